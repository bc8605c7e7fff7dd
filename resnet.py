"""Networks as flat dicts of tensors plus pure functions.

A model is `params = {name: tensor}` and `f(input, params, mode, prefix='')`
returning `(logits, group_outputs)`. `mode` is True in training (batch norm
uses batch statistics). Structure (blocks per group, shortcut convs) is read
from the keys, so one function serves every depth and width, and a teacher
loaded from disk needs no side information to run.
"""
import torch.nn.functional as F

from utils import batch_norm, bn_params, conv_params, flatten, linear_params


def wrn_depth_to_blocks(depth):
    if depth < 10 or (depth - 4) % 6 != 0:
        raise ValueError(f'WRN depth must be 6n+4 with n >= 1 (10, 16, 22, 28, 40, ...), got {depth}')
    return (depth - 4) // 6


def wrn_params(depth, width, num_classes):
    """Pre-activation Wide ResNet (CIFAR), with the 2017 reference's names and init."""
    n = wrn_depth_to_blocks(depth)
    widths = [int(w * width) for w in (16, 32, 64)]

    def block(ni, no):
        p = {'conv0': conv_params(ni, no, 3), 'conv1': conv_params(no, no, 3),
             'bn0': bn_params(ni), 'bn1': bn_params(no)}
        if ni != no:
            p['convdim'] = conv_params(ni, no, 1)
        return p

    def group(ni, no):
        return {f'block{i}': block(ni if i == 0 else no, no) for i in range(n)}

    return flatten({
        'conv0': conv_params(3, 16, 3),
        'group0': group(16, widths[0]),
        'group1': group(widths[0], widths[1]),
        'group2': group(widths[1], widths[2]),
        'bn': bn_params(widths[2]),
        'fc': linear_params(widths[2], num_classes),
    })


def count_blocks(params, prefix, group):
    head = f'{prefix}group{group}.block'
    return sum(1 for k in params if k.startswith(head) and k.endswith('.conv0'))


def wrn(input, params, mode, prefix=''):
    """Forward pass of `wrn_params`: (logits, (g0, g1, g2)), groups before the head's bn."""
    def block(x, base, stride):
        o1 = F.relu(batch_norm(x, params, base + '.bn0', mode))
        y = F.conv2d(o1, params[base + '.conv0'], stride=stride, padding=1)
        o2 = F.relu(batch_norm(y, params, base + '.bn1', mode))
        z = F.conv2d(o2, params[base + '.conv1'], stride=1, padding=1)
        if base + '.convdim' in params:
            return z + F.conv2d(o1, params[base + '.convdim'], stride=stride)
        return z + x

    n = count_blocks(params, prefix, 0)

    def group(o, g, stride):
        for i in range(n):
            o = block(o, f'{prefix}group{g}.block{i}', stride if i == 0 else 1)
        return o

    x = F.conv2d(input, params[prefix + 'conv0'], padding=1)
    g0 = group(x, 0, 1)
    g1 = group(g0, 1, 2)
    g2 = group(g1, 2, 2)
    o = F.relu(batch_norm(g2, params, prefix + 'bn', mode))
    o = F.adaptive_avg_pool2d(o, 1).flatten(1)  # = avg_pool2d(o, 8) on 32x32 inputs
    o = F.linear(o, params[prefix + 'fc.weight'], params[prefix + 'fc.bias'])
    return o, (g0, g1, g2)


def resnet(depth, width, num_classes):
    """The 2017 entry point: returns (f, flat_params)."""
    return wrn, wrn_params(depth, width, num_classes)
