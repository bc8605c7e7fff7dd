import os

# Two test workers share the machine (pytest.ini: -n 2): each of their processes computes on one thread,
# so that no two busy-waiting thread pools fight over the same cores.
os.environ.setdefault('OMP_NUM_THREADS', '1')

import hashlib  # noqa: E402
import io
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
# The scripts as the tests run them: no network whether or not the machine has one (downloads go
# to a closed port), and no torch hub cache, so "cannot download" cases mean the same everywhere.
OFFLINE_ENV = {**os.environ, 'CUDA_VISIBLE_DEVICES': '', 'TORCH_HOME': tempfile.mkdtemp(),
               **{k: 'http://127.0.0.1:9' for k in ('http_proxy', 'https_proxy', 'HTTP_PROXY', 'HTTPS_PROXY')},
               'no_proxy': '', 'NO_PROXY': ''}


def make_class_folders(root, classes=3, train_per_class=16, test_per_class=8, seed=0, size=32):
    """A tiny learnable dataset of size x size images: class c has a bright channel c, on noise."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    for split, n in (('train', train_per_class), ('test', test_per_class)):
        for c in range(classes):
            d = Path(root, split, f'class{c}')
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = rng.integers(0, 120, (size, size, 3), dtype=np.uint8)
                img[..., c % 3] += 120
                Image.fromarray(img).save(d / f'{i:03d}.png')
    return Path(root)


@pytest.fixture(scope='session')
def tiny_data(tmp_path_factory):
    return make_class_folders(tmp_path_factory.mktemp('data'))


def run_script(name, args, cwd, check=True, timeout=600, process=False):
    """Runs cifar.py or imagenet.py as a user would, in `cwd` (so logs/ resolves there): in this
    process where the process is not what is tested (its start costs 3 s, a tiny run's training
    0.1 s), else in its own. Where CUDA is, in its own: CUDA_VISIBLE_DEVICES='' hides the GPUs only
    from a process that starts."""
    import importlib
    import torch
    argv = ['--no_progress', *map(str, args)]
    if process or torch.cuda.is_available():
        p = subprocess.run([sys.executable, str(ROOT / f'{name}.py'), *argv],
                           cwd=cwd, capture_output=True, text=True, timeout=timeout, env=OFFLINE_ENV)
    else:
        p = run_here(importlib.import_module(name).main, f'{name}.py', argv, cwd)
    if check and p.returncode != 0:
        raise AssertionError(f'{name}.py failed ({p.returncode}):\n{p.stdout}\n{p.stderr}')
    return p


def run_cifar(args, cwd, check=True, timeout=300, process=False):
    return run_script('cifar', args, cwd, check, timeout, process)


def run_here(main, prog, argv, cwd):
    """`prog argv` as errors.cli runs it, in this process: its cwd, environment (OFFLINE_ENV) and
    arguments; stdout and stderr read at the file descriptors (a refusal writes to fd 2), and the
    process's state (cwd, environment, signal handlers, sys.argv) put back afterwards."""
    from training import errors
    files = [tempfile.TemporaryFile(), tempfile.TemporaryFile()]
    sys.stdout.flush(), sys.stderr.flush()
    fds = [os.dup(1), os.dup(2)]
    saved = sys.stdout, sys.stderr, sys.argv, os.getcwd(), dict(os.environ)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    code = 0
    try:
        for fd, f in zip((1, 2), files):
            os.dup2(f.fileno(), fd)
        sys.stdout, sys.stderr = (io.TextIOWrapper(open(fd, 'wb', closefd=False), write_through=True) for fd in (1, 2))
        sys.argv = [prog, *argv]
        os.chdir(cwd)
        os.environ.update(OFFLINE_ENV)
        try:
            errors.cli(main, prog)
        except SystemExit as e:
            code = e.code or 0
    finally:
        sys.stdout.flush(), sys.stderr.flush()
        for fd, old in zip((1, 2), fds):
            os.dup2(old, fd)
            os.close(old)
        sys.stdout, sys.stderr, sys.argv, cwd_before, env = saved
        os.chdir(cwd_before)
        os.environ.clear()
        os.environ.update(env)
        for s, h in handlers.items():
            signal.signal(s, h)
    out, err = (f.seek(0) or f.read().decode() for f in files)
    return subprocess.CompletedProcess([prog, *argv], code, out, err)


def read_log(folder):
    """A run folder's log.txt records; every line must be one."""
    from training.rundir import read_json_stats
    path = Path(folder, 'log.txt')
    assert all(line.startswith('json_stats: ') for line in path.read_text().splitlines())
    return read_json_stats(path)


def tree_digest(folder):
    """A hash of every file's path and bytes under folder."""
    h = hashlib.sha256()
    for p in sorted(Path(folder).rglob('*')):
        h.update(str(p.relative_to(folder)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()
