"""The one training loop of cifar.py and imagenet.py, and fit(): a Run (what the scripts build from
their options) trained epoch by epoch into its run folder, through kills and resumes.

One training step, as torchnet's Engine runs it: on_sample moves the batch to the device; step() runs
the model (a distill.Distiller) under autocast and returns the loss to backpropagate with the step's
logits and named loss terms; the engine backpropagates and calls on_forward, which queues the step's
figures on the device; flush() hands them to the meters, one device-to-host copy per `sync_every`
steps; then the optimizer steps (through the GradScaler for fp16) and on_update asks whether a signal
came. Beside model.pt7 and log.txt rank 0 writes run.json and TensorBoard event files (board.py),
which go on through resumes too.
"""
import json
import math
import os
import signal
import sys
import types
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torchnet as tnt
from tqdm import tqdm

from training import rundir
from training.board import Board
from training.device import (Dist, Precision, data_parallel, distributed, fused_sgd_skips_size1_strides,
                             place_params, rank_rng_state, rank_rng_states, rng_state, set_rng_state)
from training.distill import Distiller, FunctionalNet
from training.errors import SignalPlan, Signals, Stopped, UserError, as_user_error
from training.options import DATA_PATHS, Schedule
from utils import AT_PREFIX, check_params, is_trained, n_trained


def own_code(f):
    """f with a copy of its code object. Dynamo keeps its compiled graphs per code object: a student
    and a teacher of one architecture (both `wrn`) would share one cache, recompile against each
    other's guards and run into its size limit; with their own code each has its own."""
    if not isinstance(f, types.FunctionType):
        return f
    g = types.FunctionType(f.__code__.replace(), f.__globals__, f.__name__, f.__defaults__, f.__closure__)
    g.__kwdefaults__, g.__qualname__ = f.__kwdefaults__, f.__qualname__
    return g


def compile_errors():
    """The exceptions that mean torch.compile itself failed (no compiler, an unsupported op, ...).

    What fails while compiling a forward, dynamo wraps in BackendCompilerFailed, a TorchDynamoException on
    every torch. The backward is compiled lazily, inside loss.backward(), where AOTAutograd calls inductor
    itself: before torch 2.7 inductor's errors come out of it raw (a LoweringException or another
    OperatorIssue, a CppCompileError, ...: torch/_inductor/exc.py); from 2.7 on inductor wraps them in
    InductorError, a BackendCompilerFailed. So: TorchDynamoException, and each of inductor's own error
    classes that this torch has."""
    from torch._dynamo.exc import TorchDynamoException
    from torch._inductor import exc
    names = ('InductorError', 'OperatorIssue', 'SubgraphLoweringException', 'CppWrapperCodeGenError',
             'CppWrapperCodegenError', 'CppCompileError', 'InvalidCxxCompiler', 'CUDACompileError')
    return (TorchDynamoException, *(getattr(exc, n) for n in names if hasattr(exc, n)))


def compile_failed(error):
    """Whether `error` means torch.compile failed (compile_errors), not the program: TorchRuntimeError,
    a TorchDynamoException too, is the program's own error met while tracing (a shape mismatch), which
    eager would raise as well, so it goes through as it is."""
    from torch._dynamo.exc import TorchRuntimeError
    return isinstance(error, compile_errors()) and not isinstance(error, TorchRuntimeError)


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
            except Exception as e:
                if not compile_failed(e):
                    raise
                self.fall_back(e)
        return self.f(*args, **kwargs)

    def fall_back(self, error):
        if self.current is not self.f:
            print(f'{self.prog}: --compile unavailable here ({type(error).__name__}); running eagerly', file=sys.stderr)
            self.current = self.f


class EagerOnCompileError:
    """An optimizer whose step(closure) runs the step again eagerly where compiling failed in the
    closure's backward pass: the compiled functions fall back, and the half-made gradients go.
    Under torchrun (world > 1) no step can be taken again: DDP still waits for the failed backward's
    gradients, so the run stops with one line."""

    def __init__(self, optimizer, compiled, world=1):
        self.optimizer, self.compiled, self.world = optimizer, compiled, world

    def __getattr__(self, name):  # param_groups, zero_grad, state_dict, scaler, ...
        return getattr(self.optimizer, name)

    def step(self, closure):
        try:
            return self.optimizer.step(closure)
        except Exception as e:
            if not compile_failed(e):
                raise
            if self.world > 1:
                raise UserError(f'--compile failed in the backward pass ({type(e).__name__}); under torchrun '
                                f'the step cannot be taken again eagerly: run without --compile') from None
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
    `precision` (device.Precision) gives autocast and, for fp16, the GradScaler; scaler_state (a
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
        return EagerOnCompileError(optimizer, self.compiled, self.dist.world) if self.compiled else optimizer

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
        compute = self.precision.compute  # float16, bfloat16, or None: no autocast
        with torch.autocast(self.device.type, dtype=compute) if compute else nullcontext():
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


def sgd(params, weight_decay, precision, ngpu=1):
    """make_optimizer(lr): SGD with momentum 0.9 on every tensor of `params` that learns, as in 2017;
    the fused SGD where the precision asks for it (fp16 on a GPU), unless this torch's refuses
    DataParallel's gradients (--ngpu N with channels_last before torch 2.5)."""
    trained = [v for v in params.values() if v.requires_grad]
    fused = precision.fused_sgd and (ngpu <= 1 or not precision.channels_last or fused_sgd_skips_size1_strides())
    return lambda lr: zero_momentum(torch.optim.SGD(trained, lr, momentum=0.9, weight_decay=weight_decay,
                                                    fused=fused or None))


def zero_momentum(optimizer):
    """The optimizer, with a zero momentum buffer for each tensor that has none. torch's fused SGD makes
    a missing buffer with torch.empty_like and lets the kernel fill it (torch/optim/sgd.py _fused_sgd,
    is_first_step; ATen/native/cuda/FusedSgdKernel.cu), but when the GradScaler found an inf the kernel
    returns before writing it, and the next step reads whatever that memory held as momentum. GradScaler
    skips the first steps as a matter of course. From zero the first step is momentum * 0 + grad = grad,
    the numbers a missing buffer gives, bit for bit."""
    for group in optimizer.param_groups:
        for p in group['params']:
            if optimizer.state[p].get('momentum_buffer') is None:
                optimizer.state[p]['momentum_buffer'] = torch.zeros_like(p)
    return optimizer


# ---------------------------------------------------------------- fit: a run, epoch by epoch

@dataclass
class Run:
    """What fit() trains, as cifar.build and imagenet.build make it from the parsed options."""
    opt: object                    # the options it was built from (the beta schedule reads them)
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
    AT and KD weights and AT mode of the options and any other `terms` (factt_beta=..., at_groups=...).
    Returns (distiller, make_optimizer)."""
    adapters = adapters or {}
    for params, trained in ((params_s, True), (params_t or {}, False), (adapters, True)):
        place_params(params, device, precision.params, precision.channels_last, trained)

    def net(f, params):
        return data_parallel(FunctionalNet(compiled(f, opt.compile, prog), params, precision.compute), opt.ngpu)
    distiller = Distiller(net(f_s, params_s), f_t and net(f_t, params_t), beta=opt.at_weight, alpha=opt.alpha,
                          temperature=opt.temperature, at_mode=opt.at_mode, adapters=adapters, **terms)
    return distiller, sgd({**params_s, **adapters}, opt.weight_decay, precision, opt.ngpu)


def fit(opt, run, prog):
    """Trains `run` (a Run, from cifar.build or imagenet.build) under `opt`, writing model.pt7 and
    log.txt into opt.save."""
    dist = Dist(run.device)
    lead = dist.rank == 0  # only rank 0 writes and prints
    optimizer = run.make_optimizer(opt.lr)
    generator = getattr(run.train_loader, 'generator', None)
    run.data = {**(run.data or {}), 'images': [n_images(run.train_loader), n_images(run.test_loader)]}
    # rank 0 reads the checkpoint and hands it to the others, which may be on machines without it
    state = dist.broadcast_object(read_resume(opt.resume, run.saved) if opt.resume and lead else None)
    if state:
        check_same_data(opt, run, state.get('record') or {})
        # a teacher --allow_change lets differ is the one just loaded, not the checkpoint's copy
        new_teacher = bool(opt.allowed_changes() & {'teacher_id', 'teacher_params'})
        restore(opt.resume, state, {k: v for k, v in run.saved.items() if not (new_teacher and is_teacher(k))},
                optimizer)
        # the options' lr and weight decay at the resume epoch, not the checkpoint's: equal to them
        # bit for bit (Schedule.lr) unless --allow_change lets them differ, and then the new ones take effect
        for group in optimizer.param_groups:
            group.update(lr=run.schedule.lr(state['epoch']), weight_decay=opt.weight_decay)
    epoch = state['epoch'] if state else 0
    model = distributed(run.distiller, run.device)  # every rank starts from rank 0's weights
    signals, plan = Signals(prog), SignalPlan()
    writer = EpochWriter(opt, run, generator, plan, epoch)
    if lead:
        if state:
            print(f'resumed from {opt.resume} at epoch {epoch}, lr {run.schedule.lr(epoch):g}')
        rundir.make_save(opt.save)
        try:
            if state and state.get('record'):
                rundir.repair_log(writer.log_path, state['epoch'], state['record'])
            rundir.record_session(opt.save, run.device, dist.world, epoch,
                                  **{k: v for k, v in (run.data or {}).items() if k.startswith('teacher_')})
            if opt.tensorboard:
                writer.board = Board(opt.save, len(run.train_loader), run.data['images'], opt.tensorboard_every,
                                     epoch, rundir.read_json_stats(writer.log_path) if os.path.exists(writer.log_path) else [])
        except rundir.WriteError as e:
            raise writer.failed(e) from None
        print(f'{run.description}: {writer.n_parameters:,} parameters ({writer.n_trained:,} trained); '
              f'{run.num_classes} classes; device {run.device}'
              + (f' x {dist.world} processes' if dist.world > 1 else '') + f'; run folder {opt.save}')
    if state and state.get('rng'):  # last, after building and restoring drew their own numbers
        set_rng_state(rank_rng_state(state, dist.rank, getattr(run.train_loader, 'ranks_in_step', False)),
                      generator)
        saved = 1 + len(state.get('rng_ranks') or [])
        if lead and saved < dist.world:
            print(f'note: {opt.resume} holds the random states of {saved} process(es); ranks {saved} to '
                  f'{dist.world - 1} start their own random streams afresh from --seed', file=sys.stderr)

    def epoch_end(stats, optimizer):  # on every rank: each rank's random states go to rank 0, which saves
        rng = rank_rng_states(dist, generator) if dist.world > 1 else None
        if lead:
            writer(stats, optimizer, rng)

    def should_stop():
        plan.step_done()
        return dist.any(signals.name)

    trainer = Trainer(model, run.make_optimizer, run.device, epochs=opt.epochs, schedule=run.schedule,
                      start_epoch=epoch, topk=run.topk, precision=run.precision,
                      progress=lead and not opt.no_progress, dist=dist,
                      on_epoch_start=run.set_beta if run.scheduled() else None,
                      on_epoch_end=epoch_end, should_stop=should_stop,
                      scaler_state=(state or {}).get('scaler'), on_steps=writer.board and writer.board.steps,
                      restart_momentum=bool(getattr(opt, 'lr_restart_momentum', 1)),
                      buffers=[v for k, v in run.params_s.items() if not is_trained(k)])
    try:
        return trainer.train(run.train_loader, run.test_loader, optimizer)
    except Stopped:
        if lead:
            done = rundir.read_json_stats(writer.log_path)[-1]['epoch'] if os.path.exists(writer.log_path) else 0
            kept = f'model.pt7 holds the last whole epoch ({done})' if done else 'no epoch had finished'
            print(f'{prog}: {signals.name or "signal"}: stopped mid-epoch; {kept}; continue with '
                  f'--resume auto --save {opt.save}', file=sys.stderr)
        # a rank that got no signal itself stops with its peers, as if it had got SIGTERM
        raise Stopped(signal.Signals[signals.name] if signals.name else signal.SIGTERM) from None
    except rundir.WriteError as e:
        raise writer.failed(e) from None
    finally:
        if writer.board:
            writer.board.close()


def n_images(loader):
    """Images a pass over the loader sees, over all ranks."""
    return len(loader.dataset) if hasattr(loader, 'dataset') else len(loader.labels)


# ---------------------------------------------------------------- resume, and each epoch's files

def check_same_data(opt, run, record):
    """A resumed run's data is the checkpoint's by what it holds (class names, image size, image counts),
    wherever it lies and however its path is written (options.DATA_PATHS), unless --allow_change names
    its path: then other data is what is asked for."""
    if set(DATA_PATHS) & set(opt.allow_change.split(',')):
        return
    for key in ('class_digest', 'image_size', 'images'):
        value = run.data.get(key)
        if key in record and record[key] != value:
            where = ' '.join(f'--{n} {getattr(opt, n)}' for n in DATA_PATHS if hasattr(opt, n))
            raise UserError(f'--resume {opt.resume}: {where} holds other data than the run was trained on '
                            f'({key} {record[key]} in the checkpoint, {value} now)')


def read_resume(path, saved):
    """A model.pt7 to resume, its params checked against `saved` and under its names."""
    state = rundir.load_checkpoint(path)
    state['params'] = rundir.checkpoint_params(state, saved)
    with as_user_error(ValueError):
        check_params(state['params'], saved, f'--resume {path}')
    return state


def is_teacher(name):
    return name.startswith('teacher.')


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
    zero_momentum(optimizer)  # a checkpoint may hold no buffer for some tensors, or none kept
    return state


class EpochWriter:
    """on_epoch_end of rank 0: model.pt7 first, then its log line, then the epoch's TensorBoard points
    (`board`, where there is one), then one line on stdout."""

    def __init__(self, opt, run, generator, plan, epoch):
        self.opt, self.run, self.generator, self.plan = opt, run, generator, plan
        self.board, self.kept = None, epoch  # kept: the epoch model.pt7 holds
        self.log_path = os.path.join(opt.save, 'log.txt')
        # log.txt's n_parameters is the 2017 count, of every tensor of the student's dict (batch-norm
        # statistics too); the trained count is printed beside it
        self.n_parameters = sum(v.numel() for v in run.params_s.values())
        self.n_trained = n_trained(run.params_s)

    def failed(self, e):
        """A file that could not be written (rundir.WriteError) as the run's last line."""
        kept = (f'model.pt7 keeps epoch {self.kept}; continue with --resume auto --save {self.opt.save}'
                if self.kept else 'no epoch was saved')
        return UserError(f'{e}; {kept}')

    def __call__(self, stats, optimizer, rng=None):
        """rng: rank_rng_states' (rank 0's, [other ranks']) under torchrun; else this process's, read here."""
        opt = self.opt
        rng, rng_ranks = rng or (rng_state(self.generator), [])
        # plain JSON types (meters give numpy floats), which torch.load(weights_only=True) accepts
        record = json.loads(json.dumps({**opt.record(), **stats, 'num_classes': self.run.num_classes,
                                        **(self.run.data or {}),
                                        'n_parameters': self.n_parameters,
                                        **({'beta_now': self.run.distiller.beta} if self.run.scheduled() else {})}))
        scaler = getattr(optimizer, 'scaler', None)  # fp16: the loss scale goes on where it was
        if self.board:  # the epoch's per-step points reach the disk before model.pt7 says the epoch is done
            self.board.flush()
        rundir.save_checkpoint(os.path.join(opt.save, 'model.pt7'), self.run.saved, optimizer, stats['epoch'],
                        rng=rng, record=record, **({'rng_ranks': rng_ranks} if rng_ranks else {}),
                        **({'scaler': scaler.state_dict()} if scaler else {}))
        self.kept = stats['epoch']
        self.plan.fire(f'ckpt{stats["epoch"]}')
        rundir.append_log(self.log_path, record)
        if self.board:
            self.board.epoch(record, optimizer.param_groups[0]['lr'])
        def pct(acc):  # top-1, or top-1/top-5
            return '/'.join(f'{a:.2f}' for a in (acc if isinstance(acc, list) else [acc])) + '%'
        print(f'==> epoch {stats["epoch"]}/{opt.epochs}: train loss {stats["train_loss"]:.4f} acc '
              f'{pct(stats["train_acc"])}, test loss {stats["test_loss"]:.4f} acc {pct(stats["test_acc"])} '
              f'({stats["train_time"]:.1f}s + {stats["test_time"]:.1f}s)')
