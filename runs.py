"""Run folders and the life of a run: options, model.pt7 and log.txt, resume, RNG state, signals.

A run folder holds model.pt7 ({params, optimizer, epoch}, as in 2017, plus every RNG state and the
epoch's log record) and log.txt (one `json_stats: {...}` line per finished epoch). Both are written
so that a kill at any instant loses at most the epoch in progress, and a resumed run repeats the
uninterrupted one. Beside them rank 0 writes run.json (provenance.py) and TensorBoard event files
(board.py), which go on through kills and resumes the same way.
"""
import argparse
import json
import math
import os
import random
import signal
import sys
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import torch

import provenance
from board import Board
from distill import Distiller
from engine import Trainer, compiled, sgd
from errors import Stopped, UserError, cli, die, leave  # noqa: F401 (the scripts' cli)
from parallel import Dist, FunctionalNet, data_parallel, distributed, place_params
from precision import NAMES, Precision
from formats import append_log, checkpoint_params, load_checkpoint, read_json_stats, repair_log, save_checkpoint
from schedule import Schedule, parse_epoch_step  # noqa: F401
from utils import check_params, is_trained, n_trained


# ---------------------------------------------------------------- the command line

# --help's two groups of flags: what a user of the 2017 scripts knows comes first
FLAGS_2017 = ("2017 flags (same names, types and defaults as the paper's code)",)
FLAGS_NEW = ('new in this project',)


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line, not usage + message."""

    def error(self, message):
        die(self.prog, message)


AT_SUM_REPLICAS_HELP = ('1: with --ngpu N, weigh AT by N x beta, as the 2017 code did by summing one AT loss per '
                        'GPU; 0: beta on the whole batch (the default; without this flag, --ngpu > 1 notes the '
                        'difference)')


ALLOW_CHANGE_HELP = ('on resume, options (names without --, comma-separated, e.g. dataroot,teacher_id) that may '
                     'differ from the checkpoint\'s: a moved dataset or teacher; any other change is refused')


# The flags both scripts take, declared once: type, help and the default where both share it; each
# script gives its own defaults (add_shared's keywords) and its own order in --help.
SHARED_FLAGS = {
    'dtype': dict(default='float', type=str, help='float, double, or half / bfloat16 (autocast)'),
    'batch_size': dict(type=int), 'lr': dict(default=0.1, type=float), 'epochs': dict(type=int),
    'weight_decay': dict(type=float),
    'epoch_step': dict(type=str, help='JSON list: epochs at whose start lr *= lr_decay_ratio'),
    'lr_decay_ratio': dict(type=float),
    'resume': dict(default='', type=str, help='model.pt7 to continue from, or auto (the one in --save, if any)'),
    'temperature': dict(default=4, type=float, help='KD temperature'),
    'alpha': dict(default=0, type=float, help='KD weight'),
    'beta': dict(default=0, type=float, help='AT weight'),
    'save': dict(default='', type=str, help='run folder for model.pt7 and log.txt (default: logs/<script>_<time>)'),
    'ngpu': dict(default=1, type=int, help='GPUs to split each batch over'),
    'gpu_id': dict(default='0', type=str, help='CUDA_VISIBLE_DEVICES'),
    'at_sum_replicas': dict(default=None, type=int, choices=[0, 1], help=AT_SUM_REPLICAS_HELP),
    'seed': dict(default=0, type=int, help='seeds torch, numpy, random and the data order'),
    'device': dict(default='', type=str, help='cpu or cuda (default: cuda when available)'),
    'compile': dict(action='store_true', help='torch.compile the student and teacher forward passes'),
    'tensorboard': dict(default=None, type=int, choices=[0, 1], help='TensorBoard event files in the run folder '
                        '(default: 1 where the tensorboard package is installed)'),
    'tensorboard_every': dict(default=50, type=int, help='steps between points of the running train loss'),
    'no_progress': dict(action='store_true', help='no tqdm bars'),
    'allow_change': dict(default='', type=str, help=ALLOW_CHANGE_HELP),
}


def add_shared(add_argument, *names, **defaults):
    """Adds the SHARED_FLAGS `names`, in that order, with the script's `defaults`."""
    for name in names:
        add_argument('--' + name, **{**SHARED_FLAGS[name], **({'default': defaults[name]} if name in defaults else {})})


def at_weight(opt):
    """The AT weight on the mean over the whole batch, whatever the device count. The 2017 code summed
    one AT loss per GPU, so its --ngpu N trained with N x beta: --at_sum_replicas 1 asks for that."""
    if opt.ngpu > 1 and opt.beta and opt.at_sum_replicas is None:
        print(f'note: --ngpu {opt.ngpu} --beta {opt.beta:g} weighs the whole batch\'s AT loss by {opt.beta:g}; '
              f'the 2017 code summed one AT loss per GPU, a weight of {opt.ngpu * opt.beta:g}: pass '
              f'--at_sum_replicas 1 for that, or 0 to keep {opt.beta:g} without this note', file=sys.stderr)
    return opt.beta * (opt.ngpu if opt.at_sum_replicas else 1)


def check_options(opt, positive=(), not_negative=()):
    """The checks both scripts share, then `positive` and `not_negative` flags, each named alone.
    No number may be inf or nan: argparse's float() takes both, and no flag means them."""
    for name, value in vars(opt).items():
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f'--{name} must be a finite number, got {value}')
    Schedule(opt)  # --epoch_step parses
    if opt.dtype not in NAMES:
        raise UserError(f'--dtype must be float, double, half or bfloat16, got {opt.dtype!r}')
    for name in ('batch_size', 'epochs', 'ngpu', 'width', 'temperature', 'lr_decay_ratio', *positive):
        if not getattr(opt, name) > 0:
            raise UserError(f'--{name} must be positive, got {getattr(opt, name)}')
    for name in ('nthread', 'lr', 'weight_decay', 'beta', *not_negative):
        if not getattr(opt, name) >= 0:
            raise UserError(f'--{name} must not be negative, got {getattr(opt, name)}')
    if not 0 <= opt.alpha <= 1:  # the KD term's weight; the cross-entropy's is 1 - alpha
        raise UserError(f'--alpha must be between 0 and 1, got {opt.alpha}')
    if not 0 <= opt.seed < 2 ** 32:  # numpy's seed range
        raise UserError(f'--seed must be between 0 and 2**32 - 1, got {opt.seed}')
    changeable = [n for n in opt.allow_change.split(',') if n]
    unknown = [n for n in changeable if n not in vars(opt) or n in MAY_CHANGE]
    if unknown:
        raise UserError(f'--allow_change {opt.allow_change}: {unknown[0]!r} is not an option compared on resume '
                        f'(those are the flags\' names without --, except {", ".join(sorted(MAY_CHANGE))})')


def check_teacher_needed(opt, has_teacher, teacher_flag, terms):
    """Transfer weights (`terms`) and a beta schedule mean nothing without a teacher and a --beta:
    refused, as --grad_beta was, rather than accepted and ignored."""
    for name in terms if not has_teacher else ():
        if getattr(opt, name):
            raise UserError(f'--{name} {getattr(opt, name):g} transfers from a teacher: pass {teacher_flag}')
    decay = getattr(opt, 'beta_decay', 'none')
    if decay != 'none' and not (has_teacher and opt.beta):
        raise UserError(f'--beta_decay {decay} schedules the AT weight: pass --beta'
                        + ('' if has_teacher else f' and {teacher_flag}'))


# ---------------------------------------------------------------- options compared on resume

# Options that may differ from the checkpoint's on resume: how long, where and how fast a run goes, not
# what it trains (docs/reliability.md). Every other option must equal the checkpoint's, or be named in
# --allow_change; one that an older checkpoint lacks compares against its default.
MAY_CHANGE = {'epochs', 'resume', 'save', 'allow_change', 'nthread', 'no_progress', 'tensorboard', 'tensorboard_every',
              'device', 'gpu_id', 'cuda', 'compile', 'channels_last', 'evaluate'}


def check_resume(opt, parser):
    """Refuses to resume a checkpoint under options that change what it trains: one line naming the
    first difference and both values. A checkpoint without the options (2017's) is not compared."""
    if not opt.resume or os.environ.get('RANK', '0') != '0':  # under torchrun rank 0 reads the checkpoint
        return
    saved = load_checkpoint(opt.resume).get('record')
    if not isinstance(saved, dict):
        return
    defaults = {a.dest: a.default for a in parser._actions}
    allowed = set(MAY_CHANGE) | set(filter(None, opt.allow_change.split(',')))
    if Schedule(opt).depends_on_epochs:
        allowed.discard('epochs')  # a linear beta is spread over them
    for name, value in vars(opt).items():
        if name in allowed or (name not in saved and name not in defaults):
            continue
        before = saved.get(name, defaults.get(name))
        if json.loads(json.dumps(value)) != before:
            raise UserError(f'--resume {opt.resume}: --{name} is {before!r} in the checkpoint and {value!r} now; '
                            f'resume with the run\'s options (or pass --allow_change {name})')


# ---------------------------------------------------------------- the run folder

def check_save(opt, default_name):
    """Resolves --save and --resume auto; refuses to touch a folder that holds a run, unless resuming it."""
    if opt.resume == 'auto':
        if not opt.save:
            raise UserError('--resume auto continues the run in --save: pass --save too')
        path = os.path.join(opt.save, 'model.pt7')
        opt.resume = path if os.path.exists(path) else ''
    if not opt.save:
        opt.save = (os.path.dirname(opt.resume) or '.') if opt.resume else os.path.join('logs', default_name)
    existing = [n for n in ('model.pt7', 'log.txt') if os.path.exists(os.path.join(opt.save, n))]
    if existing and not opt.resume:
        raise UserError(f'--save {opt.save} already holds a run ({existing[0]}); pass --resume '
                        f'{os.path.join(opt.save, "model.pt7")} (or auto) to continue it, or choose another --save')


def make_save(folder):
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, '.write_test')
        open(probe, 'w').close()
        os.remove(probe)
    except OSError as e:
        raise UserError(f'--save {folder} is not writable: {e.strerror}') from None


# ---------------------------------------------------------------- random state

def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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
    """Restores rng_state's states. Those of devices this machine lacks (a run saved on CUDA and
    resumed on the CPU, or on fewer GPUs) are left out, with one line where it changes the run."""
    torch.set_rng_state(state['torch'])
    version, internal, gauss = state['python']
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, gauss = state['numpy']
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if state.get('cuda') and torch.cuda.is_available():
        for i, s in enumerate(state['cuda'][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)
    if generator is not None and 'loader' in state:
        if state['loader'].numel() == generator.get_state().numel():
            generator.set_state(state['loader'])
        else:  # CPU and CUDA generators keep states of different kinds
            print(f'warning: the checkpoint\'s data order was drawn on another kind of device than '
                  f'{generator.device.type}; it goes on from --seed, not where it left off', file=sys.stderr)


# ---------------------------------------------------------------- signals

class Signals:
    """SIGINT/SIGTERM ask the run to stop after the current step; a second one exits at once (130).

    For tests, AT_TEST_SIGNALS='WHEN:SIG,...' makes the process send itself SIG (INT, TERM, KILL)
    at WHEN: after its Nth training step ('12'), or after epoch E's checkpoint is written and before
    its log line ('ckpt2'). Signals then land at a chosen step, not at a chosen instant.
    """

    def __init__(self, prog):
        self.prog, self.name, self.steps, self.plan = prog, None, 0, {}
        for item in filter(None, os.environ.get('AT_TEST_SIGNALS', '').split(',')):
            when, sig = item.split(':')
            self.plan.setdefault(when, []).append(getattr(signal, 'SIG' + sig))
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, self.handler)

    def handler(self, signum, frame):
        if self.name is not None:
            print(f'{self.prog}: second signal, exiting now', file=sys.stderr)
            os._exit(128 + signum)
        self.name = signal.Signals(signum).name

    def fire(self, when):
        for sig in self.plan.pop(str(when), []):
            os.kill(os.getpid(), sig)

    def step_done(self):
        self.steps += 1
        self.fire(self.steps)


# ---------------------------------------------------------------- a run

def read_resume(path, saved):
    """A model.pt7 to resume, its params checked against `saved` and under its names."""
    state = load_checkpoint(path)
    state['params'] = checkpoint_params(state, saved)
    check_params(state['params'], saved, f'--resume {path}')
    return state


def restore(path, state, saved, optimizer):
    """Loads a checkpoint (read_resume's) into `saved` params and the optimizer."""
    params = state['params']
    with torch.no_grad():
        for k, v in saved.items():
            v.copy_(params[k])
    try:
        if state.get('optimizer'):
            optimizer.load_state_dict(state['optimizer'])
        state['epoch'] = int(state.get('epoch', 0))
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f'--resume {path}: optimizer state does not fit this model ({e})') from None
    trained = [p for g in optimizer.param_groups for p in g['params']]
    if any(s.get('momentum_buffer') is not None and s['momentum_buffer'].shape != p.shape
           for p in trained for s in [optimizer.state.get(p, {})]):
        # a 2017 checkpoint may list its tensors in another order: the weights are right, the momentum is not
        print(f'note: --resume {path}: its momentum does not fit this model\'s tensor order; momentum restarts',
              file=sys.stderr)
        optimizer.state.clear()
    return state


class EpochWriter:
    """on_epoch_end of rank 0: model.pt7 first, then its log line, then the epoch's TensorBoard points
    (`board`, where there is one), then one line on stdout."""

    def __init__(self, opt, run, generator, signals):
        self.opt, self.run, self.generator, self.signals = opt, run, generator, signals
        self.board = None
        self.log_path = os.path.join(opt.save, 'log.txt')
        # log.txt's n_parameters is the 2017 count, of every tensor of the student's dict (batch-norm
        # statistics too); the trained count is printed beside it
        self.n_parameters = sum(v.numel() for v in run.params_s.values())
        self.n_trained = n_trained(run.params_s)

    def __call__(self, stats, optimizer):
        opt = self.opt
        # plain JSON types (meters give numpy floats), which torch.load(weights_only=True) accepts
        record = json.loads(json.dumps({**vars(opt), **stats, 'num_classes': self.run.num_classes,
                                        **(self.run.data or {}),
                                        'n_parameters': self.n_parameters,
                                        **({'beta_now': self.run.distiller.beta} if self.run.scheduled() else {})}))
        scaler = getattr(optimizer, 'scaler', None)  # fp16: the loss scale goes on where it was
        if self.board:  # the epoch's per-step points reach the disk before model.pt7 says the epoch is done
            self.board.flush()
        save_checkpoint(os.path.join(opt.save, 'model.pt7'), self.run.saved, optimizer, stats['epoch'],
                        rng=rng_state(self.generator), record=record,
                        **({'scaler': scaler.state_dict()} if scaler else {}))
        self.signals.fire(f'ckpt{stats["epoch"]}')
        append_log(self.log_path, record)
        if self.board:
            self.board.epoch(record, optimizer.param_groups[0]['lr'])
        def pct(acc):  # top-1, or top-1/top-5
            return '/'.join(f'{a:.2f}' for a in (acc if isinstance(acc, list) else [acc])) + '%'
        print(f'==> epoch {stats["epoch"]}/{opt.epochs}: train loss {stats["train_loss"]:.4f} acc '
              f'{pct(stats["train_acc"])}, test loss {stats["test_loss"]:.4f} acc {pct(stats["test_acc"])} '
              f'({stats["train_time"]:.1f}s + {stats["test_time"]:.1f}s)')


@dataclass
class Run:
    """What fit() trains, as cifar.build and imagenet.build make it from the parsed options."""
    opt: argparse.Namespace        # the options it was built from (the beta schedule reads them)
    device: torch.device           # where this process computes: the CPU, or its GPU under torchrun
    precision: Precision           # --dtype on that device: autocast, GradScaler, memory format
    train_loader: Iterable         # this process's training batches, (inputs, targets)
    test_loader: Iterable          # this process's share of the test (ImageNet: val) set
    num_classes: int               # the dataset's: the student's classifier has as many outputs
    params_s: dict                 # the student's 2017 dict; its bn statistics go from rank 0 to all
    distiller: Distiller           # a step's loss: the student, any teacher, and the transfer terms
    make_optimizer: Callable       # lr -> a fresh SGD over the student (and any F-ActT adapters)
    saved: dict                    # the tensors model.pt7 holds, under their 2017 names
    description: str               # student and teacher, for the start-up line
    topk: tuple = (1,)             # accuracies counted: top-1 (CIFAR), or top-1 and top-5 (ImageNet)
    data: dict = None              # what the inputs are, for log.txt: image_size, class_digest (CIFAR)

    def __post_init__(self):
        self.schedule = Schedule(self.opt)

    def scheduled(self):
        return self.schedule.scheduled_beta

    def set_beta(self, epoch):
        """The AT weight of `epoch` under --beta_decay, set at the epoch's start."""
        self.distiller.beta = self.schedule.beta(epoch)


def make_distiller(opt, prog, device, precision, f_s, params_s, f_t=None, params_t=None, adapters=None, **terms):
    """The shared part of both scripts' build: the student (and teacher) dicts placed on the device in
    the run's precision, compiled where asked, split over --ngpu GPUs, inside a Distiller with the
    AT and KD weights of the options and any other `terms` (factt_beta=..., at_groups=...).
    Returns (distiller, make_optimizer)."""
    adapters = adapters or {}
    for params, trained in ((params_s, True), (params_t or {}, False), (adapters, True)):
        place_params(params, device, precision.params, precision.channels_last, trained)

    def net(f, params):
        return data_parallel(FunctionalNet(compiled(f, opt.compile, prog), params, precision.compute), opt.ngpu)
    distiller = Distiller(net(f_s, params_s), f_t and net(f_t, params_t), beta=opt.at_weight, alpha=opt.alpha,
                          temperature=opt.temperature, adapters=adapters, **terms)
    return distiller, sgd({**params_s, **adapters}, opt.weight_decay, precision)


def fit(opt, run, prog):
    """Trains `run` (a Run, from cifar.build or imagenet.build) under `opt`, writing model.pt7 and
    log.txt into opt.save."""
    dist = Dist(run.device)
    lead = dist.rank == 0  # only rank 0 writes and prints
    optimizer = run.make_optimizer(opt.lr)
    generator = getattr(run.train_loader, 'generator', None)
    # rank 0 reads the checkpoint and hands it to the others, which may be on machines without it
    state = dist.broadcast_object(read_resume(opt.resume, run.saved) if opt.resume and lead else None)
    if state:
        restore(opt.resume, state, run.saved, optimizer)
    epoch = state['epoch'] if state else 0
    model = distributed(run.distiller, run.device)  # every rank starts from rank 0's weights
    signals = Signals(prog)
    writer = EpochWriter(opt, run, generator, signals)
    if lead:
        if state:
            print(f'resumed from {opt.resume} at epoch {epoch}, lr {run.schedule.lr(epoch):g}')
        make_save(opt.save)
        if state and state.get('record'):
            repair_log(writer.log_path, state['epoch'], state['record'])
        provenance.record(opt.save, run.device, dist.world, epoch)
        if opt.tensorboard:
            writer.board = Board(opt.save, len(run.train_loader),
                                 (n_images(run.train_loader), n_images(run.test_loader)), opt.tensorboard_every,
                                 epoch, read_json_stats(writer.log_path) if os.path.exists(writer.log_path) else [])
        print(f'{run.description}: {writer.n_parameters:,} parameters ({writer.n_trained:,} trained); '
              f'{run.num_classes} classes; device {run.device}'
              + (f' x {dist.world} processes' if dist.world > 1 else '') + f'; run folder {opt.save}')
    if state and state.get('rng'):  # last, after building and restoring drew their own numbers
        set_rng_state(state['rng'], generator)

    def should_stop():
        signals.step_done()
        return dist.any(signals.name)

    trainer = Trainer(model, run.make_optimizer, run.device, epochs=opt.epochs, schedule=run.schedule,
                      start_epoch=epoch, topk=run.topk, precision=run.precision,
                      progress=lead and not opt.no_progress, dist=dist,
                      on_epoch_start=run.set_beta if run.scheduled() else None,
                      on_epoch_end=writer if lead else None, should_stop=should_stop,
                      scaler_state=(state or {}).get('scaler'), on_steps=writer.board and writer.board.steps,
                      restart_momentum=bool(getattr(opt, 'lr_restart_momentum', 1)),
                      buffers=[v for k, v in run.params_s.items() if not is_trained(k)])
    try:
        return trainer.train(run.train_loader, run.test_loader, optimizer)
    except Stopped:
        if lead:
            done = read_json_stats(writer.log_path)[-1]['epoch'] if os.path.exists(writer.log_path) else 0
            kept = f'model.pt7 holds the last whole epoch ({done})' if done else 'no epoch had finished'
            print(f'{prog}: {signals.name or "signal"}: stopped mid-epoch; {kept}; continue with '
                  f'--resume auto --save {opt.save}', file=sys.stderr)
        # a rank that got no signal itself stops with its peers, as if it had got SIGTERM
        raise Stopped(signal.Signals[signals.name] if signals.name else signal.SIGTERM) from None
    finally:
        if writer.board:
            writer.board.close()


def n_images(loader):
    """Images a pass over the loader sees, over all ranks."""
    return len(loader.dataset) if hasattr(loader, 'dataset') else len(loader.labels)
