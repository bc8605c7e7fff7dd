"""imagenet.py: the ResNet student, folded teachers from .pth/.hkl/torchvision, and a tiny run."""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision

import convert_teacher
import synthetic
import utils
from conftest import OFFLINE_ENV, ROOT, run_script
from resnet import fold_torchvision, folded_resnet, resnet_imagenet, resnet_imagenet_params
from training.teachers import load_teacher_export as load_teacher


def run_imagenet(args, cwd, check=True):
    return run_script('imagenet', args, cwd, check)


def random_torchvision(name, num_classes=1000, seed=0):
    """A torchvision ResNet in eval mode with non-trivial batch-norm statistics."""
    torch.manual_seed(seed)
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model


@pytest.mark.parametrize('depth,count', [(18, 11_687_720), (34, 21_795_880)])
def test_student_parameter_counts(depth, count):
    with torch.device('meta'):
        assert utils.n_trained(resnet_imagenet_params(depth, 1, 1000)) == count


def test_student_equals_torchvision_without_shortcut_bn():
    """Our student is torchvision's ResNet-18 with a plain 1x1 conv as downsample."""
    torch.manual_seed(1)
    ref = torchvision.models.resnet18(num_classes=7)
    for layer in (ref.layer2, ref.layer3, ref.layer4):
        layer[0].downsample = nn.Sequential(layer[0].downsample[0])
    params = resnet_imagenet_params(18, 1, 7)
    names = {'conv0': 'conv1.weight', 'bn0': 'bn1', 'fc.weight': 'fc.weight', 'fc.bias': 'fc.bias'}
    sd = {}
    for k in params:
        parts = k.split('.')
        if k.startswith('group'):
            g, i = int(parts[0][5:]), int(parts[1][5:])
            sub = {'conv0': 'conv1', 'conv1': 'conv2', 'bn0': 'bn1', 'bn1': 'bn2', 'convdim': 'downsample.0'}[parts[2]]
            tv = f'layer{g + 1}.{i}.{sub}' + ('.' + parts[3] if len(parts) > 3 else '.weight')
        else:
            tv = names.get(k) or names[parts[0]] + '.' + parts[1]
        sd[tv] = params[k]
    missing = ref.load_state_dict(sd, strict=False).missing_keys
    assert all(k.endswith('num_batches_tracked') for k in missing)
    x = torch.randn(2, 3, 64, 64)
    for mode in (True, False):
        ref.train(mode)
        y_ref = ref(x)
        y, groups = resnet_imagenet(x, params, mode)
        torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    assert [g.shape[1] for g in groups] == [64, 128, 256, 512]


@pytest.mark.parametrize('name', ['resnet18', 'resnet34'])
def test_folded_torchvision_gives_torchvision_logits(name, tmp_path):
    model = random_torchvision(name)
    torch.save(model.state_dict(), tmp_path / 'tv.pth')
    f, params = load_teacher(f'torchvision:{name}:{tmp_path / "tv.pth"}')
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        y_ref = model(x)
        y, groups = f(x, params)
    assert len(groups) == 4
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4 * y_ref.abs().max().item())
    n_blocks = {'resnet18': 8, 'resnet34': 16}[name]
    assert sum(1 for k in params if k.endswith('.conv0.weight')) == n_blocks


def test_pth_and_hkl_exports_round_trip(tmp_path):
    model = random_torchvision('resnet18')
    torch.save(model.state_dict(), tmp_path / 'tv.pth')
    assert convert_teacher.main([f'torchvision:resnet18:{tmp_path / "tv.pth"}', str(tmp_path / 'e.pth'),
                                 str(tmp_path / 'e.hkl')]) == 0
    folded = fold_torchvision(model.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        y_ref = model(x)
    for path in ('e.pth', 'e.hkl'):
        f, params = load_teacher(str(tmp_path / path))
        assert set(params) == set(folded)
        assert all(torch.equal(params[k], folded[k]) for k in folded)
        with torch.no_grad():
            torch.testing.assert_close(f(x, params)[0], y_ref, rtol=1e-4, atol=1e-4)
    import hickle
    raw = hickle.load(str(tmp_path / 'e.hkl'))
    assert isinstance(raw['conv0.weight'], np.ndarray)  # hickle files hold numpy arrays
    # and back: .hkl -> .pth gives the same tensors
    assert convert_teacher.main([str(tmp_path / 'e.hkl'), str(tmp_path / 'back.pth')]) == 0
    back = torch.load(tmp_path / 'back.pth', weights_only=True)
    assert all(torch.equal(back[k], folded[k]) for k in folded)


def make_image_folder(root, classes=6, train=2, val=1, size=(48, 48)):
    """The tests' ImageNet: 6 classes of 48x48 JPEGs unless told otherwise."""
    return Path(synthetic.make_image_folder(root, classes, train, val, size))


@pytest.fixture(scope='module')
def imagenet_work(tmp_path_factory):
    work = tmp_path_factory.mktemp('imagenet')
    make_image_folder(work / 'data')
    make_image_folder(work / 'data4', classes=4)
    model = random_torchvision('resnet34', num_classes=6)
    torch.save(fold_torchvision(model.state_dict()), work / 'resnet-34-export.pth')
    return work


def test_tiny_run_with_teacher(imagenet_work):
    w = imagenet_work
    run_imagenet(['--imagenetpath', 'data', '--depth', 18, '--teacher_params', 'resnet-34-export.pth',
                  '--beta', 1e3, '--batch_size', 4, '--epochs', 1, '--nthread', 0, '--save', 'logs/at'], w)
    rec = [json.loads(line[12:]) for line in (w / 'logs/at/log.txt').read_text().splitlines()]
    assert len(rec) == 1
    top1, top5 = rec[0]['test_acc']
    assert 0 <= top1 <= top5 <= 100
    train1, train5 = rec[0]['train_acc']  # [top1, top5], as 2017 logged it
    assert 0 <= train1 <= train5 <= 100
    assert len(rec[0]['at_losses']) == 4 and all(math.isfinite(m) for m, _ in rec[0]['at_losses'])
    state = torch.load(w / 'logs/at/model.pt7', weights_only=True)
    assert {'params', 'optimizer', 'epoch'} <= set(state) and 'group3.block1.conv1' in state['params']
    # the student checkpoint evaluates by itself, and the teacher export too
    out = run_imagenet(['--imagenetpath', 'data', '--evaluate', '--resume', 'logs/at/model.pt7'], w).stdout
    assert f'top-1 error {100 - top1:.2f}%' in out and f'top-5 error {100 - top5:.2f}%' in out
    # --resume auto finds it in --save; given as an export, one line says what was meant
    auto = run_imagenet(['--imagenetpath', 'data', '--evaluate', '--resume', 'auto', '--save', 'logs/at'], w).stdout
    assert auto == out
    p = run_imagenet(['--imagenetpath', 'data', '--evaluate', 'logs/at/model.pt7'], w, check=False)
    assert p.returncode == 1 and p.stderr.strip().splitlines() == [
        "imagenet.py: error: --evaluate logs/at/model.pt7 is a run's checkpoint, not an export: pass --evaluate "
        "--resume logs/at/model.pt7"]
    p = run_imagenet(['--imagenetpath', 'data', '--evaluate', '--resume', 'auto', '--save', 'logs/none'], w, check=False)
    assert p.returncode == 1 and p.stderr.strip().splitlines() == [
        'imagenet.py: error: --evaluate --resume auto: --save logs/none holds no model.pt7 to evaluate']
    out = run_imagenet(['--imagenetpath', 'data', '--evaluate', 'resnet-34-export.pth'], w).stdout
    assert 'top-1 error' in out and 'on 6 images' in out


def test_at_groups_subset_and_baseline(imagenet_work):
    w = imagenet_work
    run_imagenet(['--imagenetpath', 'data', '--teacher_params', 'resnet-34-export.pth', '--beta', 1e3,
                  '--at_groups', '2,3', '--batch_size', 6, '--epochs', 1, '--nthread', 0, '--save', 'logs/at23'], w)
    rec = json.loads((w / 'logs/at23/log.txt').read_text()[12:])
    assert len(rec['at_losses']) == 2
    run_imagenet(['--imagenetpath', 'data', '--batch_size', 6, '--epochs', 1, '--nthread', 0,
                  '--save', 'logs/base'], w)
    rec = json.loads((w / 'logs/base/log.txt').read_text()[12:])
    assert rec['at_losses'] == [] and len(rec['test_acc']) == 2


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason='needs 2 GPUs')
def test_two_gpu_data_parallel_with_at_losses():
    """The 2017 gather crashed here (its issue #35)."""
    from training.distill import Distiller
    from training.distill import FunctionalNet
    from training.device import data_parallel
    params_s = {k: v.cuda() for k, v in resnet_imagenet_params(18, 1, 10).items()}
    utils.set_requires_grad_except_bn_(params_s)
    params_t = {k: v.cuda() for k, v in fold_torchvision(random_torchvision('resnet34', 10).state_dict()).items()}
    x, y = torch.randn(8, 3, 64, 64, device='cuda'), torch.randint(0, 10, (8,), device='cuda')
    model = Distiller(data_parallel(FunctionalNet(resnet_imagenet, params_s), 2),
                      data_parallel(FunctionalNet(folded_resnet, params_t), 2), alpha=0.5, beta=1e3)
    logits, losses = model(x, y, True)
    losses['loss'].backward()
    assert logits.shape == (8, 10) and torch.isfinite(losses['loss'])
    assert sum(k.startswith(utils.AT_PREFIX) for k in losses) == 4
    assert params_s['fc.weight'].grad is not None


IMAGENET_2017_DEFAULTS = dict(  # the 2017 imagenet.py's flags and defaults
    depth=18, width=1, imagenetpath='', nthread=4, teacher_params='', batch_size=256, lr=0.1, epochs=100,
    weight_decay=1e-4, epoch_step='[30,60,90]', lr_decay_ratio=0.1, temperature=4, alpha=0, beta=0, dtype='float',
    resume='', save='', ngpu=1, gpu_id='0', cuda=False)


def test_imagenet_defaults_are_2017s_but_nthreads():
    import imagenet
    opt = vars(imagenet.build_parser().parse_args([]))
    assert {k: opt[k] for k in IMAGENET_2017_DEFAULTS} == {**IMAGENET_2017_DEFAULTS, 'nthread': None}
    # 2017: 4 workers; now the CPUs this process may use, and an explicit --nthread as given
    from training import imagenet_data
    assert imagenet.settle(imagenet.parse_args(['--imagenetpath', 'x']), 'x').nthread == imagenet_data.default_workers()
    assert imagenet.settle(imagenet.parse_args(['--imagenetpath', 'x', '--nthread', '4']), 'x').nthread == 4
    assert opt['at_groups'] == '0,1,2,3' and opt['evaluate'] == ''  # new flags: every group, and training


def test_beta_under_ngpu_and_the_2017_sum_over_replicas(capsys):
    """--ngpu 2 --beta 1e3: beta weighs the whole batch's AT loss, and one line says so; with
    --at_sum_replicas 1 the total equals 2017's: kd + beta x the sum of each replica's AT losses."""
    import imagenet
    from training.distill import Distiller
    from training.distill import FunctionalNet

    def settled(argv):
        return imagenet.settle(imagenet.parse_args(argv), 'x')
    base = ['--imagenetpath', 'x', '--ngpu', '2', '--beta', '1e3', '--teacher_params', 'x.pth']
    assert settled(base).at_weight == 1000
    note = capsys.readouterr().err.strip().splitlines()
    assert len(note) == 1 and 'by 1000' in note[0] and 'a weight of 2000' in note[0] and '--at_sum_replicas 1' in note[0]
    opt = settled(base + ['--at_sum_replicas', '1'])
    assert opt.at_weight == 2000 and settled(base + ['--at_sum_replicas', '0']).at_weight == 1000
    assert settled(['--imagenetpath', 'x', '--beta', '1e3', '--teacher_params', 'x.pth',
                    '--at_sum_replicas', '1']).at_weight == 1000
    assert capsys.readouterr().err == ''
    torch.manual_seed(0)
    params_s = resnet_imagenet_params(18, 0.25, 6)
    params_t = fold_torchvision(random_torchvision('resnet18', 6).state_dict())
    x, y = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        _, losses = Distiller(FunctionalNet(resnet_imagenet, dict(params_s)), FunctionalNet(folded_resnet, params_t),
                              beta=opt.at_weight)(x, y, False)
        replica_at = 0.0  # by hand: each replica's AT losses on its half of the batch, summed
        for half in (slice(0, 2), slice(2, 4)):
            g_s, g_t = resnet_imagenet(x[half], params_s, False)[1], folded_resnet(x[half], params_t)[1]
            replica_at += sum(utils.at_loss(s, t) for s, t in zip(g_s, g_t))
        expected = torch.nn.functional.cross_entropy(resnet_imagenet(x, params_s, False)[0], y) + 1000 * replica_at
    assert losses['loss'].item() == pytest.approx(expected.item(), rel=1e-5)


def test_stem_has_64_channels_at_any_width():
    params = resnet_imagenet_params(18, 0.5, 10)
    assert params['conv0'].shape == (64, 3, 7, 7) and params['bn0.weight'].shape == (64,)
    assert params['group0.block0.convdim'].shape == (32, 64, 1, 1)  # the first block meets the width
    y, groups = resnet_imagenet(torch.randn(2, 3, 64, 64), params, True)
    assert y.shape == (2, 10) and [g.shape[1] for g in groups] == [32, 64, 128, 256]


def test_2017_flags_cuda_accepted():
    import imagenet
    assert imagenet.parse_args(['--imagenetpath', 'x', '--cuda']).cuda is True


def write_2017_imagenet_checkpoint(path, num_classes, teacher):
    """model.pt7 as the 2017 imagenet.py left it: student. and teacher. tensors, legacy torch.save."""
    torch.manual_seed(3)
    params = resnet_imagenet_params(18, 1, num_classes)
    utils.set_requires_grad_except_bn_(params)
    opt = torch.optim.SGD([v for v in params.values() if v.requires_grad], 0.1, momentum=0.9)
    sum(v.sum() for v in params.values() if v.requires_grad).backward()
    opt.step()
    path.parent.mkdir(parents=True)
    torch.save({'params': {**{'student.' + k: v.detach() for k, v in params.items()},
                           **{'teacher.' + k: v for k, v in teacher.items()}},
                'optimizer': opt.state_dict(), 'epoch': 1}, path, _use_new_zipfile_serialization=False)
    return params


def test_2017_imagenet_checkpoint_evaluates_and_resumes(imagenet_work):
    w = imagenet_work
    teacher = torch.load(w / 'resnet-34-export.pth', weights_only=True)
    params = write_2017_imagenet_checkpoint(w / 'logs/old2017/model.pt7', 6, teacher)
    out = run_imagenet(['--imagenetpath', 'data', '--evaluate', '--resume', 'logs/old2017/model.pt7'], w).stdout
    # the same figures as an evaluation of the student's tensors saved the plain way
    torch.save({'params': {k: v.detach() for k, v in params.items()}}, w / 'plain.pt7')
    plain = run_imagenet(['--imagenetpath', 'data', '--evaluate', '--resume', 'plain.pt7'], w).stdout
    assert out.split(': ', 1)[1] == plain.split(': ', 1)[1] and 'top-5 error' in out
    p = run_imagenet(['--imagenetpath', 'data', '--batch_size', 6, '--epochs', 2, '--nthread', 0,
                      '--resume', 'logs/old2017/model.pt7'], w)
    assert 'resumed from logs/old2017/model.pt7 at epoch 1' in p.stdout and 'Traceback' not in p.stderr
    rec = [json.loads(line[12:]) for line in (w / 'logs/old2017/log.txt').read_text().splitlines()]
    assert [r['epoch'] for r in rec] == [2]
    state = torch.load(w / 'logs/old2017/model.pt7', weights_only=True)
    assert not any(k.startswith(('student.', 'teacher.')) for k in state['params'])  # saved the plain way now


@pytest.mark.slow
def test_evaluate_under_torchrun_counts_all_of_val(imagenet_work):
    w = imagenet_work
    single = run_imagenet(['--imagenetpath', 'data', '--evaluate', 'resnet-34-export.pth'], w).stdout
    p = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                        str(ROOT / 'imagenet.py'), '--no_progress', '--imagenetpath', 'data', '--evaluate',
                        'resnet-34-export.pth', '--batch_size', '2'], cwd=w, capture_output=True, text=True,
                       timeout=300, env=OFFLINE_ENV)
    assert p.returncode == 0, p.stderr
    lines = [line for line in p.stdout.splitlines() if 'top-1 error' in line]
    assert lines == [line for line in single.splitlines() if 'top-1 error' in line]  # once, over all 6 images
    assert 'on 6 images' in lines[0]


def test_teacher_with_other_classes_for_at_alone(imagenet_work):
    w = imagenet_work
    torch.save(fold_torchvision(random_torchvision('resnet34', num_classes=1000).state_dict()), w / 'r34-1k.pth')
    args = ['--imagenetpath', 'data', '--teacher_params', 'r34-1k.pth', '--beta', 1e3, '--batch_size', 6,
            '--epochs', 1, '--nthread', 0]
    run_imagenet([*args, '--save', 'logs/at1k'], w)  # attention maps know no classes
    assert len(json.loads((w / 'logs/at1k/log.txt').read_text()[12:])['at_losses']) == 4
    p = run_imagenet(['--imagenetpath', 'data', '--evaluate', 'r34-1k.pth'], w, check=False)
    assert p.returncode != 0 and p.stderr.strip().splitlines() == [
        'imagenet.py: error: r34-1k.pth has 1000 classes, val/ has 6: its errors would mean nothing']
    p = run_imagenet([*args, '--alpha', 0.5, '--save', 'logs/kd1k'], w, check=False)
    assert p.returncode != 0 and p.stderr.strip().splitlines() == [
        'imagenet.py: error: teacher r34-1k.pth has 1000 classes, the dataset 6: KD (--alpha) compares class '
        'scores; AT alone (--alpha 0) would do']
