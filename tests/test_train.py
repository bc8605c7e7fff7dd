"""End to end: cifar.py on a tiny class-folder dataset, as a user runs it."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import read_log, run_cifar
from training.device import Precision
from nn_wrn import NNWideResNet

SMALL = ['--depth', 10, '--width', 1, '--batch_size', 16, '--nthread', 0]
STATS = {'train_loss', 'train_acc', 'test_loss', 'test_acc', 'epoch', 'num_classes', 'n_parameters',
         'train_time', 'test_time', 'at_losses'}


def load(path):
    return torch.load(path, map_location='cpu', weights_only=True)


def nn_test_accuracy(params, depth, width, data_root):
    """Test accuracy of saved params run through the torch.nn reference WRN, with our own
    reading and normalising of the images (the 2017 CIFAR mean and std)."""
    mean = np.array([125.3, 123.0, 113.9]) / 255
    std = np.array([63.0, 62.1, 66.7]) / 255
    classes = sorted(p.name for p in Path(data_root, 'test').iterdir())
    xs, ys = [], []
    for c, name in enumerate(classes):
        for f in sorted(Path(data_root, 'test', name).iterdir()):
            xs.append((np.asarray(Image.open(f).convert('RGB'), np.float64) / 255 - mean) / std)
            ys.append(c)
    x = torch.tensor(np.stack(xs), dtype=torch.float32).permute(0, 3, 1, 2)
    net = NNWideResNet(depth, width, len(classes)).load_flat_state(params).eval()
    with torch.no_grad():
        pred = net(x)[0].argmax(1)
    return 100.0 * (pred == torch.tensor(ys)).sum().item() / len(ys)  # as a double, like the meter


@pytest.fixture(scope='module')
def teacher_run(tiny_data, tmp_path_factory):
    cwd = tmp_path_factory.mktemp('work')
    run_cifar([*SMALL, '--dataroot', tiny_data, '--epochs', 2, '--save', 'logs/teacher'], cwd)
    return cwd


def test_teacher_run_folder_format(teacher_run, tiny_data):
    folder = teacher_run / 'logs' / 'teacher'
    state = load(folder / 'model.pt7')
    assert {'params', 'optimizer', 'epoch'} <= set(state) and state['epoch'] == 2
    assert 'conv0' in state['params'] and 'fc.weight' in state['params']
    assert not any(k.startswith(('student.', 'teacher.')) for k in state['params'])
    assert state['optimizer']['param_groups'][0]['momentum'] == 0.9
    log = read_log(folder)
    assert [r['epoch'] for r in log] == [1, 2]
    for r in log:
        assert STATS <= set(r)
        assert r['depth'] == 10 and r['seed'] == 0 and r['save'] == 'logs/teacher'  # every option
        # the 2017 count: 77,395 trained numbers and the running mean and variance of the 7 batch norms
        # (16+16+16+32+32+64+64 = 240 channels)
        assert r['num_classes'] == 3 and r['at_losses'] == [] and r['n_parameters'] == 77_395 + 2 * 240
    # the saved params, run through an independent torch.nn WRN, give the logged accuracy
    acc = nn_test_accuracy({k: v.float() for k, v in state['params'].items()}, 10, 1, tiny_data)
    assert acc == pytest.approx(log[-1]['test_acc'], abs=1e-6)


def test_student_with_teacher_at_and_kd(teacher_run, tiny_data):
    run_cifar([*SMALL, '--dataroot', tiny_data, '--epochs', 2, '--save', 'logs/student',
               '--teacher_id', 'teacher', '--beta', 1e3, '--alpha', 0.9], teacher_run)
    folder = teacher_run / 'logs' / 'student'
    state = load(folder / 'model.pt7')
    names = set(state['params'])
    assert {n for n in names if not n.startswith('student.') and not n.startswith('teacher.')} == set()
    teacher = load(teacher_run / 'logs' / 'teacher' / 'model.pt7')['params']
    for k, v in teacher.items():  # the teacher rode along, untouched
        assert torch.equal(state['params']['teacher.' + k], v)
    assert not torch.equal(state['params']['student.conv0'], teacher['conv0'])
    log = read_log(folder)
    assert len(log) == 2 and log[0]['teacher_id'] == 'teacher' and log[0]['beta'] == 1e3
    assert len(log[0]['at_losses']) == 3 and all(m > 0 and math.isfinite(m) for m, _ in log[0]['at_losses'])
    # the distilled student's checkpoint itself serves as a teacher (its student. tensors)
    run_cifar([*SMALL, '--dataroot', tiny_data, '--epochs', 1, '--save', 'logs/student2',
               '--teacher_id', str(folder), '--beta', 1e3], teacher_run)


def test_at_alone_from_a_teacher_with_other_classes(teacher_run, tmp_path_factory):
    """Attention maps know no classes: a 3-class teacher guides a 4-class student (KD would be refused)."""
    from conftest import make_class_folders
    data = make_class_folders(tmp_path_factory.mktemp('four'), classes=4, train_per_class=4, test_per_class=2)
    run_cifar([*SMALL, '--dataroot', data, '--epochs', 1, '--save', 'logs/other', '--teacher_id', 'teacher',
               '--beta', 1e3], teacher_run)
    r = read_log(teacher_run / 'logs' / 'other')[0]
    assert r['num_classes'] == 4 and len(r['at_losses']) == 3 and all(m > 0 for m, _ in r['at_losses'])


def test_resume_continues_epochs_and_lr_schedule(tiny_data, tmp_path):
    common = [*SMALL, '--dataroot', tiny_data, '--epoch_step', '[2,3]', '--lr', 0.1]
    run_cifar([*common, '--epochs', 1, '--save', 'logs/r'], tmp_path)
    assert load(tmp_path / 'logs/r/model.pt7')['optimizer']['param_groups'][0]['lr'] == pytest.approx(0.1)
    out = run_cifar([*common, '--epochs', 3, '--resume', 'logs/r/model.pt7'], tmp_path)
    assert 'resumed from logs/r/model.pt7 at epoch 1' in out.stdout
    state = load(tmp_path / 'logs/r/model.pt7')
    assert state['epoch'] == 3
    assert state['optimizer']['param_groups'][0]['lr'] == pytest.approx(0.1 * 0.2 * 0.2)
    assert [r['epoch'] for r in read_log(tmp_path / 'logs/r')] == [1, 2, 3]
    # the checkpoint keeps momentum (test_robust.py checks it comes back bit for bit)
    assert all('momentum_buffer' in s for s in state['optimizer']['state'].values())


def test_same_seed_same_run_other_seed_other_run(tiny_data, tmp_path):
    args = [*SMALL, '--dataroot', tiny_data, '--epochs', 1]
    run_cifar([*args, '--save', 'logs/a'], tmp_path)
    run_cifar([*args, '--save', 'logs/b'], tmp_path)
    run_cifar([*args, '--save', 'logs/c', '--seed', 1], tmp_path)
    a, b, c = (read_log(tmp_path / 'logs' / n)[0] for n in 'abc')
    assert (a['train_loss'], a['test_loss']) == (b['train_loss'], b['test_loss'])
    assert a['train_loss'] != c['train_loss'] and c['seed'] == 1
    pa, pb = (load(tmp_path / 'logs' / n / 'model.pt7')['params'] for n in 'ab')
    assert all(torch.equal(pa[k], pb[k]) for k in pa)


def write_2017_run(folder, depth, width, num_classes):
    """A teacher run as the 2017 code left it: plain names, legacy torch.save, log with
    the 2017 options (no seed, no device)."""
    torch.manual_seed(5)
    net = NNWideResNet(depth, width, num_classes)
    params = net.flat_state()
    folder.mkdir(parents=True)
    torch.save({'params': params, 'optimizer': {}, 'epoch': 200},
               folder / 'model.pt7', _use_new_zipfile_serialization=False)
    opts = dict(depth=depth, width=float(width), dataset='CIFAR10', dataroot='.', dtype='float', nthread=4,
                teacher_id='', batch_size=128, lr=0.1, epochs=200, weight_decay=0.0005,
                epoch_step='[60,120,160]', lr_decay_ratio=0.2, resume='', randomcrop_pad=4,
                temperature=4, alpha=0, beta=0, cuda=False, save=str(folder), ngpu=1, gpu_id='0')
    stats = dict(train_loss=0.1, train_acc=[99.0], test_loss=0.3, test_acc=93.7, epoch=200,
                 num_classes=num_classes, n_parameters=1, train_time=1.0, test_time=1.0, at_losses=[])
    (folder / 'log.txt').write_text('json_stats: ' + json.dumps({**opts, **stats}) + '\n')
    return params


def test_2017_format_teacher(tiny_data, tmp_path):
    params = write_2017_run(tmp_path / 'logs' / 'resnet_16_2_teacher', 16, 2, 3)
    run_cifar([*SMALL, '--depth', 16, '--dataroot', tiny_data, '--epochs', 1, '--save', 'logs/at_16_1_16_2',
               '--teacher_id', 'resnet_16_2_teacher', '--beta', 1e3, '--alpha', 0.9], tmp_path)
    saved = load(tmp_path / 'logs/at_16_1_16_2/model.pt7')['params']
    assert saved['teacher.group0.block0.convdim'].shape == (32, 16, 1, 1)
    assert torch.equal(saved['teacher.fc.weight'], params['fc.weight'])
    assert saved['student.fc.weight'].shape == (3, 64)


@pytest.mark.parametrize('dtype,tolerance', [('half', 2e-3), ('bfloat16', 2e-2)])
def test_mixed_precision_trains_as_fp32_does(tiny_data, tmp_path, dtype, tolerance):
    """One epoch under autocast against the same epoch in fp32: the losses agree to the precision's
    rounding (fp16 keeps 11 significant bits, bf16 8: relative 2e-3 and 2e-2 over 3 steps)."""
    run_cifar([*SMALL, '--dataroot', tiny_data, '--epochs', 1, '--save', 'logs/f32'], tmp_path)
    p = run_cifar([*SMALL, '--dataroot', tiny_data, '--epochs', 1, '--dtype', dtype, '--save', 'logs/m'], tmp_path)
    (f32,), (low,) = read_log(tmp_path / 'logs/f32'), read_log(tmp_path / 'logs/m')
    for k in ('train_loss', 'test_loss'):
        assert low[k] == pytest.approx(f32[k], rel=tolerance), k
    warned = [line for line in p.stderr.splitlines() if line.startswith('warning:')]
    assert len(warned) == (1 if Precision(dtype).emulated() else 0), p.stderr
    r = read_log(tmp_path / 'logs/m')[0]
    assert math.isfinite(r['train_loss']) and r['dtype'] == dtype
    assert load(tmp_path / 'logs/m/model.pt7')['params']['conv0'].dtype == torch.float32  # fp32 master weights


def test_torchvision_loader_path(tiny_data, tmp_path):
    """The 2017 per-image pipeline stays selectable and gives a consistent run."""
    run_cifar([*SMALL, '--dataroot', tiny_data, '--epochs', 1, '--loader', 'torchvision', '--nthread', 1,
               '--channels_last', 0, '--save', 'logs/tv'], tmp_path)
    r = read_log(tmp_path / 'logs/tv')[0]
    assert r['loader'] == 'torchvision' and r['channels_last'] == 0
    acc = nn_test_accuracy(load(tmp_path / 'logs/tv/model.pt7')['params'], 10, 1, tiny_data)
    assert acc == pytest.approx(r['test_acc'], abs=1e-6)


@pytest.mark.slow
def test_compile_compiles_where_torch_can_and_falls_back_where_it_cannot(tiny_data, tmp_path):
    """--compile compiles where this torch compiles a small function (a probe, here, independent of
    the run) and says in one line that it runs eagerly where it cannot; either way it trains as the
    eager run does: bitwise where it fell back, and within float rounding where it compiled (inductor
    fuses and reorders reductions: 1e-4 relative over an epoch of 3 steps)."""
    from training.loop import compile_errors
    try:
        torch._dynamo.reset()
        torch.compile(lambda x: (x * 2).sum(), dynamic=False)(torch.ones(3))
        can_compile = True
    except compile_errors():
        can_compile = False
    args = [*SMALL, '--dataroot', tiny_data, '--epochs', 1, '--channels_last', 0]
    p = run_cifar([*args, '--compile', '--save', 'logs/c'], tmp_path, timeout=600, process=True)  # dynamo's caches
    run_cifar([*args, '--save', 'logs/e'], tmp_path)
    assert 'Traceback' not in p.stderr
    assert ('--compile unavailable here' in p.stderr) == (not can_compile), p.stderr
    (c,), (e,) = read_log(tmp_path / 'logs/c'), read_log(tmp_path / 'logs/e')
    for k in ('train_loss', 'test_loss'):
        assert c[k] == (pytest.approx(e[k], rel=1e-4) if can_compile else e[k]), (k, can_compile)


def test_nin_teacher_and_student(tiny_data, tmp_path):
    args = ['--model', 'nin', '--batch_size', 16, '--nthread', 0, '--dataroot', tiny_data, '--epochs', 1]
    run_cifar([*args, '--width', 0.3, '--save', 'logs/nin_wide'], tmp_path)
    out = run_cifar([*args, '--width', 0.1, '--save', 'logs/at_nin', '--teacher_id', 'nin_wide', '--beta', 1e3],
                    tmp_path)
    assert 'student NIN-0.1, teacher NIN-0.3' in out.stdout
    r = read_log(tmp_path / 'logs/at_nin')[0]
    assert r['model'] == 'nin' and len(r['at_losses']) == 3 and math.isfinite(r['train_loss'])


def test_factt_with_adapters_and_beta_decay(tiny_data, tmp_path):
    small = [*SMALL, '--dataroot', tiny_data]
    run_cifar([*small, '--width', 2, '--epochs', 1, '--save', 'logs/t2'], tmp_path)
    args = [*small, '--teacher_id', 't2', '--factt_beta', 100, '--beta', 1e3, '--alpha', 0.9,
            '--beta_decay', 'step', '--epoch_step', '[2]', '--save', 'logs/f']
    run_cifar([*args, '--epochs', 1], tmp_path)
    first = load(tmp_path / 'logs/f/model.pt7')['params']
    # WRN-10-1 -> WRN-10-2: every group doubles its channels, so every group has an adapter
    assert {k for k in first if k.startswith('adapter.')} == {'adapter.group0', 'adapter.group1', 'adapter.group2'}
    assert first['adapter.group2'].shape == (128, 64, 1, 1)
    run_cifar([*args, '--epochs', 2, '--resume', 'auto'], tmp_path)
    second = load(tmp_path / 'logs/f/model.pt7')['params']
    assert not torch.equal(first['adapter.group1'], second['adapter.group1'])  # trained with the student
    log = read_log(tmp_path / 'logs/f')
    assert [r['beta_now'] for r in log] == [1e3, 200.0]
    assert all(r['factt_loss'][0] > 0 for r in log)


def cpu_flags():
    try:
        text = Path('/proc/cpuinfo').read_text()
    except OSError:
        return None
    return set(next((line.split(':', 1)[1].split() for line in text.splitlines() if line.startswith('flags')), []))


@pytest.mark.parametrize('dtype', ['bfloat16', 'half'])
def test_autocast_warning_follows_the_cpu_flags(dtype):
    """Read from /proc/cpuinfo, not from torch: without any AVX-512 a low-precision CPU step is
    emulated (slow), so the user is told; with AVX-512 BW/VL/DQ oneDNN has kernels for it."""
    flags = cpu_flags()
    if flags is None:
        pytest.skip('no /proc/cpuinfo')
    assert not Precision('float').emulated() and not Precision(dtype, 'cuda').emulated()
    if not any(f.startswith('avx512') for f in flags):
        assert Precision(dtype).emulated()
    elif {'avx512bw', 'avx512vl', 'avx512dq'} <= flags and (dtype == 'bfloat16' or 'avx512_fp16' in flags
                                                            or 'amx_fp16' in flags):
        assert not Precision(dtype).emulated()
    else:
        pytest.skip('partial AVX-512: oneDNN decides')


def deferred_run(sync_every, nan_at=None):
    """engine.Trainer on a fixed linear model (lr 0) over 7 random batches, with a test pass."""
    import torchnet as tnt
    from training.loop import Trainer
    g = torch.Generator().manual_seed(0)
    w = torch.randn(12, 10, generator=g, requires_grad=True)
    batches = [(torch.randn(9, 12, generator=g), torch.randint(0, 10, (9,), generator=g)) for _ in range(7)]
    seen = []

    def compute(x, y, mode):
        logits = x @ w
        loss = torch.nn.functional.cross_entropy(logits, y)
        seen.append(1)
        if nan_at and mode and len(seen) == nan_at:
            loss = loss * float('nan')
        return logits, {'loss': loss, 'at_loss.2': x.abs().mean(), 'at_loss.3': (x ** 2).mean(), 'extra_loss': logits.std()}

    sgd = lambda lr: torch.optim.SGD([w], lr=0.0)  # noqa: E731
    stats = Trainer(compute, sgd, torch.device('cpu'), epochs=1, topk=(1, 5), progress=False,
                    sync_every=sync_every).train(batches, batches[:3], sgd(0))
    # independent figures: torchnet's own meters fed one batch at a time, the 2017 way
    meters = [tnt.meter.ClassErrorMeter(topk=[1, 5], accuracy=True) for _ in range(2)]
    losses, groups = [], []
    with torch.no_grad():
        for i, (x, y) in enumerate(batches):
            meters[0].add(x @ w, y)
            losses.append(torch.nn.functional.cross_entropy(x @ w, y).item())
            groups.append([x.abs().mean().item(), (x ** 2).mean().item()])
            if i < 3:
                meters[1].add(x @ w, y)
    return stats, meters[0].value(), meters[1].value(), np.mean(losses), np.mean(groups, 0)


@pytest.mark.parametrize('sync_every', [1, 3, 50])
def test_deferred_meters_equal_per_step_meters(sync_every):
    """Reading the device every k steps must not change a logged figure."""
    stats, train_acc, test_acc, train_loss, groups = deferred_run(sync_every)
    assert stats['train_acc'] == pytest.approx(train_acc, abs=1e-9)  # top-1 and top-5, as ImageNet logs it
    assert stats['test_acc'] == pytest.approx(test_acc, abs=1e-9)  # top-1 and top-5
    assert stats['train_loss'] == pytest.approx(train_loss, rel=1e-6)
    assert [m[0] for m in stats['at_losses']] == pytest.approx(list(groups), rel=1e-6)
    assert len(stats['extra_loss']) == 2 and math.isfinite(stats['extra_loss'][0])


@pytest.mark.parametrize('sync_every', [1, 3])
def test_deferred_meters_name_the_first_bad_batch(sync_every):
    from training import errors
    with pytest.raises(errors.UserError, match=r'the loss is nan at epoch 1, batch 5;'):
        deferred_run(sync_every, nan_at=5)
