"""torchrun: 2 gloo processes on CPU train one run, written once, with meters over all ranks."""
import subprocess
import sys

import numpy as np
import pytest
import torch

from training import rundir
from conftest import OFFLINE_ENV, ROOT, make_class_folders, read_log, run_cifar
from test_train import nn_test_accuracy


def torchrun(args, cwd, nproc=2):
    return subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node',
                           str(nproc), str(ROOT / 'cifar.py'), '--no_progress', *map(str, args)],
                          cwd=cwd, capture_output=True, text=True, timeout=600,
                          env=OFFLINE_ENV)


@pytest.fixture(scope='module')
def odd_data(tmp_path_factory):
    # 48 training and 21 test images: an odd test set splits 11/10, so one rank's
    # accuracy cannot pass for the whole set's
    return make_class_folders(tmp_path_factory.mktemp('odd'), classes=3, train_per_class=16, test_per_class=7)


@pytest.mark.parametrize('loader', ['fast', pytest.param('torchvision', marks=pytest.mark.slow)])
def test_two_process_run(odd_data, tmp_path, loader):
    p = torchrun(['--dataroot', odd_data, '--depth', 10, '--batch_size', 16, '--nthread', 0, '--epochs', 2,
                  '--loader', loader, '--save', 'logs/ddp'], tmp_path)
    assert p.returncode == 0, p.stderr
    # every conv weight has its gradient's strides (channels_last, the CPU's default): DDP's buckets fit them
    assert 'Grad strides do not match bucket view strides' not in p.stderr
    log = read_log(tmp_path / 'logs/ddp')
    assert [r['epoch'] for r in log] == [1, 2]  # written once, by rank 0
    assert p.stdout.count('==> epoch 1/2') == 1
    # rank 0 alone writes the event file and run.json
    assert len(list((tmp_path / 'logs/ddp').glob('events.out.tfevents.*'))) == 1
    assert [s['processes'] for s in rundir.read_sessions(tmp_path / 'logs/ddp')] == [2]
    params = torch.load(tmp_path / 'logs/ddp/model.pt7', weights_only=True)['params']
    # test accuracy over all 21 images, as an independent evaluation of the saved weights gives it
    assert nn_test_accuracy(params, 10, 1, odd_data) == pytest.approx(log[-1]['test_acc'], abs=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize('loader', ['fast', 'torchvision'])
def test_two_process_resume_repeats_the_uninterrupted_run(odd_data, tmp_path, loader):
    """DistributedDataParallel from a checkpoint: the same figures and weights as without the cut. With
    the torchvision loader each rank draws its own crops (--nthread 0: from its own torch stream), so
    each rank's random state must come back as it was, not rank 0's on every rank."""
    args = ['--dataroot', odd_data, '--depth', 10, '--batch_size', 16, '--nthread', 0, '--epoch_step', '[]',
            '--loader', loader]
    for extra in (['--epochs', 3, '--save', 'logs/whole'], ['--epochs', 2, '--save', 'logs/cut'],
                  ['--epochs', 3, '--save', 'logs/cut', '--resume', 'auto']):
        p = torchrun(args + extra, tmp_path)
        assert p.returncode == 0, p.stderr
    keys = ('epoch', 'train_loss', 'train_acc', 'test_loss', 'test_acc')
    whole, cut = ([[r[k] for k in keys] for r in read_log(tmp_path / 'logs' / n)] for n in ('whole', 'cut'))
    assert whole == cut and len(cut) == 3
    a, b = (torch.load(tmp_path / 'logs' / n / 'model.pt7', weights_only=True) for n in ('whole', 'cut'))
    assert all(torch.equal(a['params'][k], b['params'][k]) for k in a['params'])
    assert len(b['rng_ranks']) == 1 and not torch.equal(b['rng']['torch'], b['rng_ranks'][0]['torch'])


@pytest.mark.slow
def test_two_process_gradient_at(odd_data, tmp_path):
    """Double backprop inside DistributedDataParallel's one forward: gradient AT and flip symmetry."""
    run_cifar(['--dataroot', odd_data, '--depth', 10, '--batch_size', 16, '--nthread', 0, '--epochs', 1,
               '--save', 'logs/t'], tmp_path)
    p = torchrun(['--dataroot', odd_data, '--depth', 10, '--batch_size', 16, '--nthread', 0, '--epochs', 1,
                  '--teacher_id', 't', '--beta', 1e3, '--grad_beta', 10, '--sym_beta', 1, '--save', 'logs/g'], tmp_path)
    assert p.returncode == 0, p.stderr
    r = read_log(tmp_path / 'logs/g')[0]
    assert r['grad_at_loss'][0] > 0 and r['sym_loss'][0] > 0 and len(r['at_losses']) == 3


@pytest.mark.slow
def test_world_larger_than_dataset(tmp_path):
    data = make_class_folders(tmp_path / 'one', classes=1, train_per_class=1, test_per_class=1)
    p = torchrun(['--dataroot', data, '--depth', 10, '--epochs', 1, '--nthread', 0, '--save', 'logs/x'], tmp_path)
    assert p.returncode != 0
    ours = [line for line in p.stderr.splitlines() if line.startswith('cifar.py: error:')]
    # each rank says it, once, naming itself (torchrun may stop a rank before it does: at least one does)
    assert 1 <= len(ours) == len(set(ours)) and set(ours) <= {
        f'cifar.py: error: rank {r}: 2 torchrun processes for 1 images: too few images to give each process some'
        for r in (0, 1)}
    assert 'cifar.py", line' not in p.stderr  # no traceback from our processes (torchrun adds its own report)
    assert not (tmp_path / 'logs/x').exists()


@pytest.mark.slow
def test_imagenet_two_processes(tmp_path):
    from test_imagenet import make_image_folder
    make_image_folder(tmp_path / 'data')
    p = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                        str(ROOT / 'imagenet.py'), '--no_progress', '--imagenetpath', 'data', '--batch_size', '4',
                        '--epochs', '1', '--nthread', '0', '--save', 'logs/d'],
                       cwd=tmp_path, capture_output=True, text=True, timeout=600,
                       env=OFFLINE_ENV)
    assert p.returncode == 0, p.stderr
    log = read_log(tmp_path / 'logs/d')
    assert len(log) == 1 and len(log[0]['test_acc']) == 2
    torch.load(tmp_path / 'logs/d/model.pt7', weights_only=True)


def _crops_worker(rank, init, root, nthread, out):
    import cifar
    from training import errors
    from training import device
    torch.distributed.init_process_group('gloo', init_method=init, rank=rank, world_size=2)
    opt = cifar.parse_args(['--dataroot', root, '--loader', 'torchvision', '--nthread', str(nthread),
                            '--batch_size', '16', '--seed', '0'])
    device.seed_everything(opt.seed)  # as cifar.build does, once the process group is up
    train = cifar.create_loaders(opt, torch.device('cpu'))[0]
    torch.save(next(iter(train))[0], f'{out}/{rank}.pt')
    errors.leave()


@pytest.mark.parametrize('nthread', [0, pytest.param(1, marks=pytest.mark.slow)])
def test_ranks_crop_and_flip_apart_with_the_torchvision_loader(tmp_path, nthread):
    """Every image the same: what tells two ranks' batches apart is their crops and flips. Seeded alike,
    the ranks would draw the same ones, and the global batch would hold B/N distinct augmentations."""
    from PIL import Image
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    for split, n in (('train', 8), ('test', 2)):
        for c in ('a', 'b'):
            (tmp_path / 'data' / split / c).mkdir(parents=True)
            for i in range(n):
                image.save(tmp_path / 'data' / split / c / f'{i}.png')
    torch.multiprocessing.spawn(_crops_worker, nprocs=2, args=(f'file://{tmp_path}/init', str(tmp_path / 'data'),
                                                               nthread, str(tmp_path)))
    a, b = (torch.load(tmp_path / f'{r}.pt') for r in (0, 1))
    assert a.shape == b.shape == (8, 3, 32, 32)
    views = {x.numpy().tobytes() for x in torch.cat([a, b])}
    # 16 draws from 162 crops and flips: most of them differ, not each rank's 8 twice
    assert not torch.equal(a, b) and len(views) > 8
