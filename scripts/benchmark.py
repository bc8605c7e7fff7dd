#!/usr/bin/env python
"""Throughput of cifar.py's paths, measured side by side in one process.

Each configuration is built once through cifar.py's own `build` and trained by
engine.Trainer, the loop cifar.py uses; img/s count data loading and the whole
step. The configurations run in turn (A B C A B C ...) and the medians over
repeats are printed with their ratio to the first one.

    python scripts/benchmark.py --dataroot /tmp/cifar10-jpg
    python scripts/benchmark.py --dataroot /tmp/cifar10-jpg --configs faithful,fast,fast-bf16 --repeats 5
"""
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
import torch  # noqa: E402

import cifar  # noqa: E402
from engine import Trainer, autocast_for  # noqa: E402
from resnet import wrn_depth_to_blocks, wrn_params  # noqa: E402
from runs import Parser, cli  # noqa: E402
from utils import UserError  # noqa: E402

PROG = 'benchmark.py'

CONFIGS = {
    'faithful': ['--loader', 'torchvision', '--channels_last', '0'],  # the 2017 path: per-image PIL, fp32 eager
    'fast': [],  # cifar.py's defaults
    'fast-bf16': ['--dtype', 'bfloat16'],
    'fast-half': ['--dtype', 'half'],
    'fast-compile': ['--compile'],
    'fast-nocl': ['--channels_last', '0'],
    'fast-grad': ['--grad_beta', '1'],  # gradient-based AT on top of activation AT: double backprop
    'fast-stepsync': [],  # the defaults, but the meters read the device after every step (the 2017 way)
}
SYNC_EVERY = {'fast-stepsync': 1}  # the Trainer's sync_every; others take its default


class Timed:
    """Yields `warmup + n` batches of a loader, cycling it; `seconds` is the time the last n took.

    The device is synchronised only where the clock is read, so that a GPU runs ahead of the
    host between steps as it does in training.
    """

    def __init__(self, loader, warmup, n, device):
        self.loader, self.warmup, self.n, self.device, self.marks = loader, warmup, n, device, []

    def __len__(self):
        return self.warmup + self.n

    @property
    def seconds(self):
        return self.marks[1] - self.marks[0]

    def __iter__(self):
        self.marks = []
        it = iter(self.loader)
        for i in range(self.warmup + self.n + 1):
            if i in (self.warmup, self.warmup + self.n):
                if self.device.type == 'cuda':
                    torch.cuda.synchronize()
                self.marks.append(time.perf_counter())
            if i == self.warmup + self.n:
                return
            try:
                yield next(it)
            except StopIteration:  # a small split: go round again
                it = iter(self.loader)
                yield next(it)


def make_teacher(folder, depth, width, num_classes):
    """A randomly initialised teacher run folder: speed does not depend on the weights."""
    os.makedirs(folder)
    torch.save({'params': wrn_params(depth, width, num_classes), 'optimizer': {}, 'epoch': 0},
               os.path.join(folder, 'model.pt7'))
    with open(os.path.join(folder, 'log.txt'), 'w') as fh:
        fh.write('json_stats: ' + json.dumps({'depth': depth, 'width': width}) + '\n')


def train_rate(run, opt, steps, warmup, sync_every=None):
    timed = Timed(run.train_loader, warmup, steps, run.device)
    Trainer(run.distiller, run.make_optimizer, run.device, epochs=1, n_at=run.n_at, dtype=opt.dtype,
            progress=False, sync_every=sync_every).train(timed, None, run.make_optimizer(opt.lr))
    return steps * opt.batch_size / timed.seconds


def eval_rate(run, opt, steps, warmup):
    timed = Timed(run.test_loader, warmup, steps, run.device)
    with torch.no_grad(), autocast_for(run.device, opt.dtype):
        for x, y in timed:
            run.distiller(x.to(run.device), y.to(run.device), False)
    return steps * opt.batch_size / timed.seconds


def teacher_shape(text):
    """--teacher DEPTH,WIDTH of a WRN, or '' for none."""
    try:
        depth, width = text.split(',')
        depth, width = int(depth), float(width)
        wrn_depth_to_blocks(depth)
        if width <= 0:
            raise ValueError
    except ValueError:
        raise UserError(f'--teacher must be DEPTH,WIDTH of a WRN (depth 6n+4, width > 0), like 16,2; got {text!r}') from None
    return depth, width


def main(argv=None):
    p = Parser(prog=PROG, description=__doc__.split('\n')[0])
    p.add_argument('--dataroot', required=True)
    p.add_argument('--configs', default='faithful,fast', help=f'comma list of {", ".join(CONFIGS)}')
    p.add_argument('--depth', type=int, default=16)
    p.add_argument('--width', type=float, default=1)
    p.add_argument('--teacher', default='16,2', help='teacher depth,width; "" for no teacher')
    p.add_argument('--batch_size', type=int, default=128)
    p.add_argument('--steps', type=int, default=20, help='timed steps per measurement')
    p.add_argument('--warmup', type=int, default=3)
    p.add_argument('--repeats', type=int, default=3)
    p.add_argument('--device', default='')
    p.add_argument('--nthread', default='4', help="DataLoader workers of the faithful path (cifar.py's default)")
    args = p.parse_args(argv)
    names = args.configs.split(',')
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise UserError(f'unknown config {unknown[0]!r}; choose from {", ".join(CONFIGS)}')
    for name in ('steps', 'repeats', 'batch_size'):
        if getattr(args, name) <= 0:
            raise UserError(f'--{name} must be positive, got {getattr(args, name)}')
    if args.warmup < 0:
        raise UserError(f'--warmup must not be negative, got {args.warmup}')
    teacher = teacher_shape(args.teacher) if args.teacher else None

    tmp = tempfile.mkdtemp()
    common = ['--dataroot', args.dataroot, '--depth', str(args.depth), '--width', str(args.width),
              '--batch_size', str(args.batch_size), '--no_progress', '--device', args.device, '--nthread', args.nthread]
    if teacher:
        train_dir = os.path.join(args.dataroot, 'train')
        classes = len(os.listdir(train_dir)) if os.path.isdir(train_dir) else 10
        make_teacher(os.path.join(tmp, 'teacher'), *teacher, classes)
        common += ['--teacher_id', os.path.join(tmp, 'teacher'), '--beta', '1e+3']

    runs = {}
    for name in names:
        opt = cifar.parse_args(common + CONFIGS[name])
        t = time.perf_counter()
        runs[name] = (cifar.build(opt), opt)
        print(f'# {name}: built in {time.perf_counter() - t:.1f}s (data decoding included)', flush=True)
    device = runs[names[0]][0].device
    train, evals, peak = {n: [] for n in names}, {n: [] for n in names}, {}
    for r in range(args.repeats):
        for name in names:
            run, opt = runs[name]
            if device.type == 'cuda':
                torch.cuda.reset_peak_memory_stats()
            train[name].append(train_rate(run, opt, args.steps, args.warmup, SYNC_EVERY.get(name)))
            evals[name].append(eval_rate(run, opt, args.steps, args.warmup))
            if device.type == 'cuda':
                peak[name] = max(peak.get(name, 0), torch.cuda.max_memory_allocated() / 2 ** 20)
            print(f'# repeat {r + 1}: {name}: train {train[name][-1]:.1f} img/s, eval {evals[name][-1]:.1f} img/s',
                  flush=True)

    cpu = platform.processor() or platform.machine()
    where = torch.cuda.get_device_name(device) if device.type == 'cuda' else f'CPU {cpu}, {torch.get_num_threads()} threads'
    teacher = f'WRN-{args.teacher.replace(",", "-")} teacher, AT' if args.teacher else 'no teacher'
    print(f'\nWRN-{args.depth}-{args.width:g} student, {teacher}, batch {args.batch_size}; {where}; '
          f'torch {torch.__version__}; medians of {args.repeats} x {args.steps} steps')
    print('| config | train img/s | ratio | eval img/s | ratio |' + (' peak MiB |' if peak else ''))
    print('|---|---|---|---|---|' + ('---|' if peak else ''))
    base_t, base_e = statistics.median(train[names[0]]), statistics.median(evals[names[0]])
    for n in names:
        mt, me = statistics.median(train[n]), statistics.median(evals[n])
        print(f'| {n} | {mt:.1f} | {mt / base_t:.2f}x | {me:.1f} | {me / base_e:.2f}x |'
              + (f' {peak[n]:.0f} |' if peak else ''))
    if not peak:
        print(f'process peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB')


if __name__ == '__main__':
    cli(main, PROG)
