"""The CIFAR networks of the CIFAR-100 distillation benchmark (RepDistiller, Tian et al., ICLR 2020),
as flat dicts of tensors plus pure functions, in the style of resnet.py.

A separate module, so that resnet.py stays the 2017 networks (WRN, NIN, ImageNet ResNets) and this
one the benchmark's: resnet8 ... resnet110, resnet8x4, resnet32x4, vgg8 ... vgg19 with batch norm,
and the cross-architecture networks ResNet50, MobileNetV2 (that code's mobile_half), ShuffleV1 and
ShuffleV2. What was matched, and the parameter counts, are in docs/cifar100.md.

Each f(input, params, mode, prefix='') returns (logits, group outputs): the outputs AT matches,
which that code takes as `feat[1:-1]` of `forward(x, is_feat=True, preact=False)`: each stage's
output (not the stem, not the pooled feature). Depth and widths are read from the keys, as
resnet.py does.
"""
import math

import torch
import torch.nn.functional as F
from torch.nn.init import kaiming_normal_, kaiming_uniform_

from utils import batch_norm, count_blocks, flatten

# ---------------------------------------------------------------- initialisation as that code does it


def conv_fan_out(ni, no, k):
    # kaiming normal, fan_out, as that code initialises its convs (the 2017 WRN uses fan_in)
    return kaiming_normal_(torch.empty(no, ni, k, k), mode='fan_out', nonlinearity='relu')


def bn_ones(n):
    return {'weight': torch.ones(n), 'bias': torch.zeros(n),
            'running_mean': torch.zeros(n), 'running_var': torch.ones(n)}


def conv_default(ni, no, k, groups=1):
    # torch.nn.Conv2d's own init (uniform, bound 1/sqrt(fan_in)), which the ShuffleNets leave in place
    return kaiming_uniform_(torch.empty(no, ni // groups, k, k), a=math.sqrt(5))


def linear_default(ni, no):
    # torch.nn.Linear's own init, which that code leaves in place for its ResNets
    bound = 1 / math.sqrt(ni)
    return {'weight': torch.empty(no, ni).uniform_(-bound, bound), 'bias': torch.empty(no).uniform_(-bound, bound)}


# ---------------------------------------------------------------- post-activation CIFAR ResNets

RESNET_WIDTHS = {'': [16, 16, 32, 64], 'x4': [32, 64, 128, 256]}
RESNETS = {**{f'resnet{d}': (d, RESNET_WIDTHS['']) for d in (8, 14, 20, 32, 44, 56, 110)},
           **{f'resnet{d}x4': (d, RESNET_WIDTHS['x4']) for d in (8, 32)}}


def cifar_resnet_params(depth, widths, num_classes):
    """He et al.'s CIFAR ResNet, depth 6n+2: a 3x3 stem, three stages of n basic blocks (strides
    1, 2, 2), a 1x1 conv + bn shortcut wherever a block changes shape."""
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f'CIFAR ResNet depth must be 6n+2 with n >= 1, got {depth}')
    n = (depth - 2) // 6

    def block(ni, no, stride):
        p = {'conv0': conv_fan_out(ni, no, 3), 'bn0': bn_ones(no), 'conv1': conv_fan_out(no, no, 3), 'bn1': bn_ones(no)}
        if stride != 1 or ni != no:
            p.update(convdim=conv_fan_out(ni, no, 1), bndim=bn_ones(no))
        return p

    p, ni = {'conv0': conv_fan_out(3, widths[0], 3), 'bn0': bn_ones(widths[0])}, widths[0]
    for g, (no, stride) in enumerate(zip(widths[1:], (1, 2, 2))):
        p[f'group{g}'] = {f'block{i}': block(ni if i == 0 else no, no, stride if i == 0 else 1) for i in range(n)}
        ni = no
    p['fc'] = linear_default(ni, num_classes)
    return flatten(p)


def cifar_resnet(input, params, mode, prefix=''):
    """Forward pass of `cifar_resnet_params`: (logits, (g0, g1, g2)), each stage's output after its relu."""
    def block(x, base, stride):
        o = F.relu(batch_norm(F.conv2d(x, params[base + '.conv0'], stride=stride, padding=1), params, base + '.bn0', mode))
        z = batch_norm(F.conv2d(o, params[base + '.conv1'], padding=1), params, base + '.bn1', mode)
        if base + '.convdim' in params:
            x = batch_norm(F.conv2d(x, params[base + '.convdim'], stride=stride), params, base + '.bndim', mode)
        return F.relu(z + x)

    o = F.relu(batch_norm(F.conv2d(input, params[prefix + 'conv0'], padding=1), params, prefix + 'bn0', mode))
    groups = []
    for g, stride in enumerate((1, 2, 2)):
        for i in range(count_blocks(params, g, prefix)):
            o = block(o, f'{prefix}group{g}.block{i}', stride if i == 0 else 1)
        groups.append(o)
    o = F.adaptive_avg_pool2d(o, 1).flatten(1)  # = avg_pool2d(o, 8) on 32x32 inputs
    return F.linear(o, params[prefix + 'fc.weight'], params[prefix + 'fc.bias']), tuple(groups)


# ---------------------------------------------------------------- VGG with batch norm, for CIFAR

# five stages of 3x3 convs (widths per stage); vgg8 is that code's cfg S, vgg11/13/16/19 the usual A/B/D/E
VGG_CFGS = {
    'vgg8': [[64], [128], [256], [512], [512]],
    'vgg11': [[64], [128], [256, 256], [512, 512], [512, 512]],
    'vgg13': [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    'vgg16': [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    'vgg19': [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
}


def vgg_params(cfg, num_classes):
    """Convs with a bias, each followed by batch norm; one linear classifier on the pooled 512 channels."""
    p, ni = {}, 3
    for b, widths in enumerate(cfg):
        for i, no in enumerate(widths):
            w = conv_fan_out(ni, no, 3)
            p[f'block{b}.conv{i}'] = {'weight': w, 'bias': torch.zeros(no)}
            p[f'block{b}.bn{i}'] = bn_ones(no)
            ni = no
    # that code's classifier init: normal(0, 0.01), bias 0
    p['fc'] = {'weight': torch.randn(num_classes, ni) * 0.01, 'bias': torch.zeros(num_classes)}
    return flatten(p)


def vgg(input, params, mode, prefix=''):
    """Forward pass of `vgg_params`: (logits, (g1, g2, g3, g4)), the outputs of stages 1 to 4 after
    their relu. Max pools follow stages 0, 1 and 2 (and 3 on 64-pixel inputs, as in that code), so
    on CIFAR stages 3 and 4 both run at 4x4; the head pools globally."""
    o, groups = input, []
    n_blocks = 1 + max(int(k[len(prefix) + 5:].split('.')[0]) for k in params
                       if k.startswith(prefix + 'block') and k.endswith('.weight'))
    for b in range(n_blocks):
        i = 0
        while f'{prefix}block{b}.conv{i}.weight' in params:
            conv, bn = f'{prefix}block{b}.conv{i}', f'{prefix}block{b}.bn{i}'
            o = F.conv2d(o, params[conv + '.weight'], params[conv + '.bias'], padding=1)
            o = F.relu(batch_norm(o, params, bn, mode))
            i += 1
        if b > 0:
            groups.append(o)
        if b < 3 or (b == 3 and input.shape[-1] == 64):
            o = F.max_pool2d(o, 2, 2)
    o = F.adaptive_avg_pool2d(o, 1).flatten(1)
    return F.linear(o, params[prefix + 'fc.weight'], params[prefix + 'fc.bias']), tuple(groups)


# ---------------------------------------------------------------- the cross-architecture networks


def count_stages(params, prefix='', head='group'):
    n = 0
    while f'{prefix}{head}{n}.block0.conv0' in params:
        n += 1
    return n


def conv_bn(x, params, base, j, mode, stride=1):
    """Conv `base + 'conv{j}'` (padded to keep the size; its groups, 1, grouped or depthwise, read from
    the weight), then batch norm `base + 'bn{j}'`."""
    w = params[f'{base}conv{j}']
    o = F.conv2d(x, w, stride=stride, padding=w.shape[-1] // 2, groups=x.shape[1] // w.shape[1])
    return batch_norm(o, params, f'{base}bn{j}', mode)


# ResNet-50 of that code's models/resnetv2.py: a 3x3 64-channel stem at stride 1 (no max pool), four
# stages of bottleneck blocks (1x1, 3x3 at the stage's stride, 1x1 to 4x the width) at strides 1, 2, 2, 2
BOTTLENECK_WIDTHS, BOTTLENECK_EXPANSION = (64, 128, 256, 512), 4


def bottleneck_resnet_params(blocks, num_classes):
    """Widths 64-128-256-512 (outputs 4x that), a 1x1 conv + bn shortcut wherever a block changes
    shape; init as that code: convs kaiming normal (fan_out), bn 1 and 0, torch.nn's linear."""
    def block(ni, width, stride):
        no = width * BOTTLENECK_EXPANSION
        p = {'conv0': conv_fan_out(ni, width, 1), 'bn0': bn_ones(width),
             'conv1': conv_fan_out(width, width, 3), 'bn1': bn_ones(width),
             'conv2': conv_fan_out(width, no, 1), 'bn2': bn_ones(no)}
        if stride != 1 or ni != no:
            p.update(convdim=conv_fan_out(ni, no, 1), bndim=bn_ones(no))
        return p

    p, ni = {'conv0': conv_fan_out(3, 64, 3), 'bn0': bn_ones(64)}, 64
    for g, (n, width, stride) in enumerate(zip(blocks, BOTTLENECK_WIDTHS, (1, 2, 2, 2))):
        no = width * BOTTLENECK_EXPANSION
        p[f'group{g}'] = {f'block{i}': block(ni if i == 0 else no, width, stride if i == 0 else 1) for i in range(n)}
        ni = no
    p['fc'] = linear_default(ni, num_classes)
    return flatten(p)


def bottleneck_resnet(input, params, mode, prefix=''):
    """Forward pass of `bottleneck_resnet_params`: (logits, (g0, g1, g2, g3)), each stage's output
    after its relu (32x32, 16x16, 8x8, 4x4 on CIFAR)."""
    def block(x, base, stride):
        o = F.relu(conv_bn(x, params, base, 0, mode))
        o = F.relu(conv_bn(o, params, base, 1, mode, stride))
        z = conv_bn(o, params, base, 2, mode)
        if base + 'convdim' in params:
            x = conv_bn(x, params, base, 'dim', mode, stride)
        return F.relu(z + x)

    o = F.relu(conv_bn(input, params, prefix, 0, mode))
    groups = []
    for g in range(count_stages(params, prefix)):
        for i in range(count_blocks(params, g, prefix)):
            o = block(o, f'{prefix}group{g}.block{i}.', 2 if g > 0 and i == 0 else 1)
        groups.append(o)
    o = F.adaptive_avg_pool2d(o, 1).flatten(1)
    return F.linear(o, params[prefix + 'fc.weight'], params[prefix + 'fc.bias']), tuple(groups)


# MobileNetV2 of that code's models/mobilenetv2.py: per stage (expansion t, channels c at width 1,
# blocks n, first stride s). Its stem is a 3x3 conv at stride 2; every inverted residual block,
# the first (t = 1) included, is 1x1 expand-bn-relu, 3x3 depthwise-bn-relu, 1x1 project-bn, plus the
# input where the block keeps shape. A 1x1 conv-bn-relu to 1280 channels precedes the pooling.
MOBILENETV2_STAGES = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                      (6, 160, 3, 2), (6, 320, 1, 1))
MOBILENETV2_GROUPS = (1, 2, 4, 6)  # the stages whose outputs are that code's f1 ... f4


def mobilenetv2_params(width_mult, num_classes, expansion=6):
    """That code's mobilenetv2_T_w(T=expansion, W=width_mult); mobile_half is (6, 0.5). Init as
    there: convs normal with std sqrt(2 / (k * k * out channels)) (kaiming fan_out, depthwise too),
    bn 1 and 0, the classifier normal(0, 0.01) with a zero bias."""
    ni = int(32 * width_mult)
    p = {'conv0': conv_fan_out(3, ni, 3), 'bn0': bn_ones(ni)}
    for s, (t, c, n, _) in enumerate(MOBILENETV2_STAGES):
        t, no = expansion if t != 1 else 1, int(c * width_mult)
        stage = {}
        for i in range(n):
            cin = ni if i == 0 else no
            hidden = cin * t
            stage[f'block{i}'] = {'conv0': conv_fan_out(cin, hidden, 1), 'bn0': bn_ones(hidden),
                                  'conv1': conv_fan_out(1, hidden, 3), 'bn1': bn_ones(hidden),  # depthwise
                                  'conv2': conv_fan_out(hidden, no, 1), 'bn2': bn_ones(no)}
        p[f'stage{s}'] = stage
        ni = no
    last = int(1280 * width_mult) if width_mult > 1 else 1280
    p['conv1'], p['bn1'] = conv_fan_out(ni, last, 1), bn_ones(last)
    p['fc'] = {'weight': torch.randn(num_classes, last) * 0.01, 'bias': torch.zeros(num_classes)}
    return flatten(p)


def mobilenetv2(input, params, mode, prefix=''):
    """Forward pass of `mobilenetv2_params`: (logits, (g1, g2, g3, g4)), the outputs of stages 1, 2,
    4 and 6 (16x16, 8x8, 4x4, 2x2 on CIFAR). They end in bn (a linear bottleneck): no relu."""
    def block(x, base, stride):
        o = F.relu(conv_bn(x, params, base, 0, mode))
        o = F.relu(conv_bn(o, params, base, 1, mode, stride))
        o = conv_bn(o, params, base, 2, mode)
        return o + x if o.shape == x.shape else o  # stride 1 and the same channels

    o = F.relu(conv_bn(input, params, prefix, 0, mode, 2))
    groups = []
    for s in range(count_stages(params, prefix, 'stage')):
        for i in range(count_blocks(params, s, prefix, head='stage')):
            o = block(o, f'{prefix}stage{s}.block{i}.', MOBILENETV2_STAGES[s][3] if i == 0 else 1)
        if s in MOBILENETV2_GROUPS:
            groups.append(o)
    o = F.relu(conv_bn(o, params, prefix, 1, mode))
    o = F.adaptive_avg_pool2d(o, 1).flatten(1)  # = that code's AvgPool2d(2, ceil_mode=True) on 32x32 inputs
    return F.linear(o, params[prefix + 'fc.weight'], params[prefix + 'fc.bias']), tuple(groups)


# ShuffleNet V1 of that code's models/ShuffleNetv1.py: a 1x1 conv-bn-relu stem to 24 channels at
# stride 1, three stages whose first block halves the size and concatenates its 3x3-average-pooled
# input (so it adds width - input channels), and torch.nn's default init throughout.
def shufflev1_params(widths, blocks, groups, num_classes):
    """Each block: 1x1 grouped conv to a quarter of its output, bn, relu, channel shuffle, 3x3
    depthwise conv, bn, 1x1 grouped conv, bn. The first 1x1 conv after the stem is not grouped."""
    p, ni = {'conv0': conv_default(3, 24, 1), 'bn0': bn_ones(24)}, 24
    for g, (width, n) in enumerate(zip(widths, blocks)):
        stage = {}
        for i in range(n):
            no = width - ni if i == 0 else width
            mid, g0 = no // 4, 1 if ni == 24 else groups
            stage[f'block{i}'] = {'conv0': conv_default(ni, mid, 1, g0), 'bn0': bn_ones(mid),
                                  'conv1': conv_default(mid, mid, 3, mid), 'bn1': bn_ones(mid),
                                  'conv2': conv_default(mid, no, 1, groups), 'bn2': bn_ones(no)}
            ni = width
        p[f'group{g}'] = stage
    p['fc'] = linear_default(ni, num_classes)
    return flatten(p)


def shufflev1(input, params, mode, prefix=''):
    """Forward pass of `shufflev1_params`: (logits, (g0, g1, g2)), each stage's output after its
    relu (16x16, 8x8, 4x4 on CIFAR). Groups are read from the weights' shapes."""
    def block(x, base, stride):
        o = F.relu(conv_bn(x, params, base, 0, mode))
        o = F.channel_shuffle(o, x.shape[1] // params[base + 'conv0'].shape[1])  # as many as conv0's groups
        o = F.relu(conv_bn(o, params, base, 1, mode, stride))
        o = conv_bn(o, params, base, 2, mode)
        if stride == 2:
            return F.relu(torch.cat([o, F.avg_pool2d(x, 3, 2, 1)], 1))
        return F.relu(o + x)

    o = F.relu(conv_bn(input, params, prefix, 0, mode))
    groups = []
    for g in range(count_stages(params, prefix)):
        for i in range(count_blocks(params, g, prefix)):
            o = block(o, f'{prefix}group{g}.block{i}.', 2 if i == 0 else 1)
        groups.append(o)
    o = F.adaptive_avg_pool2d(o, 1).flatten(1)  # = that code's avg_pool2d(o, 4) on 32x32 inputs
    return F.linear(o, params[prefix + 'fc.weight'], params[prefix + 'fc.bias']), tuple(groups)


# ShuffleNet V2 of that code's models/ShuffleNetv2.py: the same 1x1 stem, three stages of a
# down-sampling block and n basic blocks, a 1x1 conv-bn-relu to widths[3] channels, torch.nn's init
def shufflev2_params(widths, blocks, num_classes):
    """Down block: left, 3x3 depthwise (stride 2)-bn, 1x1-bn-relu; right, 1x1-bn-relu, 3x3
    depthwise (stride 2)-bn, 1x1-bn-relu; each to half the width. Basic block: half the channels
    pass, the other half go through 1x1-bn-relu, 3x3 depthwise-bn, 1x1-bn-relu."""
    def convs(*shapes):  # (ni, no, k, groups) per conv, each followed by its bn
        p = {}
        for j, (ni, no, k, g) in enumerate(shapes):
            p[f'conv{j}'], p[f'bn{j}'] = conv_default(ni, no, k, g), bn_ones(no)
        return p

    p, ni = {'conv0': conv_default(3, 24, 1), 'bn0': bn_ones(24)}, 24
    for g, (no, n) in enumerate(zip(widths[:3], blocks)):
        mid, half = no // 2, int(no * 0.5)
        p[f'group{g}'] = {'down': convs((ni, ni, 3, ni), (ni, mid, 1, 1), (ni, mid, 1, 1), (mid, mid, 3, mid),
                                        (mid, mid, 1, 1)),
                          **{f'block{i}': convs((half, half, 1, 1), (half, half, 3, half), (half, half, 1, 1))
                             for i in range(n)}}
        ni = no
    p['conv1'], p['bn1'] = conv_default(ni, widths[3], 1), bn_ones(widths[3])
    p['fc'] = linear_default(widths[3], num_classes)
    return flatten(p)


def shufflev2(input, params, mode, prefix=''):
    """Forward pass of `shufflev2_params`: (logits, (g0, g1, g2)), each stage's output after its
    last channel shuffle (16x16, 8x8, 4x4 on CIFAR)."""
    def down(x, base):
        left = conv_bn(x, params, base, 0, mode, 2)
        left = F.relu(conv_bn(left, params, base, 1, mode))
        right = F.relu(conv_bn(x, params, base, 2, mode))
        right = conv_bn(right, params, base, 3, mode, 2)
        right = F.relu(conv_bn(right, params, base, 4, mode))
        return F.channel_shuffle(torch.cat([left, right], 1), 2)

    def block(x, base):
        c = int(x.shape[1] * 0.5)  # that code's split: the first half passes unchanged
        o = F.relu(conv_bn(x[:, c:], params, base, 0, mode))
        o = conv_bn(o, params, base, 1, mode)
        o = F.relu(conv_bn(o, params, base, 2, mode))
        return F.channel_shuffle(torch.cat([x[:, :c], o], 1), 2)

    o = F.relu(conv_bn(input, params, prefix, 0, mode))
    groups = []
    for g in range(count_stages(params, prefix)):
        o = down(o, f'{prefix}group{g}.down.')
        for i in range(count_blocks(params, g, prefix)):
            o = block(o, f'{prefix}group{g}.block{i}.')
        groups.append(o)
    o = F.relu(conv_bn(o, params, prefix, 1, mode))
    o = F.adaptive_avg_pool2d(o, 1).flatten(1)  # = that code's avg_pool2d(o, 4) on 32x32 inputs
    return F.linear(o, params[prefix + 'fc.weight'], params[prefix + 'fc.bias']), tuple(groups)


# ---------------------------------------------------------------- the registry

# the cross-architecture networks, as that code's model_dict names them: (f, params(num_classes), group outputs)
OTHERS = {
    'ResNet50': (bottleneck_resnet, lambda c: bottleneck_resnet_params((3, 4, 6, 3), c), 4),
    'MobileNetV2': (mobilenetv2, lambda c: mobilenetv2_params(0.5, c), 4),  # mobile_half
    'ShuffleV1': (shufflev1, lambda c: shufflev1_params((240, 480, 960), (4, 8, 4), 3, c), 3),
    'ShuffleV2': (shufflev2, lambda c: shufflev2_params((116, 232, 464, 1024), (3, 7, 3), c), 3),  # net size 1
}
MODELS = {**{name: cifar_resnet for name in RESNETS}, **{name: vgg for name in VGG_CFGS},
          **{name: f for name, (f, _, _) in OTHERS.items()}}


def model_params(name, num_classes):
    if name in RESNETS:
        return cifar_resnet_params(*RESNETS[name], num_classes)
    if name in OTHERS:
        return OTHERS[name][1](num_classes)
    return vgg_params(VGG_CFGS[name], num_classes)


def n_groups(name):
    """How many outputs AT matches (that code's feat[1:-1]): 3 stages for the CIFAR ResNets and the
    ShuffleNets, 4 for VGG, ResNet50 and MobileNetV2."""
    if name in OTHERS:
        return OTHERS[name][2]
    return 3 if name in RESNETS else len(VGG_CFGS[name]) - 1
