"""A run, and fit(): what cifar.py and imagenet.py build from their options (a Run), trained epoch
by epoch into its run folder, through kills and resumes. Beside model.pt7 and log.txt rank 0 writes
run.json (provenance.py) and TensorBoard event files (board.py), which go on through resumes too."""
import os
import signal
import sys
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from training import provenance
from training.board import Board
from training.distill import Distiller
from training.engine import Trainer, compiled, sgd
from training.errors import Stopped
from training.formats import read_json_stats, repair_log
from training.options import Options
from training.parallel import Dist, FunctionalNet, data_parallel, distributed, place_params
from training.precision import Precision
from training.rng import rank_rng_state, rank_rng_states, set_rng_state
from training.rundir import EpochWriter, make_save, read_resume, restore
from training.schedule import Schedule
from training.signals import SignalPlan, Signals
from utils import is_trained

@dataclass
class Run:
    """What fit() trains, as cifar.build and imagenet.build make it from the parsed options."""
    opt: Options                   # the options it was built from (the beta schedule reads them)
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
    signals, plan = Signals(prog), SignalPlan()
    writer = EpochWriter(opt, run, generator, plan)
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
        set_rng_state(rank_rng_state(state, dist.rank), generator)
        saved = 1 + len(state.get('rng_ranks') or [])
        if lead and saved < dist.world:
            print(f'note: {opt.resume} holds the random states of {saved} process(es); ranks {saved} to '
                  f'{dist.world - 1} draw their augmentation afresh from --seed', file=sys.stderr)

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
