"""The one training loop of cifar.py and imagenet.py: torchnet's Engine, its meters, mixed precision
(autocast, with a GradScaler for fp16) and torch.compile.

One training step, as the engine runs it: on_sample moves the batch to the device; step() runs the
model under autocast and returns the loss to backpropagate with the step's logits and named loss
terms; the engine backpropagates and calls on_forward, which queues the step's figures on the
device; flush() hands them to the meters, one device-to-host copy per `sync_every` steps; then the
optimizer steps (through the GradScaler for fp16) and on_update asks whether a signal came.
"""
import math
import sys
import types

import torch
import torchnet as tnt
from tqdm import tqdm

from training.compat import compile_errors
from training.parallel import Dist
from training.precision import Precision
from training.errors import Stopped, UserError
from utils import AT_PREFIX


def own_code(f):
    """f with a copy of its code object. Dynamo keeps its compiled graphs per code object: a student
    and a teacher of one architecture (both `wrn`) would share one cache, recompile against each
    other's guards and run into its size limit; with their own code each has its own."""
    if not isinstance(f, types.FunctionType):
        return f
    g = types.FunctionType(f.__code__.replace(), f.__globals__, f.__name__, f.__defaults__, f.__closure__)
    g.__kwdefaults__, g.__qualname__ = f.__kwdefaults__, f.__qualname__
    return g


def compiled(f, enabled, prog):
    """torch.compile(f), falling back to f where compilation fails; f itself when not enabled."""
    return Compiled(f, prog) if enabled else f


class Compiled:
    """torch.compile(f) that falls back to f, with one line, where compilation fails: in the forward
    call here, or in the backward pass, which torch compiles lazily and whose errors come out of
    loss.backward() (EagerOnCompileError retries the step then). Shapes are static: a last, smaller
    batch compiles once more, and the full batches keep kernels made for their size. Any other
    error (out of memory, a bad input) is raised as it is."""

    def __init__(self, f, prog):
        self.f, self.prog, self.current = f, prog, torch.compile(own_code(f), dynamic=False)

    def __call__(self, *args, **kwargs):
        if self.current is not self.f:
            try:
                return self.current(*args, **kwargs)
            except compile_errors() as e:
                self.fall_back(e)
        return self.f(*args, **kwargs)

    def fall_back(self, error):
        if self.current is not self.f:
            print(f'{self.prog}: --compile unavailable here ({type(error).__name__}); running eagerly', file=sys.stderr)
            self.current = self.f


class EagerOnCompileError:
    """An optimizer whose step(closure) runs the step again eagerly where compiling failed in the
    closure's backward pass: the compiled functions fall back, and the half-made gradients go."""

    def __init__(self, optimizer, compiled):
        self.optimizer, self.compiled = optimizer, compiled

    def __getattr__(self, name):  # param_groups, zero_grad, state_dict, scaler, ...
        return getattr(self.optimizer, name)

    def step(self, closure):
        try:
            return self.optimizer.step(closure)
        except compile_errors() as e:
            for c in self.compiled:
                c.fall_back(e)
            self.optimizer.zero_grad()
            return self.optimizer.step(closure)


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


class Trainer:
    """torchnet's Engine with its hooks as methods: trains `model`, evaluates after every epoch.

    model(inputs, targets, mode) -> (logits, {'loss': total, and named terms}), as distill.Distiller
    gives: 'at_loss.G' for group G, 'factt_loss', 'grad_at_loss', ... Each term gets a meter the
    first time it is seen, and is logged by name; the AT terms go to the 2017 `at_losses` list.
    make_optimizer(lr) builds a fresh optimizer: at an epoch where the `schedule` (schedule.Schedule)
    drops the lr, the lr becomes the schedule's and the momentum restarts, as in 2017
    (restart_momentum=False: the optimizer is kept and only its lr changes, as RepDistiller does).
    on_epoch_start(epoch) runs first in each
    epoch (a beta schedule); on_epoch_end(stats, optimizer) saves and logs, with the 2017 fields in
    stats. should_stop() is asked after steps (a signal). on_steps(epoch, [(batch, loss), ...]) gets
    the train losses as the meters do (a TensorBoard curve). Under torchrun, `dist` sums the meters
    over ranks, and rank 0's batch-norm `buffers` are broadcast before each test pass. The meters
    read the device only every `sync_every` steps and at the end of each pass, so that a GPU is not
    made to wait for the host (default: 50 on GPUs; 1 on the CPU, where reading is free).
    `precision` (precision.Precision) gives autocast and, for fp16, the GradScaler; scaler_state (a
    checkpoint's) resumes its scale.
    """

    def __init__(self, model, make_optimizer, device, *, epochs, schedule=None, start_epoch=0, topk=(1,),
                 precision=None, progress=True, sync_every=None, dist=None,
                 buffers=(), on_epoch_start=None, on_epoch_end=None, should_stop=None, scaler_state=None,
                 on_steps=None, restart_momentum=True):
        self.model, self.device = model, device
        self.precision = precision or Precision(device_type=device.type)
        self.epochs, self.schedule, self.start_epoch = epochs, schedule, start_epoch
        self.restart_momentum = restart_momentum
        self.progress, self.buffers = progress, list(buffers)
        self.on_epoch_start, self.on_epoch_end, self.should_stop = on_epoch_start, on_epoch_end, should_stop
        self.on_steps = on_steps
        self.dist = dist or Dist(device)
        self.sync_every = sync_every or (1 if device.type == 'cpu' else 50)
        self.stop_every = self.sync_every if self.dist.world > 1 else 1  # under torchrun asking is a collective
        self.meter_loss = tnt.meter.AverageValueMeter()
        self.classacc = tnt.meter.ClassErrorMeter(topk=list(topk), accuracy=True)
        self.timer_train, self.timer_test = tnt.meter.TimeMeter('s'), tnt.meter.TimeMeter('s')
        self.terms = {}  # a meter per named loss term, made the first time the model reports it
        self.scaler = self.precision.scaler(scaler_state)
        modules = model.modules() if isinstance(model, torch.nn.Module) else ()  # a plain function has none
        self.compiled = [m.f for m in modules if isinstance(getattr(m, 'f', None), Compiled)]
        self.make_optimizer = lambda lr: self.wrap(make_optimizer(lr))
        self.pending = []  # per step: (batch number, batch size, term names, device vector of its figures)
        self.epoch, self.t0, self.last = start_epoch, 0, {}
        if self.dist.rank == 0 and self.precision.emulated():
            print(f'warning: this CPU has no native {self.precision.name} kernels; --dtype {self.precision.name} '
                  f'will train slower than float', file=sys.stderr)

    def wrap(self, optimizer):
        """The optimizer the engine steps: through the GradScaler (fp16), and retried eagerly where
        compiling the backward pass fails (--compile)."""
        if self.scaler:
            optimizer = GradScaled(optimizer, self.scaler)
        return EagerOnCompileError(optimizer, self.compiled) if self.compiled else optimizer

    def meters(self, train):
        return [self.meter_loss, self.classacc, *(self.terms.values() if train else [])]

    def train(self, train_loader, test_loader, optimizer):
        """Runs epochs start_epoch+1 .. epochs from `optimizer`; returns the last epoch's stats."""
        self.train_loader, self.test_loader = train_loader, test_loader
        optimizer = self.wrap(optimizer)
        self.engine = tnt.engine.Engine()
        self.engine.hooks.update(on_sample=self.on_sample, on_forward=self.on_forward, on_start=self.on_start,
                                 on_update=self.on_update, on_start_epoch=self.on_start_epoch,
                                 on_end_epoch=self.on_end_epoch)
        self.engine.train(self.step, train_loader, self.epochs, optimizer)
        return self.last

    def on_sample(self, state):
        inputs, targets = state['sample'][:2]
        state['sample'] = [inputs.to(self.device, self.precision.params, non_blocking=True),
                           targets.to(self.device, non_blocking=True), state['train']]

    def step(self, sample):
        """The engine's network: the loss to backpropagate (scaled for fp16), and the step's output
        for on_forward: its logits, its loss and its named terms, detached."""
        inputs, targets, mode = sample
        with self.precision.autocast():
            y, losses = self.model(inputs, targets, mode)
        loss = losses['loss']
        terms = {k: v.detach() for k, v in losses.items() if k != 'loss'} if mode else {}
        return (self.scaler.scale(loss) if self.scaler and mode else loss), (y.detach(), loss.detach(), terms)

    def on_forward(self, state):
        """Queues the step's figures, still on the device: loss, errors at each k, then each term."""
        (y, loss, terms), target = state['output'], state['sample'][1]
        for name in terms:
            self.terms.setdefault(name, tnt.meter.AverageValueMeter())
        errors = topk_errors(y.float(), target, self.classacc.topk)
        values = torch.stack([v.float().reshape(()) for v in (loss, *errors, *terms.values())])
        self.pending.append((state['t'] - self.t0 + 1, len(target), tuple(terms), values))
        if len(self.pending) >= self.sync_every:
            self.flush(state)

    def flush(self, state):
        """Feeds the meters with the pending steps' figures: one device-to-host copy."""
        if not self.pending:
            return
        rows = torch.stack([v for *_, v in self.pending]).tolist()
        pending, self.pending, k = self.pending, [], len(self.classacc.topk)
        for (batch, size, names, _), (loss, *rest) in zip(pending, rows):
            if not math.isfinite(loss):
                raise UserError(f'the loss is {loss} at epoch {self.epoch}, batch {batch}'
                                f'{"" if state["train"] else " of the test pass"}; model.pt7 keeps the last good epoch')
            self.meter_loss.add(loss)
            for topk, err in zip(self.classacc.topk, rest[:k]):
                self.classacc.sum[topk] += int(err)
            self.classacc.n += size
            for name, v in zip(names, rest[k:]):
                self.terms[name].add(v)
        if self.on_steps and state['train']:
            self.on_steps(self.epoch, [(batch, row[0]) for (batch, *_), row in zip(pending, rows)])
        if self.progress and state['train']:
            state['iterator'].set_postfix(loss=f'{self.meter_loss.value()[0]:.3f}',
                                          acc=f'{self.classacc.value()[0]:.2f}', refresh=False)

    def on_start(self, state):
        self.t0 = 0
        if state['train']:
            state['epoch'] = self.start_epoch

    def on_update(self, state):
        if self.should_stop and (state['t'] - self.t0) % self.stop_every == 0 and self.should_stop():
            raise Stopped()

    def on_start_epoch(self, state):
        self.epoch = epoch = state['epoch'] + 1
        if self.on_epoch_start:
            self.on_epoch_start(epoch)
        if hasattr(getattr(self.train_loader, 'sampler', None), 'set_epoch'):
            self.train_loader.sampler.set_epoch(epoch)  # DistributedSampler: a fresh, seeded order
        if self.schedule and self.schedule.drops(epoch):
            lr = self.schedule.lr(epoch)
            if self.restart_momentum:
                state['optimizer'] = self.make_optimizer(lr)
            else:
                for group in state['optimizer'].param_groups:
                    group['lr'] = lr
        for m in self.meters(True):
            m.reset()
        self.timer_train.reset()
        self.t0 = state['t']
        state['iterator'] = tqdm(self.train_loader, desc=f'epoch {epoch}/{self.epochs}', dynamic_ncols=True,
                                 leave=False, disable=not self.progress)

    def on_end_epoch(self, state):
        self.flush(state)
        self.dist.sync_meters(self.meters(True))
        terms = {name: list(m.value()) for name, m in self.terms.items()}
        stats = {'train_loss': self.meter_loss.value()[0], 'train_acc': self.accuracy(),
                 'epoch': state['epoch'], 'train_time': self.timer_train.value(),
                 'at_losses': [v for name, v in terms.items() if name.startswith(AT_PREFIX)],  # 2017: by group
                 **{name: v for name, v in terms.items() if not name.startswith(AT_PREFIX)}}
        if self.test_loader is not None:
            stats.update(self.test())
        self.last = stats
        if self.on_epoch_end:
            self.on_epoch_end(stats, state['optimizer'])

    def test(self):
        """One pass over the test set, with rank 0's batch-norm statistics on every rank."""
        self.dist.broadcast_(self.buffers)
        for m in self.meters(False):
            m.reset()
        self.timer_test.reset()
        with torch.no_grad():
            self.engine.test(self.step, tqdm(self.test_loader, desc='test', leave=False, dynamic_ncols=True,
                                             disable=not self.progress))
        self.flush({'train': False})
        self.dist.sync_meters(self.meters(False))
        return {'test_loss': self.meter_loss.value()[0], 'test_time': self.timer_test.value(),
                'test_acc': self.accuracy()}

    def accuracy(self):
        """Top-1 accuracy (%), or [top-1, top-5] where both are counted (ImageNet), as 2017 logged them."""
        acc = self.classacc.value()
        return acc[0] if len(acc) == 1 else acc


def evaluate(f, params, loader, device, precision=None, topk=(1, 5), progress=True, dist=None):
    """Top-k accuracies (%) of f(inputs, params, False) over a loader, and the image count;
    under torchrun, over every rank's share."""
    meter = tnt.meter.ClassErrorMeter(topk=list(topk), accuracy=True)
    with torch.inference_mode(), (precision or Precision(device_type=device.type)).autocast():
        for x, y in tqdm(loader, desc='evaluate', leave=False, dynamic_ncols=True, disable=not progress):
            meter.add(f(x.to(device), params, False)[0].float(), y)
    (dist or Dist(device)).sync_meters([meter])
    return meter.value(), meter.n


def sgd(params, weight_decay, precision):
    """make_optimizer(lr): SGD with momentum 0.9 on every tensor of `params` that learns, as in 2017;
    the fused SGD where the precision asks for it (fp16 on a GPU)."""
    trained = [v for v in params.values() if v.requires_grad]
    return lambda lr: torch.optim.SGD(trained, lr, momentum=0.9, weight_decay=weight_decay,
                                      fused=precision.fused_sgd or None)
