#!/usr/bin/env python
"""Throughput of cifar.py's paths, measured side by side in one process.

Each configuration is built once through cifar.py's own `build` and trained by
engine.Trainer, the loop cifar.py uses; img/s count data loading and the whole
step. The configurations run in turn (A B C A B C ...) and the medians over
repeats are printed with their ratio to the first one. The dataset is decoded
once and shared by every configuration.

On a GPU, `peak MiB` is each configuration's own: the most memory allocated
during its steps above what was allocated before them, plus its own dataset and
weights resident on the GPU (the other configurations' are not counted).
`fast-nobench` (cudnn.benchmark off) runs in a process of its own: cuDNN keeps
the kernels it picked per process, whatever the flag says when they are reused.

    python scripts/benchmark.py --dataroot /tmp/cifar10-jpg
    python scripts/benchmark.py --dataroot /tmp/cifar10-jpg --configs faithful,fast,fast-bf16 --repeats 5
    python scripts/benchmark.py --dataroot /tmp/cifar10-jpg --configs fast,fast-cl,fast-nocl,fast-nobench --json out.json
    python scripts/benchmark.py --dataroot /tmp/c100 --model resnet8x4 --teacher resnet32x4 --batch_size 64 \
        --configs nn-loop,fast,fast-compile

`nn-loop` is the same student and teacher built from torch.nn modules (tests/nn_cifar_nets.py,
tests/nn_wrn.py) and trained in a plain PyTorch loop the way RepDistiller's train_student.py runs
it: a torchvision DataLoader with per-image RandomCrop (zero padding), flip and Normalize, the
teacher in eval mode under no_grad, cross-entropy + beta x AT, a loss.item() every step.

`--pipeline imagenet` measures imagenet.py's input pipeline alone, on 500x375 JPEGs it generates:
img/s of the 2017 pipeline (ImageFolder with the 2017 transforms, fp32 batches) and of
imagenet_data's (uint8 views, normalised by the device) with each CPU decoder, at 1, 2 and all
workers, in turn (A B C A B C ...), after warm-up batches; the workers' start-up is reported apart.

    python scripts/benchmark.py --pipeline imagenet --batch_size 32 --steps 10 --repeats 5
"""
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import cifar  # noqa: E402
from training.data import check_classes  # noqa: E402
from training.loop import Trainer  # noqa: E402
from resnet import CIFAR_MODELS, cifar_model_name, wrn_depth_to_blocks  # noqa: E402
from training.rundir import cpu_info as cpu  # noqa: E402
from training.errors import cli  # noqa: E402
from training.options import Parser  # noqa: E402
from synthetic import write_teacher_run  # noqa: E402
from training.errors import UserError  # noqa: E402
from utils import at_loss  # noqa: E402

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
    'fast-cl': ['--channels_last', '1'],  # with fast-nocl: both memory formats, whatever the device's default
    'fast-nobench': [],  # the defaults with torch.backends.cudnn.benchmark off, in a process of its own
    'nn-loop': None,  # torch.nn modules in a plain loop, as RepDistiller trains (not through cifar.py)
}
SYNC_EVERY = {'fast-stepsync': 1}  # the Trainer's sync_every; others take its default
# configs measured by a child process of this script: cuDNN caches the algorithm it chose for each
# convolution shape per process, without the benchmark flag in the key, so in a process where
# another config has already run those shapes the flag would change nothing
OWN_PROCESS = {'fast-nobench': ('fast', ['--cudnn_benchmark', '0'])}


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


def shared_decoding():
    """cifar.build decodes the dataset for each config: decode each split once, and hand every
    config the same uint8 tensor (the loaders only read it; on a GPU each config has its own copy)."""
    decode, cache = cifar.decode_all, {}

    def decode_once(dataset):
        key = (type(dataset).__name__, str(getattr(dataset, 'root', '')), getattr(dataset, 'train', None), len(dataset))
        if key not in cache:
            cache[key] = decode(dataset)
        images, labels = cache[key]
        return images, list(labels)
    cifar.decode_all = decode_once


def resident_bytes(run, device_type='cuda'):
    """Bytes of a config's own tensors on the device: its dataset (the fast loader) and its networks,
    each storage once."""
    tensors = [t for loader in (run.train_loader, run.test_loader) for t in
               (getattr(loader, 'images', None), getattr(loader, 'labels', None)) if torch.is_tensor(t)]
    tensors += list(run.distiller.parameters()) + list(run.distiller.buffers())
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in tensors if t.device.type == device_type}
    return sum(storages.values())


def nn_module(shape, num_classes):
    """The torch.nn build of (model, depth, width), from the tests' independent builds."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'tests'))
    from cifar_nets import RESNETS, VGG_CFGS
    from nn_cifar_nets import NAMED, NNResNet, NNVGG
    from nn_wrn import NNWideResNet
    model, depth, width = shape
    if model == 'wrn':
        return NNWideResNet(depth, width, num_classes)
    if model in RESNETS:
        return NNResNet(*RESNETS[model], num_classes)
    if model in VGG_CFGS:
        return NNVGG(VGG_CFGS[model], num_classes)
    if model in NAMED:
        return NAMED[model](num_classes)
    raise UserError(f'nn-loop has no torch.nn build of {model}')


class NNLoop:
    """The student (and teacher) as torch.nn modules, trained by a plain loop: RepDistiller's way."""

    def __init__(self, args, device):
        from torch.utils.data import DataLoader
        self.device, self.beta = device, 1e3
        train_set, test_set = (cifar.open_cifar(args.dataroot, args.dataset, train, cifar.torchvision_transform(
            4, train, pad_mode='zeros', normalize='cifar100')) for train in (True, False))
        check_classes(train_set, test_set, f'--dataroot {args.dataroot}')
        classes = len(train_set.classes)
        self.train_loader = DataLoader(train_set, args.batch_size, shuffle=True, num_workers=int(args.nthread),
                                       pin_memory=device.type == 'cuda', drop_last=True)
        self.test_loader = DataLoader(test_set, args.batch_size, num_workers=int(args.nthread))
        self.student = nn_module(args.student_shape, classes).to(device)
        self.teacher = args.teacher_shape and nn_module(args.teacher_shape, classes).to(device).eval()
        self.optimizer = torch.optim.SGD(self.student.parameters(), 0.05, momentum=0.9, weight_decay=5e-4)

    def train_rate(self, steps, warmup, batch_size):
        timed = Timed(self.train_loader, warmup, steps, self.device)
        self.student.train()
        for x, y in timed:
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            logits, g_s = self.student(x)
            loss = F.cross_entropy(logits, y)
            if self.teacher:
                with torch.no_grad():
                    _, g_t = self.teacher(x)
                loss = loss + self.beta * sum(at_loss(a, b) for a, b in zip(g_s, g_t))
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            loss.item()  # that code's meters read the loss every step
        return steps * batch_size / timed.seconds

    def eval_rate(self, steps, warmup, batch_size):
        timed = Timed(self.test_loader, warmup, steps, self.device)
        self.student.eval()
        with torch.no_grad():
            for x, y in timed:
                self.student(x.to(self.device))[0].argmax(1).eq(y.to(self.device)).sum().item()
        return steps * batch_size / timed.seconds


def train_rate(run, opt, steps, warmup, sync_every=None):
    timed = Timed(run.train_loader, warmup, steps, run.device)
    Trainer(run.distiller, run.make_optimizer, run.device, epochs=1, precision=run.precision,
            progress=False, sync_every=sync_every).train(timed, None, run.make_optimizer(opt.lr))
    return steps * opt.batch_size / timed.seconds


def eval_rate(run, opt, steps, warmup):
    timed = Timed(run.test_loader, warmup, steps, run.device)
    with torch.no_grad(), run.precision.autocast():
        for x, y in timed:
            run.distiller(x.to(run.device), y.to(run.device), False)
    return steps * opt.batch_size / timed.seconds


def teacher_shape(text):
    """--teacher DEPTH,WIDTH of a WRN, a model name (resnet32x4, vgg13, ...), or '' for none:
    (model, depth, width)."""
    if text in CIFAR_MODELS and text not in ('wrn', 'nin'):
        return text, 16, 1.
    try:
        depth, width = text.split(',')
        depth, width = int(depth), float(width)
        wrn_depth_to_blocks(depth)
        if width <= 0:
            raise ValueError
    except ValueError:
        raise UserError(f'--teacher must be DEPTH,WIDTH of a WRN (depth 6n+4, width > 0), like 16,2, or a model '
                        f'name like resnet32x4; got {text!r}') from None
    return 'wrn', depth, width


def parse_args(argv):
    p = Parser(prog=PROG, description=__doc__.split('\n')[0])
    p.add_argument('--dataroot', default='', help='CIFAR data (not with --pipeline)')
    p.add_argument('--pipeline', default='', choices=['imagenet'], help="only the input pipeline: imagenet.py's")
    p.add_argument('--images', type=int, default=64, help='--pipeline: JPEGs to generate (the loaders cycle them)')
    p.add_argument('--dataset', default='CIFAR10', choices=['CIFAR10', 'CIFAR100'],
                   help='for torchvision\'s files; a class-folder dataset is read whatever this says')
    p.add_argument('--configs', default='faithful,fast', help=f'comma list of {", ".join(CONFIGS)}')
    p.add_argument('--model', default='wrn', choices=[m for m in CIFAR_MODELS if m != 'nin'], metavar='MODEL',
                   help='student: wrn (--depth, --width) or a named network (resnet8x4, vgg8, ...)')
    p.add_argument('--depth', type=int, default=16)
    p.add_argument('--width', type=float, default=1)
    p.add_argument('--teacher', default='16,2', help='teacher depth,width of a WRN, or a model name; "" for no teacher')
    p.add_argument('--batch_size', type=int, default=128)
    p.add_argument('--steps', type=int, default=20, help='timed steps per measurement')
    p.add_argument('--warmup', type=int, default=3)
    p.add_argument('--repeats', type=int, default=3)
    p.add_argument('--device', default='')
    p.add_argument('--nthread', default='4', help="DataLoader workers of the faithful path (cifar.py's default)")
    p.add_argument('--cudnn_benchmark', type=int, choices=[0, 1], default=None,
                   help='torch.backends.cudnn.benchmark for every config (default: on, as cifar.py sets it on a GPU)')
    p.add_argument('--json', default='', help='also write the figures to this file')
    args = p.parse_args(argv)
    if not args.dataroot and not args.pipeline:
        raise UserError('pass --dataroot DIR (CIFAR data), or --pipeline imagenet')
    if args.images <= 0:
        raise UserError(f'--images must be positive, got {args.images}')
    names = args.configs.split(',')
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise UserError(f'unknown config {unknown[0]!r}; choose from {", ".join(CONFIGS)}')
    if len(set(names)) != len(names):
        raise UserError(f'--configs names a config twice: {args.configs}')
    for name in ('steps', 'repeats', 'batch_size'):
        if getattr(args, name) <= 0:
            raise UserError(f'--{name} must be positive, got {getattr(args, name)}')
    if args.warmup < 0:
        raise UserError(f'--warmup must not be negative, got {args.warmup}')
    args.names = names
    args.teacher_shape = teacher_shape(args.teacher) if args.teacher else None
    args.student_shape = (args.model, args.depth, args.width)
    args.student_name = cifar_model_name(*args.student_shape)
    args.teacher_name = cifar_model_name(*args.teacher_shape) if args.teacher else ''
    return args


def own_process(args, name):
    """Measures `name` in a child process of this script; its figures, as measure() returns them."""
    config, extra = OWN_PROCESS[name]
    fd, out = tempfile.mkstemp(suffix='.json')
    os.close(fd)
    argv = [sys.executable, os.path.abspath(__file__), '--dataroot', args.dataroot, '--dataset', args.dataset, '--configs', config,
            '--model', args.model, '--depth', str(args.depth), '--width', str(args.width), '--teacher', args.teacher,
            '--batch_size', str(args.batch_size), '--steps', str(args.steps), '--warmup', str(args.warmup),
            '--repeats', str(args.repeats), '--device', args.device, '--nthread', args.nthread, '--json', out, *extra]
    print(f'# {name}: measured by its own process ({config} with {" ".join(extra)})', flush=True)
    p = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        if p.returncode != 0:
            last = p.stdout.strip().splitlines()[-1:] or ['no output']
            raise UserError(f'{name}: its process failed ({p.returncode}): {last[0]}')
        with open(out) as fh:
            figures = json.load(fh)['configs'][config]
    finally:
        os.remove(out)
    for r, (t, e) in enumerate(zip(figures['train_img_s'], figures['eval_img_s'])):
        print(f'# repeat {r + 1}: {name}: train {t:.1f} img/s, eval {e:.1f} img/s', flush=True)
    return figures


def measure(args, names):
    """Builds the configs in `names` in this process and times them in turn; {name: figures}."""
    tmp = tempfile.mkdtemp()
    common = ['--dataroot', args.dataroot, '--dataset', args.dataset, '--model', args.model, '--depth', str(args.depth), '--width', str(args.width),
              '--batch_size', str(args.batch_size), '--no_progress', '--device', args.device, '--nthread', args.nthread]
    if args.teacher_shape:
        train_dir = os.path.join(args.dataroot, 'train')
        classes = len(os.listdir(train_dir)) if os.path.isdir(train_dir) else 10
        write_teacher_run(os.path.join(tmp, 'teacher'), *args.teacher_shape, classes)
        common += ['--teacher_id', os.path.join(tmp, 'teacher'), '--beta', '1e+3']

    shared_decoding()
    runs = {}
    for name in names:
        t = time.perf_counter()
        if CONFIGS[name] is None:
            device = cifar.select_device(args.device, '0', 1)
            runs[name] = (NNLoop(args, device), SimpleNamespace(device=device))
            print(f'# {name}: built in {time.perf_counter() - t:.1f}s (torch.nn modules, torchvision DataLoader)',
                  flush=True)
            continue
        opt, device = cifar.setup(common + CONFIGS[name])
        runs[name] = (cifar.build(opt, device), opt)
        print(f'# {name}: built in {time.perf_counter() - t:.1f}s'
              + (' (data decoding included)' if len(runs) == 1 else ' (decoded data shared)'), flush=True)
    device = runs[names[0]][0].device
    built = [n for n in names if CONFIGS[n] is not None]
    cuda = device.type == 'cuda'
    if cuda and args.cudnn_benchmark is not None:
        torch.backends.cudnn.benchmark = bool(args.cudnn_benchmark)
    resident = {n: resident_bytes(runs[n][0]) if n in built else 0 for n in names} if cuda else {}
    figures = {n: {'train_img_s': [], 'eval_img_s': [], 'peak_mib': None} for n in names}
    for r in range(args.repeats):
        for name in names:
            run, opt = runs[name]
            if cuda:
                torch.cuda.synchronize()
                before = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            if name in built:
                train = train_rate(run, opt, args.steps, args.warmup, SYNC_EVERY.get(name))
                evals = eval_rate(run, opt, args.steps, args.warmup)
            else:
                train = run.train_rate(args.steps, args.warmup, args.batch_size)
                evals = run.eval_rate(args.steps, args.warmup, args.batch_size)
            f = figures[name]
            f['train_img_s'].append(train)
            f['eval_img_s'].append(evals)
            if cuda:
                own = (torch.cuda.max_memory_allocated() - before + resident[name]) / 2 ** 20
                f['peak_mib'] = max(f['peak_mib'] or 0, own)
            print(f'# repeat {r + 1}: {name}: train {train:.1f} img/s, eval {evals:.1f} img/s', flush=True)
    where = torch.cuda.get_device_name(device) if cuda else \
        f'CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads'
    runs.clear()
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return figures, where, cuda


def make_jpegs(root, n, seed=0):
    """n 500x375 JPEGs of smooth noise (photograph-like to the decoder, unlike white noise) in 2 classes."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    for i in range(n):
        d = os.path.join(root, f'class{i % 2}')
        os.makedirs(d, exist_ok=True)
        img = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((500, 375), Image.BICUBIC)
        img = np.asarray(img).astype(np.int16) + rng.integers(-20, 20, (375, 500, 3))
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(os.path.join(d, f'{i:05d}.JPEG'), quality=90)


def pipeline_loader(name, folder, batch, workers, device):
    """imagenet.py's train loader: the 2017 one, or imagenet_data's with decoder `name`."""
    from training import imagenet_data as D
    if name == '2017':
        import torchvision.transforms as T
        from torchvision.datasets.folder import default_loader
        transform = T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(),
                               T.Normalize(D.MEAN, D.STD)])
        dataset = SimpleNamespace(samples=folder.samples)
        images = type('Images2017', (torch.utils.data.Dataset,), {
            '__len__': lambda self: len(dataset.samples),
            '__getitem__': lambda self, i: (transform(default_loader(dataset.samples[i][0])), dataset.samples[i][1])})()
        return torch.utils.data.DataLoader(images, batch, shuffle=True, num_workers=workers,
                                           pin_memory=device.type == 'cuda')
    feed = D.image_loader(folder, True, batch, workers, 0, device, SimpleNamespace(rank=0, world=1), name)
    # on a GPU, through to normalised batches there; on the CPU, the uint8 batches the workers send
    # (normalising, a device's work, is timed apart: here it would take a core from the workers)
    return feed if device.type == 'cuda' else feed.loader


def cpu_normalize_ms(batch, repeats=5):
    """Milliseconds to normalise a uint8 batch on the CPU, as imagenet_data.Feed does when training there."""
    from training import imagenet_data as D
    x = torch.randint(0, 256, (batch, 224, 224, 3), dtype=torch.uint8).permute(0, 3, 1, 2)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        D.normalize(x)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def time_pipeline(loader, warmup, steps, device):
    """(seconds to the first batch: the workers' start-up, img/s over `steps` batches after `warmup` more)."""
    t0 = time.perf_counter()
    it = iter(loader)
    x, _ = next(it)
    start = time.perf_counter() - t0
    for _ in range(warmup):
        next(it)
    if device.type == 'cuda':
        torch.cuda.synchronize()
    t0, n = time.perf_counter(), 0
    for _ in range(steps):
        x, _ = next(it)
        n += len(x)
    if device.type == 'cuda':
        torch.cuda.synchronize()
    return start, n / (time.perf_counter() - t0)


def pipeline_main(args):
    from training import imagenet_data as D
    from training.data import image_folder
    device = cifar.select_device(args.device, '0', 1)
    decoders = ['pil', 'torchvision'] + (['nvjpeg'] if device.type == 'cuda' else [])
    names = ['2017'] + decoders
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    counts = sorted({min(1, cpus), min(2, cpus), cpus})
    batches = (args.warmup + args.steps + 1) * args.batch_size
    with tempfile.TemporaryDirectory() as root:
        make_jpegs(root, args.images)
        folder = image_folder(root)
        differences = {d: D.decoder_difference(folder, d, device) for d in decoders if d != 'pil'}
        # one pass of a loader covers a measurement: no epoch ends (and no restart) inside one
        folder.samples = folder.samples * -(-batches // len(folder.samples))
        folder.targets = [t for _, t in folder.samples]
        figures = {(w, n): {'img_s': [], 'startup_s': []} for w in counts for n in names}
        for r in range(args.repeats):
            for w in counts:
                for n in names:
                    start, rate = time_pipeline(pipeline_loader(n, folder, args.batch_size, w, device), args.warmup,
                                                args.steps, device)
                    figures[w, n]['img_s'].append(rate)
                    figures[w, n]['startup_s'].append(start)
                    print(f'# repeat {r + 1}: {w} workers: {n}: {rate:.1f} img/s, start-up {start:.2f}s', flush=True)
    where = torch.cuda.get_device_name(device) if device.type == 'cuda' else f'CPU {cpu()["model"]}'
    print(f'\nImageNet input pipeline alone, train views of 500x375 JPEGs, batch {args.batch_size}; {where}, '
          f'{cpus} CPUs, flags {" ".join(cpu()["flags"])}; torch {torch.__version__}; '
          f'medians of {args.repeats} x {args.steps} '
          f'batches after {args.warmup}')
    print('pixels against the 2017 transforms (uint8 levels, same boxes): pil 0 (equal); '
          + '; '.join(f'{d} train max {t[0]:.0f}, mean {t[1]:.3f}, val max {v[0]:.0f}, mean {v[1]:.3f}'
                      for d, (t, v) in ((d, (f['train'], f['val'])) for d, f in differences.items())))
    if device.type == 'cpu':
        print(f'the new pipelines are timed to their uint8 batches; normalising one on the CPU (training there) '
              f'takes {cpu_normalize_ms(args.batch_size):.1f} ms in the main process ({torch.get_num_threads()} threads)')
    print('| workers | pipeline | img/s | ratio | start-up s |')
    print('|---|---|---|---|---|')
    for w in counts:
        base = statistics.median(figures[w, '2017']['img_s'])
        for n in names:
            f = figures[w, n]
            f['img_s_median'], f['startup_s_median'] = statistics.median(f['img_s']), statistics.median(f['startup_s'])
            f['ratio'] = f['img_s_median'] / base
            print(f"| {w} | {n} | {f['img_s_median']:.1f} | {f['ratio']:.2f}x | {f['startup_s_median']:.2f} |")
    if args.json:
        with open(args.json, 'w') as fh:
            json.dump({'where': where, 'cpu_flags': cpu()['flags'], 'torch': torch.__version__, 'batch_size': args.batch_size,
                       'steps': args.steps, 'warmup': args.warmup, 'repeats': args.repeats,
                       'pixel_difference': {d: {split: {'max': m, 'mean': a} for split, (m, a) in f.items()}
                                            for d, f in differences.items()},
                       'pipelines': {f'{w} workers {n}': f for (w, n), f in figures.items()}}, fh, indent=1)


def main(argv=None):
    args = parse_args(argv)
    if args.pipeline:
        return pipeline_main(args)
    names = args.names
    here = [n for n in names if n not in OWN_PROCESS]
    figures, where, cuda = measure(args, here) if here else ({}, None, None)
    for name in names:
        if name in OWN_PROCESS:
            figures[name] = own_process(args, name)
    figures = {n: figures[n] for n in names}
    if where is None:  # every config ran in a child process
        cuda = torch.cuda.is_available() and args.device != 'cpu'
        where = torch.cuda.get_device_name() if cuda else \
            f'CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads'

    teacher = f'{args.teacher_name} teacher, AT' if args.teacher else 'no teacher'
    peak = cuda
    print(f'\n{args.student_name} student, {teacher}, batch {args.batch_size}; {where}; '
          f'torch {torch.__version__}; medians of {args.repeats} x {args.steps} steps')
    if peak:
        print("peak MiB: each config's own, the most allocated during its steps above what was allocated "
              'before them, plus its own dataset and weights on the GPU')
    print('| config | train img/s | ratio | eval img/s | ratio |' + (' peak MiB |' if peak else ''))
    print('|---|---|---|---|---|' + ('---|' if peak else ''))
    base_t, base_e = statistics.median(figures[names[0]]['train_img_s']), statistics.median(figures[names[0]]['eval_img_s'])
    for n in names:
        f = figures[n]
        f['train_median'], f['eval_median'] = statistics.median(f['train_img_s']), statistics.median(f['eval_img_s'])
        f['train_ratio'], f['eval_ratio'] = f['train_median'] / base_t, f['eval_median'] / base_e
        print(f"| {n} | {f['train_median']:.1f} | {f['train_ratio']:.2f}x | {f['eval_median']:.1f} | {f['eval_ratio']:.2f}x |"
              + (f" {f['peak_mib']:.0f} |" if peak else ''))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if not peak:
        print(f'process peak RSS {rss:.0f} MiB')
    if args.json:
        with open(args.json, 'w') as fh:
            json.dump({'where': where, 'torch': torch.__version__, 'device': 'cuda' if cuda else 'cpu',
                       'student': args.student_name, 'teacher': args.teacher_name,
                       'batch_size': args.batch_size, 'steps': args.steps, 'warmup': args.warmup,
                       'repeats': args.repeats, 'cudnn_benchmark': args.cudnn_benchmark,
                       'peak_definition': 'own steps above prior allocation + own dataset and weights (MiB); None on CPU',
                       'process_peak_rss_mib': rss, 'configs': figures}, fh, indent=1)


if __name__ == '__main__':
    cli(main, PROG)
