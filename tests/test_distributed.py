"""torchrun: 2 gloo processes on CPU train one run, written once, with meters over all ranks."""
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, make_class_folders, read_log
from test_train import nn_test_accuracy


def torchrun(args, cwd, nproc=2):
    return subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node',
                           str(nproc), str(ROOT / 'cifar.py'), '--no_progress', *map(str, args)],
                          cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, 'CUDA_VISIBLE_DEVICES': ''})


@pytest.fixture(scope='module')
def odd_data(tmp_path_factory):
    # 48 training and 21 test images: an odd test set splits 11/10, so one rank's
    # accuracy cannot pass for the whole set's
    return make_class_folders(tmp_path_factory.mktemp('odd'), classes=3, train_per_class=16, test_per_class=7)


@pytest.mark.parametrize('loader', ['fast', 'torchvision'])
def test_two_process_run(odd_data, tmp_path, loader):
    p = torchrun(['--dataroot', odd_data, '--depth', 10, '--batch_size', 16, '--nthread', 0, '--epochs', 2,
                  '--loader', loader, '--save', 'logs/ddp'], tmp_path)
    assert p.returncode == 0, p.stderr
    log = read_log(tmp_path / 'logs/ddp')
    assert [r['epoch'] for r in log] == [1, 2]  # written once, by rank 0
    assert p.stdout.count('==> epoch 1/2') == 1
    params = torch.load(tmp_path / 'logs/ddp/model.pt7', weights_only=True)['params']
    # test accuracy over all 21 images, as an independent evaluation of the saved weights gives it
    assert nn_test_accuracy(params, 10, 1, odd_data) == pytest.approx(log[-1]['test_acc'], abs=1e-6)


def test_world_larger_than_dataset(tmp_path):
    data = make_class_folders(tmp_path / 'one', classes=1, train_per_class=1, test_per_class=1)
    p = torchrun(['--dataroot', data, '--depth', 10, '--epochs', 1, '--nthread', 0, '--save', 'logs/x'], tmp_path)
    assert p.returncode != 0
    ours = [line for line in p.stderr.splitlines() if line.startswith('cifar.py: error:')]
    assert ours == ['cifar.py: error: 2 torchrun processes for 1 images: too few images to give each process some']
    assert 'cifar.py", line' not in p.stderr  # no traceback from our processes (torchrun adds its own report)
    assert not (tmp_path / 'logs/x').exists()


def _meters_worker(rank, init, out):
    import torchnet as tnt
    import utils
    torch.distributed.init_process_group('gloo', init_method=init, rank=rank, world_size=2)
    acc, loss = tnt.meter.ClassErrorMeter(topk=[1], accuracy=True), tnt.meter.AverageValueMeter()
    # rank 0 gets 3 of 4 right, rank 1 gets 0 of 2; losses 1, 2 and 6
    if rank == 0:
        acc.add(torch.eye(4), torch.tensor([0, 1, 2, 0]))
        loss.add(1.0)
        loss.add(2.0)
    else:
        acc.add(torch.eye(2), torch.tensor([1, 0]))
        loss.add(6.0)
    utils.Dist(torch.device('cpu')).sync_meters([acc, loss])
    torch.save({'acc': acc.value()[0], 'loss': loss.value()[0]}, f'{out}/{rank}.pt')
    torch.distributed.destroy_process_group()


def test_meters_are_summed_over_ranks(tmp_path):
    sys.path.insert(0, str(ROOT))
    torch.multiprocessing.spawn(_meters_worker, args=(f'file://{tmp_path}/init', str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        r = torch.load(tmp_path / f'{rank}.pt')
        assert r['acc'] == pytest.approx(100 * 3 / 6) and r['loss'] == pytest.approx(3.0)


def test_imagenet_two_processes(tmp_path):
    from test_imagenet import make_image_folder
    make_image_folder(tmp_path / 'data')
    p = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                        str(ROOT / 'imagenet.py'), '--no_progress', '--imagenetpath', 'data', '--batch_size', '4',
                        '--epochs', '1', '--nthread', '0', '--save', 'logs/d'],
                       cwd=tmp_path, capture_output=True, text=True, timeout=600,
                       env={**os.environ, 'CUDA_VISIBLE_DEVICES': ''})
    assert p.returncode == 0, p.stderr
    log = read_log(tmp_path / 'logs/d')
    assert len(log) == 1 and len(log[0]['test_acc']) == 2
    torch.load(tmp_path / 'logs/d/model.pt7', weights_only=True)
