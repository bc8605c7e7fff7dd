"""The CIFAR-100 benchmark's protocol: the crd preset, the lr steps with and without a momentum
restart, zero padding, the KD normalisation of RepDistiller's DistillKL, the WRN initialisation of
its wrn.py, scripts/cifar100.sh, and all 13 pairs of its tables end to end."""
import json
import math
import signal
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import cifar
from conftest import OFFLINE_ENV, ROOT, make_class_folders, read_log
from training.data import DeviceLoader
from training.loop import Trainer
from training.errors import UserError
from training.options import Schedule
from utils import kd_loss
from resnet import cifar_model_groups, wrn_params

sys.path.insert(0, str(ROOT / 'scripts'))
import summarize  # noqa: E402


def distill_kl(y_s, y_t, T):
    """RepDistiller's DistillKL, written out: KL(p_t || p_s) summed over batch and classes, times T^2,
    divided by the batch size."""
    p_s, p_t = F.softmax(y_s / T, dim=1), F.softmax(y_t / T, dim=1)
    return (p_t * (p_t.log() - p_s.log())).sum() * T ** 2 / y_s.shape[0]


def test_kd_at_alpha_0_9_equals_distill_kl_weighted_0_9_with_cross_entropy_0_1():
    torch.manual_seed(0)
    y_s, y_t = torch.randn(6, 100, dtype=torch.float64) * 3, torch.randn(6, 100, dtype=torch.float64) * 3
    labels = torch.randint(0, 100, (6,))
    theirs = 0.9 * distill_kl(y_s, y_t, 4) + 0.1 * F.cross_entropy(y_s, labels)
    torch.testing.assert_close(kd_loss(y_s, y_t, labels, 4, 0.9), theirs, rtol=1e-12, atol=1e-12)
    assert distill_kl(y_s, y_t, 4) > 1  # a KL term of weight, not one divided by the classes too


def test_preset_crd_trains_repdistillers_lr_and_every_flag_given_wins():
    """RepDistiller's train_student.py: lr = 0.05 x 0.1^k, k the decay epochs (150, 180, 210) that the
    1-based epoch exceeds. The preset's schedule, as the loop and TensorBoard read it, against that rule."""
    opt = cifar.parse_args(['--preset', 'crd'])
    schedule = Schedule(opt)
    assert [schedule.lr(e) for e in range(1, 241)] == pytest.approx(
        [0.05 * 0.1 ** sum(e > d for d in (150, 180, 210)) for e in range(1, 241)], rel=1e-12)
    assert vars(opt).items() >= cifar.PRESETS['crd'].items()  # every key is an option the parser knows
    # every value the preset sets gives way to the flag given, and none leaks into a run without it
    defaults = {a.dest: a.default for a in cifar.build_parser()._actions}
    defaults['init'] = '2017'  # None in the parser: decided from --model, 2017 for the WRN
    for name in cifar.PRESETS['crd']:
        given = cifar.setup(['--preset', 'crd', f'--{name}', str(defaults[name])])[0]
        assert getattr(given, name) == defaults[name], name
        assert getattr(cifar.setup([])[0], name) == defaults[name], name
    # the benchmark's networks other than the WRN have their own code's initialisation only, NIN 2017's only
    assert [cifar.setup(['--model', m])[0].init for m in ('resnet8', 'vgg8', 'nin', 'wrn')] == ['crd', 'crd', '2017', '2017']
    assert cifar.setup(['--preset', 'crd'])[0].init == 'crd'


LR_001 = ('MobileNetV2', 'ShuffleV1', 'ShuffleV2')  # train_student.py and train_teacher.py: lr 0.01 for these


@pytest.mark.parametrize('model', [*LR_001, 'ResNet50', 'resnet8x4', 'wrn'])
def test_preset_lr_is_0_01_for_mobilenet_and_shufflenets(model):
    """That code sets lr 0.01 for MobileNetV2 and the ShuffleNets, as students and as teachers (a teacher
    is a run without one)."""
    assert cifar.parse_args(['--preset', 'crd', '--model', model]).lr == (0.01 if model in LR_001 else 0.05)
    assert cifar.parse_args(['--preset', 'crd', '--model', model, '--lr', '0.03']).lr == 0.03
    assert cifar.parse_args(['--model', model]).lr == 0.1


def test_wrn_init_crd_is_that_of_repdistillers_wrn_py_and_2017_stays():
    """crd: convs normal(0, sqrt(2 / (k*k*out))) (wrn.py's loop), bn weight 1 and bias 0, the linear
    weight torch.nn.Linear's uniform(+-1/sqrt(in)) with a zero bias. 2017: bitwise what it was."""
    torch.manual_seed(0)
    p = wrn_params(40, 2, 100, 'crd')
    for name, k, out in (('group2.block3.conv1', 3, 128), ('group1.block0.convdim', 1, 64), ('conv0', 3, 16)):
        w = p[name]
        assert w.shape[0] == out and w.shape[-1] == k
        assert w.std().item() == pytest.approx(math.sqrt(2 / (k * k * out)), rel=0.05 if w.numel() > 4000 else 0.2)
        assert abs(w.mean().item()) < 0.1 * w.std().item()
    bns = [k[:-len('.weight')] for k in p if k.endswith('.weight') and k[:-len('.weight')] + '.running_var' in p]
    assert len(bns) == 37 and all((p[b + '.weight'] == 1).all() and (p[b + '.bias'] == 0).all() for b in bns)
    bound = 1 / math.sqrt(128)
    assert p['fc.weight'].abs().max() <= bound
    assert p['fc.weight'].std().item() == pytest.approx(bound / math.sqrt(3), rel=0.03)  # uniform's std
    assert (p['fc.bias'] == 0).all()
    torch.manual_seed(0)
    old = wrn_params(16, 1, 10)
    torch.manual_seed(0)
    named = wrn_params(16, 1, 10, '2017')
    assert list(named) == list(old) and all(torch.equal(v, named[k]) for k, v in old.items())
    assert 0 < old['bn.weight'].min() and old['bn.weight'].max() < 1 and old['bn.weight'].std() > 0.1


@pytest.mark.parametrize('restart', [True, False])
def test_lr_steps_restart_or_keep_the_momentum(restart):
    """One step an epoch, lr steps at epochs 2 and 4: the lr follows RepDistiller's rule for decay
    epochs [1, 3] either way; the momentum buffer restarts only with restart_momentum."""
    torch.manual_seed(0)
    w = torch.randn(3, 2, requires_grad=True)
    x, t = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])

    def model(inputs, targets, mode):
        y = inputs @ w
        return y, {'loss': F.cross_entropy(y, targets)}

    def make(lr):
        return torch.optim.SGD([w], lr, momentum=0.9)

    seen = []
    schedule = Schedule(dict(lr=0.05, epoch_step='[2,4]', lr_decay_ratio=0.1, epochs=4))
    Trainer(model, make, torch.device('cpu'), epochs=4, schedule=schedule, progress=False,
            restart_momentum=restart,
            on_epoch_end=lambda stats, opt: seen.append((opt.param_groups[0]['lr'], w.grad.clone(),
                                                         opt.state[w]['momentum_buffer'].clone()))
            ).train([(x, t)], None, make(0.05))
    assert [lr for lr, _, _ in seen] == pytest.approx([0.05 * 0.1 ** sum(e > s for s in (1, 3)) for e in (1, 2, 3, 4)])
    for (_, _, before), (_, grad, buf), epoch in zip(seen, seen[1:], (2, 3, 4)):
        fresh = restart and epoch in (2, 4)
        torch.testing.assert_close(buf, grad if fresh else 0.9 * before + grad)


@pytest.mark.parametrize('mode,values', [('zeros', {-1.0, 1.0}), ('reflect', {1.0})])
def test_zero_padding_pads_black_pixels(mode, values):
    white = torch.full((64, 3, 8, 8), 255, dtype=torch.uint8)
    loader = DeviceLoader(white, [0] * 64, batch_size=64, mean=[0.5] * 3, std=[0.5] * 3, train=True, pad=2,
                          pad_mode=mode, generator=torch.Generator().manual_seed(0))
    x, _ = next(iter(loader))
    assert set(x.unique().tolist()) == values  # 0 -> (0 - 0.5) / 0.5 = -1; 255 -> 1


def cifar100_sh(*args, **env):
    return subprocess.run(['bash', str(ROOT / 'scripts' / 'cifar100.sh'), *args], capture_output=True, text=True,
                          env={**OFFLINE_ENV, **env}, timeout=600)


def saves(lines):
    return [line.split('--save ')[1].split()[0].rsplit('/', 1)[1] for line in lines if '--save' in line]


SAME = ['wrn_16_2_40_2', 'wrn_40_1_40_2', 'resnet20_56', 'resnet20_110', 'resnet32_110', 'resnet8x4_32x4', 'vgg8_13']
CROSS = ['MobileNetV2_vgg13', 'MobileNetV2_ResNet50', 'vgg8_ResNet50', 'ShuffleV1_resnet32x4', 'ShuffleV2_resnet32x4',
         'ShuffleV1_wrn_40_2']


def test_dry_run_lists_every_run(tmp_path):
    p = cifar100_sh('--dry-run', LOGS=str(tmp_path))
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert saves(lines) == (
        ['wrn_40_2_teacher', 'resnet56_teacher', 'resnet110_teacher', 'resnet32x4_teacher', 'vgg13_teacher',
         'ResNet50_teacher', 'wrn_16_2', 'wrn_40_1', 'resnet20', 'resnet32', 'resnet8x4', 'vgg8', 'MobileNetV2',
         'ShuffleV1', 'ShuffleV2']
        + [f'{m}_{r}' for r in SAME + CROSS for m in ('at', 'kd')])
    assert all(line.startswith("python cifar.py --preset crd --dataroot . --epochs 240 --epoch_step '[151,181,211]'")
               for line in lines)
    assert lines[-1].endswith(f'--model ShuffleV1 --teacher_id {tmp_path}/wrn_40_2_teacher --alpha 0.9 --temperature 4')
    assert lines[-2].endswith(f'--model ShuffleV1 --teacher_id {tmp_path}/wrn_40_2_teacher --beta 1e+3')
    # the script's pairs are summarize.py's, with the same teacher and student runs
    assert list(summarize.CIFAR100.rows) == SAME + CROSS
    for pair in SAME + CROSS:
        at = next(line for line in lines if f'--save {tmp_path}/at_{pair} ' in line)
        student, teacher = (summarize.CIFAR100.run_name(pair, m) for m in ('student', 'teacher'))
        # student first, as 2017's at_16_1_16_2 (16-1 taught by 16-2) and RepDistiller's S:..._T:... name them
        assert pair.startswith(student + '_') and teacher.removesuffix('_teacher').endswith(pair[len(student) + 1:])
        assert at.endswith(f'{" ".join(flags(student))} --teacher_id {tmp_path}/{teacher} --beta 1e+3'), at
    short = cifar100_sh('--dry-run', LOGS=str(tmp_path), EPOCHS='24', SEEDS='0 1', PAIRS='resnet8x4_32x4',
                        METHODS='at').stdout.splitlines()
    assert saves(short) == ['resnet32x4_teacher', 'at_resnet8x4_32x4', 'at_resnet8x4_32x4_s1']
    assert "--epochs 24 --epoch_step '[16,19,22]'" in short[0] and '--seed 1' in short[-1]
    assert cifar100_sh('--dry-run', LOGS=str(tmp_path), ROWS='vgg8_13', METHODS='kd').stdout.count('\n') == 2
    for env, message in (({'PAIRS': 'resnet56'}, 'unknown row resnet56'), ({'METHODS': 'fitnet'}, 'unknown method fitnet'),
                         ({'EPOCHS': 'x'}, 'EPOCHS must be a positive whole number'),
                         ({'EPOCHS': '010'}, "EPOCHS must be a positive whole number, got '010'")):
        p = cifar100_sh('--dry-run', **env)
        assert p.returncode == 2 and p.stderr.count('\n') == 1 and message in p.stderr


def flags(run_name):
    """cifar.py's model flags of a run name of cifar100.sh: wrn_D_W, or a network's name."""
    if run_name.startswith('wrn_'):
        depth, width = run_name.split('_')[1:3]
        return ['--depth', depth, '--width', width]
    return ['--model', run_name]


def test_stops_at_the_first_run_that_does_not_finish(tmp_path):
    """A run stopped by a signal exits 143: the script stops there and says how to go on."""
    fake = tmp_path / 'python'
    # a new run folder to the status query (training.formats), then a run that a signal stops
    fake.write_text('#!/bin/sh\nif [ "$1" = -m ]; then echo new; exit 0; fi\n'
                    'echo "$@" >> "$(dirname "$0")/calls"\nexit 143\n')
    fake.chmod(0o755)
    p = cifar100_sh(LOGS=str(tmp_path / 'logs'), PYTHON=str(fake), ROWS='vgg8_13')
    assert p.returncode == 143
    assert (tmp_path / 'calls').read_text().count('\n') == 1  # no run after the interrupted one
    d = f'{tmp_path}/logs/vgg13_teacher'
    assert p.stderr.strip() == (f'cifar100.sh: interrupted in {d} (exit 143); run the same command again to resume: '
                                f'finished runs are skipped, {d} continues')


@pytest.mark.slow
def test_one_row_end_to_end_then_summarized(tmp_path, monkeypatch):
    """resnet56 -> resnet20 with AT for 1 epoch on a tiny 100-class folder (the teacher, then the student);
    a second call finds both done; the table has their cells and shows the others missing."""
    data = make_class_folders(tmp_path / 'c100', classes=100, train_per_class=1, test_per_class=1)
    env = dict(LOGS=str(tmp_path / 'logs'), DATAROOT=str(data), EPOCHS='1', ROWS='resnet20_56', METHODS='at',
               PYTHON=sys.executable, EXTRA='--no_progress --nthread 0', OMP_NUM_THREADS='1')
    p = cifar100_sh(**env)
    assert p.returncode == 0, p.stderr[-2000:]
    logs = tmp_path / 'logs'
    at = read_log(logs / 'at_resnet20_56')[0]
    assert (at['preset'], at['model'], at['num_classes'], at['lr_restart_momentum'], at['batch_size']) == \
        ('crd', 'resnet20', 100, 0, 64)
    assert len(at['at_losses']) == 3 and at['beta'] == 1000 and at['alpha'] == 0
    # the 2017 count: 861,620 trained, and the running mean and variance of 16 + 18x16 + 18x32 + 32 + 18x64 + 64
    # = 2,128 batch-norm channels
    assert read_log(logs / 'resnet56_teacher')[0]['n_parameters'] == 861_620 + 2 * 2_128
    again = cifar100_sh(**env)
    assert again.returncode == 0 and again.stdout.splitlines() == [
        f'# done: {logs}/{n}' for n in ('resnet56_teacher', 'at_resnet20_56')]

    sys.path.insert(0, str(ROOT / 'scripts'))
    import summarize
    summarize.main([str(logs), '--table', 'cifar100', '--out', str(tmp_path / 'out' / 'c100')])
    rows = {(r['pair'], r['method']): r for r in json.loads((tmp_path / 'out' / 'c100.json').read_text())}
    assert rows['resnet20_56', 'at']['last']['median'] == pytest.approx(at['test_acc'])
    assert rows['resnet20_56', 'at']['paper'] == 70.55 and rows['resnet20_56', 'at']['seeds'] == 1
    assert rows['resnet20_56', 'teacher']['seeds'] == 1 and rows['resnet20_110', 'teacher']['seeds'] == 0
    md = (tmp_path / 'out' / 'c100.md').read_text()
    assert '| vgg8 | vgg13 | KD | 72.98 | — | — | — | — | 0 |' in md and 'top-1 accuracy %' in md
    # two tables, as published: the same-family pairs, then the cross-family ones with their figures
    same, cross = md.index('### Teacher and student of the same family'), md.index('### Teacher and student of different')
    assert same < md.index('| resnet20 | resnet56 | AT | 70.55 |') < cross < md.index(
        '| MobileNetV2 | ResNet50 | AT | 58.58 | — | — | — | — | 0 |')
    assert '| ShuffleV1 | WRN-40-2 | teacher | 75.61 |' in md[cross:] and 'last-epoch figures' in md
    assert rows['MobileNetV2_vgg13', 'kd']['paper'] == 67.37 and len(rows) == 13 * 4
    summarize.main([str(logs), '--table', 'cifar100', '--rows', 'vgg8_ResNet50', '--out', str(tmp_path / 'out' / 'x')])
    md = (tmp_path / 'out' / 'x.md').read_text()
    assert 'same family' not in md and md.count('| vgg8 | ResNet50 |') == 4 and '| 73.81 |' in md

    # a teacher with another count of group outputs cannot be paired by AT, but KD takes any two networks
    monkeypatch.chdir(tmp_path)
    base = ['--preset', 'crd', '--model', 'vgg8', '--dataroot', str(data), '--device', 'cpu', '--nthread', '0',
            '--teacher_id', str(logs / 'resnet56_teacher')]
    for transfer in (['--beta', '1e+3'], ['--factt_beta', '1e+4', '--alpha', '0.9']):
        with pytest.raises(UserError, match=r'^teacher resnet56 has 3 group outputs and student vgg8 4: AT \(--beta, '
                                            r'--factt_beta\) pairs them one to one; KD \(--alpha\) needs none$'):
            cifar.build(*cifar.setup(base + transfer))
    run = cifar.build(*cifar.setup(base + ['--alpha', '0.9']))
    x, y = next(iter(run.train_loader))
    _, losses = run.distiller(x, y, True)
    assert set(losses) == {'loss'} and losses['loss'].isfinite()  # KD alone: no AT term to log


def test_preset_builds_the_wrn_with_the_crd_init(tmp_path, monkeypatch):
    data = make_class_folders(tmp_path / 'c', classes=3, train_per_class=1, test_per_class=1, size=8)
    monkeypatch.chdir(tmp_path)
    common = ['--depth', '10', '--width', '2', '--dataroot', str(data), '--device', 'cpu', '--nthread', '0']
    crd = cifar.build(*cifar.setup(['--preset', 'crd', *common])).params_s
    old = cifar.build(*cifar.setup(common)).params_s
    assert (crd['bn.weight'] == 1).all() and (crd['fc.bias'] == 0).all()
    assert not (old['bn.weight'] == 1).any()


# ---------------------------------------------------------------- the 13 pairs end to end

@pytest.fixture(scope='module')
def c100(tmp_path_factory):
    """A 100-class folder of 8x8 images (small for speed; the networks pool globally), 1 train and 1 test
    image a class, and a cache of teacher runs trained on it (each made the first time a pair asks)."""
    root = tmp_path_factory.mktemp('pairs')
    return dict(data=make_class_folders(root / 'c100', classes=100, train_per_class=1, test_per_class=1, size=8),
                logs=root / 'logs', teachers={})


def run_main(argv):
    """cifar.py in this process (no interpreter start-up per run), its signal handlers put back after."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        cifar.main(argv)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)


def crd_run(c100, name, model_flags, *extra):
    """A 1-epoch --preset crd run of 2 steps of 50 images, as cifar100.sh names it; its log record."""
    run_main(['--preset', 'crd', '--dataroot', str(c100['data']), '--epochs', '1', '--batch_size', '50',
              '--device', 'cpu', '--nthread', '0', '--no_progress', '--tensorboard', '0',
              '--save', str(c100['logs'] / name), *model_flags, *extra])
    return read_log(c100['logs'] / name)[-1]


@pytest.mark.parametrize('pair', SAME + CROSS)
def test_pair_runs_end_to_end(pair, c100):
    """Each pair of RepDistiller's two tables: its teacher trained under the preset (once, shared), then
    the student with AT on every group output and KD at once. No pair is skipped: a network that is
    missing fails here."""
    student, teacher = (summarize.CIFAR100.run_name(pair, m) for m in ('student', 'teacher'))
    if teacher not in c100['teachers']:
        c100['teachers'][teacher] = crd_run(c100, teacher, flags(teacher.removesuffix('_teacher')))
    t = c100['teachers'][teacher]
    record = crd_run(c100, f'atkd_{pair}', flags(student), '--teacher_id', str(c100['logs'] / teacher),
                     '--beta', '1e+3', '--alpha', '0.9')
    lr = {m: 0.01 if m in LR_001 else 0.05 for m in (student, t['model'])}
    assert (t['lr'], record['lr']) == (lr[t['model']], lr[student] if student in lr else 0.05)
    assert (record['at_pool'], record['init'], record['num_classes'], record['epoch']) == ('features', 'crd', 100, 1)
    n = cifar_model_groups(record['model'])
    assert n == cifar_model_groups(t['model']) and len(record['at_losses']) == n
    # [mean, std] over the steps, by group; a map of 1x1 (the last groups of some, on 8x8 images) is 1 for all
    assert all(math.isfinite(v[0]) and v[0] >= 0 for v in record['at_losses']) and record['at_losses'][0][0] > 0
    assert math.isfinite(record['train_loss'])
