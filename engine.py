"""The one training loop of cifar.py and imagenet.py: torchnet's Engine, its meters, mixed precision
(autocast, with a GradScaler for fp16) and torch.compile."""
import math
import sys
import types
from contextlib import nullcontext

import torch
import torchnet as tnt
from tqdm import tqdm

from compat import compile_errors
from parallel import Dist
from utils import UserError

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
    convolutions and a step runs several times slower than fp32 (docs/speed.md).
    """
    if device.type != 'cpu' or dtype not in AMP_DTYPES:
        return False
    native = {torch.bfloat16: '_is_mkldnn_bf16_supported', torch.float16: '_is_mkldnn_fp16_supported'}
    try:
        return not getattr(torch.ops.mkldnn, native[AMP_DTYPES[dtype]])()
    except (AttributeError, RuntimeError):  # the check is private to torch: never fail a run on it
        return False


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
    batch compiles once more, and the full batches keep kernels made for their size. Any other error (out of memory, a
    bad input) is raised as it is."""

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

    model(inputs, targets, mode) -> (logits, {'loss': total, 'at_losses': [...], other losses}),
    as distill.Distiller gives. make_optimizer(lr) builds a fresh optimizer: at an epoch in
    `epoch_step` the lr is multiplied by `lr_decay_ratio` and the momentum restarts, as in 2017
    (restart_momentum=False: the optimizer is kept and only its lr changes, as RepDistiller does).
    on_epoch_start(epoch) runs first in each epoch (a beta schedule); on_epoch_end(stats, optimizer)
    saves and logs, with the 2017 fields in stats. should_stop() is asked after steps (a signal).
    on_steps(epoch, [(batch, loss), ...]) gets the train losses as the meters do (a TensorBoard curve).
    Under torchrun, `dist` sums the meters over ranks, and rank 0's batch-norm `buffers` are
    broadcast before each test pass. The meters get every step's values but read them from the
    device only every `sync_every` steps and at the end of each pass, so that a GPU is not made
    to wait for the host (default: 50 on GPUs; 1 on the CPU, where reading is free).
    With fp16 a GradScaler scales the loss; scaler_state (a checkpoint's) resumes its scale.
    """

    def __init__(self, model, make_optimizer, device, *, epochs, epoch_step=(), lr_decay_ratio=1.,
                 start_epoch=0, topk=(1,), n_at=0, dtype='float', progress=True, sync_every=None,
                 dist=None, buffers=(), on_epoch_start=None, on_epoch_end=None, should_stop=None, scaler_state=None,
                 on_steps=None, restart_momentum=True):
        self.model, self.device, self.dtype = model, device, dtype
        self.epochs, self.epoch_step, self.start_epoch = epochs, epoch_step, start_epoch
        self.lr_decay_ratio, self.restart_momentum = lr_decay_ratio, restart_momentum
        self.progress, self.buffers = progress, list(buffers)
        self.on_epoch_start, self.on_epoch_end, self.should_stop = on_epoch_start, on_epoch_end, should_stop
        self.on_steps = on_steps
        self.dist = dist or Dist(device)
        self.sync_every = sync_every or (1 if device.type == 'cpu' else 50)
        self.stop_every = self.sync_every if self.dist.world > 1 else 1  # under torchrun asking is a collective
        self.meter_loss = tnt.meter.AverageValueMeter()
        self.classacc = tnt.meter.ClassErrorMeter(topk=list(topk), accuracy=True)
        self.timer_train, self.timer_test = tnt.meter.TimeMeter('s'), tnt.meter.TimeMeter('s')
        self.meters_at = [tnt.meter.AverageValueMeter() for _ in range(n_at)]
        self.meters_extra = {}  # one per other loss the model reports (factt_loss, grad_at_loss, ...)
        self.amp = autocast_for(device, dtype)
        self.in_dtype = PARAM_DTYPES.get(dtype, torch.float32)
        # fp16 gradients underflow without loss scaling
        self.scaler = torch.amp.GradScaler(device.type) if AMP_DTYPES.get(dtype) == torch.float16 else None
        if self.scaler and scaler_state:
            self.scaler.load_state_dict(scaler_state)
        modules = model.modules() if isinstance(model, torch.nn.Module) else ()  # a plain function has none
        self.compiled = [m.f for m in modules if isinstance(getattr(m, 'f', None), Compiled)]
        self.make_optimizer = lambda lr: self.wrap(make_optimizer(lr))
        self.pending = []  # (batch number, batch size, device vector: loss, errors at each k, AT losses, extras)
        self.losses, self.epoch, self.t0, self.last = None, start_epoch, 0, {}
        if self.dist.rank == 0 and slow_cpu_autocast(device, dtype):
            print(f'warning: this CPU has no native {dtype} kernels; --dtype {dtype} will train slower than float',
                  file=sys.stderr)

    def wrap(self, optimizer):
        """The optimizer the engine steps: through the GradScaler (fp16), and retried eagerly where
        compiling the backward pass fails (--compile)."""
        if self.scaler:
            optimizer = GradScaled(optimizer, self.scaler)
        return EagerOnCompileError(optimizer, self.compiled) if self.compiled else optimizer

    def meters(self, train):
        return [self.meter_loss, self.classacc, *(self.meters_at + list(self.meters_extra.values()) if train else [])]

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

    def step(self, sample):
        """The engine's network: (loss to backpropagate, logits)."""
        inputs, targets, mode = sample
        with self.amp:
            y, losses = self.model(inputs, targets, mode)
        loss = losses['loss']
        self.losses = [loss.detach()]
        if mode:
            extras = {k: v for k, v in losses.items() if k not in ('loss', 'at_losses')}
            for name in extras:
                self.meters_extra.setdefault(name, tnt.meter.AverageValueMeter())
            self.losses += [v.detach() for v in (*losses.get('at_losses', ()), *extras.values())]
        return (self.scaler.scale(loss) if self.scaler and mode else loss), y

    def on_sample(self, state):
        inputs, targets = state['sample'][:2]
        state['sample'] = [inputs.to(self.device, self.in_dtype, non_blocking=True),
                           targets.to(self.device, non_blocking=True), state['train']]

    def on_forward(self, state):
        output, target = state['output'].detach().float(), state['sample'][1]
        errors = topk_errors(output, target, self.classacc.topk)
        values = [v.float().reshape(()) for v in (self.losses[0], *errors, *self.losses[1:])]
        self.pending.append((state['t'] - self.t0 + 1, len(target), torch.stack(values)))
        if len(self.pending) >= self.sync_every:
            self.flush(state)

    def flush(self, state):
        """Feeds the meters with the pending steps' values: one device-to-host copy."""
        if not self.pending:
            return
        rows = torch.stack([v for _, _, v in self.pending]).tolist()
        pending, self.pending = self.pending, []
        for (batch, size, _), (loss, *rest) in zip(pending, rows):
            if not math.isfinite(loss):
                raise UserError(f'the loss is {loss} at epoch {self.epoch}, batch {batch}'
                                f'{"" if state["train"] else " of the test pass"}; model.pt7 keeps the last good epoch')
            self.meter_loss.add(loss)
            for k, err in zip(self.classacc.topk, rest):
                self.classacc.sum[k] += int(err)
            self.classacc.n += size
            for m, v in zip(self.meters(state['train'])[2:], rest[len(self.classacc.topk):]):
                m.add(v)
        if self.on_steps and state['train']:
            self.on_steps(self.epoch, [(batch, row[0]) for (batch, _, _), row in zip(pending, rows)])
        if self.progress and state['train']:
            state['iterator'].set_postfix(loss=f'{self.meter_loss.value()[0]:.3f}',
                                          acc=f'{self.classacc.value()[0]:.2f}', refresh=False)

    def on_start(self, state):
        self.t0 = 0
        if state['train']:
            state['epoch'] = self.start_epoch

    def on_update(self, state):
        if self.should_stop and (state['t'] - self.t0) % self.stop_every == 0 and self.should_stop():
            raise Stop()

    def on_start_epoch(self, state):
        self.epoch = epoch = state['epoch'] + 1
        if self.on_epoch_start:
            self.on_epoch_start(epoch)
        if hasattr(getattr(self.train_loader, 'sampler', None), 'set_epoch'):
            self.train_loader.sampler.set_epoch(epoch)  # DistributedSampler: a fresh, seeded order
        if epoch in self.epoch_step:
            if self.restart_momentum:
                state['optimizer'] = self.make_optimizer(state['optimizer'].param_groups[0]['lr'] * self.lr_decay_ratio)
            else:
                for group in state['optimizer'].param_groups:
                    group['lr'] *= self.lr_decay_ratio
        for m in self.meters(True):
            m.reset()
        self.timer_train.reset()
        self.t0 = state['t']
        state['iterator'] = tqdm(self.train_loader, desc=f'epoch {epoch}/{self.epochs}', dynamic_ncols=True,
                                 leave=False, disable=not self.progress)

    def on_end_epoch(self, state):
        self.flush(state)
        self.dist.sync_meters(self.meters(True))
        stats = {'train_loss': self.meter_loss.value()[0], 'train_acc': self.accuracy(),
                 'epoch': state['epoch'], 'train_time': self.timer_train.value(),
                 'at_losses': [list(m.value()) for m in self.meters_at],
                 **{name: list(m.value()) for name, m in self.meters_extra.items()}}
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


class Stop(Exception):
    """A signal asked the run to stop after the current step."""


def evaluate(f, params, loader, device, dtype='float', topk=(1, 5), progress=True, dist=None):
    """Top-k accuracies (%) of f(inputs, params, False) over a loader, and the image count;
    under torchrun, over every rank's share."""
    meter = tnt.meter.ClassErrorMeter(topk=list(topk), accuracy=True)
    with torch.inference_mode(), autocast_for(device, dtype):
        for x, y in tqdm(loader, desc='evaluate', leave=False, dynamic_ncols=True, disable=not progress):
            meter.add(f(x.to(device), params, False)[0].float(), y)
    (dist or Dist(device)).sync_meters([meter])
    return meter.value(), meter.n


def sgd(params, weight_decay, device, dtype):
    """make_optimizer(lr): SGD with momentum 0.9 on every tensor of `params` that learns, as in 2017.
    With fp16 on a GPU it is the fused SGD, which takes the GradScaler's inf check on the device:
    the host does not wait for the GPU at every step to read it."""
    trained = [v for v in params.values() if v.requires_grad]
    fused = device.type == 'cuda' and AMP_DTYPES.get(dtype) == torch.float16
    return lambda lr: torch.optim.SGD(trained, lr, momentum=0.9, weight_decay=weight_decay, fused=fused or None)
