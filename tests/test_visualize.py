"""scripts/visualize.py draws the grids it says it draws."""
import subprocess
import sys

import pytest
import torch
import torchvision
from PIL import Image

from conftest import ROOT, run_cifar
from resnet import fold_torchvision


def visualize(args, cwd):
    p = subprocess.run([sys.executable, str(ROOT / 'scripts' / 'visualize.py'), *map(str, args)], cwd=cwd,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    return p.stdout


@pytest.mark.slow
def test_cifar_runs_activation_and_gradient_maps(tiny_data, tmp_path):
    small = ['--depth', 10, '--batch_size', 16, '--nthread', 0, '--dataroot', tiny_data, '--epochs', 1]
    run_cifar([*small, '--save', 'logs/t'], tmp_path)
    run_cifar([*small, '--save', 'logs/s', '--teacher_id', 't', '--beta', 1e3], tmp_path)
    visualize(['logs/t', 'logs/s', '--dataroot', tiny_data, '-n', 3, '--out', 'act.png'], tmp_path)
    # 3 rows; columns: the image, then 3 groups for each of 2 runs; 120 px a cell
    assert Image.open(tmp_path / 'act.png').size == (7 * 120, 3 * 120)
    visualize(['logs/t', 'logs/s', '--dataroot', tiny_data, '-n', 2, '--kind', 'grad', '--out', 'grad.png'],
              tmp_path)
    assert Image.open(tmp_path / 'grad.png').size == (3 * 120, 2 * 120)


def test_nin_run(tiny_data, tmp_path):
    """A NIN has no fc.weight: its class count comes from its classifier conv."""
    run_cifar(['--model', 'nin', '--width', 0.1, '--batch_size', 16, '--nthread', 0, '--dataroot', tiny_data,
               '--epochs', 1, '--save', 'logs/nin'], tmp_path)
    visualize(['logs/nin', '--dataroot', tiny_data, '-n', 2, '--out', 'nin.png'], tmp_path)
    assert Image.open(tmp_path / 'nin.png').size == (4 * 120, 2 * 120)


def test_imagenet_export_on_image_files(tiny_data, tmp_path):
    torch.manual_seed(0)
    torch.save(fold_torchvision(torchvision.models.resnet18().eval().state_dict()), tmp_path / 'e.pth')
    images = sorted((tiny_data / 'test' / 'class0').iterdir())[:2]
    out = visualize(['--export', 'e.pth', *images, '--out', 'maps.png'], tmp_path)
    assert '2 images x 4 maps' in out
    assert Image.open(tmp_path / 'maps.png').size == (5 * 120, 2 * 120)
