"""The CIFAR networks of the CIFAR-100 distillation benchmark (RepDistiller, Tian et al., ICLR 2020),
as flat dicts of tensors plus pure functions, in the style of resnet.py.

A separate module, so that resnet.py stays the 2017 networks (WRN, NIN, ImageNet ResNets) and this
one the benchmark's: resnet8 ... resnet110, resnet8x4, resnet32x4 and vgg8 ... vgg19 with batch
norm. What was matched, and the parameter counts, are in docs/cifar100.md.

Each f(input, params, mode, prefix='') returns (logits, group outputs): the outputs AT matches,
which that code takes as `feat[1:-1]`, each stage's output after its relu (not the stem, not the
pooled feature). Depth and widths are read from the keys, as resnet.py does.
"""
import math

import torch
import torch.nn.functional as F
from torch.nn.init import kaiming_normal_

from utils import batch_norm, count_blocks, flatten

# ---------------------------------------------------------------- initialisation as that code does it


def conv_fan_out(ni, no, k):
    # kaiming normal, fan_out, as that code initialises its convs (the 2017 WRN uses fan_in)
    return kaiming_normal_(torch.empty(no, ni, k, k), mode='fan_out', nonlinearity='relu')


def bn_ones(n):
    return {'weight': torch.ones(n), 'bias': torch.zeros(n),
            'running_mean': torch.zeros(n), 'running_var': torch.ones(n)}


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


# ---------------------------------------------------------------- the registry

MODELS = {**{name: cifar_resnet for name in RESNETS}, **{name: vgg for name in VGG_CFGS}}


def model_params(name, num_classes):
    if name in RESNETS:
        return cifar_resnet_params(*RESNETS[name], num_classes)
    return vgg_params(VGG_CFGS[name], num_classes)


def n_groups(name):
    """How many outputs AT matches: 3 stages for the ResNets, 4 for VGG (that code's feat[1:-1])."""
    return 3 if name in RESNETS else len(VGG_CFGS[name]) - 1
