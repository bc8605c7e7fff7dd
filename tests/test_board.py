"""TensorBoard event files and run.json: what a run writes beside log.txt, through kills and resumes."""
import signal
import subprocess
import sys

import pytest
import torch

from training import board
import cifar
from training import rundir
from training import errors
from training import options
from conftest import ROOT, read_log, run_cifar
from test_robust import start_cifar

pytest.importorskip('tensorboard')
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader  # noqa: E402

# 48 images in batches of 16: 3 steps an epoch; a point every 2 steps crosses epoch ends
ARGS = ['--depth', 10, '--batch_size', 16, '--nthread', 0, '--epochs', 3, '--epoch_step', '[2]',
        '--tensorboard_every', 2]
TIMED = {'train/img_per_s', 'test/img_per_s'}


def scalars(folder):
    """{tag: [(step, value), ...]} as TensorBoard shows the folder."""
    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()['scalars']}


def raw_steps(folder, tag):
    """Every step of `tag` in the folder's event files, purged or not."""
    return sorted(e.step for p in folder.glob('events.out.tfevents.*') for e in EventFileLoader(str(p)).Load()
                  for v in e.summary.value if v.tag == tag)


@pytest.mark.slow
def test_killed_and_resumed_run_draws_the_uninterrupted_curves(tiny_data, tmp_path):
    args = [*ARGS, '--dataroot', tiny_data]
    run_cifar([*args, '--save', 'logs/whole'], tmp_path)
    # killed after step 5 (mid-epoch 2), then between epoch 2's checkpoint and its log line, then to the end
    for when in ('5:KILL', 'ckpt2:KILL'):
        p = start_cifar([*args, '--save', 'logs/cut', '--resume', 'auto'], tmp_path, AT_TEST_SIGNALS=when)
        p.communicate(timeout=120)
        assert p.returncode == -signal.SIGKILL, when
    # a process of its own, as a user's resume is: TensorBoard orders event files by name, which holds
    # the second and the pid, and this process's pid may sort before the killed run's in the same second
    run_cifar([*args, '--save', 'logs/cut', '--resume', 'auto'], tmp_path, process=True)
    whole, cut = scalars(tmp_path / 'logs/whole'), scalars(tmp_path / 'logs/cut')
    assert whole['step/train_loss'] == cut['step/train_loss'] and [s for s, _ in whole['step/train_loss']] == [2, 4, 6, 8]
    assert raw_steps(tmp_path / 'logs/cut', 'step/train_loss') == [2, 4, 4, 6, 8]  # step 4 of the killed epoch, purged
    assert set(whole) == set(cut)
    for tag in set(whole) - TIMED:  # epoch 2's points came back from its checkpointed record
        assert whole[tag] == cut[tag], tag
    for tag in TIMED:
        assert [s for s, _ in cut[tag]] == [1, 2, 3] and all(v > 0 for _, v in cut[tag])
    log = read_log(tmp_path / 'logs/whole')
    assert [v for _, v in whole['lr']] == pytest.approx([0.1, 0.02, 0.02])
    assert [v for _, v in whole['train/loss']] == pytest.approx([r['train_loss'] for r in log], rel=1e-6)
    assert [v for _, v in whole['test/top1']] == pytest.approx([r['test_acc'] for r in log], rel=1e-6)

    sessions = rundir.read_sessions(tmp_path / 'logs/cut')
    assert [s['from_epoch'] for s in sessions] == [0, 1, 2]
    assert sessions[0]['argv'][1:] == ['--no_progress', *map(str, args), '--save', 'logs/cut', '--resume', 'auto']
    head = subprocess.run(['git', '-C', str(ROOT), 'rev-parse', 'HEAD'], capture_output=True, text=True)
    assert sessions[0]['git']['commit'] == (head.stdout.strip() if head.returncode == 0 else 'unknown')
    assert (sessions[0]['torch'], sessions[0]['python']) == (torch.__version__, sys.version.split()[0])
    assert sessions[0]['device'] == 'cpu' and sessions[0]['processes'] == 1
    assert len(rundir.read_sessions(tmp_path / 'logs/whole')) == 1


def test_epoch_scalars_of_an_imagenet_record():
    """Top-5, AT losses named by their group, the other losses, β, img/s: read from the record."""
    record = {'epoch': 4, 'train_loss': 2.5, 'test_loss': 3.0, 'train_acc': [40.0, 65.0], 'test_acc': [35.0, 60.0],
              'at_losses': [[0.1, 0.01], [0.2, 0.02]], 'at_group_list': [2, 3], 'grad_at_loss': [0.3, 0.03],
              'sym_loss': [0.4, 0.04], 'beta_now': 200.0, 'train_time': 10.0, 'test_time': 0.0,
              'lr': 0.1, 'lr_decay_ratio': 0.1, 'epoch_step': '[2,4,9]'}
    assert board.lr_at(record) == pytest.approx(0.001)
    assert board.epoch_scalars(record, 0.001, (1000, 500)) == {
        'lr': 0.001, 'beta': 200.0, 'at_loss/group2': 0.1, 'at_loss/group3': 0.2, 'train/grad_at_loss': 0.3,
        'train/sym_loss': 0.4, 'train/top1': 40.0, 'train/top5': 65.0, 'test/top1': 35.0, 'test/top5': 60.0,
        'train/img_per_s': 100.0, 'train/loss': 2.5, 'test/loss': 3.0}  # no test img/s from a zero time


def test_without_tensorboard(monkeypatch, capfd):
    monkeypatch.setitem(sys.modules, 'torch.utils.tensorboard', None)  # as if not installed
    assert cifar.setup([])[0].tensorboard == 0  # runs go on without event files
    with pytest.raises(SystemExit) as e:
        errors.cli(lambda: cifar.parse_args(['--tensorboard', '1']), 'cifar.py')
    assert e.value.code == 1
    assert capfd.readouterr().err == 'cifar.py: error: --tensorboard 1 needs the tensorboard package: ' \
                                     'pip install tensorboard\n'


def test_provenance_without_git(monkeypatch, tmp_path):
    monkeypatch.setenv('PATH', str(tmp_path))  # no git to run
    assert rundir.code_version() == {'commit': 'unknown', 'dirty': 'unknown'}
    monkeypatch.undo()
    monkeypatch.setattr(rundir, 'CODE', str(tmp_path))  # git, but no checkout
    assert rundir.code_version() == {'commit': 'unknown', 'dirty': 'unknown'}


def test_help_lists_the_2017_flags_first_and_names_2017s_default_where_it_differs():
    """The 2017 group promises the paper's code's defaults: a flag in it whose default changed
    says 2017's in its help (imagenet.py's --nthread)."""
    import imagenet
    from test_cli import FLAGS_2017_DEFAULTS
    from test_imagenet import IMAGENET_2017_DEFAULTS
    changed = []
    for module, old in ((cifar, FLAGS_2017_DEFAULTS), (imagenet, IMAGENET_2017_DEFAULTS)):
        parser = module.build_parser()
        groups = {g.title: {a.dest for a in g._group_actions} for g in parser._action_groups}
        assert groups[options.GROUP_2017] == set(old)
        assert {a.dest for a in parser._actions} - set(old) - {'help'} == groups[options.GROUP_NEW]
        text = parser.format_help()
        assert text.index(options.GROUP_2017) < text.index('\n  --depth ') < text.index(options.GROUP_NEW)
        for a in parser._actions:
            if a.dest in old and a.default != old[a.dest]:
                changed.append(a.dest)
                assert f'2017: {old[a.dest]}' in a.help, a.dest
    assert changed == ['nthread']


def test_summarize_shows_provenance_beside_the_table(tmp_path, capsys):
    import importlib.util
    spec = importlib.util.spec_from_file_location('summarize', ROOT / 'scripts' / 'summarize.py')
    summarize = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(summarize)
    for name, sessions in (('resnet_16_1', 2), ('at_16_1_16_2_s1', 1), ('other_run', 1)):
        folder = tmp_path / 'logs' / name
        folder.mkdir(parents=True)
        rundir.append_log(folder / 'log.txt', {'epoch': 1, 'epochs': 1, 'test_acc': 90.0})
        for epoch in range(sessions):
            rundir.record_session(folder, torch.device('cpu'), 1, epoch)
    summarize.main([str(tmp_path / 'logs'), '--out', str(tmp_path / 't'), '--rows', '16_1_16_2', '--provenance'])
    table = (tmp_path / 't.md').read_text().split('| run |')[1]
    commit = rundir.code_version()['commit'][:10]
    rows = [line for line in table.splitlines() if line.startswith('| ')]
    assert [r.split(' | ')[0] for r in rows] == ['| at_16_1_16_2_s1', '| resnet_16_1']  # only the table's runs
    assert all(f'| {commit}' in r and f'| {torch.__version__} | cpu (' in r for r in rows)
    assert rows[1].endswith('x 1 | 2 |')  # started, then resumed once
    assert table in capsys.readouterr().out
