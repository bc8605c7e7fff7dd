"""The options of cifar.py and imagenet.py as one typed object (Options, a dataclass): its fields build
the command line, the flags both scripts share are declared once, and the parsed options are checked.
They are the run's one record of what it trains: log.txt and model.pt7 hold them, and a resume reads
the checkpoint's back, typed, and compares them. Schedule: the lr and AT weight of every epoch, read
from them by the loop, TensorBoard, the resume message and the scripts' dry runs."""
import argparse
import json
import math
import os
import sys
from dataclasses import MISSING, Field, asdict, dataclass, field, fields
from typing import Optional, get_args

from training.errors import UserError, die
from training.rundir import load_checkpoint

# --help's two groups of flags: what a user of the 2017 scripts knows comes first
GROUP_2017 = '2017 flags (same names, types and defaults as the paper\'s code)'
GROUP_NEW = 'new in this project'


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line, not usage + message."""

    def error(self, message):
        die(self.prog, message)


AT_SUM_REPLICAS_HELP = ('1: with --ngpu N, weigh AT by N x beta, as the 2017 code did by summing one AT loss per '
                        'GPU; 0: beta on the whole batch (the default; without this flag, --ngpu > 1 notes the '
                        'difference)')


ALLOW_CHANGE_HELP = ('on resume, options (names without --, comma-separated, e.g. dataroot,teacher_id) that may '
                     'differ from the checkpoint\'s: a moved dataset or teacher; any other change is refused')


AT_MODE_HELP = ('AT loss: code (the 2017 code\'s mean of squared differences of the maps; --beta 1e+3 is the '
                'paper\'s setting) or paper (Eq. 2 as written: beta/2 times the 2-norm, not squared, per sample; '
                'docs/losses.md)')


def flag(type, default, help=None, *, v2017=False, may_change=False, **argparse_kw):
    """A command-line option, declared whole as a field of an Options class: its type (Optional where
    the default is None: decided after parsing), default and help; `v2017` puts it in the 2017 group of
    --help, and `may_change` lets it differ from the checkpoint's on resume (how long, where or how
    fast a run goes, not what it trains; docs/reliability.md)."""
    return field(default=default, metadata=dict(
        type=Optional[type] if default is None else type, help=help, group=GROUP_2017 if v2017 else GROUP_NEW,
        may_change=may_change, argparse=argparse_kw))


def derived(type, *sources):
    """An option of `type` decided from the others (`sources`) after parsing (at_weight): saved and
    compared with them, but no flag. None until decided, and not compared against a checkpoint that
    lacks it; free to differ on resume where one of its sources is."""
    return field(default=None, metadata=dict(type=Optional[type], sources=sources))  # no 'group': no flag


# Options --allow_change may not name: a resumed run could not take their new value, so it would be
# accepted and ignored (every other option is read from the options when the run is built, and takes
# effect; loop.fit sets the optimizer's lr and weight decay from them, not from the checkpoint).
NOT_ON_RESUME = {
    **dict.fromkeys(('model', 'depth', 'width', 'init'), 'the weights come from the checkpoint'),
    'seed': 'the random states come from the checkpoint',
    'preset': 'the options it sets are compared one by one: name those',
}


# The flags both scripts take, declared once (flag's arguments); where the scripts' defaults differ
# the declaration has none, and each script gives its own (shared's default).
SHARED_FLAGS = {
    'dtype': dict(type=str, default='float', v2017=True,
                  help='float (or float32), double (float64); half (float16) or bfloat16: autocast, the weights '
                       'kept float32'),
    'batch_size': dict(type=int, help='images a step, over all devices', v2017=True),
    'lr': dict(type=float, default=0.1, help='SGD learning rate (momentum 0.9)', v2017=True),
    'epochs': dict(type=int, may_change=True, v2017=True, help='epochs to train (more on a resume: it goes on)'),
    'weight_decay': dict(type=float, help='on every trained tensor, batch norm included', v2017=True),
    'epoch_step': dict(type=str, v2017=True, help='JSON list: epochs (from 1) at whose start lr *= lr_decay_ratio; '
                                                  'an epoch listed twice drops it once'),
    'lr_decay_ratio': dict(type=float, v2017=True, help='the lr\'s factor at each --epoch_step'),
    'resume': dict(type=str, default='', may_change=True, v2017=True,
                   help='model.pt7 to continue from, or auto (the one in --save, if any)'),
    'temperature': dict(type=float, default=4, help='KD temperature', v2017=True),
    'alpha': dict(type=float, default=0, help='KD weight', v2017=True),
    'beta': dict(type=float, default=0, help='AT weight', v2017=True),
    'at_mode': dict(type=str, default='code', help=AT_MODE_HELP),  # choices: utils.AT_MODES, which imports torch
    'cuda': dict(type=bool, default=False, may_change=True, v2017=True,
                 help='(2017 flag, kept for compatibility; see --device)'),
    'save': dict(type=str, default='', may_change=True, v2017=True,
                 help='run folder for model.pt7 and log.txt (default: logs/<script>_<time>)'),
    'ngpu': dict(type=int, default=1, help='GPUs to split each batch over', v2017=True),
    'gpu_id': dict(type=str, default='0', may_change=True, help='CUDA_VISIBLE_DEVICES', v2017=True),
    'at_sum_replicas': dict(type=int, default=None, choices=[0, 1], help=AT_SUM_REPLICAS_HELP),
    'seed': dict(type=int, default=0, help='seeds torch, numpy, random and the data order'),
    'device': dict(type=str, default='', may_change=True, help='cpu or cuda (default: cuda when available)'),
    'compile': dict(type=bool, default=False, may_change=True,
                    help='torch.compile the student and teacher forward passes'),
    'tensorboard': dict(type=int, default=None, may_change=True, choices=[0, 1],
                        help='TensorBoard event files in the run folder (default: 1 where the tensorboard package '
                             'is installed)'),
    'tensorboard_every': dict(type=int, default=50, may_change=True,
                              help='steps between points of the running train loss'),
    'no_progress': dict(type=bool, default=False, may_change=True, help='no tqdm bars'),
    'allow_change': dict(type=str, default='', may_change=True, help=ALLOW_CHANGE_HELP),
}


def shared(name, default=MISSING, **argparse_kw):
    """The field of SHARED_FLAGS[name]; `default`: this script's, where the scripts differ."""
    return flag(**SHARED_FLAGS[name], **({} if default is MISSING else dict(default=default)), **argparse_kw)


def options_class(cls):
    """An Options subclass made a frozen dataclass: its fields (flag, shared, derived) in the order
    written, each typed by its own declaration. Frozen: once decided (a script's settle), the options
    the run records are the options it trains with."""
    cls.__annotations__ = {k: v.metadata['type'] for k, v in vars(cls).items() if isinstance(v, Field)}
    return dataclass(frozen=True)(cls)


def _scalar(annotation):
    """int for int and Optional[int]; the type argparse converts a flag's text with."""
    args = [a for a in get_args(annotation) if a is not type(None)]
    return args[0] if args else annotation


class Options:
    """A run's options, one typed object: a subclass (made by options_class) declares them as fields
    (flag, shared, derived), from which its command line is built. log.txt and model.pt7 hold them
    (record()); a resume reads the checkpoint's back into the same type (from_record) and compares
    them field by field."""

    @classmethod
    def parser(cls, prog, description):
        p = Parser(prog=prog, description=description)
        groups = {}
        for f in fields(cls):
            if 'group' not in f.metadata:
                continue  # derived: not a flag
            title = f.metadata['group']
            if title not in groups:
                groups[title] = p.add_argument_group(title)
            kw = dict(action='store_true') if f.type is bool else dict(default=f.default, type=_scalar(f.type))
            groups[title].add_argument('--' + f.name, help=f.metadata['help'], **kw, **f.metadata['argparse'])
        return p

    @classmethod
    def from_namespace(cls, namespace):
        return cls(**vars(namespace))

    @classmethod
    def may_change(cls):
        return {f.name for f in fields(cls) if f.metadata.get('may_change')}

    def allowed_changes(self):
        """The options that may differ from a checkpoint's: those declared so, those --allow_change
        names, and those derived from either."""
        allowed = self.may_change() | set(filter(None, self.allow_change.split(',')))
        return allowed | {f.name for f in fields(self) if allowed & set(f.metadata.get('sources', ()))}

    def record(self):
        """The options as plain JSON values, as log.txt and model.pt7 hold them."""
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_record(cls, record, where):
        """A saved record's options, typed: a value of the wrong type is one line naming it. Options
        the record lacks (it is older) take their defaults."""
        values = {}
        for f in fields(cls):
            if f.name not in record:
                continue
            value, kind = record[f.name], _scalar(f.type)
            ok = (value is None and kind is not f.type) or (type(value) is kind) or (
                kind is float and type(value) is int)
            if not ok:
                raise UserError(f'{where}: its option {f.name} is {value!r}, not of type {kind.__name__}')
            values[f.name] = value
        return cls(**values)


def at_weight(opt):
    """The AT weight on the mean over the whole batch, whatever the device count. The 2017 code summed
    one AT loss per GPU, so its --ngpu N trained with N x beta: --at_sum_replicas 1 asks for that
    (meaningless under torchrun: check_options refuses it there)."""
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
    from training.device import NAMES  # torch: not at the top, which rundir's status imports
    if opt.dtype not in NAMES:
        raise UserError(f'--dtype must be one of {", ".join(NAMES)}, got {opt.dtype!r}')
    for name in ('batch_size', 'epochs', 'ngpu', 'width', 'temperature', 'lr_decay_ratio', *positive):
        if not getattr(opt, name) > 0:
            raise UserError(f'--{name} must be positive, got {getattr(opt, name)}')
    for name in ('nthread', 'lr', 'weight_decay', 'beta', *not_negative):
        if getattr(opt, name) is not None and not getattr(opt, name) >= 0:  # None: decided in settle
            raise UserError(f'--{name} must not be negative, got {getattr(opt, name)}')
    if not 0 <= opt.alpha <= 1:  # the KD term's weight; the cross-entropy's is 1 - alpha
        raise UserError(f'--alpha must be between 0 and 1, got {opt.alpha}')
    if not 0 <= opt.seed < 2 ** 32:  # numpy's seed range
        raise UserError(f'--seed must be between 0 and 2**32 - 1, got {opt.seed}')
    if opt.at_sum_replicas is not None and int(os.environ.get('WORLD_SIZE', 1)) > 1:
        raise UserError('--at_sum_replicas weighs the AT loss of --ngpu replicas inside one process; under torchrun '
                        'each process takes the AT loss of its share and DistributedDataParallel averages the '
                        'gradients, so beta already weighs the whole batch: drop --at_sum_replicas')
    if opt.ngpu > 1 and opt.compile:
        # DataParallel's replicas call one compiled function; dynamo guards on the device, so it compiles once
        # per GPU and, past its recompile limit, runs eagerly after a very long first step
        raise UserError(f'--compile with --ngpu {opt.ngpu}: the replicas would share one compiled function, which '
                        f'recompiles for each GPU; use --ngpu 1, or torchrun with one GPU per process')
    changeable = [n for n in opt.allow_change.split(',') if n]
    flags = {f.name for f in fields(opt) if 'group' in f.metadata}
    unknown = [n for n in changeable if n not in flags or n in opt.may_change()]
    if unknown:
        raise UserError(f'--allow_change {opt.allow_change}: {unknown[0]!r} is not an option compared on resume '
                        f'(those are the flags\' names without --, except {", ".join(sorted(opt.may_change()))})')
    for name in changeable:
        if name in NOT_ON_RESUME:
            raise UserError(f'--allow_change {name}: a resumed run cannot take a new --{name} '
                            f'({NOT_ON_RESUME[name]}); start a new run for it')


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

# Where the data is: not compared as text (a moved copy, or the same folder named another way, is the
# same data) but by what it holds, once it is read (loop.check_same_data).
DATA_PATHS = ('dataroot', 'imagenetpath')


def check_resume(opt):
    """Refuses to resume a checkpoint under options that change what it trains: one line naming the
    first difference and both values. Which options may change is declared with each (flag's
    may_change). A checkpoint without the options (2017's) is not compared."""
    if not opt.resume or os.environ.get('RANK', '0') != '0':  # under torchrun rank 0 reads the checkpoint
        return
    record = load_checkpoint(opt.resume).get('record')
    if not isinstance(record, dict):
        return
    saved = type(opt).from_record(record, f'--resume {opt.resume}')
    allowed = opt.allowed_changes() | set(DATA_PATHS)
    if Schedule(opt).depends_on_epochs:
        allowed.discard('epochs')  # a linear beta is spread over them
    now = opt.record()
    for f in fields(opt):
        if f.name in allowed or (f.name not in record and f.default is None):
            continue  # a None default is decided from other options (--init from --model), compared themselves
        before = getattr(saved, f.name)
        if now[f.name] != before:
            raise UserError(f'--resume {opt.resume}: --{f.name} is {before!r} in the checkpoint and '
                            f'{getattr(opt, f.name)!r} now; resume with the run\'s options (or pass --allow_change '
                            f'{f.name})')


# ---------------------------------------------------------------- the schedule
# The lr drops at the start of each epoch listed in --epoch_step (1-based), by --lr_decay_ratio. A
# repeated entry drops it once, as 2017's `epoch in epoch_step` did; the scripts' scaled schedules
# list distinct epochs.

def parse_epoch_step(text):
    """--epoch_step: a JSON list of ints, epochs from 1 on."""
    try:
        steps = json.loads(text)
    except (json.JSONDecodeError, TypeError):
        steps = None
    if not isinstance(steps, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in steps):
        raise UserError(f'--epoch_step must be a JSON list of ints, like [60,120,160]; got {text!r}')
    if any(s < 1 for s in steps):  # epochs count from 1: an lr step at 0 would never happen
        raise UserError(f'--epoch_step lists epochs from 1 on, like [60,120,160]; got {text!r}')
    return steps


class Schedule:
    """lr(epoch) and beta(epoch) of a run. `options`: a script's Options or a log record's dict."""

    def __init__(self, options):
        o = options if isinstance(options, dict) else vars(options)
        self.base_lr, self.ratio, self.epochs = o['lr'], o['lr_decay_ratio'], o.get('epochs')
        self.steps = sorted(set(parse_epoch_step(o['epoch_step'])))  # a repeated epoch drops once
        self.base_beta = o.get('at_weight', o.get('beta', 0))
        self.beta_decay = o.get('beta_decay', 'none')

    def drops(self, epoch):
        """Whether the lr drops at the start of `epoch`."""
        return epoch in self.steps

    def lr(self, epoch):
        """The lr of `epoch`, multiplied step by step as the optimizer's is (so equal to it bit for bit)."""
        lr = self.base_lr
        for s in self.steps:
            if s <= epoch:
                lr *= self.ratio
        return lr

    def beta(self, epoch):
        """The AT weight of `epoch`. none: constant (2017). step: times the ratio exactly when the lr
        drops. linear: from beta at epoch 1 down to beta/epochs at the last epoch."""
        if self.beta_decay == 'step':
            return self.base_beta * self.ratio ** sum(1 for s in self.steps if s <= epoch)
        if self.beta_decay == 'linear':
            return self.base_beta * (self.epochs - epoch + 1) / self.epochs
        return self.base_beta

    @property
    def scheduled_beta(self):
        return self.beta_decay != 'none'

    @property
    def depends_on_epochs(self):
        """A linear beta is spread over --epochs: changing it changes the epochs already trained."""
        return self.beta_decay == 'linear'

    def key(self):
        """What a finished run's schedule is, for comparing it with one asked for."""
        return self.epochs, self.steps
