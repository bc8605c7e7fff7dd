"""The lr and AT weight of every epoch of a run, from its options: one definition, read by the loop,
TensorBoard, the resume message and the scripts' dry runs.

The lr drops at the start of each epoch listed in --epoch_step (1-based), by --lr_decay_ratio. A
repeated entry drops it once, as 2017's `epoch in epoch_step` did; the scripts' scaled schedules
list distinct epochs."""
import json

from training.errors import UserError


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
