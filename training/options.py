"""The command line of cifar.py and imagenet.py: the flags they share, declared once, and the checks
of the parsed options, the ones compared on resume among them. The parsed options are the run's one
record of what it trains: log.txt and model.pt7 hold them, and a resume is checked against them."""
import argparse
import json
import math
import os
import sys

from training.errors import UserError, die
from training.formats import load_checkpoint
from training.precision import NAMES
from training.schedule import Schedule

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


AT_MODE_HELP = ('AT loss: code (the 2017 code\'s mean of squared differences of the maps; --beta 1e+3 is the '
                'paper\'s setting) or paper (Eq. 2 as written: beta/2 times the 2-norm, not squared, per sample; '
                'docs/losses.md)')


def at_weight(opt):
    """The AT weight on the mean over the whole batch, whatever the device count. The 2017 code summed
    one AT loss per GPU, so its --ngpu N trained with N x beta: --at_sum_replicas 1 asks for that.
    It means nothing under torchrun, which is refused rather than ignored."""
    if opt.at_sum_replicas is not None and int(os.environ.get('WORLD_SIZE', 1)) > 1:
        raise UserError('--at_sum_replicas weighs the AT loss of --ngpu replicas inside one process; under torchrun '
                        'each process takes the AT loss of its share and DistributedDataParallel averages the '
                        'gradients, so beta already weighs the whole batch: drop --at_sum_replicas')
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
    if opt.ngpu > 1 and opt.compile:
        # DataParallel's replicas call one compiled function; dynamo guards on the device, so it compiles once
        # per GPU and, past its recompile limit, runs eagerly after a very long first step
        raise UserError(f'--compile with --ngpu {opt.ngpu}: the replicas would share one compiled function, which '
                        f'recompiles for each GPU; use --ngpu 1, or torchrun with one GPU per process')
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
# --allow_change; one that an older checkpoint lacks compares against its default, where it has one.
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
        if name in allowed or (name not in saved and defaults.get(name) is None):
            continue  # a None default is decided from other options (--init from --model), compared themselves
        before = saved.get(name, defaults.get(name))
        if json.loads(json.dumps(value)) != before:
            raise UserError(f'--resume {opt.resume}: --{name} is {before!r} in the checkpoint and {value!r} now; '
                            f'resume with the run\'s options (or pass --allow_change {name})')
