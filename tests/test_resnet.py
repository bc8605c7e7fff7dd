import pytest
import torch

import utils
from resnet import wrn, wrn_params
from nn_wrn import NNWideResNet


@pytest.mark.parametrize('depth,width,count', [
    (16, 1, 175_066), (16, 2, 691_674), (40, 1, 563_930), (40, 2, 2_243_546)])
def test_trainable_parameter_counts(depth, width, count):
    with torch.device('meta'):
        params = wrn_params(depth, width, 10)
    assert utils.n_trained(params) == count


def test_the_2017_count_takes_the_batch_norm_statistics_too():
    """log.txt's n_parameters as the 2017 code logged it for WRN-16-1 on CIFAR-10."""
    with torch.device('meta'):
        params = wrn_params(16, 1, 10)
    assert sum(v.numel() for v in params.values()) == 175_994


def test_names_match_the_2017_layout():
    params = wrn_params(16, 2, 10)
    nn_names = set(NNWideResNet(16, 2, 10).flat_state())
    assert set(params) == nn_names
    assert 'group0.block0.convdim' in params and 'group0.block1.convdim' not in params
    assert {'conv0', 'bn.running_var', 'fc.weight', 'fc.bias', 'group2.block1.bn1.running_mean'} <= set(params)
    # WRN-16-1: group0 keeps 16 channels, so its first block has no shortcut conv
    assert 'group0.block0.convdim' not in wrn_params(16, 1, 10)


def test_init():
    torch.manual_seed(0)
    p = wrn_params(16, 4, 10)
    w = p['group2.block1.conv1']  # 256 x 256 x 3 x 3
    assert w.std().item() == pytest.approx((2 / (256 * 9)) ** 0.5, rel=0.02)  # kaiming normal, fan_in
    assert abs(w.mean().item()) < 1e-3
    bn = p['group1.block0.bn0.weight']
    assert (bn >= 0).all() and (bn < 1).all() and bn.std() > 0.1
    assert (p['fc.bias'] == 0).all() and (p['bn.bias'] == 0).all()
    assert (p['bn.running_mean'] == 0).all() and (p['bn.running_var'] == 1).all()


@pytest.mark.parametrize('depth,width', [(10, 1), (16, 2)])
def test_functional_wrn_equals_torch_nn(depth, width):
    torch.manual_seed(1)
    params = wrn_params(depth, width, 7)
    # move bn stats away from their init so eval mode is a real test
    for k in params:
        if 'running' in k:
            params[k] = params[k] + torch.rand_like(params[k])
    net = NNWideResNet(depth, width, 7).double().load_flat_state({k: v.double() for k, v in params.items()})
    params = {k: v.double() for k, v in params.items()}
    x = torch.randn(5, 3, 32, 32, dtype=torch.float64)

    for mode in (False, True):
        net.train(mode)
        y_ref, g_ref = net(x)
        y, g = wrn(x, params, mode)
        torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
        assert len(g) == 3
        for a, b in zip(g, g_ref):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    # train mode updated running stats in both, identically
    for k, v in net.flat_state().items():
        torch.testing.assert_close(params[k], v, rtol=1e-10, atol=1e-10)
    assert g[0].shape[1:] == (int(16 * width), 32, 32) and g[2].shape[1:] == (int(64 * width), 8, 8)


def test_gradients_match_torch_nn():
    torch.manual_seed(2)
    params = {k: v.double() for k, v in wrn_params(10, 1, 3).items()}
    net = NNWideResNet(10, 1, 3).double().load_flat_state(params)
    utils.set_requires_grad_except_bn_(params)
    x, t = torch.randn(4, 3, 32, 32, dtype=torch.float64), torch.tensor([0, 1, 2, 1])
    torch.nn.functional.cross_entropy(wrn(x, params, True)[0], t).backward()
    torch.nn.functional.cross_entropy(net(x)[0], t).backward()
    assert net.fc.weight.grad is not None
    torch.testing.assert_close(params['fc.weight'].grad, net.fc.weight.grad)
    torch.testing.assert_close(params['conv0'].grad, net.conv0.weight.grad)
    torch.testing.assert_close(params['group1.block0.convdim'].grad, net.groups[1][0].convdim.weight.grad)
    assert not params['bn.running_mean'].requires_grad


@pytest.mark.parametrize('depth', [0, 4, 11, 15, 17])
def test_depth_must_be_6n_plus_4(depth):
    with pytest.raises(ValueError, match='6n\\+4'):
        wrn_params(depth, 1, 10)


def test_nin_sizes_and_groups():
    from resnet import nin, nin_params
    # by hand: NIN-wide's convs, 3*192*25 + 192*160 + 160*96 + 96*192*25 + 2*192*192 + 192*192*9
    # + 192*192 + 192*10, plus the class bias and batch-norm weights and biases
    convs = 3 * 192 * 25 + 192 * 160 + 160 * 96 + 96 * 192 * 25 + 2 * 192 ** 2 + 192 * 192 * 9 + 192 ** 2 + 1920
    bn = 2 * (192 + 160 + 96 + 192 * 5)
    with torch.device('meta'):
        assert utils.n_trained(nin_params(1, 10)) == convs + bn + 10
        thin = utils.n_trained(nin_params(0.45, 10))
    assert 190_000 < thin < 210_000  # the paper's 0.2M
    y, groups = nin(torch.randn(2, 3, 32, 32), nin_params(0.45, 10), True)
    assert y.shape == (2, 10)
    assert [tuple(g.shape[1:]) for g in groups] == [(43, 32, 32), (86, 16, 16), (86, 8, 8)]
    # the spatial sizes match NIN-wide's, so AT needs no pooling between thin and wide
    assert [g.shape[-1] for g in nin(torch.randn(1, 3, 32, 32), nin_params(1, 10), False)[1]] == [32, 16, 8]
