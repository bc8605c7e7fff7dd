"""Never lose a run: exact resume, kill -9 at any instant, signals, non-finite losses."""
import signal
import subprocess
import sys

import pytest
import torch

from conftest import OFFLINE_ENV, ROOT, read_log, run_cifar

SMALL = ['--depth', 10, '--width', 1, '--batch_size', 16, '--nthread', 0]


def start_cifar(args, cwd, **env):
    return subprocess.Popen([sys.executable, str(ROOT / 'cifar.py'), '--no_progress', *map(str, args)], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**OFFLINE_ENV, 'CUDA_VISIBLE_DEVICES': '', **env})


def momentum(state):
    return [s['momentum_buffer'] for _, s in sorted(state['optimizer']['state'].items())]


@pytest.mark.parametrize('loader', ['fast', 'torchvision'])
def test_resume_repeats_the_uninterrupted_run(tiny_data, tmp_path, loader):
    # no lr step at the cut: epoch 3 goes on with the restored momentum, not a fresh optimizer
    args = [*SMALL, '--dataroot', tiny_data, '--loader', loader, '--epoch_step', '[]', '--seed', 3]
    if loader == 'torchvision':
        args += ['--nthread', 1]  # worker seeds must come back too
    run_cifar([*args, '--epochs', 3, '--save', 'logs/whole'], tmp_path)
    run_cifar([*args, '--epochs', 2, '--save', 'logs/cut'], tmp_path)  # as if stopped after epoch 2
    out = run_cifar([*args, '--epochs', 3, '--save', 'logs/cut', '--resume', 'auto'], tmp_path)
    assert 'resumed from logs/cut/model.pt7 at epoch 2' in out.stdout
    whole, cut = read_log(tmp_path / 'logs/whole'), read_log(tmp_path / 'logs/cut')
    assert [r['epoch'] for r in cut] == [1, 2, 3]
    for a, b in zip(whole, cut):
        assert (a['train_loss'], a['train_acc'], a['test_loss'], a['test_acc']) == \
               (b['train_loss'], b['train_acc'], b['test_loss'], b['test_acc']), a['epoch']
    sa = torch.load(tmp_path / 'logs/whole/model.pt7', weights_only=True)
    sb = torch.load(tmp_path / 'logs/cut/model.pt7', weights_only=True)
    assert all(torch.equal(sa['params'][k], sb['params'][k]) for k in sa['params'])
    ma, mb = momentum(sa), momentum(sb)
    assert len(ma) == len(sa['params']) - 2 * 7 and all(torch.equal(x, y) for x, y in zip(ma, mb))


def test_distilled_student_resumes_exactly(tiny_data, tmp_path):
    run_cifar([*SMALL, '--dataroot', tiny_data, '--epochs', 1, '--save', 'logs/t'], tmp_path)
    args = [*SMALL, '--dataroot', tiny_data, '--teacher_id', 't', '--beta', 1e3, '--alpha', 0.5]
    run_cifar([*args, '--epochs', 2, '--save', 'logs/whole'], tmp_path)
    run_cifar([*args, '--epochs', 1, '--save', 'logs/cut'], tmp_path)
    run_cifar([*args, '--epochs', 2, '--save', 'logs/cut', '--resume', 'auto'], tmp_path)
    whole, cut = read_log(tmp_path / 'logs/whole'), read_log(tmp_path / 'logs/cut')
    assert [(r['train_loss'], r['test_acc'], r['at_losses']) for r in whole] == \
           [(r['train_loss'], r['test_acc'], r['at_losses']) for r in cut]


@pytest.mark.slow
def test_kill_9_at_chosen_steps_never_loses_the_run(tiny_data, tmp_path):
    """SIGKILL mid-epoch, and between a checkpoint and its log line; resuming each time ends
    in the log of the uninterrupted run. 48 images in batches of 16: 3 steps an epoch."""
    args = [*SMALL, '--dataroot', tiny_data, '--epochs', 5]
    run_cifar([*args, '--save', 'logs/whole'], tmp_path)
    for when, ckpt, logged in (('5:KILL', 1, [1]),  # mid-epoch 2
                               ('ckpt3:KILL', 3, [1, 2]),  # epoch 3 saved, its log line not yet written
                               ('2:KILL', 3, [1, 2, 3])):  # mid-epoch 4, after the lost line came back
        p = start_cifar([*args, '--save', 'logs/k', '--resume', 'auto'], tmp_path, AT_TEST_SIGNALS=when)
        p.communicate(timeout=120)
        assert p.returncode == -signal.SIGKILL, when
        assert torch.load(tmp_path / 'logs/k/model.pt7', weights_only=True)['epoch'] == ckpt  # loads, whole
        assert (tmp_path / 'logs/k/log.txt').read_text().endswith('\n')
        assert [r['epoch'] for r in read_log(tmp_path / 'logs/k')] == logged, when
    run_cifar([*args, '--save', 'logs/k', '--resume', 'auto'], tmp_path)
    keys = ('epoch', 'train_loss', 'train_acc', 'test_loss', 'test_acc')
    assert [[r[k] for k in keys] for r in read_log(tmp_path / 'logs/k')] == \
           [[r[k] for k in keys] for r in read_log(tmp_path / 'logs/whole')]


@pytest.mark.parametrize('epoch', [pytest.param(1, marks=pytest.mark.slow), 2])  # the first epoch (no log.txt yet) and the last
def test_kill_between_checkpoint_and_log_line_at_the_edges(tiny_data, tmp_path, epoch):
    args = [*SMALL, '--dataroot', tiny_data, '--epochs', 2]
    run_cifar([*args, '--save', 'logs/whole'], tmp_path)
    p = start_cifar([*args, '--save', 'logs/k'], tmp_path, AT_TEST_SIGNALS=f'ckpt{epoch}:KILL')
    p.communicate(timeout=120)
    assert p.returncode == -signal.SIGKILL
    assert len(read_log(tmp_path / 'logs/k')) == epoch - 1 if epoch > 1 else not (tmp_path / 'logs/k/log.txt').exists()
    run_cifar([*args, '--save', 'logs/k', '--resume', 'auto'], tmp_path)
    def same(r):  # everything but the clock and the folder
        return {k: v for k, v in r.items() if k not in ('train_time', 'test_time', 'save', 'resume')}
    assert [same(r) for r in read_log(tmp_path / 'logs/k')] == [same(r) for r in read_log(tmp_path / 'logs/whole')]


def test_a_line_torn_by_a_kill_goes_and_the_checkpoint_line_comes_back(tiny_data, tmp_path):
    args = [*SMALL, '--dataroot', tiny_data, '--epochs', 2, '--save', 'logs/t']
    run_cifar([*args, '--epochs', 1], tmp_path)
    log = tmp_path / 'logs/t/log.txt'
    whole = log.read_text()
    log.write_text(whole[:-1] + '\njson_stats: {"epoch": 2, "train_lo')  # a kill in the middle of epoch 2's write
    run_cifar([*args, '--resume', 'auto'], tmp_path)
    lines = log.read_text().splitlines()
    assert len(lines) == 2 and lines[0] + '\n' == whole and [r['epoch'] for r in read_log(tmp_path / 'logs/t')] == [1, 2]


@pytest.mark.parametrize('sig', ['TERM', pytest.param('INT', marks=pytest.mark.slow)])
def test_signal_stops_cleanly_and_resume_continues(tiny_data, tmp_path, sig):
    args = [*SMALL, '--dataroot', tiny_data, '--epochs', 3, '--save', 'logs/s']
    p = start_cifar(args, tmp_path, AT_TEST_SIGNALS=f'5:{sig}')  # mid-epoch 2
    _, err = p.communicate(timeout=120)
    assert p.returncode == 128 + getattr(signal, f'SIG{sig}'), err  # 143 or 130: a shell script stops too
    assert err.strip().splitlines() == [f'cifar.py: SIG{sig}: stopped mid-epoch; model.pt7 holds the last whole '
                                        f'epoch (1); continue with --resume auto --save logs/s']
    assert torch.load(tmp_path / 'logs/s/model.pt7', weights_only=True)['epoch'] == 1
    assert [r['epoch'] for r in read_log(tmp_path / 'logs/s')] == [1]
    run_cifar([*args, '--resume', 'auto'], tmp_path)
    assert [r['epoch'] for r in read_log(tmp_path / 'logs/s')] == [1, 2, 3]


def test_signal_before_the_first_epoch_ends_says_so(tiny_data, tmp_path):
    args = [*SMALL, '--dataroot', tiny_data, '--epochs', 2, '--save', 'logs/s0']
    p = start_cifar(args, tmp_path, AT_TEST_SIGNALS='2:INT')  # mid-epoch 1
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130 and err.strip().splitlines() == [
        'cifar.py: SIGINT: stopped mid-epoch; no epoch had finished; continue with --resume auto --save logs/s0']
    assert not (tmp_path / 'logs/s0/model.pt7').exists() and not (tmp_path / 'logs/s0/log.txt').exists()
    run_cifar([*args, '--resume', 'auto'], tmp_path)
    assert [r['epoch'] for r in read_log(tmp_path / 'logs/s0')] == [1, 2]


def test_second_signal_exits_at_once(tiny_data, tmp_path):
    p = start_cifar([*SMALL, '--dataroot', tiny_data, '--epochs', 3, '--save', 'logs/s2'], tmp_path,
                    AT_TEST_SIGNALS='5:TERM,5:TERM')
    _, err = p.communicate(timeout=120)
    assert p.returncode == 143 and err.strip().splitlines() == ['cifar.py: second signal, exiting now']
    assert torch.load(tmp_path / 'logs/s2/model.pt7', weights_only=True)['epoch'] == 1


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
