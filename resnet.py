"""Networks as flat dicts of tensors plus pure functions.

A model is `params = {name: tensor}` and `f(input, params, mode, prefix='')`
returning `(logits, group_outputs)`. `mode` is True in training (batch norm
uses batch statistics). Structure (blocks per group, shortcut convs) is read
from the keys, so one function serves every depth and width, and a teacher
loaded from disk needs no side information to run.
"""
import math

import torch
import torch.nn.functional as F

import cifar_nets
from utils import batch_norm, bn_params, conv_params, count_blocks, flatten, linear_params


def wrn_depth_to_blocks(depth):
    if depth < 10 or (depth - 4) % 6 != 0:
        raise ValueError(f'WRN depth must be 6n+4 with n >= 1 (10, 16, 22, 28, 40, ...), got {depth}')
    return (depth - 4) // 6


def wrn_params(depth, width, num_classes, init='2017'):
    """Pre-activation Wide ResNet (CIFAR), with the 2017 reference's names. init '2017': its init
    (kaiming fan_in convs and linear weight, bn weights uniform in [0, 1)); 'crd': that of RepDistiller's
    models/wrn.py (kaiming fan_out convs, bn weight 1, torch.nn.Linear's default weight, zero bias)."""
    n = wrn_depth_to_blocks(depth)
    widths = [int(w * width) for w in (16, 32, 64)]
    conv, bn, linear = WRN_INITS[init]

    def block(ni, no):
        p = {'conv0': conv(ni, no, 3), 'conv1': conv(no, no, 3), 'bn0': bn(ni), 'bn1': bn(no)}
        if ni != no:
            p['convdim'] = conv(ni, no, 1)
        return p

    def group(ni, no):
        return {f'block{i}': block(ni if i == 0 else no, no) for i in range(n)}

    return flatten({
        'conv0': conv(3, 16, 3),
        'group0': group(16, widths[0]),
        'group1': group(widths[0], widths[1]),
        'group2': group(widths[1], widths[2]),
        'bn': bn(widths[2]),
        'fc': linear(widths[2], num_classes),
    })


def linear_default_weight(ni, no):
    # torch.nn.Linear's default weight, uniform in +-1/sqrt(ni), which RepDistiller's wrn.py keeps; its bias it zeroes
    bound = 1 / math.sqrt(ni)
    return {'weight': torch.empty(no, ni).uniform_(-bound, bound), 'bias': torch.zeros(no)}


# --init of the WRN: (conv, bn, linear) tensor makers
WRN_INITS = {'2017': (conv_params, bn_params, linear_params),
             'crd': (cifar_nets.conv_fan_out, cifar_nets.bn_ones, linear_default_weight)}


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

    n = count_blocks(params, 0, prefix)

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


# ---------------------------------------------------------------- Network-in-Network (CIFAR)

# Lin et al.'s CIFAR NIN: three mlpconv blocks (a k x k conv, then two 1x1 convs), each conv
# followed by batch norm and relu. These are NIN-wide's widths (965,568 conv weights, about
# 0.97M trained parameters with batch norm: the paper's 1M). --width scales every hidden width:
# 0.45 gives NIN-thin (about 0.2M: the paper's 0.2M). The last 1x1 conv maps to the classes and
# is pooled globally into the logits.
NIN_BLOCKS = [(5, [192, 160, 96]), (5, [192, 192, 192]), (3, [192, 192, None])]


def nin_params(width, num_classes):
    p, ni = {}, 3
    for b, (k, widths) in enumerate(NIN_BLOCKS):
        for i, no in enumerate(widths):
            last = no is None
            no = num_classes if last else int(no * width)
            p[f'block{b}.conv{i}'] = conv_params(ni, no, k if i == 0 else 1)
            if last:
                p[f'block{b}.conv{i}.bias'] = torch.zeros(no)
            else:
                p[f'block{b}.bn{i}'] = bn_params(no)
            ni = no
    return flatten(p)


def nin(input, params, mode, prefix=''):
    """Forward pass of `nin_params`: (logits, (g0, g1, g2)), each block's last hidden activation
    (for the last block, the one before the classifier conv)."""
    o, groups = input, []
    for b, (k, widths) in enumerate(NIN_BLOCKS):
        if b == 1:
            o = F.max_pool2d(o, 3, 2, 1)
        elif b == 2:
            o = F.avg_pool2d(o, 3, 2, 1)
        for i in range(len(widths)):
            conv, bn = f'{prefix}block{b}.conv{i}', f'{prefix}block{b}.bn{i}'
            o = F.conv2d(o, params[conv], params.get(conv + '.bias'), padding=k // 2 if i == 0 else 0)
            if bn + '.weight' in params:  # every conv but the classifier
                o = F.relu(batch_norm(o, params, bn, mode))
                last_hidden = o
        groups.append(last_hidden)
    return F.adaptive_avg_pool2d(o, 1).flatten(1), tuple(groups)


# wrn and nin take --depth and --width; the CIFAR-100 benchmark's networks are named in full
CIFAR_MODELS = {'wrn': wrn, 'nin': nin, **cifar_nets.MODELS}
# --init: the initialisations each network has, its default first; the benchmark's others: ('crd',)
INITS = tuple(WRN_INITS)
INITS_OF = {'wrn': ('2017', 'crd'), 'nin': ('2017',)}


def cifar_model_params(model, depth, width, num_classes, init=None):
    """A CIFAR network's parameters; `init` (INITS) matters to the WRN alone, the only one with two."""
    if model == 'wrn':
        return wrn_params(depth, width, num_classes, init or '2017')
    if model == 'nin':
        return nin_params(width, num_classes)
    return cifar_nets.model_params(model, num_classes)


def cifar_model_name(model, depth, width):
    return {'wrn': f'WRN-{depth}-{width:g}', 'nin': f'NIN-{width:g}'}.get(model, model)


def cifar_model_groups(model):
    """How many group outputs the model returns: the count of AT terms."""
    return 3 if model in ('wrn', 'nin') else cifar_nets.n_groups(model)


def cifar_model_head(model):
    """The key of the classifier's bias or weight, whose rows are the classes."""
    return 'block2.conv2.bias' if model == 'nin' else 'fc.weight'


# ---------------------------------------------------------------- ImageNet ResNets

IMAGENET_BLOCKS = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3]}


def resnet_imagenet_params(depth, width, num_classes=1000):
    """Post-activation basic-block ResNet-18/34; a 1x1 conv, without bn, where a shortcut changes channels.
    As in 2017, the stem has 64 channels at any width: only the groups scale with `width`."""
    if depth not in IMAGENET_BLOCKS:
        raise ValueError(f'ImageNet ResNet depth must be one of {sorted(IMAGENET_BLOCKS)}, got {depth}')
    widths = [int(w * width) for w in (64, 128, 256, 512)]

    def block(ni, no):
        p = {'conv0': conv_params(ni, no, 3), 'bn0': bn_params(no),
             'conv1': conv_params(no, no, 3), 'bn1': bn_params(no)}
        if ni != no:
            p['convdim'] = conv_params(ni, no, 1)
        return p

    groups, ni = {}, 64
    for g, (n, no) in enumerate(zip(IMAGENET_BLOCKS[depth], widths)):
        groups[f'group{g}'] = {f'block{i}': block(ni if i == 0 else no, no) for i in range(n)}
        ni = no
    return flatten({'conv0': conv_params(3, 64, 7), 'bn0': bn_params(64), **groups,
                    'fc': linear_params(widths[3], num_classes)})


def resnet_imagenet(input, params, mode, prefix=''):
    """Forward pass of `resnet_imagenet_params`: (logits, [g0, g1, g2, g3])."""
    def block(x, base, stride):
        o = F.relu(batch_norm(F.conv2d(x, params[base + '.conv0'], stride=stride, padding=1),
                              params, base + '.bn0', mode))
        z = batch_norm(F.conv2d(o, params[base + '.conv1'], padding=1), params, base + '.bn1', mode)
        if base + '.convdim' in params:
            return F.relu(z + F.conv2d(x, params[base + '.convdim'], stride=stride))
        return F.relu(z + x)

    o = F.conv2d(input, params[prefix + 'conv0'], stride=2, padding=3)
    o = F.max_pool2d(F.relu(batch_norm(o, params, prefix + 'bn0', mode)), 3, 2, 1)
    groups = []
    for g in range(4):
        for i in range(count_blocks(params, g, prefix)):
            o = block(o, f'{prefix}group{g}.block{i}', 2 if g > 0 and i == 0 else 1)
        groups.append(o)
    o = F.adaptive_avg_pool2d(o, 1).flatten(1)  # = avg_pool2d(o, 7) on 224x224 inputs
    return F.linear(o, params[prefix + 'fc.weight'], params[prefix + 'fc.bias']), groups


def folded_resnet(input, params, mode=False):
    """A teacher export, every bn folded into its conv as the 2017 exports were: (logits, [g0, g1, g2, g3])."""
    def conv(x, base, stride, padding):
        return F.conv2d(x, params[base + '.weight'], params.get(base + '.bias'), stride, padding)

    def block(x, base, stride):
        o = conv(F.relu(conv(x, base + '.conv0', stride, 1)), base + '.conv1', 1, 1)
        if base + '.conv_dim.weight' in params:
            return F.relu(o + conv(x, base + '.conv_dim', stride, 0))
        return F.relu(o + x)

    o = F.max_pool2d(F.relu(conv(input, 'conv0', 2, 3)), 3, 2, 1)
    groups = []
    for g in range(4):
        for i in range(count_blocks(params, g, leaf='conv0.weight')):
            o = block(o, f'group{g}.block{i}', 2 if g > 0 and i == 0 else 1)
        groups.append(o)
    o = F.adaptive_avg_pool2d(o, 1).flatten(1)
    return F.linear(o, params['fc.weight'], params['fc.bias']), groups


def fold_torchvision(state_dict, eps=1e-5):
    """A torchvision ResNet-18/34 state_dict as a teacher export: every bn folded into its conv.

    A downsample's bn shift has no key of its own in the export: it joins the
    block's conv1 bias, since both are added before the final relu.
    """
    sd = {k: v.detach().float().cpu() for k, v in state_dict.items()}

    def fold(conv, bn):
        scale = sd[bn + '.weight'] / torch.sqrt(sd[bn + '.running_var'] + eps)
        return sd[conv + '.weight'] * scale.view(-1, 1, 1, 1), sd[bn + '.bias'] - sd[bn + '.running_mean'] * scale

    out = {}
    out['conv0.weight'], out['conv0.bias'] = fold('conv1', 'bn1')
    for g in range(4):
        i = 0
        while f'layer{g + 1}.{i}.conv1.weight' in sd:
            src, dst = f'layer{g + 1}.{i}', f'group{g}.block{i}'
            out[dst + '.conv0.weight'], out[dst + '.conv0.bias'] = fold(src + '.conv1', src + '.bn1')
            out[dst + '.conv1.weight'], out[dst + '.conv1.bias'] = fold(src + '.conv2', src + '.bn2')
            if src + '.downsample.0.weight' in sd:
                w, b = fold(src + '.downsample.0', src + '.downsample.1')
                out[dst + '.conv_dim.weight'] = w
                out[dst + '.conv1.bias'] = out[dst + '.conv1.bias'] + b
            i += 1
    out['fc.weight'], out['fc.bias'] = sd['fc.weight'], sd['fc.bias']
    return out


def expected_export_shapes(params):
    """The shapes a teacher export must have, given its conv0 and the blocks its keys name."""
    try:
        c0 = params['conv0.weight'].shape[0]
        n_classes = params['fc.weight'].shape[0]
    except KeyError as e:
        raise ValueError(f'missing tensor {e.args[0]!r}') from None
    shapes, ni = {'conv0.weight': (c0, 3, 7, 7), 'conv0.bias': (c0,)}, c0
    for g in range(4):
        n = count_blocks(params, g, leaf='conv0.weight')
        if n == 0:
            raise ValueError(f'missing tensor \'group{g}.block0.conv0.weight\'')
        no = params[f'group{g}.block0.conv0.weight'].shape[0]
        for i in range(n):
            b, cin = f'group{g}.block{i}', ni if i == 0 else no
            shapes.update({b + '.conv0.weight': (no, cin, 3, 3), b + '.conv0.bias': (no,),
                           b + '.conv1.weight': (no, no, 3, 3), b + '.conv1.bias': (no,)})
            if i == 0 and g > 0:
                shapes[b + '.conv_dim.weight'] = (no, cin, 1, 1)
        ni = no
    shapes.update({'fc.weight': (n_classes, ni), 'fc.bias': (n_classes,)})
    return shapes
