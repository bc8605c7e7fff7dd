"""cifar_nets.py against independent torch.nn builds: same weights, same logits and group outputs."""
import pytest
import torch

import utils
from cifar_nets import MODELS, OTHERS, RESNETS, VGG_CFGS, cifar_resnet, model_params, n_groups, vgg
from nn_cifar_nets import NAMED, NNResNet, NNVGG, flat_state, load_flat
from resnet import CIFAR_MODELS, cifar_model_groups, cifar_model_params

# RepDistiller's published sizes for 100 classes (M), to 2 digits, and our exact counts
COUNTS = {'resnet8': 83_892, 'resnet14': 181_108, 'resnet20': 278_324, 'resnet32': 472_756, 'resnet44': 667_188,
          'resnet56': 861_620, 'resnet110': 1_736_564, 'resnet8x4': 1_233_540, 'resnet32x4': 7_433_860,
          'vgg8': 3_965_028, 'vgg11': 9_277_284, 'vgg13': 9_462_180, 'vgg16': 14_774_436, 'vgg19': 20_086_692,
          # the cross-architecture networks: RepDistiller's counts for 100 classes, exactly (issue 23)
          'ResNet50': 23_705_252, 'MobileNetV2': 812_836, 'ShuffleV1': 949_258, 'ShuffleV2': 1_355_528}
PUBLISHED = {'resnet20': 0.28, 'resnet56': 0.86, 'resnet110': 1.74, 'resnet8x4': 1.23, 'resnet32x4': 7.43,
             'vgg8': 3.96, 'vgg13': 9.46}


def nn_build(name, classes):
    if name in NAMED:
        return NAMED[name](classes)
    return NNResNet(*RESNETS[name], classes) if name in RESNETS else NNVGG(VGG_CFGS[name], classes)


@pytest.mark.parametrize('name', sorted(COUNTS))
def test_parameter_counts_match_the_torch_nn_build(name):
    with torch.device('meta'):
        params = model_params(name, 100)
        reference = sum(p.numel() for p in nn_build(name, 100).parameters())
    assert utils.n_trained(params) == COUNTS[name] == reference
    if name in PUBLISHED:
        assert round(COUNTS[name] / 1e6, 2) == pytest.approx(PUBLISHED[name], abs=0.011)


def test_resnet20_count_by_hand():
    # stem conv + bn; stage 0: 3 blocks of two 16x16 3x3 convs + 2 bns; stages 1, 2: a first block with
    # a 1x1 conv + bn shortcut, then two plain blocks; fc 64 -> 100
    stem = 3 * 16 * 9 + 2 * 16
    s0 = 3 * (2 * 16 * 16 * 9 + 4 * 16)
    s1 = (16 * 32 * 9 + 32 * 32 * 9 + 4 * 32 + 16 * 32 + 2 * 32) + 2 * (2 * 32 * 32 * 9 + 4 * 32)
    s2 = (32 * 64 * 9 + 64 * 64 * 9 + 4 * 64 + 32 * 64 + 2 * 64) + 2 * (2 * 64 * 64 * 9 + 4 * 64)
    assert stem + s0 + s1 + s2 + 64 * 100 + 100 == COUNTS['resnet20']


def perturbed(params):
    """Weights and running statistics away from their init, so that bn in eval mode is a real test."""
    g = torch.Generator().manual_seed(3)
    out = {}
    for k, v in params.items():
        v = v.double()
        if k.endswith('running_var'):
            v = v + torch.rand(v.shape, generator=g, dtype=v.dtype)
        elif k.endswith(('running_mean', 'bias', '.weight')) and v.dim() == 1:
            v = v + 0.1 * torch.randn(v.shape, generator=g, dtype=v.dtype)
        out[k] = v
    return out


@pytest.mark.parametrize('name', ['resnet8', 'resnet14', 'resnet8x4', 'vgg8', 'vgg11', *OTHERS])
def test_functional_equals_torch_nn(name):
    """Logits and group outputs in both modes, the running statistics the training pass moved, and
    the gradient of every trained tensor (grouped and depthwise convs, the shuffles' inverse)."""
    torch.manual_seed(0)
    params = perturbed(model_params(name, 7))
    net = load_flat(nn_build(name, 7).double(), params)
    utils.set_requires_grad_except_bn_(params)
    x = torch.randn(2 if name == 'ResNet50' else 3, 3, 32, 32, dtype=torch.float64)
    t = torch.arange(len(x)) * 2
    f = CIFAR_MODELS[name]
    for mode in (False, True):
        net.train(mode)
        y_ref, g_ref = net(x)
        y, g = f(x, params, mode)
        torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
        assert len(g) == len(g_ref) == n_groups(name) == cifar_model_groups(name)
        for a, b in zip(g, g_ref):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    torch.nn.functional.cross_entropy(y, t).backward()  # the training-mode pass
    torch.nn.functional.cross_entropy(y_ref, t).backward()
    for k, v in flat_state(net).items():  # train mode moved the running statistics alike
        torch.testing.assert_close(params[k], v, rtol=1e-10, atol=1e-10)
    grads, names = dict(net.named_parameters()), net.flat_names()
    trained = [k for k in params if utils.is_trained(k)]
    assert len(trained) == len(grads)
    for k in trained:
        torch.testing.assert_close(params[k].grad, grads[names[k]].grad, rtol=1e-9, atol=1e-12, msg=lambda m: f"{k}: {m}")


def test_group_shapes_and_structure_from_keys():
    """The depth is read from the keys: one function serves resnet8 and resnet32x4; the groups are
    each stage's output (3 for the ResNets, 4 for VGG, where stages 3 and 4 both run at 4x4)."""
    x = torch.randn(2, 3, 32, 32)
    _, g = cifar_resnet(x, model_params('resnet8x4', 10), False)
    assert [tuple(t.shape[1:]) for t in g] == [(64, 32, 32), (128, 16, 16), (256, 8, 8)]
    _, g = cifar_resnet(x, model_params('resnet14', 10), False)
    assert [tuple(t.shape[1:]) for t in g] == [(16, 32, 32), (32, 16, 16), (64, 8, 8)]
    assert all((t >= 0).all() for t in g)  # after the relu, as that code's AT takes them
    y, g = vgg(x, model_params('vgg8', 10), False)
    assert y.shape == (2, 10) and [tuple(t.shape[1:]) for t in g] == [(128, 16, 16), (256, 8, 8), (512, 4, 4), (512, 4, 4)]
    p = model_params('resnet8', 10)
    assert 'group0.block0.convdim' not in p and 'group1.block0.bndim.running_var' in p
    assert 'group0.block0.convdim' in model_params('resnet8x4', 10)  # 32 -> 64 channels at stride 1
    assert set(MODELS) <= set(CIFAR_MODELS) and cifar_model_params('vgg13', 16, 1, 5)['fc.weight'].shape == (5, 512)


def test_gradients_match_torch_nn():
    torch.manual_seed(4)
    params = perturbed(model_params('resnet8', 3))
    net = load_flat(NNResNet(*RESNETS['resnet8'], 3).double(), params)
    utils.set_requires_grad_except_bn_(params)
    x, t = torch.randn(4, 3, 32, 32, dtype=torch.float64), torch.tensor([0, 1, 2, 1])
    torch.nn.functional.cross_entropy(cifar_resnet(x, params, True)[0], t).backward()
    torch.nn.functional.cross_entropy(net(x)[0], t).backward()
    torch.testing.assert_close(params['group1.block0.convdim'].grad, net.layer2[0].downsample[0].weight.grad)
    torch.testing.assert_close(params['conv0'].grad, net.conv1.weight.grad)


def test_cross_architecture_structure():
    """That code's feat[1:-1] shapes, and the layers the parameter count alone would not pin down."""
    x = torch.randn(2, 3, 32, 32)
    shapes = {'ResNet50': [(256, 32, 32), (512, 16, 16), (1024, 8, 8), (2048, 4, 4)],
              'MobileNetV2': [(12, 16, 16), (16, 8, 8), (48, 4, 4), (160, 2, 2)],
              'ShuffleV1': [(240, 16, 16), (480, 8, 8), (960, 4, 4)],
              'ShuffleV2': [(116, 16, 16), (232, 8, 8), (464, 4, 4)]}
    for name, expected in shapes.items():
        p = model_params(name, 10)
        y, g = CIFAR_MODELS[name](x, p, False)
        assert y.shape == (2, 10) and [tuple(t.shape[1:]) for t in g] == expected
        assert n_groups(name) == cifar_model_groups(name) == len(expected)
    p = model_params('ShuffleV1', 10)
    assert p['group0.block0.conv0'].shape == (54, 24, 1, 1)  # after the stem: not grouped
    assert p['group0.block0.conv2'].shape == (216, 18, 1, 1)  # 216 + the 24 pooled input channels = 240
    assert p['group0.block1.conv0'].shape == (60, 80, 1, 1) and p['group0.block1.conv1'].shape == (60, 1, 3, 3)
    p = model_params('MobileNetV2', 10)
    assert p['stage0.block0.conv0'].shape == (16, 16, 1, 1)  # that code expands by t = 1 too
    assert p['stage1.block1.conv1'].shape == (72, 1, 3, 3) and p['conv1'].shape == (1280, 160, 1, 1)
    p = model_params('ShuffleV2', 10)
    assert p['group0.down.conv0'].shape == (24, 1, 3, 3) and p['group2.block2.conv2'].shape == (232, 232, 1, 1)
    assert p['conv1'].shape == (1024, 464, 1, 1)
    assert 'group0.block0.convdim' in model_params('ResNet50', 10)  # 64 -> 256 channels at stride 1
