"""Never lose a run: exact resume, kill -9 at any instant, signals, non-finite losses."""
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, read_log, run_cifar

SMALL = ['--depth', 10, '--width', 1, '--batch_size', 16, '--nthread', 0]


def start_cifar(args, cwd):
    return subprocess.Popen([sys.executable, str(ROOT / 'cifar.py'), '--no_progress', *map(str, args)], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, 'CUDA_VISIBLE_DEVICES': ''})


@pytest.mark.parametrize('loader', ['fast', 'torchvision'])
def test_resume_repeats_the_uninterrupted_run(tiny_data, tmp_path, loader):
    args = [*SMALL, '--dataroot', tiny_data, '--loader', loader, '--epoch_step', '[3]', '--seed', 3]
    if loader == 'torchvision':
        args += ['--nthread', 1]  # worker seeds must come back too
    run_cifar([*args, '--epochs', 4, '--save', 'logs/whole'], tmp_path)
    run_cifar([*args, '--epochs', 2, '--save', 'logs/cut'], tmp_path)  # as if killed after epoch 2
    out = run_cifar([*args, '--epochs', 4, '--save', 'logs/cut', '--resume', 'auto'], tmp_path)
    assert 'resumed from logs/cut/model.pt7 at epoch 2' in out.stdout
    whole, cut = read_log(tmp_path / 'logs/whole'), read_log(tmp_path / 'logs/cut')
    assert [r['epoch'] for r in cut] == [1, 2, 3, 4]
    for a, b in zip(whole, cut):
        assert (a['train_loss'], a['train_acc'], a['test_loss'], a['test_acc']) == \
               (b['train_loss'], b['train_acc'], b['test_loss'], b['test_acc']), a['epoch']
    pa = torch.load(tmp_path / 'logs/whole/model.pt7', weights_only=True)['params']
    pb = torch.load(tmp_path / 'logs/cut/model.pt7', weights_only=True)['params']
    assert all(torch.equal(pa[k], pb[k]) for k in pa)


def test_distilled_student_resumes_exactly(tiny_data, tmp_path):
    run_cifar([*SMALL, '--dataroot', tiny_data, '--epochs', 1, '--save', 'logs/t'], tmp_path)
    args = [*SMALL, '--dataroot', tiny_data, '--teacher_id', 't', '--beta', 1e3, '--alpha', 0.5]
    run_cifar([*args, '--epochs', 2, '--save', 'logs/whole'], tmp_path)
    run_cifar([*args, '--epochs', 1, '--save', 'logs/cut'], tmp_path)
    run_cifar([*args, '--epochs', 2, '--save', 'logs/cut', '--resume', 'auto'], tmp_path)
    whole, cut = read_log(tmp_path / 'logs/whole'), read_log(tmp_path / 'logs/cut')
    assert [(r['train_loss'], r['test_acc'], r['at_losses']) for r in whole] == \
           [(r['train_loss'], r['test_acc'], r['at_losses']) for r in cut]


def test_kill_9_at_random_instants_never_loses_the_run(tiny_data, tmp_path):
    rng = random.Random(0)
    args = [*SMALL, '--dataroot', tiny_data, '--epochs', 40, '--save', 'logs/k']
    kills = 0
    for attempt in range(5):
        p = start_cifar(args + (['--resume', 'auto'] if attempt else []), tmp_path)
        deadline = time.time() + 60
        while not (tmp_path / 'logs/k/log.txt').exists() and time.time() < deadline and p.poll() is None:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 2.0))
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            kills += 1
        p.wait()
        state = torch.load(tmp_path / 'logs/k/model.pt7', weights_only=True)  # loads, whole
        text = (tmp_path / 'logs/k/log.txt').read_text()
        assert text.endswith('\n')
        epochs = [r['epoch'] for r in read_log(tmp_path / 'logs/k')]
        assert epochs == list(range(1, len(epochs) + 1))
        # the log agrees with the checkpoint, or lacks only the line a resume restores
        assert state['epoch'] in (epochs[-1], epochs[-1] + 1)
    assert kills >= 3
    final = state['epoch'] + 1
    run_cifar([*SMALL, '--dataroot', tiny_data, '--epochs', final, '--save', 'logs/k', '--resume', 'auto'], tmp_path)
    assert [r['epoch'] for r in read_log(tmp_path / 'logs/k')] == list(range(1, final + 1))


def wait_for_log(path, p, timeout=60):
    deadline = time.time() + timeout
    while not path.exists() and time.time() < deadline and p.poll() is None:
        time.sleep(0.05)
    assert path.exists(), p.communicate()


@pytest.mark.parametrize('sig', [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_cleanly_and_resume_continues(tiny_data, tmp_path, sig):
    p = start_cifar([*SMALL, '--dataroot', tiny_data, '--epochs', 500, '--save', 'logs/s'], tmp_path)
    wait_for_log(tmp_path / 'logs/s/log.txt', p)
    p.send_signal(sig)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and 'stopped mid-epoch' in lines[0] and '--resume auto' in lines[0]
    done = torch.load(tmp_path / 'logs/s/model.pt7', weights_only=True)['epoch']
    assert [r['epoch'] for r in read_log(tmp_path / 'logs/s')] == list(range(1, done + 1))
    assert f'last whole epoch ({done})' in lines[0]


def test_second_signal_exits_at_once(tiny_data, tmp_path):
    # a step long enough (about a second here) for the second signal to land inside it;
    # signals that arrive together are merged into one by the OS
    p = start_cifar(['--depth', 16, '--width', 4, '--batch_size', 48, '--nthread', 0, '--dataroot', tiny_data,
                     '--epochs', 500, '--save', 'logs/s2'], tmp_path)
    wait_for_log(tmp_path / 'logs/s2/log.txt', p, timeout=120)
    p.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and 'second signal' in err
    torch.load(tmp_path / 'logs/s2/model.pt7', weights_only=True)


def test_non_finite_loss_stops_with_one_line(tiny_data, tmp_path):
    p = run_cifar([*SMALL, '--dataroot', tiny_data, '--epochs', 3, '--lr', 1e30, '--save', 'logs/nan'], tmp_path,
                  check=False)
    lines = p.stderr.strip().splitlines()
    assert p.returncode != 0 and 'Traceback' not in p.stderr and len(lines) == 1
    assert 'the loss is' in lines[0] and 'at epoch 1, batch' in lines[0]
    assert not (tmp_path / 'logs/nan/model.pt7').exists()


def test_resume_auto(tiny_data, tmp_path):
    p = run_cifar([*SMALL, '--dataroot', tiny_data, '--epochs', 1, '--resume', 'auto'], tmp_path, check=False)
    assert p.returncode != 0 and 'pass --save' in p.stderr
    out = run_cifar([*SMALL, '--dataroot', tiny_data, '--epochs', 1, '--resume', 'auto', '--save', 'logs/a'],
                    tmp_path)
    assert 'resumed' not in out.stdout and len(read_log(tmp_path / 'logs/a')) == 1
