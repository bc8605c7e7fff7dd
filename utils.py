"""Losses, functional layers, checkpoints and the training loop shared by cifar.py and imagenet.py."""
import json
import math
import os
import random
import signal
import sys
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.init import kaiming_normal_
from torch.nn.parallel import gather, parallel_apply, scatter
from torch.nn.parallel._functions import Broadcast
import torchnet as tnt
from tqdm import tqdm


class UserError(Exception):
    """Bad input: reported as one line on stderr, never as a traceback."""


def cli(main, prog):
    """Runs a script's main: bad input is one line on stderr and exit 1, never a traceback."""
    try:
        main()
    except UserError as e:
        die(prog, e, code=1)
    except KeyboardInterrupt:  # before training starts; during it, fit handles the signal
        print(f'\n{prog}: interrupted', file=sys.stderr)
        sys.exit(130)


def parse_epoch_step(text):
    """--epoch_step: a JSON list of ints."""
    try:
        steps = json.loads(text)
    except json.JSONDecodeError:
        steps = None
    if not isinstance(steps, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in steps):
        raise UserError(f'--epoch_step must be a JSON list of ints, like [60,120,160]; got {text!r}')
    return steps


def die(prog, message, code=2):
    if os.environ.get('RANK', '0') == '0':  # under torchrun, one rank says it for all
        print(f'{prog}: error: {message}', file=sys.stderr)
    sys.exit(code)


# ---------------------------------------------------------------- losses

def at(x, size=None):
    """Spatial attention map: per-sample L2-normalised mean over channels of x^2
    (average-pooled to `size` first, when given)."""
    a = x.pow(2).mean(1)
    if size is not None and tuple(a.shape[-2:]) != tuple(size):
        a = F.adaptive_avg_pool2d(a, size)
    return F.normalize(a.flatten(1))


def at_loss(x, y):
    """Mean squared difference of the attention maps. Maps of different sizes meet at the
    smaller one when it divides the larger exactly (average pooling); others are refused."""
    if x.shape[-2:] == y.shape[-2:]:
        return (at(x) - at(y)).pow(2).mean()
    size = tuple(min(a, b) for a, b in zip(x.shape[-2:], y.shape[-2:]))
    if any(max(a, b) % min(a, b) for a, b in zip(x.shape[-2:], y.shape[-2:])):
        raise UserError(f'attention maps of {tuple(x.shape[-2:])} and {tuple(y.shape[-2:])} do not match: '
                        f'only sizes that are whole multiples of each other are pooled to meet')
    return (at(x, size) - at(y, size)).pow(2).mean()


def kd_loss(y, teacher_scores, labels, T, alpha):
    """Hinton's KD: alpha * T^2 * KL(teacher || student) per sample + (1 - alpha) * CE."""
    p = F.log_softmax(y / T, dim=1)
    q = F.softmax(teacher_scores / T, dim=1)
    l_kl = F.kl_div(p, q, reduction='sum') * (T ** 2) / y.shape[0]
    l_ce = F.cross_entropy(y, labels)
    return l_kl * alpha + l_ce * (1. - alpha)


distillation = kd_loss  # the 2017 name


def input_grad(f, params, x, targets, mode, create_graph):
    """Gradient attention (paper section 3.2): J = d CE(f(x), targets) / dx, with f's outputs.

    create_graph=True keeps J differentiable (the student's, for double backprop)."""
    with torch.enable_grad():  # J needs autograd, even where the caller has turned it off
        x = x.detach().requires_grad_()
        y, groups = f(x, params, mode)
        (j,) = torch.autograd.grad(F.cross_entropy(y, targets), x, create_graph=create_graph)
    return j, y, groups


def factt_loss(s, t):
    """Full-activation transfer (F-ActT): mean squared difference of whole tensors, each flattened
    and L2-normalised per sample."""
    return (F.normalize(s.flatten(1)) - F.normalize(t.flatten(1))).pow(2).mean()


def grad_at_loss(j_s, j_t):
    """Gradient AT: F-ActT's form on the input gradients, so student and teacher compare in
    direction, not in scale (our choice; the paper leaves it open). The total adds grad_beta/2 times it."""
    return factt_loss(j_s, j_t)


def beta_schedule(beta, kind, epoch, epochs, epoch_step, ratio):
    """The AT weight at a (1-based) epoch. none: constant (2017). step: times `ratio` at each
    epoch in `epoch_step`, with the lr. linear: from beta down to beta/epochs at the last epoch."""
    if kind == 'step':
        return beta * ratio ** sum(1 for s in epoch_step if s <= epoch)
    if kind == 'linear':
        return beta * (epochs - epoch + 1) / epochs
    return beta


def sym_loss(f, params, x, targets, mode, j=None):
    """Flip symmetry of gradient attention: J(x) against the mirrored J of the mirrored image."""
    if j is None:
        j = input_grad(f, params, x, targets, mode, create_graph=True)[0]
    j_mirror = input_grad(f, params, x.flip(-1), targets, mode, create_graph=True)[0]
    return grad_at_loss(j, j_mirror.flip(-1))


# ---------------------------------------------------------------- params

def conv_params(ni, no, k=1):
    return kaiming_normal_(torch.empty(no, ni, k, k))


def linear_params(ni, no):
    return {'weight': kaiming_normal_(torch.empty(no, ni)), 'bias': torch.zeros(no)}


def bn_params(n):
    return {'weight': torch.rand(n), 'bias': torch.zeros(n),
            'running_mean': torch.zeros(n), 'running_var': torch.ones(n)}


bnparams = bn_params  # the 2017 name


def flatten(params):
    """{'a': {'b': t}} -> {'a.b': t}."""
    out = {}
    for k, v in params.items():
        if isinstance(v, dict):
            out.update({f'{k}.{kk}': vv for kk, vv in flatten(v).items()})
        else:
            out[k] = v
    return out


def is_trained(name):
    return not name.endswith(('running_mean', 'running_var'))


def set_requires_grad_except_bn_(params):
    for k, v in params.items():
        v.requires_grad_(is_trained(k) and v.is_floating_point())


def batch_norm(x, params, base, mode):
    return F.batch_norm(x, weight=params[base + '.weight'], bias=params[base + '.bias'],
                        running_mean=params[base + '.running_mean'],
                        running_var=params[base + '.running_var'], training=mode)


def data_parallel(f, input, params, mode, device_ids, output_device=None):
    """DataParallel for a functional model: split the batch over `device_ids`.

    As with nn.DataParallel, batch-norm running statistics are updated on the
    first device's replica only.
    """
    device_ids = list(device_ids)
    if len(device_ids) <= 1:
        return f(input, params, mode)
    if output_device is None:
        output_device = device_ids[0]
    names = list(params)
    copies = Broadcast.apply(device_ids, *params.values())
    replicas = [dict(zip(names, copies[i * len(names):(i + 1) * len(names)]))
                for i in range(len(device_ids))]
    # share the first replica's running stats with the master copy
    for k in names:
        if not is_trained(k):
            replicas[0][k] = params[k]
    inputs = scatter(input, device_ids)
    outputs = parallel_apply([lambda x, p=p: f(x, p, mode) for p in replicas[:len(inputs)]],
                             [(x,) for x in inputs], devices=device_ids[:len(inputs)])
    return gather(outputs, output_device)


def n_trained(params):
    return sum(v.numel() for k, v in params.items() if is_trained(k))


# ---------------------------------------------------------------- run folders

def save_checkpoint(path, params, optimizer, epoch, **extra):
    """Writes {params, optimizer, epoch, **extra} atomically: a kill at any instant leaves
    either the previous file or the new one, whole."""
    state = dict(params={k: v.detach().cpu() for k, v in params.items()},
                 optimizer=optimizer.state_dict(), epoch=epoch, **extra)
    tmp = path + '.tmp'
    with open(tmp, 'wb') as fh:
        torch.save(state, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def rng_state(generator=None):
    """Every random state a run draws from, in types torch.load(weights_only=True) accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {'torch': torch.get_rng_state(), 'python': random.getstate(),
             'numpy': [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)]}
    if torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state_all()
    if generator is not None:
        state['loader'] = generator.get_state()
    return state


def set_rng_state(state, generator=None):
    torch.set_rng_state(state['torch'])
    version, internal, gauss = state['python']
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, gauss = state['numpy']
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])
    if generator is not None and 'loader' in state:
        generator.set_state(state['loader'])


def safe_load(path, what):
    """torch.load with weights_only=True (a file cannot run code); bad files raise UserError."""
    if not os.path.isfile(path):
        raise UserError(f'no such {what}: {path}')
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise UserError(f'cannot read {what} {path}: {type(e).__name__}: '
                        f'{str(e).splitlines()[0] if str(e) else "corrupt file"}') from None


def load_checkpoint(path):
    """A model.pt7 as a dict; bad files raise UserError."""
    state = safe_load(path, 'checkpoint')
    if not isinstance(state, dict) or not isinstance(state.get('params'), dict):
        raise UserError(f'{path} is not a model.pt7 checkpoint (expected a dict with "params")')
    return state


def read_json_stats(log_path):
    """The json_stats records of a log.txt, in order."""
    records = []
    with open(log_path) as fh:
        for n, line in enumerate(fh, 1):
            i = line.find('json_stats: ')
            if i < 0:
                continue
            try:
                records.append(json.loads(line[i + len('json_stats: '):]))
            except json.JSONDecodeError:
                raise UserError(f'{log_path}, line {n}: not a valid json_stats line') from None
    return records


def append_log(log_path, record):
    with open(log_path, 'a') as fh:
        fh.write('json_stats: ' + json.dumps(record) + '\n')
        fh.flush()
        os.fsync(fh.fileno())


def check_params(params, expected, what):
    """Refuse missing, extra or mis-shaped tensors with one line naming the key."""
    for k, v in expected.items():
        if k not in params:
            raise UserError(f'{what}: missing tensor {k!r}')
        if tuple(params[k].shape) != tuple(v.shape):
            raise UserError(f'{what}: tensor {k!r} has shape {tuple(params[k].shape)}, '
                            f'expected {tuple(v.shape)}')
    extra = sorted(set(params) - set(expected))
    if extra:
        raise UserError(f'{what}: unexpected tensor {extra[0]!r}')


# ---------------------------------------------------------------- runs: shared by cifar.py and imagenet.py

def check_save(opt, default_name):
    """Refuse to touch a folder that holds a run, unless it is being resumed."""
    if opt.resume == 'auto':
        if not opt.save:
            raise UserError('--resume auto continues the run in --save: pass --save too')
        path = os.path.join(opt.save, 'model.pt7')
        opt.resume = path if os.path.exists(path) else ''
    if not opt.save:
        opt.save = os.path.dirname(opt.resume) if opt.resume else os.path.join('logs', default_name)
    existing = [n for n in ('model.pt7', 'log.txt') if os.path.exists(os.path.join(opt.save, n))]
    if existing and not opt.resume:
        raise UserError(f'--save {opt.save} already holds a run ({existing[0]}); pass --resume '
                        f'{os.path.join(opt.save, "model.pt7")} (or auto) to continue it, or choose another --save')


def make_save(opt):
    try:
        os.makedirs(opt.save, exist_ok=True)
        probe = os.path.join(opt.save, '.write_test')
        open(probe, 'w').close()
        os.remove(probe)
    except OSError as e:
        raise UserError(f'--save {opt.save} is not writable: {e.strerror}') from None


def select_device(opt):
    """The device, and the torchrun process group when WORLD_SIZE > 1 (nccl on CUDA, gloo on CPU)."""
    if opt.device not in ('', 'cpu', 'cuda') and not opt.device.startswith('cuda:'):
        raise UserError(f'--device must be cpu or cuda, got {opt.device!r}')
    world = int(os.environ.get('WORLD_SIZE', 1))
    if opt.device != 'cpu' and world == 1:
        os.environ.setdefault('CUDA_VISIBLE_DEVICES', opt.gpu_id)  # before CUDA initialises
    device = torch.device(opt.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise UserError(f'--device cuda, but no CUDA GPU is available (--gpu_id {opt.gpu_id}; try --device cpu)')
    available = torch.cuda.device_count() if device.type == 'cuda' else 0
    if opt.ngpu > 1 and opt.ngpu > available:
        raise UserError(f'--ngpu {opt.ngpu} needs {opt.ngpu} GPUs; {available} visible '
                        f'(--gpu_id {opt.gpu_id}, device {device.type})')
    if world > 1:
        if opt.ngpu > 1:
            raise UserError('--ngpu splits batches inside one process; under torchrun use one GPU per process')
        if device.type == 'cuda':
            device = torch.device('cuda', int(os.environ.get('LOCAL_RANK', 0)))
            torch.cuda.set_device(device)
        torch.distributed.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
    return device


class Dist:
    """The torchrun world as the training loop needs it; world 1 is a no-op."""

    def __init__(self, device):
        on = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.rank = torch.distributed.get_rank() if on else 0
        self.world = torch.distributed.get_world_size() if on else 1
        self.device = device

    def sum(self, values):
        """Element-wise sum over ranks of a list of numbers."""
        if self.world == 1:
            return list(values)
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def any(self, flag):
        return bool(self.sum([bool(flag)])[0]) if self.world > 1 else bool(flag)

    def broadcast_(self, tensors):
        for t in tensors:
            torch.distributed.broadcast(t.data, 0)

    def average_grads_(self, params):
        grads = [p.grad for p in params if p.grad is not None]
        flat = torch._utils._flatten_dense_tensors(grads)
        torch.distributed.all_reduce(flat)
        flat /= self.world
        for g, r in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
            g.copy_(r)

    def sync_meters(self, meters):
        """Meters over the whole data, not one rank's shard."""
        if self.world == 1:
            return
        for m in meters:
            if isinstance(m, tnt.meter.ClassErrorMeter):
                n, *sums = self.sum([m.n] + [m.sum[k] for k in m.topk])
                m.n, m.sum = int(n), {k: s for k, s in zip(m.topk, sums)}
            else:
                m.sum, m.n = self.sum([m.sum, m.n])
                m.mean = m.sum / m.n if m.n else float('nan')


class AllReduced:
    """An optimizer that averages gradients over the torchrun world before stepping (what DDP does)."""

    def __init__(self, optimizer, dist):
        self.optimizer, self.dist = optimizer, dist

    def __getattr__(self, name):
        return getattr(self.optimizer, name)

    def step(self, closure=None):
        loss = closure() if closure is not None else None
        self.dist.average_grads_([p for g in self.optimizer.param_groups for p in g['params']])
        self.optimizer.step()
        return loss


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def place_params(params_s, params_t, device, dtype, channels_last):
    """Moves both param dicts to the device (in place); only the student's trained tensors learn."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for p in (params_s, params_t):
        for k, v in p.items():
            v = v.to(device, PARAM_DTYPES.get(dtype, torch.float32))
            p[k] = v.contiguous(memory_format=fmt) if v.dim() == 4 else v
    set_requires_grad_except_bn_(params_s)
    for v in params_t.values():
        v.requires_grad_(False)


def sgd_factory(params, weight_decay):
    trained = [v for v in params.values() if v.requires_grad]
    return lambda lr: torch.optim.SGD(trained, lr, momentum=0.9, weight_decay=weight_decay)


def factt_adapters(f_s, params_s, f_t, params_t, shape):
    """1x1 convs taking each student group to its teacher group's channels, where they differ."""
    with torch.no_grad():
        g_s = f_s(torch.zeros(shape), params_s, False)[1]
        g_t = f_t(torch.zeros(shape), params_t, False)[1]
    for i, (s, t) in enumerate(zip(g_s, g_t)):
        if s.shape[-2:] != t.shape[-2:]:
            raise UserError(f'F-ActT: group {i} is {tuple(s.shape[-2:])} in the student and '
                            f'{tuple(t.shape[-2:])} in the teacher; it needs equal spatial sizes')
    return {f'group{i}': conv_params(s.shape[1], t.shape[1], 1)
            for i, (s, t) in enumerate(zip(g_s, g_t)) if s.shape[1] != t.shape[1]}


def make_compute(f_s, params_s, f_t, params_t, opt, at_groups=None, adapters=None):
    """The loss: cross-entropy alone, or kd_loss + beta * sum of at_loss over `at_groups` (all by default),
    plus, when training with opt.grad_beta or opt.sym_beta, grad_beta/2 * grad_at_loss and
    sym_beta/2 * sym_loss (double backprop).

    With opt.factt_beta, F-ActT adds factt_beta * sum over groups of factt_loss, the student's
    group passed through `adapters` (1x1 convs, by group name) where channels differ.
    f(inputs, params, mode) -> (logits, group outputs); f_t None means no teacher.
    compute(...) -> (loss, logits, at_losses, {name: extra loss}); compute.weights['beta'] is
    the AT weight in force, which a beta schedule may change between epochs.
    """
    devices = list(range(opt.ngpu))
    grad_beta, sym_beta = getattr(opt, 'grad_beta', 0), getattr(opt, 'sym_beta', 0)
    factt_beta, adapters = getattr(opt, 'factt_beta', 0), adapters or {}
    weights = {'beta': opt.beta}

    def distill(y_s, g_s, y_t, g_t, targets, extras):
        groups = range(len(g_s)) if at_groups is None else at_groups
        at_losses = [at_loss(g_s[i], g_t[i]) for i in groups]
        loss = kd_loss(y_s, y_t, targets, opt.temperature, opt.alpha) + weights['beta'] * sum(at_losses)
        if factt_beta:
            extras['factt_loss'] = sum(
                factt_loss(F.conv2d(s, adapters[f'group{i}']) if f'group{i}' in adapters else s, t)
                for i, (s, t) in enumerate(zip(g_s, g_t)))
            loss = loss + factt_beta * extras['factt_loss']
        return loss, at_losses

    def compute(inputs, targets, mode):
        if mode and (grad_beta or sym_beta):
            return compute_with_grads(inputs, targets)
        y_s, g_s = data_parallel(f_s, inputs, params_s, mode, devices)
        if f_t is None:
            return F.cross_entropy(y_s, targets), y_s, [], {}
        with torch.inference_mode():  # once per batch, no graph kept
            y_t, g_t = data_parallel(f_t, inputs, params_t, False, devices)
        extras = {}
        loss, at_losses = distill(y_s, g_s, y_t, g_t, targets, extras)
        return loss, y_s, at_losses, extras

    def compute_with_grads(inputs, targets):
        j_s, y_s, g_s = input_grad(f_s, params_s, inputs, targets, True, create_graph=True)
        loss, at_losses, extras = F.cross_entropy(y_s, targets), [], {}
        if f_t is not None:
            if grad_beta:  # the teacher's J needs autograd, but no graph beyond it
                j_t, y_t, g_t = input_grad(f_t, params_t, inputs, targets, False, create_graph=False)
                y_t, g_t = y_t.detach(), [g.detach() for g in g_t]
            else:
                with torch.inference_mode():
                    y_t, g_t = f_t(inputs, params_t, False)
            loss, at_losses = distill(y_s, g_s, y_t, g_t, targets, extras)
            if grad_beta:
                extras['grad_at_loss'] = grad_at_loss(j_s, j_t)
                loss = loss + grad_beta / 2 * extras['grad_at_loss']
        if sym_beta:
            extras['sym_loss'] = sym_loss(f_s, params_s, inputs, targets, True, j=j_s)
            loss = loss + sym_beta / 2 * extras['sym_loss']
        return loss, y_s, at_losses, extras
    compute.weights = weights
    return compute


def restore(path, saved, optimizer):
    """Loads a model.pt7 into `saved` params and the optimizer; returns the checkpoint."""
    state = load_checkpoint(path)
    check_params(state['params'], saved, f'--resume {path}')
    with torch.no_grad():
        for k, v in saved.items():
            v.copy_(state['params'][k])
    try:
        if state.get('optimizer'):
            optimizer.load_state_dict(state['optimizer'])
        state['epoch'] = int(state.get('epoch', 0))
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f'--resume {path}: optimizer state does not fit this model ({e})') from None
    return state


class Stop(Exception):
    """A signal asked the run to stop after the current step."""


def stop_on_signals(prog):
    """SIGINT/SIGTERM: finish the step, then stop (returns the flag); a second signal exits at once."""
    flag = {'signal': None}

    def handler(signum, frame):
        if flag['signal'] is not None:
            print(f'{prog}: second signal, exiting now', file=sys.stderr)
            os._exit(130)
        flag['signal'] = signal.Signals(signum).name
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, handler)
    return flag


def fit(opt, run, prog):
    """Trains `run` (see cifar.build) under `opt`, writing model.pt7 and log.txt into opt.save.

    model.pt7 also holds every RNG state and the epoch's log record, so a
    resumed run repeats the uninterrupted one, and a log line lost to a kill
    between the two writes is restored from the checkpoint.
    """
    dist = Dist(run.device)
    make_optimizer = run.make_optimizer if dist.world == 1 else (lambda lr: AllReduced(run.make_optimizer(lr), dist))
    optimizer = make_optimizer(opt.lr)
    generator = getattr(run.train_loader, 'generator', None)
    lead = dist.rank == 0  # only rank 0 writes and prints
    log_path = os.path.join(opt.save, 'log.txt')
    epoch, state = 0, None
    if opt.resume:
        state = restore(opt.resume, run.saved, optimizer)
        epoch = state['epoch']
        if lead:
            print(f'resumed from {opt.resume} at epoch {epoch}, lr {optimizer.param_groups[0]["lr"]:g}')
    if dist.world > 1:  # every rank starts from rank 0's weights
        dist.broadcast_(run.saved.values())
    if lead:
        make_save(opt)
    if lead and state and state.get('record') and os.path.exists(log_path):
        logged = read_json_stats(log_path)
        if not logged or logged[-1].get('epoch', 0) < epoch:
            append_log(log_path, state['record'])
    n_parameters = n_trained(run.params_s)
    if lead:
        print(f'{run.description}: {n_parameters:,} parameters; {run.num_classes} classes; device {run.device}'
              + (f' x {dist.world} processes' if dist.world > 1 else '') + f'; run folder {opt.save}')

    def on_epoch_end(stats, optimizer):
        if not lead:
            return
        # plain JSON types (meters give numpy floats), which torch.load(weights_only=True) accepts
        record = json.loads(json.dumps({**vars(opt), **stats, 'num_classes': run.num_classes,
                                        'n_parameters': n_parameters,
                                        **({'beta_now': run.compute.weights['beta']}
                                           if getattr(opt, 'beta_decay', 'none') != 'none' else {})}))
        save_checkpoint(os.path.join(opt.save, 'model.pt7'), run.saved, optimizer, stats['epoch'],
                        rng=rng_state(generator), record=record)
        append_log(log_path, record)
        acc = stats['test_acc'] if isinstance(stats['test_acc'], list) else [stats['test_acc']]
        print(f'==> epoch {stats["epoch"]}/{opt.epochs}: train loss {stats["train_loss"]:.4f} '
              f'acc {stats["train_acc"]:.2f}%, test loss {stats["test_loss"]:.4f} acc '
              + '/'.join(f'{a:.2f}' for a in acc) + f'% ({stats["train_time"]:.1f}s + {stats["test_time"]:.1f}s)')

    def set_beta(epoch):
        if hasattr(run.compute, 'weights'):
            run.compute.weights['beta'] = beta_schedule(
                opt.beta, getattr(opt, 'beta_decay', 'none'), epoch, opt.epochs,
                parse_epoch_step(opt.epoch_step), opt.lr_decay_ratio)

    if state and state.get('rng'):  # last, after building and restoring drew their own numbers
        set_rng_state(state['rng'], generator)
    flag = stop_on_signals(prog)
    try:
        return train(run.compute, make_optimizer=make_optimizer, optimizer=optimizer,
                     train_loader=run.train_loader, test_loader=run.test_loader, epochs=opt.epochs,
                     start_epoch=epoch, epoch_step=parse_epoch_step(opt.epoch_step), lr_decay_ratio=opt.lr_decay_ratio,
                     device=run.device, on_epoch_end=on_epoch_end, n_at=run.n_at, topk=run.topk,
                     dtype=opt.dtype, progress=lead and not opt.no_progress, dist=dist,
                     on_epoch_start=set_beta,
                     should_stop=lambda: dist.any(flag['signal']),
                     buffers=[v for k, v in run.params_s.items() if not is_trained(k)])
    except Stop:
        if not lead:
            return
        done = read_json_stats(log_path)[-1]['epoch'] if os.path.exists(log_path) else 0
        print(f'{prog}: {flag["signal"] or "signal"}: stopped mid-epoch; model.pt7 holds the last whole epoch ({done}); '
              f'continue with --resume auto --save {opt.save}', file=sys.stderr)


# ---------------------------------------------------------------- training loop

AMP_DTYPES = {'half': torch.float16, 'float16': torch.float16, 'bfloat16': torch.bfloat16}
PARAM_DTYPES = {'float': torch.float32, 'float32': torch.float32,
                'double': torch.float64, 'float64': torch.float64}


def autocast_for(device, dtype):
    """Mixed precision: fp32 master weights, compute in `dtype` under autocast."""
    if dtype in AMP_DTYPES:
        return torch.autocast(device.type, dtype=AMP_DTYPES[dtype])
    return nullcontext()


def slow_cpu_autocast(device, dtype):
    """True where autocast to `dtype` would run on a CPU that has no native kernels for it.

    Without AVX-512 bf16/fp16 (e.g. an AVX2-only CPU), oneDNN emulates the low-precision
    convolutions and a step runs several times slower than fp32 (README, Speed).
    """
    if device.type != 'cpu' or dtype not in AMP_DTYPES:
        return False
    native = {torch.bfloat16: '_is_mkldnn_bf16_supported', torch.float16: '_is_mkldnn_fp16_supported'}
    try:
        return not getattr(torch.ops.mkldnn, native[AMP_DTYPES[dtype]])()
    except (AttributeError, RuntimeError):  # the check is private to torch: never fail a run on it
        return False


def compiled(f, enabled, prog):
    """torch.compile(f), falling back to f, with one line, where compilation fails."""
    if not enabled:
        return f
    current = [torch.compile(f)]

    def call(*args, **kwargs):
        if current[0] is f:
            return f(*args, **kwargs)
        try:
            return current[0](*args, **kwargs)
        except Exception as e:  # no compiler, unsupported backend, ...
            print(f'{prog}: --compile unavailable here ({type(e).__name__}); running eagerly', file=sys.stderr)
            current[0] = f
            return f(*args, **kwargs)
    return call


class GradScaled:
    """An optimizer whose step(closure) goes through a GradScaler (fp16), for torchnet's Engine."""

    def __init__(self, optimizer, scaler):
        self.optimizer, self.scaler = optimizer, scaler

    def __getattr__(self, name):  # param_groups, zero_grad, state_dict, ...
        return getattr(self.optimizer, name)

    def step(self, closure):
        loss = closure()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss


def topk_errors(output, target, topk):
    """Misclassified counts at each k, as ClassErrorMeter counts them, left on the device."""
    pred = output.topk(max(topk), 1, True, True)[1]
    correct = pred == target[:, None]
    return [len(target) - correct[:, :k].sum() for k in topk]


def train(compute, *, make_optimizer, optimizer, train_loader, test_loader,
          epochs, start_epoch, epoch_step, lr_decay_ratio, device, on_epoch_end,
          n_at=0, topk=(1,), dtype='float', progress=True, should_stop=None, dist=None, buffers=(),
          on_epoch_start=None, sync_every=None):
    """Trains with torchnet's Engine; evaluates on `test_loader` (if any) after every epoch.

    compute(inputs, targets, mode) -> (loss, logits, [per-group AT losses], {extra losses}).
    make_optimizer(lr) builds a fresh optimizer: at an epoch in `epoch_step` the
    lr is multiplied by `lr_decay_ratio` and the momentum restarts, as in 2017.
    on_epoch_end(stats, optimizer) saves and logs; stats are the 2017 fields.
    Under torchrun, `dist` sums the meters over ranks and rank 0's batch-norm
    `buffers` are broadcast before each test pass. Returns the last epoch's stats.
    The meters get every step's values, but read from the device only every
    `sync_every` steps and at the end of each pass, so that a GPU is not made to
    wait for the host between steps (default: 50 on GPUs, 1 on the CPU, where
    reading is free and the progress bar shows every step).
    """
    dist = dist or Dist(device)
    sync_every = sync_every or (1 if device.type == 'cpu' else 50)
    stop_every = sync_every if dist.world > 1 else 1  # under torchrun, asking every rank is a collective
    engine = tnt.engine.Engine()
    meter_loss = tnt.meter.AverageValueMeter()
    classacc = tnt.meter.ClassErrorMeter(topk=list(topk), accuracy=True)
    timer_train = tnt.meter.TimeMeter('s')
    timer_test = tnt.meter.TimeMeter('s')
    meters_at = [tnt.meter.AverageValueMeter() for _ in range(n_at)]
    meters_extra = {}  # one per extra loss that compute reports (grad_at_loss, sym_loss)
    amp = autocast_for(device, dtype)
    if dist.rank == 0 and slow_cpu_autocast(device, dtype):
        print(f'warning: this CPU has no native {dtype} kernels; --dtype {dtype} will train slower than float',
              file=sys.stderr)
    in_dtype = PARAM_DTYPES.get(dtype, torch.float32)
    if AMP_DTYPES.get(dtype) == torch.float16:  # fp16 gradients underflow without loss scaling
        scaler = torch.amp.GradScaler(device.type)
        new_optimizer, optimizer = (lambda lr: GradScaled(make_optimizer(lr), scaler)), GradScaled(optimizer, scaler)
    else:
        scaler, new_optimizer = None, make_optimizer
    last, current = {}, {}
    pending = []  # (batch number, batch size, device vector: loss, errors at each k, AT losses, extras)

    def h(sample):
        inputs, targets, mode = sample
        with amp:
            loss, y, at_losses, extras = compute(inputs, targets, mode)
        current['losses'] = [loss.detach(), *(v.detach() for v in at_losses), *(v.detach() for v in extras.values())] \
            if mode else [loss.detach()]
        if mode:
            for name in extras:
                meters_extra.setdefault(name, tnt.meter.AverageValueMeter())
        return (scaler.scale(loss) if scaler and mode else loss), y

    def on_sample(state):
        inputs, targets = state['sample'][:2]
        state['sample'] = [inputs.to(device, in_dtype, non_blocking=True),
                           targets.to(device, non_blocking=True), state['train']]

    def flush(state):
        """Feeds the meters with the pending steps' values: one device-to-host copy."""
        if not pending:
            return
        rows = torch.stack([v for _, _, v in pending]).tolist()
        for (batch, size, _), (loss, *rest) in zip(pending, rows):
            if not math.isfinite(loss):
                pending.clear()
                raise UserError(f'the loss is {loss} at epoch {current["epoch"]}, batch {batch}'
                                f'{"" if state["train"] else " of the test pass"}; model.pt7 keeps the last good epoch')
            meter_loss.add(loss)
            for k, err in zip(classacc.topk, rest):
                classacc.sum[k] += int(err)
            classacc.n += size
            for m, v in zip([*meters_at, *meters_extra.values()] if state['train'] else [], rest[len(classacc.topk):]):
                m.add(v)
        pending.clear()
        if progress and state['train']:
            state['iterator'].set_postfix(loss=f'{meter_loss.value()[0]:.3f}',
                                          acc=f'{classacc.value()[0]:.2f}', refresh=False)

    def on_forward(state):
        output, target = state['output'].detach().float(), state['sample'][1]
        errors = topk_errors(output, target, classacc.topk)
        values = [v.float().reshape(()) for v in (current['losses'][0], *errors, *current['losses'][1:])]
        pending.append((state['t'] - current['t0'] + 1, len(target), torch.stack(values)))
        if len(pending) >= sync_every:
            flush(state)

    def on_start(state):
        current['t0'] = 0
        if state['train']:
            state['epoch'] = start_epoch

    def on_update(state):
        if should_stop and (state['t'] - current['t0']) % stop_every == 0 and should_stop():
            raise Stop()

    def on_start_epoch(state):
        epoch = state['epoch'] + 1
        if on_epoch_start:
            on_epoch_start(epoch)
        if hasattr(getattr(train_loader, 'sampler', None), 'set_epoch'):
            train_loader.sampler.set_epoch(epoch)  # DistributedSampler: a fresh, seeded order
        if epoch in epoch_step:
            lr = state['optimizer'].param_groups[0]['lr']
            state['optimizer'] = new_optimizer(lr * lr_decay_ratio)
        for m in [meter_loss, classacc, *meters_at, *meters_extra.values()]:
            m.reset()
        timer_train.reset()
        current.update(t0=state['t'], epoch=epoch)
        state['iterator'] = tqdm(train_loader, desc=f'epoch {epoch}/{epochs}', dynamic_ncols=True,
                                 leave=False, disable=not progress)

    def on_end_epoch(state):
        flush(state)
        dist.sync_meters([meter_loss, classacc, *meters_at, *meters_extra.values()])
        train_loss, train_acc = meter_loss.value()[0], classacc.value()
        stats = {'train_loss': train_loss, 'train_acc': train_acc[0], 'epoch': state['epoch'],
                 'train_time': timer_train.value(), 'at_losses': [list(m.value()) for m in meters_at],
                 **{name: list(m.value()) for name, m in meters_extra.items()}}
        if test_loader is not None:
            if dist.world > 1:
                dist.broadcast_(buffers)
            meter_loss.reset()
            classacc.reset()
            timer_test.reset()
            with torch.no_grad():
                engine.test(h, tqdm(test_loader, desc='test', leave=False, dynamic_ncols=True,
                                    disable=not progress))
            flush({'train': False})
            dist.sync_meters([meter_loss, classacc])
            test_acc = classacc.value()
            stats.update(test_loss=meter_loss.value()[0], test_time=timer_test.value(),
                         test_acc=test_acc[0] if len(test_acc) == 1 else test_acc)
        last.update(stats)
        on_epoch_end(stats, state['optimizer'])

    engine.hooks.update(on_sample=on_sample, on_forward=on_forward, on_start=on_start, on_update=on_update,
                        on_start_epoch=on_start_epoch, on_end_epoch=on_end_epoch)
    engine.train(h, train_loader, epochs, optimizer)
    return last


def evaluate(f, params, loader, device, dtype='float', topk=(1, 5), progress=True):
    """Top-k accuracies (%) of f(inputs, params, False) over a loader."""
    meter = tnt.meter.ClassErrorMeter(topk=list(topk), accuracy=True)
    with torch.inference_mode(), autocast_for(device, dtype):
        for x, y in tqdm(loader, desc='evaluate', leave=False, dynamic_ncols=True, disable=not progress):
            meter.add(f(x.to(device), params, False)[0].float(), y)
    return meter.value()


# ---------------------------------------------------------------- device-resident data

def crop_flip(padded, top, left, flip, size):
    """Per-sample crops of `padded` (B,C,H,W) at (top, left), mirrored where `flip`: one gather."""
    b, c = padded.shape[:2]
    ar = torch.arange(size, device=padded.device)
    rows = (top[:, None] + ar)[:, None, :, None]
    cols = left[:, None] + ar
    cols = torch.where(flip[:, None], cols.flip(1), cols)[:, None, None, :]
    return padded[torch.arange(b, device=padded.device)[:, None, None, None],
                  torch.arange(c, device=padded.device)[None, :, None, None], rows, cols]


class DeviceLoader:
    """A whole image dataset as one uint8 tensor on the training device, batched there.

    Training batches get what the torchvision pipeline gives one image at a time:
    reflect-pad, a random crop back to full size and a random horizontal flip,
    then scaling to [0,1] and normalisation, vectorised over the batch. The
    order is reshuffled every epoch from `generator`. It yields (inputs, targets)
    like a DataLoader, already on the device.
    """

    def __init__(self, images, labels, *, batch_size, mean, std, train, pad=4, device='cpu',
                 generator=None, channels_last=False, rank=0, world=1):
        device = torch.device(device)
        self.rank, self.world = rank, world
        self.images = images.to(device)  # (N, C, H, W) uint8
        self.labels = torch.as_tensor(labels, dtype=torch.long).to(device)
        self.batch_size, self.train, self.pad = batch_size, train, int(pad)
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1)
        self.generator = generator
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __len__(self):
        return -(-self.shard_size() // self.batch_size)

    def shard_size(self):
        n = len(self.labels)
        if self.world == 1:
            return n
        # training shards are padded to one size, so every rank takes as many steps
        return -(-n // self.world) if self.train else len(range(self.rank, n, self.world))

    def augment(self, x):
        n, size = x.shape[0], x.shape[-1]
        if self.pad:
            x = F.pad(x, [self.pad] * 4, mode='reflect')
        g, dev = self.generator, x.device
        top = torch.randint(0, 2 * self.pad + 1, (n,), device=dev, generator=g)
        left = torch.randint(0, 2 * self.pad + 1, (n,), device=dev, generator=g)
        flip = torch.randint(0, 2, (n,), device=dev, generator=g).bool()
        return crop_flip(x, top, left, flip, size)

    def __iter__(self):
        n = len(self.labels)
        order = (torch.randperm(n, device=self.labels.device, generator=self.generator)
                 if self.train else torch.arange(n, device=self.labels.device))
        if self.world > 1:  # the same seeded order on every rank; each takes its own slice
            if self.train:
                order = torch.cat([order, order[:self.shard_size() * self.world - n]])
            order = order[self.rank::self.world]
        for idx in order.split(self.batch_size):
            x = self.images[idx].float()
            if self.train:
                x = self.augment(x)
            # the same float ops as ToTensor + Normalize, so outputs match torchvision's bit for bit
            x = x.div_(255).sub_(self.mean).div_(self.std).contiguous(memory_format=self.memory_format)
            yield x, self.labels[idx]
