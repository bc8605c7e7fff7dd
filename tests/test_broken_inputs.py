"""What a user hands over, broken or changed (issue 30): a resumed run takes every option it is allowed
to change, or refuses it; a teacher that never finished is said so; a moved dataset resumes; broken
files of every kind are one line, a non-zero exit, and no earlier file lost."""
import json
import shutil
import subprocess
import sys

import pytest
import torch

import cifar
from training import loop
from training.data import PAD_MODES
from conftest import OFFLINE_ENV, ROOT, make_class_folders, read_log, run_cifar
from test_bad_input import run_inprocess

NET = ['--depth', 10, '--width', 0.25, '--batch_size', 16, '--nthread', 0, '--tensorboard', 0]
STUDENT = [*NET, '--beta', 1000, '--alpha', 0.5, '--epoch_step', '[5]']  # no lr drop in epoch 2


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    """Two teachers (seeds 0 and 1), one stopped after epoch 1 of 3 (half), and a student of the first
    with one epoch of two done."""
    root = tmp_path_factory.mktemp('runs')
    make_class_folders(root / 'data')
    make_class_folders(root / 'more', train_per_class=20, seed=1)
    for seed in (0, 1):
        run_cifar([*NET, '--dataroot', root / 'data', '--epochs', 1, '--seed', seed, '--save', root / f't{seed}'], root)
    run_cifar([*STUDENT, '--dataroot', root / 'data', '--teacher_id', root / 't0', '--epochs', 1,
               '--save', root / 'student'], root)
    p = subprocess.run([sys.executable, ROOT / 'cifar.py', *map(str, NET), '--dataroot', root / 'data', '--epochs', '3',
                        '--no_progress', '--save', root / 'half'], cwd=root, capture_output=True, text=True,
                       env={**OFFLINE_ENV, 'AT_TEST_SIGNALS': '4:TERM'})  # 3 steps an epoch: stops in epoch 2
    assert p.returncode == 143 and [r['epoch'] for r in read_log(root / 'half')] == [1], p.stderr
    return root


def resume(runs, tmp_path, capfd, monkeypatch, *argv):
    """Resumes a copy of the student for its second epoch; (exit status, stderr lines, what epoch 2 ran
    with: (optimizer, run))."""
    shutil.copytree(runs / 'student', tmp_path / 'student')
    seen = []
    write = loop.EpochWriter.__call__
    monkeypatch.setattr(loop.EpochWriter, '__call__',
                        lambda self, stats, optimizer, rng=None: (seen.append((optimizer, self.run)),
                                                                  write(self, stats, optimizer, rng))[1])
    base = [*STUDENT, '--dataroot', str(runs / 'data'), '--teacher_id', str(runs / 't0'), '--epochs', '2',
            '--resume', str(tmp_path / 'student/model.pt7'), '--no_progress']
    argv = list(map(str, [*base, *argv]))
    code, err = run_inprocess(cifar.main, argv, 'cifar.py', capfd)
    return code, err, seen[-1] if seen else None


def teacher_tensor(folder):
    return torch.load(folder / 'model.pt7', weights_only=True)['params']['conv0']


# option, new value, what epoch 2 must show: the new value in effect (base: lr 0.1, ratio 0.2, drop at 5)
TAKES_EFFECT = [
    ('lr', 0.05, lambda o, r, d: o.param_groups[0]['lr'] == 0.05),
    ('weight_decay', 0.001, lambda o, r, d: o.param_groups[0]['weight_decay'] == 0.001),
    ('epoch_step', '[2]', lambda o, r, d: o.param_groups[0]['lr'] == pytest.approx(0.1 * 0.2)),
    ('epoch_step,lr_decay_ratio', ('[2]', 0.5), lambda o, r, d: o.param_groups[0]['lr'] == 0.05),
    ('batch_size', 8, lambda o, r, d: r.train_loader.batch_size == 8),
    ('temperature', 2, lambda o, r, d: r.distiller.temperature == 2),
    ('alpha', 0.9, lambda o, r, d: r.distiller.alpha == 0.9),
    ('beta', 500, lambda o, r, d: r.distiller.beta == 500),
    ('beta_decay,epoch_step', ('step', '[2]'), lambda o, r, d: r.distiller.beta == pytest.approx(1000 * 0.2)),
    ('at_mode', 'paper', lambda o, r, d: r.distiller.at_mode == 'paper'),
    ('at_pool', 'features', lambda o, r, d: r.distiller.at_pool == 'features'),
    ('sym_beta', 0.5, lambda o, r, d: r.distiller.sym_beta == 0.5),
    ('randomcrop_pad', 2, lambda o, r, d: r.train_loader.pad == 2),
    ('pad_mode', 'zeros', lambda o, r, d: r.train_loader.pad_mode == PAD_MODES['zeros']),
    ('loader', 'torchvision', lambda o, r, d: isinstance(r.train_loader, torch.utils.data.DataLoader)),
    ('dtype', 'double', lambda o, r, d: r.params_s['conv0'].dtype == torch.float64),
    ('dataroot', 'more', lambda o, r, d: len(r.train_loader.labels) == 60),
    ('teacher_id', 't1', lambda o, r, d: torch.equal(r.saved['teacher.conv0'].cpu(), teacher_tensor(d / 't1'))),
]


@pytest.mark.parametrize('name,value,check', TAKES_EFFECT, ids=[c[0] for c in TAKES_EFFECT])
def test_an_allowed_change_takes_effect_in_the_resumed_run(runs, tmp_path, capfd, monkeypatch, name, value, check):
    value = runs / value if name in ('dataroot', 'teacher_id') else value
    values = value if isinstance(value, tuple) else (value,)
    argv = [a for n, v in zip(name.split(','), values) for a in (f'--{n}', v)]
    code, err, seen = resume(runs, tmp_path, capfd, monkeypatch, *argv, '--allow_change', name)
    assert code == 0, err
    optimizer, run = seen
    assert check(optimizer, run, runs), f'--{name} {value} did not take effect'
    assert [r['epoch'] for r in read_log(tmp_path / 'student')] == [1, 2]


def test_an_unchanged_resume_keeps_the_checkpoints_lr_and_teacher(runs, tmp_path, capfd, monkeypatch):
    code, err, (optimizer, run) = resume(runs, tmp_path, capfd, monkeypatch)
    assert code == 0, err
    assert optimizer.param_groups[0]['lr'] == 0.1 and optimizer.param_groups[0]['weight_decay'] == 0.0005
    assert torch.equal(run.saved['teacher.conv0'].cpu(), teacher_tensor(runs / 't0'))


def test_an_allowed_change_the_teacher_cannot_take_is_one_line(runs, tmp_path, capfd, monkeypatch):
    code, err, seen = resume(runs, tmp_path, capfd, monkeypatch, '--normalize', 'cifar100', '--allow_change', 'normalize')
    assert code == 1 and seen is None and len(err) == 1
    assert 'was trained on --normalize 2017 inputs, the student\'s are --normalize cifar100' in err[0]


@pytest.mark.parametrize('name,value', [('depth', 16), ('width', 0.5), ('model', 'nin'), ('init', 'crd'),
                                        ('seed', 1), ('preset', 'crd')])
def test_an_option_a_resume_cannot_take_is_refused_at_allow_change(runs, tmp_path, capfd, monkeypatch, name, value):
    code, err, seen = resume(runs, tmp_path, capfd, monkeypatch, '--allow_change', name)
    assert code == 1 and seen is None
    assert len(err) == 1 and err[0].startswith(f'cifar.py: error: --allow_change {name}: a resumed run cannot take'), err
    assert [r['epoch'] for r in read_log(tmp_path / 'student')] == [1]


@pytest.mark.parametrize('teacher,epochs,warned', [('half', 3, True), ('t0', 1, False)])
def test_the_teachers_epochs_are_recorded_and_an_unfinished_one_warned(runs, tmp_path, capfd, teacher, epochs, warned):
    code, err = run_inprocess(cifar.main, list(map(str, [*STUDENT, '--dataroot', runs / 'data', '--teacher_id',
                                                         runs / teacher, '--epochs', 1, '--save', tmp_path / 's',
                                                         '--no_progress'])), 'cifar.py', capfd)
    assert code == 0, err
    warning = f'warning: teacher {runs / teacher} did not finish its schedule: it trained 1 of 3 epochs'
    assert [line for line in err if 'teacher' in line] == ([warning] if warned else [])
    assert {k: read_log(tmp_path / 's')[0][k] for k in ('teacher_epoch', 'teacher_epochs')} == dict(
        teacher_epoch=1, teacher_epochs=epochs)
    session = json.loads((tmp_path / 's/run.json').read_text())['sessions'][0]
    assert (session['teacher_epoch'], session['teacher_epochs']) == (1, epochs)


def test_the_same_data_named_another_way_resumes_and_other_data_is_one_line(runs, tmp_path, capfd, monkeypatch):
    shutil.copytree(runs / 'data', tmp_path / 'moved')
    monkeypatch.chdir(tmp_path)  # the run started on runs/data; it resumes on a relative path to a copy
    code, err, _ = resume(runs, tmp_path, capfd, monkeypatch, '--dataroot', 'moved')
    assert code == 0, err
    assert [r['epoch'] for r in read_log(tmp_path / 'student')] == [1, 2]
    shutil.rmtree(tmp_path / 'student')
    code, err, seen = resume(runs, tmp_path, capfd, monkeypatch, '--dataroot', runs / 'more')
    assert code == 1 and seen is None and len(err) == 1
    assert err[0].endswith(f'--dataroot {runs / "more"} holds other data than the run was trained on (images '
                           f'[48, 24] in the checkpoint, [60, 24] now)'), err
    assert [r['epoch'] for r in read_log(tmp_path / 'student')] == [1]


# ---------------------------------------------------------------- an unreadable image (item 1)

def break_image(path, how):
    """Replaces the image at `path` by a broken one."""
    good = path.read_bytes()
    if how == 'truncated':  # a whole header, cut pixels: found only where the file is decoded in full
        path.write_bytes(good[:len(good) // 2])
    else:
        path.write_bytes({'empty': b'', 'random': bytes(range(256)) * 4, 'text': b'not an image\n'}[how])


def run_with_workers(name, argv, nthread, capfd):
    """(exit code, stderr lines) of a run; with DataLoader workers in a process of its own, which is
    what is tested there: in this one, the failed loader's queue threads could write into a later test."""
    import importlib
    argv = ['--no_progress', *map(str, argv)]
    if not nthread:
        return run_inprocess(importlib.import_module(name).main, argv, f'{name}.py', capfd)
    p = subprocess.run([sys.executable, str(ROOT / f'{name}.py'), *argv], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env=OFFLINE_ENV)
    return p.returncode, [line for line in p.stderr.splitlines() if line.strip()]


@pytest.mark.parametrize('loader,nthread', [('fast', 0), ('torchvision', 0), ('torchvision', 2)])
@pytest.mark.parametrize('how', ['empty', 'truncated'])
def test_an_unreadable_image_is_one_line_naming_it(tmp_path, capfd, loader, nthread, how):
    data = make_class_folders(tmp_path / 'data', train_per_class=4, test_per_class=2)
    bad = data / 'train/class1/002.png'
    break_image(bad, how)
    argv = [*NET, '--dataroot', data, '--epochs', 1, '--loader', loader, '--nthread', nthread, '--save', tmp_path / 's']
    code, err = run_with_workers('cifar', argv, nthread, capfd)
    reason = {'empty': 'empty file', 'truncated': 'image file is truncated'}[how]
    assert code == 1 and len(err) == 1 and err[0].startswith(f'cifar.py: error: cannot read image {bad}: {reason}'), err
    if loader == 'fast':  # decoded up front: before the run folder exists
        assert not (tmp_path / 's').exists()


@pytest.mark.parametrize('decoder,nthread', [('pil', 0), ('pil', 1), ('torchvision', 1)])
def test_an_unreadable_imagenet_image_is_one_line_where_it_is_met(tmp_path, capfd, decoder, nthread):
    data = make_class_folders(tmp_path / 'data', classes=5, train_per_class=1, test_per_class=1)
    (data / 'test').rename(data / 'val')
    bad = data / 'train/class3/000.png'
    break_image(bad, 'truncated')
    code, err = run_with_workers('imagenet', [
        '--imagenetpath', data, '--width', 0.25, '--batch_size', 5, '--epochs', 1, '--nthread', nthread,
        '--decoder', decoder, '--save', tmp_path / 's', '--tensorboard', 0], nthread, capfd)
    assert code == 1 and len(err) == 1 and err[0].startswith(f'imagenet.py: error: cannot read image {bad}: '), err


def test_the_nvjpeg_batch_decode_names_an_unreadable_file(tmp_path):
    from torchvision.datasets import ImageFolder
    from training import imagenet_data as D
    from training.errors import UserError
    data = make_class_folders(tmp_path / 'data', classes=2, train_per_class=2, test_per_class=0)
    bad = data / 'train/class1/001.png'
    break_image(bad, 'truncated')
    items = D.Images(ImageFolder(data / 'train'), False, 'nvjpeg')
    (files, boxes, paths), _ = D.collate_files([items[i] for i in range(len(items))])
    with pytest.raises(UserError, match=f'^cannot read image {bad}: '):
        D.decode_batch(files, boxes, paths, torch.device('cpu'), False)


def test_check_images_lists_every_unreadable_image(tmp_path):
    data = make_class_folders(tmp_path / 'data', train_per_class=3, test_per_class=1)
    bad = {data / 'train/class0/001.png': 'empty', data / 'test/class2/000.png': 'random',
           data / 'train/class1/002.png': 'truncated'}
    script = [sys.executable, ROOT / 'scripts/check_images.py']
    assert subprocess.run([*script, data, '--workers', '2'], capture_output=True, env=OFFLINE_ENV).returncode == 0
    for path, how in bad.items():
        break_image(path, how)
    (data / 'train/class0/notes.txt').write_text('not an image, nor named like one\n')
    p = subprocess.run([*script, data, '--workers', '2'], capture_output=True, text=True, env=OFFLINE_ENV)
    assert p.returncode == 1 and 'Traceback' not in p.stderr
    assert sorted(p.stdout.splitlines()) == sorted(f'cannot read image {path}: {reason}' for path, reason in zip(
        bad, ['empty file', 'not an image file that can be decoded', 'image file is truncated']))
    assert p.stderr.splitlines()[-1] == f'check_images.py: 3 of 12 images under {data} cannot be read'


# ---------------------------------------------------------------- a full disk (item 2)

@pytest.fixture
def full_disk(monkeypatch):
    """open() (and io.open, tensorboard's) whose files named like `.name` fail every write with ENOSPC
    once `.on` is set, as a full file system's do."""
    import builtins
    import errno
    import io
    import os
    from types import SimpleNamespace
    disk, real = SimpleNamespace(name=None, on=False), builtins.open

    class Full:
        def __init__(self, fh):
            self.fh = fh

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):
            return getattr(self.fh, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

    def fake_open(file, mode='r', *args, **kwargs):
        fh = real(file, mode, *args, **kwargs)
        hit = disk.on and set(mode) & set('wax') and disk.name in os.path.basename(str(file))
        return Full(fh) if hit else fh
    monkeypatch.setattr(builtins, 'open', fake_open)
    monkeypatch.setattr(io, 'open', fake_open)
    return disk


# the file that cannot be written (a name, or the start of one), the epoch model.pt7 keeps and the
# epochs log.txt holds, when the disk fills up at epoch 2's end (the event file: after its step points)
FULL = [('model.pt7.tmp', 'model.pt7', 1, [1]), ('log.txt', 'log.txt', 2, [1]),
        ('events.out.tfevents', 'events.out.tfevents', 2, [1, 2])]


@pytest.mark.parametrize('name,shown,kept,logged', FULL, ids=[c[1] for c in FULL])
def test_a_full_disk_mid_run_is_one_line_that_names_the_file_and_the_kept_epoch(
        tmp_path, capfd, monkeypatch, full_disk, name, shown, kept, logged):
    import re
    data = make_class_folders(tmp_path / 'data', train_per_class=4, test_per_class=2)
    save = tmp_path / 's'
    write = loop.EpochWriter.__call__

    def epoch_end(self, stats, optimizer, rng=None):  # the disk fills up during epoch 2
        full_disk.on = stats['epoch'] == 2
        return write(self, stats, optimizer, rng)
    monkeypatch.setattr(loop.EpochWriter, '__call__', epoch_end)
    full_disk.name = name
    argv = list(map(str, [*NET, '--dataroot', data, '--epochs', 2, '--save', save, '--no_progress',
                          '--tensorboard', int(shown.startswith('events')), '--tensorboard_every', 1]))
    code, err = run_inprocess(cifar.main, argv, 'cifar.py', capfd)
    assert code == 1 and len(err) == 1, err
    assert re.fullmatch(f'cifar.py: error: cannot write {re.escape(str(save / shown))}[^ ]*: No space left on device; '
                        f'model.pt7 keeps epoch {kept}; continue with --resume auto --save {re.escape(str(save))}',
                        err[0]), err
    assert torch.load(save / 'model.pt7', weights_only=True)['epoch'] == kept
    assert [r['epoch'] for r in read_log(save)] == logged and not list(save.glob('*.tmp'))
    full_disk.on = False  # room again: the run goes on from the kept epoch
    monkeypatch.setattr(loop.EpochWriter, '__call__', write)
    code, err = run_inprocess(cifar.main, [*argv, '--resume', 'auto'], 'cifar.py', capfd)
    assert code == 0, err
    assert [r['epoch'] for r in read_log(save)] == [1, 2]


def test_a_full_disk_at_run_json_is_one_line_and_keeps_the_run(runs, tmp_path, capfd, monkeypatch, full_disk):
    from conftest import tree_digest
    shutil.copytree(runs / 't0', tmp_path / 't0')
    before = tree_digest(tmp_path / 't0')
    full_disk.name, full_disk.on = 'run.json', True
    code, err = run_inprocess(cifar.main, list(map(str, [*NET, '--dataroot', runs / 'data', '--epochs', 2,
                                                         '--resume', tmp_path / 't0/model.pt7', '--no_progress'])),
                              'cifar.py', capfd)
    assert code == 1 and err == [f'cifar.py: error: cannot write {tmp_path / "t0/run.json"}: No space left on device; '
                                 f'model.pt7 keeps epoch 1; continue with --resume auto --save {tmp_path / "t0"}'], err
    assert tree_digest(tmp_path / 't0') == before


# ---------------------------------------------------------------- every file the project reads, broken (item 6)

def broken(path, how, monkeypatch):
    """Breaks the file at `path`: each way a file a user hands over can be wrong. No read permission is
    simulated (tests may run as root, whom chmod does not stop): open() refuses that path."""
    import builtins
    import io
    good = path.read_bytes() if path.is_file() else b''
    if how == 'no_permission':
        real = builtins.open

        def refusing(file, *args, **kwargs):
            if str(file) == str(path) and refusing.on:
                raise PermissionError(13, 'Permission denied', str(file))
            return real(file, *args, **kwargs)
        refusing.on = True
        monkeypatch.setattr(builtins, 'open', refusing)
        monkeypatch.setattr(io, 'open', refusing)
        return refusing
    shutil.rmtree(path) if path.is_dir() else path.unlink()
    if how == 'folder':
        path.mkdir()
    else:
        path.write_bytes({'empty': b'', 'truncated': good[:len(good) // 2], 'random': bytes(range(256)) * 8,
                          'wrong_kind': b'{"sessions": 3}\n' if path.suffix != '.json' else b'json_stats: {}\n'}[how])


HOW = ['empty', 'truncated', 'random', 'wrong_kind', 'no_permission', 'folder']
# what is broken: (file under a fresh copy of `runs`, the command that reads it); an image in a
# folder is what ImageFolder walks into, so a folder there is no image at all (not a case)
READS = {
    'image': ('data/train/class1/002.png', ['--dataroot', '{d}/data', '--save', '{d}/new']),
    'checkpoint': ('t0/model.pt7', ['--dataroot', '{d}/data', '--resume', '{d}/t0/model.pt7', '--epochs', 2]),
    'run.json': ('t0/run.json', ['--dataroot', '{d}/data', '--resume', '{d}/t0/model.pt7', '--epochs', 2]),
    'teacher checkpoint': ('t0/model.pt7', ['--dataroot', '{d}/data', '--teacher_id', '{d}/t0', '--beta', 1000,
                                            '--save', '{d}/new']),
    'teacher log.txt': ('t0/log.txt', ['--dataroot', '{d}/data', '--teacher_id', '{d}/t0', '--beta', 1000,
                                       '--save', '{d}/new']),
    'class folder': ('data/train/class1', ['--dataroot', '{d}/data', '--save', '{d}/new']),
}
CASES = [pytest.param(what, how, id=f'{what}-{how}') for what in READS
         for how in {'image': HOW[:-1], 'class folder': ['a_file']}.get(what, HOW)]


@pytest.mark.parametrize('what,how', CASES)
def test_every_file_broken_every_way_is_one_line(runs, tmp_path, capfd, monkeypatch, what, how):
    from conftest import tree_digest
    for name in ('data', 't0'):
        shutil.copytree(runs / name, tmp_path / name)
    path, argv = READS[what]
    if how == 'a_file':  # where the class folder should be
        shutil.rmtree(tmp_path / path)
        (tmp_path / path).write_bytes(b'')
    refusing = None if what == 'class folder' else broken(tmp_path / path, how, monkeypatch)
    digests = lambda: {name: tree_digest(tmp_path / name) for name in ('data', 't0')}  # noqa: E731
    if refusing:  # the digests read every file
        refusing.on = False
    before = digests()
    if refusing:
        refusing.on = True
    argv = [str(a).format(d=tmp_path) for a in [*NET, '--epochs', 1, '--no_progress', *argv]]
    code, err = run_inprocess(cifar.main, argv, 'cifar.py', capfd)
    assert code not in (0, None) and len(err) == 1 and err[0].startswith('cifar.py: error: '), err
    if refusing:
        refusing.on = False
    assert digests() == before


EXPORTS = [pytest.param(ext, how, id=f'{ext}-{how}') for ext in ('pth', 'hkl') for how in HOW]


@pytest.mark.parametrize('ext,how', EXPORTS)
def test_every_teacher_export_broken_every_way_is_one_line(tmp_path, capfd, monkeypatch, ext, how):
    from training import teachers
    path = tmp_path / f'teacher.{ext}'
    tensors = {'conv0': torch.zeros(4, 3, 7, 7), 'fc.weight': torch.zeros(5, 8)}
    if ext == 'pth':
        torch.save(tensors, path)
    else:
        import hickle
        hickle.dump({k: v.numpy() for k, v in tensors.items()}, str(path))
    if ext == 'hkl' and how == 'no_permission':
        pytest.skip('h5py opens files in C: open() cannot refuse them, and chmod does not stop root')
    broken(path, how, monkeypatch)
    code, err = run_inprocess(lambda: teachers.load_teacher_export(str(path)), [], 'imagenet.py', capfd)
    assert code not in (0, None) and len(err) == 1 and err[0].startswith('imagenet.py: error: '), err
