"""A run trains what it was started as: its options checked on resume, its teacher's data checked, one
lr schedule, and the scripts' commands built so that every path arrives whole (issue 24's cases)."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from training import board
from conftest import OFFLINE_ENV, ROOT, make_class_folders, read_log, run_cifar

SMALL = ['--depth', 10, '--batch_size', 16, '--nthread', 0, '--tensorboard', 0]


@pytest.fixture(scope='module')
def crd_run(tmp_path_factory):
    """A finished 1-epoch --preset crd run at logs/crd (CIFAR-100 mean/std, zero padding, batch 16)."""
    cwd = tmp_path_factory.mktemp('truth')
    make_class_folders(cwd / 'data', classes=3, train_per_class=8, test_per_class=4)
    run_cifar([*SMALL, '--preset', 'crd', '--dataroot', 'data', '--epochs', 1, '--save', 'logs/crd'], cwd)
    return cwd


def refusal(p):
    assert p.returncode == 1 and 'Traceback' not in p.stderr, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    return lines[0]


def test_resume_without_the_preset_is_refused_naming_the_first_difference(crd_run):
    p = run_cifar([*SMALL, '--dataroot', 'data', '--epochs', 2, '--resume', 'auto', '--save', 'logs/crd'],
                  crd_run, check=False)
    assert refusal(p) == ("cifar.py: error: --resume auto: --dataset is 'CIFAR100' in the checkpoint and 'CIFAR10' "
                          "now; resume with the run's options (or pass --allow_change dataset)").replace(
        '--resume auto', '--resume logs/crd/model.pt7')
    assert len(read_log(crd_run / 'logs/crd')) == 1  # nothing trained


@pytest.mark.parametrize('flag,value', [('--lr', 0.01), ('--normalize', '2017'), ('--pad_mode', 'reflect'),
                                        ('--seed', 1), ('--beta_decay', 'none')])
def test_each_changed_option_is_named(crd_run, flag, value):
    if flag == '--beta_decay':  # an option the record holds at its default: a changed default is caught too
        flag, value = '--weight_decay', 1e-4
    p = run_cifar([*SMALL, '--preset', 'crd', '--dataroot', 'data', '--epochs', 2, '--resume', 'auto',
                   '--save', 'logs/crd', flag, value], crd_run, check=False)
    assert f'error: --resume logs/crd/model.pt7: {flag} is ' in refusal(p)


def test_more_epochs_resume_on_a_moved_dataset(crd_run, tmp_path):
    shutil.copytree(crd_run / 'logs/crd', tmp_path / 'crd')
    shutil.copytree(crd_run / 'data', tmp_path / 'moved data')
    run_cifar([*SMALL, '--preset', 'crd', '--dataroot', tmp_path / 'moved data', '--epochs', 2, '--resume', 'auto',
               '--save', tmp_path / 'crd'], crd_run)  # the same data by what it holds (loop.check_same_data)
    assert [r['epoch'] for r in read_log(tmp_path / 'crd')] == [1, 2]


def test_an_option_an_older_checkpoint_lacks_compares_against_its_default(crd_run, tmp_path):
    shutil.copytree(crd_run / 'logs/crd', tmp_path / 'old')
    state = torch.load(tmp_path / 'old/model.pt7', weights_only=True)
    del state['record']['pad_mode']  # as written before the flag existed
    torch.save(state, tmp_path / 'old/model.pt7')
    base = [*SMALL, '--preset', 'crd', '--dataroot', 'data', '--epochs', 1, '--resume', tmp_path / 'old/model.pt7',
            '--save', tmp_path / 'old']
    # the preset's zero padding against the default, reflect: a difference
    assert "--pad_mode is 'reflect' in the checkpoint and 'zeros' now" in refusal(run_cifar(base, crd_run, check=False))
    p = run_cifar([*base, '--pad_mode', 'reflect'], crd_run)
    assert 'resumed from' in p.stdout


def test_a_checkpoint_option_of_the_wrong_type_is_one_line(crd_run, tmp_path):
    shutil.copytree(crd_run / 'logs/crd', tmp_path / 'bad')
    state = torch.load(tmp_path / 'bad/model.pt7', weights_only=True)
    state['record']['batch_size'] = '16'  # a hand-edited record
    torch.save(state, tmp_path / 'bad/model.pt7')
    p = run_cifar([*SMALL, '--preset', 'crd', '--dataroot', 'data', '--epochs', 2, '--resume', 'auto',
                   '--save', tmp_path / 'bad'], crd_run, check=False)
    assert refusal(p).endswith("bad/model.pt7: its option batch_size is '16', not of type int")


def test_a_teacher_of_other_inputs_is_refused(crd_run):
    p = run_cifar([*SMALL, '--dataroot', 'data', '--epochs', 1, '--save', 'logs/s', '--teacher_id', 'crd',
                   '--beta', 1e3], crd_run, check=False)
    assert refusal(p) == ("cifar.py: error: teacher logs/crd was trained on --normalize cifar100 inputs, the "
                          "student's are --normalize 2017: the teacher would see inputs it never saw")
    assert not (crd_run / 'logs/s').exists()


def test_a_teacher_of_other_classes_is_refused_for_kd(crd_run, tmp_path):
    make_class_folders(tmp_path / 'other', classes=3, train_per_class=2, test_per_class=1)
    for split in ('train', 'test'):  # the same count, other names
        os.rename(tmp_path / 'other' / split / 'class0', tmp_path / 'other' / split / 'zebra')
    p = run_cifar([*SMALL, '--preset', 'crd', '--dataroot', tmp_path / 'other', '--epochs', 1,
                   '--save', tmp_path / 's', '--teacher_id', crd_run / 'logs/crd', '--alpha', 0.9],
                  crd_run, check=False)
    assert 'was trained on other class folders (names or order) than the student' in refusal(p)


def test_visualize_normalises_with_the_runs_own_statistics(crd_run, monkeypatch):
    sys.path.insert(0, str(ROOT / 'scripts'))
    import visualize
    seen = []
    monkeypatch.setattr(visualize, 'maps', lambda f, params, x, targets, kind: seen.append(x) or [[]] * len(x))
    monkeypatch.setattr(visualize, 'draw', lambda *a: None)
    monkeypatch.chdir(crd_run)
    visualize.main(['logs/crd', '--dataroot', 'data', '-n', '2'])
    images = visualize.cifar_images('data', 'CIFAR100', 2)[0]
    mean, std = np.array([0.5071, 0.4867, 0.4408]), np.array([0.2675, 0.2565, 0.2761])  # RepDistiller's
    hand = (np.stack(images).astype(np.float64) / 255 - mean) / std
    np.testing.assert_allclose(seen[0].permute(0, 2, 3, 1).numpy(), hand, rtol=1e-5, atol=1e-5)


def test_tensorboard_lr_of_a_repeated_step_is_the_optimizers():
    """table1.sh at EPOCHS=2 passed [2,2,2]: the loop dropped the lr once (0.02), TensorBoard thrice."""
    record = {'epoch': 2, 'lr': 0.1, 'lr_decay_ratio': 0.2, 'epoch_step': '[2,2,2]', 'epochs': 2}
    assert board.lr_at(record) == 0.1 * 0.2


FAKE_PYTHON = '''#!/usr/bin/env bash
# formats.py (is a run done?) runs; cifar.py's arguments are recorded, one JSON list a line
if [ "$1" != cifar.py ]; then exec {python} "$@"; fi
{python} -c 'import json, sys; print(json.dumps(sys.argv[1:]))' "$@" >> {record}
'''


@pytest.mark.parametrize('script', ['table1.sh', 'cifar100.sh'])
def test_paths_with_spaces_quotes_and_dollars_arrive_whole(tmp_path, script):
    fake, record = tmp_path / 'python', tmp_path / 'argv.jsonl'
    fake.write_text(FAKE_PYTHON.format(python=sys.executable, record=record))
    fake.chmod(0o755)
    data, logs = tmp_path / "my data 'q' $HOME", tmp_path / 'runs $x "y"'
    env = {**OFFLINE_ENV, 'PYTHON': str(fake), 'DATAROOT': str(data), 'LOGS': str(logs), 'EPOCHS': '1',
           'ROWS': '16_1_16_2' if script == 'table1.sh' else 'resnet20_56', 'METHODS': 'at'}
    p = subprocess.run(['bash', str(ROOT / 'scripts' / script)], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    calls = [json.loads(line) for line in record.read_text().splitlines()]
    assert len(calls) == 2  # the teacher, then AT
    for argv in calls:
        assert argv[argv.index('--dataroot') + 1] == str(data)
        assert argv[argv.index('--save') + 1].startswith(str(logs) + '/')
    teacher = calls[0][calls[0].index('--save') + 1]
    assert calls[1][calls[1].index('--teacher_id') + 1] == teacher and teacher.startswith(str(logs))
    # the printed command, pasted into a shell, is the same command
    printed = [line for line in p.stdout.splitlines() if not line.startswith('#')]
    echoed = subprocess.run(['bash', '-c', printed[0].replace(str(fake), 'printf "%s\\n"', 1)],
                            capture_output=True, text=True).stdout.splitlines()
    assert echoed == calls[0] and calls[0][0] == 'cifar.py'


def test_relative_paths_resolve_from_where_the_user_stands(tmp_path):
    fake, record = tmp_path / 'python', tmp_path / 'argv.jsonl'
    fake.write_text(FAKE_PYTHON.format(python=sys.executable, record=record))
    fake.chmod(0o755)
    env = {**OFFLINE_ENV, 'PYTHON': str(fake), 'DATAROOT': 'mydata', 'LOGS': 'mylogs', 'EPOCHS': '1',
           'ROWS': '16_1_16_2', 'METHODS': 'student'}
    p = subprocess.run(['bash', str(ROOT / 'scripts' / 'table1.sh')], capture_output=True, text=True, env=env,
                       cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    argv = json.loads(record.read_text().splitlines()[0])
    assert argv[argv.index('--dataroot') + 1] == str(tmp_path.resolve() / 'mydata')
    assert argv[argv.index('--save') + 1] == str(tmp_path.resolve() / 'mylogs' / 'resnet_16_2_teacher')
