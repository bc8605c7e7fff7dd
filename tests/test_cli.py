"""Flags as in 2017, and bad input refused with one line on stderr."""
import shutil

import pytest
import torch

import cifar
from conftest import run_cifar, tree_digest

FLAGS_2017_DEFAULTS = {  # the 2017 cifar.py's flags and defaults
    'depth': 16, 'width': 1, 'dataset': 'CIFAR10', 'dataroot': '.', 'dtype': 'float', 'nthread': 4,
    'teacher_id': '', 'batch_size': 128, 'lr': 0.1, 'epochs': 200, 'weight_decay': 0.0005,
    'epoch_step': '[60,120,160]', 'lr_decay_ratio': 0.2, 'resume': '', 'randomcrop_pad': 4,
    'temperature': 4, 'alpha': 0, 'beta': 0, 'cuda': False, 'save': '', 'ngpu': 1, 'gpu_id': '0',
}
FLAGS_2017_TYPES = {'depth': int, 'width': float, 'nthread': int, 'batch_size': int, 'lr': float,
                   'epochs': int, 'weight_decay': float, 'lr_decay_ratio': float, 'randomcrop_pad': float,
                   'temperature': float, 'alpha': float, 'beta': float, 'ngpu': int}


def test_defaults_match_2017():
    opt = vars(cifar.parse_args([]))
    for k, v in FLAGS_2017_DEFAULTS.items():
        assert opt[k] == v and type(opt[k]) is type(v), k
    assert opt['seed'] == 0 and opt['device'] == ''


def test_types_match_2017():
    actions = {a.dest: a for a in cifar.build_parser()._actions}
    for k, t in FLAGS_2017_TYPES.items():
        assert actions[k].type is t, k
    assert cifar.parse_args(['--width', '2']).width == 2.0


@pytest.fixture(scope='module')
def finished(tiny_data, tmp_path_factory):
    """A work dir with a finished tiny run at logs/done."""
    cwd = tmp_path_factory.mktemp('bad')
    run_cifar(['--depth', 10, '--batch_size', 16, '--nthread', 0, '--dataroot', tiny_data,
               '--epochs', 1, '--save', 'logs/done'], cwd)
    (cwd / 'logs' / 'nomodel').mkdir()
    shutil.copytree(cwd / 'logs/done', cwd / 'logs/badlog')
    with open(cwd / 'logs/badlog/log.txt', 'a') as fh:
        fh.write('json_stats: {"epoch": 2, "train_loss": \n')
    shutil.copy(cwd / 'logs/done/log.txt', cwd / 'logs/nomodel/log.txt')
    (cwd / 'corrupt.pt7').write_bytes((cwd / 'logs/done/model.pt7').read_bytes()[:300])
    (cwd / 'garbage.pt7').write_bytes(b'not a checkpoint at all')
    torch.save({'something': 1}, cwd / 'notrun.pt7')
    wrong = torch.load(cwd / 'logs/done/model.pt7', weights_only=True)
    wrong['params'] = {k: v for k, v in wrong['params'].items() if k != 'fc.bias'}
    torch.save(wrong, cwd / 'missingkey.pt7')
    return cwd


BAD = {
    'depth not 6n+4': (['--depth', 11], '6n+4'),
    'depth too small': (['--depth', 4], '6n+4'),
    'unknown flag': (['--bogus', 1], 'unrecognized'),
    'non-numeric lr': (['--lr', 'fast'], 'invalid float'),
    'epoch_step not JSON': (['--epoch_step', '60,120'], 'JSON list of ints'),
    'epoch_step floats': (['--epoch_step', '[60.5]'], 'JSON list of ints'),
    'epoch_step a dict': (['--epoch_step', '{"a": 1}'], 'JSON list of ints'),
    'zero batch size': (['--batch_size', 0], 'batch_size'),
    'negative batch size': (['--batch_size', -5], 'batch_size'),
    'unknown dataset': (['--dataset', 'MNIST'], 'CIFAR10'),
    'unknown dtype': (['--dtype', 'int8'], 'dtype'),
    'missing dataroot, download fails': (['--dataroot', 'no/such/dir'], 'could not be downloaded'),
    'unknown teacher': (['--teacher_id', 'nobody'], 'no run folder'),
    'teacher lacks model.pt7': (['--teacher_id', 'nomodel'], 'has no model.pt7'),
    'KD from a teacher with other classes': (['--teacher_id', 'done', '--alpha', 0.9, '--dataset', 'CIFAR100', '--dataroot', 'DATA100'],
                                   'trained on 3 classes'),
    'resume missing': (['--resume', 'nothere.pt7'], 'no such checkpoint'),
    'resume truncated': (['--resume', 'corrupt.pt7'], 'cannot read checkpoint'),
    'resume garbage': (['--resume', 'garbage.pt7'], 'cannot read checkpoint'),
    'resume not a run': (['--resume', 'notrun.pt7'], 'not a model.pt7'),
    'resume missing key': (['--resume', 'missingkey.pt7', '--batch_size', 16], "missing tensor 'fc.bias'"),
    'resume other model': (['--resume', 'logs/done/model.pt7', '--depth', 16],
                           '--depth is 10 in the checkpoint and 16 now'),
    'save onto finished run': (['--save', 'logs/done'], 'already holds a run'),
    'ngpu without GPUs': (['--ngpu', 2], '--ngpu 2'),
    'cuda without GPU': (['--device', 'cuda'], 'no CUDA'),
    'unknown device': (['--device', 'tpu'], 'cpu or cuda'),
    'unwritable save': (['--save', 'corrupt.pt7/run'], 'not writable'),
    'teacher log with a bad line': (['--teacher_id', 'badlog'], 'not a valid json_stats line'),
    'negative randomcrop_pad': (['--randomcrop_pad', -1], '--randomcrop_pad must not be negative'),
    'randomcrop_pad as large as the image': (['--randomcrop_pad', 32], 'smaller than the images (32 pixels)'),
    'negative lr': (['--lr', -0.1], '--lr must not be negative'),
    'negative weight_decay': (['--weight_decay', -1e-4], '--weight_decay must not be negative'),
    'zero width': (['--width', 0], '--width must be positive'),
    'compile with grad_beta': (['--compile', '--grad_beta', 1, '--teacher_id', 'done'], 'without --compile'),
    'gpu_id naming absent GPUs': (['--gpu_id', '7', '--device', 'cuda'], 'no CUDA'),
}


@pytest.mark.parametrize('case', list(BAD))
def test_bad_input_one_line_no_traceback(case, finished, tiny_data, tmp_path_factory):
    args, expected = BAD[case]
    data = tiny_data
    if 'DATA100' in args:  # a class-folder dataset with another number of classes
        from conftest import make_class_folders
        data = make_class_folders(tmp_path_factory.mktemp('data4'), classes=4, train_per_class=2,
                                  test_per_class=1)
        args = [a for a in args if a != 'DATA100'][:-1]
    if '--dataroot' not in args:
        args = ['--dataroot', data, *args]
    elif 'no/such/dir' not in args:
        args = [*args, data]
    before = tree_digest(finished / 'logs')
    p = run_cifar(['--depth', 10, '--nthread', 0, '--epochs', 1, *args]
                  if '--depth' not in args else ['--nthread', 0, '--epochs', 1, *args], finished, check=False)
    lines = p.stderr.strip().splitlines()
    assert p.returncode != 0
    assert 'Traceback' not in p.stderr
    assert len(lines) == 1 and lines[0].startswith('cifar.py: error: '), p.stderr
    assert expected in lines[0]
    assert tree_digest(finished / 'logs') == before  # no run folder touched
    assert not (finished / 'no').exists()  # the failed download left no folder behind
