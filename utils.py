"""The paper's math and the 2017 helpers: attention maps and losses, functional layers, parameters.

Everything else (the training loop, run folders, data, devices) lives in the modules beside this one.
"""
import torch
import torch.nn.functional as F
from torch.nn.init import kaiming_normal_



# ---------------------------------------------------------------- attention transfer (paper section 3)

def at(x, size=None, channels='mean'):
    """Spatial attention map: per-sample L2-normalised mean over channels of x^2 (the 2017 code), or
    with channels='sum' their sum (the paper's F_sum^2; the same map once normalised, up to rounding),
    average-pooled to `size` first, when given."""
    a = x.pow(2).mean(1) if channels == 'mean' else x.pow(2).sum(1)
    if size is not None and tuple(a.shape[-2:]) != tuple(size):
        a = F.adaptive_avg_pool2d(a, size)
    return F.normalize(a.flatten(1))


AT_PREFIX = 'at_loss.'  # a model's AT loss terms are named 'at_loss.0', 'at_loss.1', ...: one per group
# --at_pool: where maps of different sizes meet. attention: the attention map is average-pooled, only
# between whole multiples (the 2017 rule); features: the larger feature map is adaptive-average-pooled
# to the smaller size before its attention map is taken, any sizes (RepDistiller's distiller_zoo/AT.py)
AT_POOLS = ('attention', 'features')
# --at_mode: code, the 2017 code's element mean of squared differences; paper, Eq. 2's per-sample
# 2-norm of the difference (not squared), maps summed over channels, averaged over the batch
AT_MODES = ('code', 'paper')


def at_loss(x, y, pool='attention', mode='code'):
    """One group's AT term between student output x and teacher output y (N, C, H, W; channel counts
    may differ). mode 'code': mean over batch and positions of (at(x) - at(y))^2; 'paper': mean over
    the batch of ||at(x) - at(y)||_2 with maps summed over channels. Maps of different sizes meet at
    the smaller one (per side): by `pool` (AT_POOLS)."""
    size = None
    if x.shape[-2:] != y.shape[-2:]:
        size = tuple(min(a, b) for a, b in zip(x.shape[-2:], y.shape[-2:]))
        if pool == 'features':
            x, y = (F.adaptive_avg_pool2d(t, size) if tuple(t.shape[-2:]) != size else t for t in (x, y))
            size = None
        elif any(max(a, b) % min(a, b) for a, b in zip(x.shape[-2:], y.shape[-2:])):
            raise ValueError(f'attention maps of {tuple(x.shape[-2:])} and {tuple(y.shape[-2:])} do not match: '
                            f'only sizes that are whole multiples of each other are pooled to meet '
                            f'(--at_pool features pools the feature maps, any sizes)')
    if mode == 'paper':
        return (at(x, size, 'sum') - at(y, size, 'sum')).norm(dim=1).mean()
    return (at(x, size) - at(y, size)).pow(2).mean()


def kd_loss(y, teacher_scores, labels, T, alpha):
    """Hinton's KD: alpha * T^2 * KL(teacher || student) per sample + (1 - alpha) * CE."""
    p = F.log_softmax(y / T, dim=1)
    q = F.softmax(teacher_scores / T, dim=1)
    l_kl = F.kl_div(p, q, reduction='sum') * (T ** 2) / y.shape[0]
    l_ce = F.cross_entropy(y, labels)
    return l_kl * alpha + l_ce * (1. - alpha)


def factt_loss(s, t):
    """Full-activation transfer (F-ActT): mean squared difference of whole tensors, each flattened
    and L2-normalised per sample."""
    return (F.normalize(s.flatten(1)) - F.normalize(t.flatten(1))).pow(2).mean()


# ---------------------------------------------------------------- gradient-based attention (paper section 3.2)

def input_grad(f, params, x, targets, mode, create_graph):
    """Gradient attention: J = d CE(f(x), targets) / dx, with f's outputs.

    create_graph=True keeps J differentiable (the student's, for double backprop)."""
    with torch.enable_grad():  # J needs autograd, even where the caller has turned it off
        x = x.detach().requires_grad_()
        y, groups = f(x, params, mode)
        (j,) = torch.autograd.grad(F.cross_entropy(y, targets), x, create_graph=create_graph)
    return j, y, groups


def grad_at_loss(j_s, j_t):
    """Gradient AT: F-ActT's form on the input gradients, so student and teacher compare in
    direction, not in scale (our choice; the paper leaves it open). The total adds grad_beta/2 times it."""
    return factt_loss(j_s, j_t)


def sym_loss(f, params, x, targets, mode, j=None):
    """Flip symmetry of gradient attention: J(x) against the mirrored J of the mirrored image."""
    if j is None:
        j = input_grad(f, params, x, targets, mode, create_graph=True)[0]
    j_mirror = input_grad(f, params, x.flip(-1), targets, mode, create_graph=True)[0]
    return grad_at_loss(j, j_mirror.flip(-1))


# ---------------------------------------------------------------- functional layers and parameters

def conv_params(ni, no, k=1):
    return kaiming_normal_(torch.empty(no, ni, k, k))


def linear_params(ni, no):
    return {'weight': kaiming_normal_(torch.empty(no, ni)), 'bias': torch.zeros(no)}


def bn_params(n):
    return {'weight': torch.rand(n), 'bias': torch.zeros(n),
            'running_mean': torch.zeros(n), 'running_var': torch.ones(n)}


def flatten(params):
    """{'a': {'b': t}} -> {'a.b': t}."""
    out = {}
    for k, v in params.items():
        if isinstance(v, dict):
            out.update({f'{k}.{kk}': vv for kk, vv in flatten(v).items()})
        else:
            out[k] = v
    return out


def count_blocks(params, group, prefix='', leaf='conv0', head='group'):
    """Blocks in a group (or a 'stage'), counted from the keys: structure needs no side information."""
    head = f'{prefix}{head}{group}.block'
    return sum(1 for k in params if k.startswith(head) and k.endswith('.' + leaf))


def batch_norm(x, params, base, mode):
    return F.batch_norm(x, weight=params[base + '.weight'], bias=params[base + '.bias'],
                        running_mean=params[base + '.running_mean'],
                        running_var=params[base + '.running_var'], training=mode)


def is_trained(name):
    return not name.endswith(('running_mean', 'running_var'))


def set_requires_grad_except_bn_(params):
    for k, v in params.items():
        v.requires_grad_(is_trained(k) and v.is_floating_point())


def n_trained(params):
    return sum(v.numel() for k, v in params.items() if is_trained(k))


def check_params(params, expected, what):
    """Refuse missing, extra or mis-shaped tensors with one line naming the key.
    `expected` maps names to tensors or to shapes."""
    for k, v in expected.items():
        shape = tuple(getattr(v, 'shape', v))
        if k not in params:
            raise ValueError(f'{what}: missing tensor {k!r}')
        if tuple(params[k].shape) != shape:
            raise ValueError(f'{what}: tensor {k!r} has shape {tuple(params[k].shape)}, expected {shape}')
    extra = sorted(set(params) - set(expected))
    if extra:
        raise ValueError(f'{what}: unexpected tensor {extra[0]!r}')
