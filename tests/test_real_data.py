"""A smoke test on real CIFAR-10 images, when ../shared/data holds them (skipped elsewhere)."""
import os
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch

from conftest import ROOT, read_log, run_cifar
from test_train import nn_test_accuracy

ARCHIVE = Path(os.environ.get('CIFAR10_JPG_TAR', ROOT.parent / 'shared' / 'data' / 'cifar10-jpg.tar.gz'))


def extract_subset(archive, dest, train_per_class, test_per_class):
    limits, seen = {'train': train_per_class, 'test': test_per_class}, Counter()
    with tarfile.open(archive) as tar:
        for m in tar:
            parts = Path(m.name).parts  # cifar10-jpg/<split>/<class>/<file>
            if not m.isfile() or len(parts) != 4 or parts[1] not in limits:
                continue
            if seen[parts[1], parts[2]] < limits[parts[1]]:
                seen[parts[1], parts[2]] += 1
                out = Path(dest, *parts[1:])
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(tar.extractfile(m).read())
    return Path(dest)


@pytest.mark.skipif(not ARCHIVE.is_file(), reason=f'no real CIFAR-10 at {ARCHIVE}')
@pytest.mark.slow
def test_real_cifar10_subset_learns(tmp_path):
    data = extract_subset(ARCHIVE, tmp_path / 'cifar10', 300, 50)
    assert sorted(p.name for p in (data / 'train').iterdir())[:3] == ['airplane', 'automobile', 'bird']
    run_cifar(['--dataroot', data, '--depth', 10, '--width', 1, '--epochs', 3, '--batch_size', 64,
               '--nthread', 0, '--save', 'logs/real'], tmp_path, timeout=900)
    log = read_log(tmp_path / 'logs/real')
    assert log[-1]['num_classes'] == 10 and len(log) == 3
    assert log[-1]['test_acc'] > 20  # chance is 10%
    params = torch.load(tmp_path / 'logs/real/model.pt7', weights_only=True)['params']
    assert nn_test_accuracy(params, 10, 1, data) == pytest.approx(log[-1]['test_acc'], abs=1e-6)
