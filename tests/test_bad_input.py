"""Every flag of every script, fed values of the wrong kind: one line on stderr, a non-zero exit, no
traceback, and nothing left behind. The entry scripts' cases are generated from their parsers, so a
new flag is tried as soon as it exists (a text flag must be given its bad values below)."""
import argparse
import io
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

import cifar
import imagenet
from training import errors
from resnet import CIFAR_MODELS, fold_torchvision
from conftest import OFFLINE_ENV, ROOT, make_class_folders, run_cifar
from test_imagenet import random_torchvision

sys.path.insert(0, str(ROOT / 'scripts'))
import benchmark  # noqa: E402
import convert_teacher  # noqa: E402
import summarize  # noqa: E402
import visualize  # noqa: E402

MISSING, A_FILE, A_FOLDER, UNWRITABLE = '<missing>', '<file>', '<folder>', '/proc/at_no_such_dir/run'
# numbers by type: every int and float flag refuses these (a flag whose choices are listed refuses 'x' and 99)
BAD_NUMBERS = {int: ['-1', 'x', '1.5', 'nan'], float: ['-1', 'inf', 'nan', 'x']}
ZERO_IS_BAD = {'depth', 'width', 'batch_size', 'ngpu', 'temperature', 'lr_decay_ratio', 'epochs'}
MORE_BAD = {'randomcrop_pad': ['2.7']}  # pixels: a whole number
# text flags: the bad values of each; a text flag missing here fails test_every_text_flag_has_bad_values
BAD_TEXT = {
    'dataset': ['MNIST'], 'dtype': ['int8'], 'dataroot': [MISSING, A_FILE], 'imagenetpath': [MISSING, A_FILE],
    'teacher_id': [MISSING, A_FILE], 'teacher_params': [MISSING, A_FOLDER, A_FILE],
    'epoch_step': ['x', '[0]', '[-1]', '[1.5]', '{}'], 'resume': [MISSING, A_FILE, A_FOLDER],
    'save': [A_FILE, UNWRITABLE], 'device': ['tpu', 'cuda', 'cuda:x'], 'at_groups': ['x', '4', '1,1', ''],
    'evaluate': [MISSING, A_FILE], 'allow_change': ['x', 'epochs'],
    'gpu_id': [],  # CUDA_VISIBLE_DEVICES: a machine without GPUs has nothing to check it against
}
NOT_FLAGS = {'help', 'cuda', 'compile', 'no_progress'}  # switches take no value
# what the line says, where it matters: (script, flag, value) -> a part of the line
SAYS = {
    ('cifar', '--lr', 'x'): 'invalid float', ('cifar', '--lr', '-1'): '--lr must not be negative',
    ('cifar', '--weight_decay', '-1'): '--weight_decay must not be negative',
    ('cifar', '--width', '0'): '--width must be positive', ('cifar', '--batch_size', '0'): 'batch_size',
    ('cifar', '--batch_size', '-1'): 'batch_size', ('cifar', '--dataset', 'MNIST'): 'CIFAR10',
    ('cifar', '--dtype', 'int8'): 'dtype', ('cifar', '--device', 'tpu'): 'cpu or cuda',
    ('cifar', '--device', 'cuda'): 'no CUDA', ('cifar', '--randomcrop_pad', '-1'): '--randomcrop_pad must not be negative',
    **{('cifar', '--epoch_step', v): 'JSON list of ints' for v in ('x', '[1.5]', '{}')},
    ('cifar', '--dataroot', MISSING): 'could not be downloaded', ('cifar', '--teacher_id', MISSING): 'no run folder',
    ('cifar', '--resume', MISSING): 'no such checkpoint', ('cifar', '--resume', A_FILE): 'cannot read checkpoint',
    ('imagenet', '--lr', '-1'): '--lr must not be negative',
    ('imagenet', '--temperature', '0'): '--temperature must be positive',
    ('imagenet', '--teacher_params', MISSING): 'no such teacher file',
    ('imagenet', '--teacher_params', A_FILE): 'cannot read teacher',
}


def cases(parser, prog):
    for action in parser._actions:
        name = action.dest
        if name in NOT_FLAGS or isinstance(action, argparse._StoreTrueAction):
            continue
        flag = action.option_strings[0]
        if action.choices:
            values = ['x', '99']
        elif action.type in BAD_NUMBERS:
            values = BAD_NUMBERS[action.type] + (['0'] if name in ZERO_IS_BAD else []) + MORE_BAD.get(name, [])
        else:
            values = BAD_TEXT.get(name, [None])
        for v in values:
            yield pytest.param(prog, flag, v, SAYS.get((prog, flag, v)), id=f'{prog}{flag}={v}')


ENTRY = [*cases(cifar.build_parser(), 'cifar'), *cases(imagenet.build_parser(), 'imagenet')]


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    from PIL import Image
    root = tmp_path_factory.mktemp('bad')
    make_class_folders(root / 'cifar', classes=3, train_per_class=4, test_per_class=2)
    make_class_folders(root / 'cifar10', classes=10, train_per_class=1, test_per_class=1)
    make_class_folders(root / 'cifar100', classes=100, train_per_class=1, test_per_class=1)
    for split in ('train', 'test'):  # 4x4 images: too small for a VGG's five poolings
        for c in range(2):
            (root / 'tiny' / split / f'c{c}').mkdir(parents=True)
            Image.new('RGB', (4, 4), (60 * c, 0, 0)).save(root / 'tiny' / split / f'c{c}' / '0.png')
    make_class_folders(root / 'imagenet', classes=5, train_per_class=1, test_per_class=1)
    os.rename(root / 'imagenet' / 'test', root / 'imagenet' / 'val')
    make_class_folders(root / 'cifar4', classes=4, train_per_class=2, test_per_class=1)
    make_class_folders(root / 'imagenet4', classes=4, train_per_class=1, test_per_class=1)
    os.rename(root / 'imagenet4' / 'test', root / 'imagenet4' / 'val')
    (root / 'a_file').write_text('not what was asked for\n')
    # runs and checkpoints as they should not be: a finished run, and broken copies of it
    run_cifar(['--depth', 10, '--batch_size', 16, '--nthread', 0, '--dataroot', 'cifar', '--epochs', 1,
               '--save', 'logs/done'], root)
    shutil.copytree(root / 'logs/done', root / 'logs/badlog')
    with open(root / 'logs/badlog/log.txt', 'a') as fh:
        fh.write('json_stats: {"epoch": 2, "train_loss": \n')
    (root / 'logs/nomodel').mkdir()
    shutil.copy(root / 'logs/done/log.txt', root / 'logs/nomodel/log.txt')
    (root / 'corrupt.pt7').write_bytes((root / 'logs/done/model.pt7').read_bytes()[:300])
    torch.save({'something': 1}, root / 'notrun.pt7')
    wrong = torch.load(root / 'logs/done/model.pt7', weights_only=True)
    wrong['params'] = {k: v for k, v in wrong['params'].items() if k != 'fc.bias'}
    torch.save(wrong, root / 'missingkey.pt7')
    # ImageNet teacher exports: a good one, and broken copies
    good = fold_torchvision(random_torchvision('resnet34', num_classes=5).state_dict())
    buffer = io.BytesIO()
    torch.save(good, buffer)
    (root / 'corrupt.pth').write_bytes(buffer.getvalue()[:1000])
    (root / 'corrupt.hkl').write_bytes(b'no hdf5 here')
    for name, change in {
        'missing': lambda d: d.pop('group2.block1.conv1.bias'),
        'extra': lambda d: d.__setitem__('group9.something', torch.zeros(1)),
        'shape': lambda d: d.__setitem__('group1.block0.conv_dim.weight', torch.zeros(128, 64, 3, 3)),
    }.items():
        d = dict(good)
        change(d)
        torch.save(d, root / f'{name}.pth')
    return root


def tree(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob('*'))


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """A script's process, in-process: its own folder, offline, signals and GPUs as they were."""
    monkeypatch.chdir(tmp_path)
    for k, v in OFFLINE_ENV.items():
        if k.lower().endswith('proxy') or k in ('CUDA_VISIBLE_DEVICES', 'TORCH_HOME'):
            monkeypatch.setenv(k, v)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield tmp_path
    for s, h in handlers.items():
        signal.signal(s, h)


def run_inprocess(main, argv, prog, capfd):
    """(exit status, stderr lines) of `prog argv` as errors.cli runs it; a traceback fails the test."""
    old, sys.argv = sys.argv, [prog, *argv]
    try:
        with pytest.raises(SystemExit) as e:
            errors.cli(main, prog)
    finally:
        sys.argv = old
    out, err = capfd.readouterr()
    return e.value.code, [line for line in err.splitlines() if line.strip()]


def concrete(value, data, tmp_path):
    return {MISSING: str(tmp_path / 'no' / 'such'), A_FILE: str(data / 'a_file'), A_FOLDER: str(data)}.get(value, value)


def assert_one_line_refusal(code, err, before, sandbox, data, data_before, what):
    assert code not in (0, None), f'{what}: accepted'
    assert len(err) == 1 and 'Traceback' not in err[0] and err[0].split(':')[0].endswith(('.py', '.sh')), (what, err)
    assert tree(sandbox) == before, f'{what}: left files behind'
    assert tree(data) == data_before, f'{what}: changed the data folder'


@pytest.mark.parametrize('prog,flag,value,says', ENTRY)
def test_entry_script_flags(prog, flag, value, says, data, sandbox, capfd):
    if value is None:
        pytest.fail(f'{prog}.py {flag}: a text flag with no bad values in BAD_TEXT')
    module = {'cifar': cifar, 'imagenet': imagenet}[prog]
    base = (['--dataroot', str(data / 'cifar'), '--depth', '10'] if prog == 'cifar' else
            ['--imagenetpath', str(data / 'imagenet'), '--width', '0.25', '--batch_size', '5'])
    argv = [*base, '--epochs', '1', '--nthread', '0', '--save', 'logs/run', '--no_progress',
            flag, concrete(value, data, sandbox)]
    before, data_before = tree(sandbox), tree(data)
    code, err = run_inprocess(module.main, argv, f'{prog}.py', capfd)
    assert_one_line_refusal(code, err, before, sandbox, data, data_before, f'{prog}.py {flag} {value!r}')
    assert err[0].startswith(f'{prog}.py: error: ') and (says or '') in err[0], err


# values each flag takes, in combinations that do not go together: (argv after the base, what the line says)
CIFAR_COMBOS = [
    (['--model', 'nin', '--init', 'crd'], 'NIN-1 has only the 2017 initialisation'),
    (['--model', 'vgg8', '--init', '2017'], 'vgg8 has only the crd initialisation'),
    (['--model', 'vgg8', '--depth', '28'], '--model vgg8 has no --depth: its name fixes its layers'),
    (['--model', 'nin', '--depth', '28'], '--model nin has no --depth'),
    (['--preset', 'crd', '--model', 'nin'], '--init crd: NIN-1 has only the 2017'),  # the preset's init
    (['--model', 'resnet8', '--at_pool', 'features', '--at_mode', 'paper', '--init', '2017'], '--init 2017'),
]


@pytest.mark.parametrize('argv,message', CIFAR_COMBOS, ids=[' '.join(a) for a, _ in CIFAR_COMBOS])
def test_cifar_flag_combinations(argv, message, data, sandbox, capfd):
    base = ['--dataroot', str(data / 'cifar'), '--epochs', '1', '--nthread', '0', '--save', 'logs/run', '--no_progress']
    before, data_before = tree(sandbox), tree(data)
    code, err = run_inprocess(cifar.main, [*base, *argv], 'cifar.py', capfd)
    assert_one_line_refusal(code, err, before, sandbox, data, data_before, f'cifar.py {argv}')
    assert message in err[0]


# pairs of flags that each pass alone and are refused together: (script, flags, environment, the line)
SUBPROCESS_PAIRS = [
    ('cifar', ['--ngpu', '2', '--compile'], {},
     'cifar.py: error: --compile with --ngpu 2: the replicas would share one compiled function, which recompiles '
     'for each GPU; use --ngpu 1, or torchrun with one GPU per process'),
    ('imagenet', ['--ngpu', '2', '--compile'], {},
     'imagenet.py: error: --compile with --ngpu 2: the replicas would share one compiled function, which '
     'recompiles for each GPU; use --ngpu 1, or torchrun with one GPU per process'),
    *[(prog, ['--at_sum_replicas', v], {'WORLD_SIZE': '2', 'RANK': '1'},
       f'{prog}.py: error: rank 1: --at_sum_replicas weighs the AT loss of --ngpu replicas inside one process; under '
       'torchrun each process takes the AT loss of its share and DistributedDataParallel averages the gradients, so '
       'beta already weighs the whole batch: drop --at_sum_replicas') for prog in ('cifar', 'imagenet') for v in '01'],
]


@pytest.mark.parametrize('prog,flags,env,line', SUBPROCESS_PAIRS, ids=[f"{p}:{' '.join(f)}:{','.join(e)}" for p, f, e, _ in SUBPROCESS_PAIRS])
def test_refused_pairs(prog, flags, env, line, data, tmp_path):
    """In a process of its own: under torchrun (WORLD_SIZE) a refusal leaves through os._exit."""
    base = (['--dataroot', str(data / 'cifar'), '--depth', '10'] if prog == 'cifar' else
            ['--imagenetpath', str(data / 'imagenet'), '--width', '0.25', '--batch_size', '5'])
    p = subprocess.run([sys.executable, str(ROOT / f'{prog}.py'), *base, '--epochs', '1',
                        '--save', 'logs/run', '--no_progress', *flags], capture_output=True, text=True, cwd=tmp_path,
                       timeout=120, env={**OFFLINE_ENV, **env})
    assert p.returncode == 1 and p.stderr.splitlines() == [line] and not (tmp_path / 'logs').exists()


# Flags that cannot go together, generated from the rules that refuse them: (script, flag A, value A,
# flag B, value B, more flags). A value None is a switch; '<data:NAME>' a data folder of the fixture.
NEEDS_TEACHER = {'cifar': ('--teacher_id', [('--beta', '1'), ('--alpha', '0.5'), ('--factt_beta', '1'),
                                            ('--grad_beta', '1'), ('--beta_decay', 'step')]),
                 'imagenet': ('--teacher_params', [('--beta', '1'), ('--alpha', '0.5')])}
DOUBLE_BACKPROP = [('--dtype', 'half'), ('--dtype', 'bfloat16'), ('--ngpu', '2'), ('--compile', None)]
PAIRS = [
    *[(prog, f, v, teacher, '', []) for prog, (teacher, terms) in NEEDS_TEACHER.items() for f, v in terms],
    *[('cifar', f, '1', g, w, ['--teacher_id', 't'] if f == '--grad_beta' else [])
      for f in ('--grad_beta', '--sym_beta') for g, w in DOUBLE_BACKPROP],
    *[('cifar', '--model', m, '--width', '2', []) for m in CIFAR_MODELS if m not in cifar.WIDTH_MODELS],
    ('cifar', '--beta_decay', 'step', '--beta', '0', ['--teacher_id', 't']),
    ('cifar', '--preset', 'crd', '--dataroot', '<data:cifar10>', []),
    ('cifar', '--dataset', 'CIFAR10', '--dataroot', '<data:cifar100>', []),
    ('cifar', '--model', 'vgg8', '--dataroot', '<data:tiny>', ['--randomcrop_pad', '0']),
    ('cifar', '--randomcrop_pad', '32', '--dataroot', '<data:cifar>', []),
    ('cifar', '--resume', 'auto', '--save', '', []),
    ('imagenet', '--resume', 'auto', '--save', '', []),
    ('imagenet', '--evaluate', None, '--resume', '', []),
    ('imagenet', '--decoder', 'nvjpeg', '--device', 'cpu', []),
]
PAIR_SAYS = {  # what the line says beyond the flags' names, where it matters: (script, flag A, flag B) -> a part
    ('cifar', '--grad_beta', '--compile'): 'without --compile', ('imagenet', '--evaluate', '--resume'): '--resume',
    ('cifar', '--randomcrop_pad', '--dataroot'): 'smaller than the images (32 pixels)',
    ('imagenet', '--decoder', '--device'): '--decoder nvjpeg decodes on a CUDA GPU; the device is cpu',
}


@pytest.mark.parametrize('prog,flag_a,value_a,flag_b,value_b,more', PAIRS,
                         ids=[f'{p}{a}={va}+{b}={vb}' for p, a, va, b, vb, _ in PAIRS])
def test_flags_that_cannot_go_together(prog, flag_a, value_a, flag_b, value_b, more, data, sandbox, capfd):
    module = {'cifar': cifar, 'imagenet': imagenet}[prog]
    base = (['--dataroot', str(data / 'cifar'), '--depth', '10'] if prog == 'cifar' else
            ['--imagenetpath', str(data / 'imagenet'), '--width', '0.25', '--batch_size', '5'])
    pair = [flag_a, *([] if value_a is None else [value_a]), flag_b, *([] if value_b is None else [value_b])]
    pair = [str(data / v[6:-1]) if v.startswith('<data:') else v for v in pair]
    argv = [*base, '--epochs', '1', '--nthread', '0', '--save', 'logs/run', '--no_progress', *more, *pair]
    before, data_before = tree(sandbox), tree(data)
    code, err = run_inprocess(module.main, argv, f'{prog}.py', capfd)
    what = f'{prog}.py {" ".join(pair)}'
    assert_one_line_refusal(code, err, before, sandbox, data, data_before, what)
    assert flag_a in err[0] or flag_b in err[0], (what, err)  # the line names what does not go together
    assert PAIR_SAYS.get((prog, flag_a, flag_b), '') in err[0], (what, err)


# Refusals that need more than a bad value or a pair: runs, checkpoints and teacher files that are
# not what they should be, made by the `data` fixture. (script, argv after the base, what the line says)
REFUSED = [
    ('cifar', ['--depth', '11'], '6n+4'), ('cifar', ['--depth', '4'], '6n+4'),
    ('cifar', ['--bogus', '1'], 'unrecognized'), ('cifar', ['--epoch_step', '60,120'], 'JSON list of ints'),
    ('cifar', ['--teacher_id', 'nomodel'], 'has no model.pt7'),
    ('cifar', ['--teacher_id', 'badlog'], 'not a valid json_stats line'),
    ('cifar', ['--teacher_id', 'done', '--alpha', '0.9', '--dataset', 'CIFAR100', '--dataroot', 'cifar4'],
     'trained on 3 classes'),
    ('cifar', ['--resume', 'corrupt.pt7'], 'cannot read checkpoint'),
    ('cifar', ['--resume', 'notrun.pt7'], 'not a model.pt7'),
    ('cifar', ['--resume', 'missingkey.pt7', '--batch_size', '16'], "missing tensor 'fc.bias'"),
    ('cifar', ['--resume', 'logs/done/model.pt7', '--depth', '16'], '--depth is 10 in the checkpoint and 16 now'),
    ('cifar', ['--save', 'logs/done'], 'already holds a run'),
    ('cifar', ['--save', 'corrupt.pt7/run'], 'not writable'),
    ('cifar', ['--ngpu', '2'], '--ngpu 2'), ('cifar', ['--gpu_id', '7', '--device', 'cuda'], 'no CUDA'),
    ('imagenet', ['--teacher_params', 'corrupt.pth'], 'cannot read teacher'),
    ('imagenet', ['--teacher_params', 'corrupt.hkl'], 'cannot read teacher'),
    ('imagenet', ['--teacher_params', 'missing.pth'], "missing tensor 'group2.block1.conv1.bias'"),
    ('imagenet', ['--teacher_params', 'extra.pth'], "unexpected tensor 'group9.something'"),
    ('imagenet', ['--teacher_params', 'shape.pth'], "'group1.block0.conv_dim.weight' has shape"),
    ('imagenet', ['--teacher_params', 'torchvision:resnet34'], 'cannot download'),
    ('imagenet', ['--teacher_params', 'torchvision:vgg16'], 'resnet18 or resnet34'),
    ('imagenet', ['--depth', '50'], '--depth must be one of'), ('imagenet', ['--at_groups', '1,4'], '--at_groups'),
    ('imagenet', ['--imagenetpath', ''], '--imagenetpath'),
    ('imagenet', ['--imagenetpath', 'imagenet/train'], 'no train/ folder'),
    ('imagenet', ['--imagenetpath', 'imagenet4'], 'train/ has 4 classes; top-5 error needs at least 5'),
    ('imagenet', ['--ngpu', '2'], '--ngpu 2'),
]


@pytest.mark.parametrize('prog,argv,says', REFUSED, ids=[f'{p}:{" ".join(a)}' for p, a, _ in REFUSED])
def test_refused_with_what_is_wrong(prog, argv, says, data, sandbox, capfd, monkeypatch):
    monkeypatch.chdir(data)  # the runs and files the cases name
    base = (['--dataroot', 'cifar', '--depth', '10'] if prog == 'cifar' else
            ['--imagenetpath', 'imagenet', '--width', '0.25', '--batch_size', '5'])
    argv = [*base, '--epochs', '1', '--nthread', '0', '--save', 'logs/run', '--no_progress', *argv]
    data_before = tree(data)
    code, err = run_inprocess({'cifar': cifar, 'imagenet': imagenet}[prog].main, argv, f'{prog}.py', capfd)
    assert_one_line_refusal(code, err, data_before, data, data, data_before, f'{prog}.py {argv}')
    assert err[0].startswith(f'{prog}.py: error: ') and says in err[0], err


def test_every_told_line_belongs_to_a_case():
    assert not set(SHELL_SAYS) - {shell_key(*c) for c in SHELL}
    assert not set(PAIR_SAYS) - {(p, a, b) for p, a, _, b, _, _ in PAIRS}


def test_every_text_flag_has_bad_values():
    missing = [p.values[1] for p in ENTRY if p.values[2] is None]
    assert not set(SAYS) - {p.values[:3] for p in ENTRY}, 'SAYS names a case that is not generated'
    assert not missing, f'text flags with no bad values in BAD_TEXT: {missing}'


SCRIPTS = [  # (script, argv with {data}, {tmp} and {missing} filled in)
    ('visualize', ['-n', '0', '{data}/cifar']), ('visualize', ['-n', 'x', '{data}/cifar']),
    ('visualize', ['{missing}']), ('visualize', ['{data}/a_file']), ('visualize', ['--kind', 'x', 'r']),
    ('visualize', ['--export', '{missing}', 'cat.jpg']), ('visualize', ['--export', '{data}/a_file', 'cat.jpg']),
    ('visualize', []),
    ('summarize', ['{missing}']), ('summarize', ['{data}/a_file']), ('summarize', ['{data}', '--epoch', '-1']),
    ('summarize', ['{data}', '--epoch', 'x']), ('summarize', ['{data}', '--rows', 'nope']),
    ('summarize', ['{data}', '--out', '/proc/at_no_such_dir/t']),
    ('benchmark', ['--dataroot', '{missing}']), ('benchmark', ['--dataroot', '{data}/a_file']),
    ('benchmark', ['--dataroot', '{data}/cifar', '--configs', 'x']),
    ('benchmark', ['--dataroot', '{data}/cifar', '--steps', '0']),
    ('benchmark', ['--dataroot', '{data}/cifar', '--steps', 'x']),
    ('benchmark', ['--dataroot', '{data}/cifar', '--warmup', '-1']),
    ('benchmark', ['--dataroot', '{data}/cifar', '--repeats', '-1']),
    ('benchmark', ['--dataroot', '{data}/cifar', '--batch_size', '0']),
    ('benchmark', ['--dataroot', '{data}/cifar', '--depth', '11']),
    ('benchmark', ['--dataroot', '{data}/cifar', '--width', 'nan']),
    ('benchmark', ['--dataroot', '{data}/cifar', '--width', '-1']),
    ('benchmark', ['--dataroot', '{data}/cifar', '--teacher', 'x']),
    ('benchmark', ['--dataroot', '{data}/cifar', '--nthread', '-1']),
    ('benchmark', ['--dataroot', '{data}/cifar', '--device', 'tpu']),
    ('benchmark', ['--dataroot', '{data}/cifar', '--cudnn_benchmark', '2']),
    ('convert_teacher', ['{missing}', 'x.pth']), ('convert_teacher', ['{data}/a_file', 'x.pth']),
    ('convert_teacher', ['{data}/a_file', 'x.txt']), ('convert_teacher', ['{data}/a_file', '{missing}/x.pth']),
    ('convert_teacher', ['{data}/a_file', 'x.pth', '/proc/at_no_such_dir/x.hkl']),
]


@pytest.mark.parametrize('script,argv', SCRIPTS, ids=[f'{s}:{" ".join(a)}' for s, a in SCRIPTS])
def test_python_script_flags(script, argv, data, sandbox, capfd):
    argv = [a.format(data=data, missing=sandbox / 'no' / 'such') for a in argv]
    module = {'visualize': visualize, 'summarize': summarize, 'benchmark': benchmark,
              'convert_teacher': convert_teacher}[script]
    before, data_before = tree(sandbox), tree(data)
    if script == 'convert_teacher':  # its own main: a status, and UserError for cli to say
        code, err = run_inprocess(lambda: sys.exit(convert_teacher.main(sys.argv[1:])), argv, module.PROG, capfd)
    else:
        code, err = run_inprocess(lambda: module.main(sys.argv[1:]), argv, module.PROG, capfd)
    assert_one_line_refusal(code, err, before, sandbox, data, data_before, f'{script} {argv}')


SHELL = [  # (script, arguments, environment)
    ('table1.sh', ['--nope'], {}), ('table1.sh', [], {'EPOCHS': 'x'}), ('table1.sh', [], {'EPOCHS': '0'}),
    ('table1.sh', [], {'EPOCHS': '-3'}), ('table1.sh', [], {'SEEDS': 'x'}), ('table1.sh', [], {'SEEDS': '-1'}),
    ('table1.sh', [], {'TEACHER_SEEDS': 'x'}), ('table1.sh', [], {'ROWS': 'x'}), ('table1.sh', [], {'METHODS': 'x'}),
    ('table1.sh', [], {'EPOCH_STEP': 'x'}), ('table1.sh', [], {'BETA': 'x'}), ('table1.sh', [], {'ALPHA': 'nan'}),
    ('table1.sh', [], {'FACTT_BETA': '-1'}), ('table1.sh', [], {'GRAD_BETA': 'x'}),
    ('table1.sh', [], {'PYTHON': 'no-such-python'}), ('table1.sh', [], {'DATAROOT': '{missing}'}),
    ('table1.sh', [], {'LOGS': '{data}/a_file'}), ('table1.sh', [], {'EPOCHS': '010'}),
    ('cifar100.sh', ['--nope'], {}), ('cifar100.sh', [], {'EPOCHS': 'x'}), ('cifar100.sh', [], {'SEEDS': '1 x'}),
    ('cifar100.sh', [], {'ROWS': 'x'}), ('cifar100.sh', [], {'PAIRS': 'x'}), ('cifar100.sh', [], {'PAIRS': 'nin'}),
    ('cifar100.sh', [], {'METHODS': 'factt'}), ('cifar100.sh', [], {'BETA': '-1'}),
    ('cifar100.sh', [], {'ALPHA': 'x'}), ('cifar100.sh', [], {'EPOCH_STEP': '[0]'}),
    ('cifar100.sh', [], {'PYTHON': 'no-such-python'}),
    ('imagenet.sh', ['--nope'], {}), ('imagenet.sh', [], {'IMAGENETPATH': '{missing}'}),
    ('imagenet.sh', [], {'EPOCHS': 'x'}), ('imagenet.sh', [], {'EPOCHS': '010'}), ('imagenet.sh', [], {'BATCH': '0'}),
    ('imagenet.sh', [], {'NTHREAD': 'x'}),
    ('imagenet.sh', [], {'LAUNCH': 'x'}), ('imagenet.sh', [], {'BETA': 'x'}), ('imagenet.sh', [], {'EPOCH_STEP': 'x'}),
    ('imagenet.sh', [], {'LOGS': '{data}/a_file'}), ('imagenet.sh', [], {'TEACHER_WEIGHTS': '{missing}'}),
    ('imagenet.sh', [], {'IMAGENETPATH': ''}), ('imagenet.sh', [], {'IMAGENETPATH': '{data}/imagenet/train'}),
    ('imagenet.sh', [], {'LAUNCH': 'torchrun'}), ('imagenet.sh', [], {'LAUNCH': 'ngpu:0'}),
    ('imagenet.sh', [], {'EPOCHS': '0'}), ('imagenet.sh', [], {}),  # offline, no TEACHER_WEIGHTS
    ('gpu_check.sh', ['--nope'], {}), ('gpu_check.sh', ['--budget', 'x'], {}), ('gpu_check.sh', ['--only', 'z'], {}),
    ('gpu_check.sh', ['--budget'], {}),
    ('make_wheelhouse.sh', ['--nope'], {}), ('make_wheelhouse.sh', ['--archive', '{missing}'], {}),
]


SHELL_SAYS = {  # what the line says, where it matters: (script, arguments, environment) -> a part of the line
    ('imagenet.sh', '--nope', ''): 'unknown argument --nope', ('imagenet.sh', '', "IMAGENETPATH=''"): 'set IMAGENETPATH',
    ('imagenet.sh', '', "IMAGENETPATH='{missing}'"): 'is not a folder',
    ('imagenet.sh', '', "IMAGENETPATH='{data}/imagenet/train'"): 'has no train/ folder',
    ('imagenet.sh', '', "TEACHER_WEIGHTS='{missing}'"): 'TEACHER_WEIGHTS=',
    ('imagenet.sh', '', "LAUNCH='torchrun'"): 'LAUNCH=torchrun', ('imagenet.sh', '', "LAUNCH='ngpu:0'"): 'LAUNCH=ngpu:0',
    ('imagenet.sh', '', "EPOCHS='0'"): 'EPOCHS must be', ('imagenet.sh', '', "BETA='x'"): 'BETA must be a number',
    ('imagenet.sh', '', ''): 'cannot download',
    **{(script, '', "EPOCHS='010'"): "EPOCHS must be a positive whole number, got '010'"  # one rule, not octal
       for script in ('table1.sh', 'imagenet.sh')},
}


def shell_key(script, argv, env):
    return script, ' '.join(argv), ','.join(f'{k}={v!r}' for k, v in env.items())


@pytest.mark.parametrize('script,argv,env', SHELL, ids=[':'.join(shell_key(*c)) for c in SHELL])
def test_shell_script_input(script, argv, env, data, tmp_path):
    says = SHELL_SAYS.get(shell_key(script, argv, env), '')
    fill = dict(data=data, missing=tmp_path / 'no' / 'such')
    env = {k: v.format(**fill) for k, v in env.items()}
    if script == 'table1.sh':
        env = {'DATAROOT': str(data / 'cifar'), 'EPOCHS': '1', 'ROWS': '16_1_16_2', 'METHODS': 'student', **env}
    if script == 'cifar100.sh':
        env = {'DATAROOT': str(data / 'cifar'), 'EPOCHS': '1', 'ROWS': 'resnet20_56', 'METHODS': 'student', **env}
    if script == 'imagenet.sh':
        env = {'IMAGENETPATH': str(data / 'imagenet'), 'EPOCHS': '1', **env}
    env = {'LOGS': str(tmp_path / 'logs'), 'PYTHON': sys.executable, **env}
    before, data_before = tree(tmp_path), tree(data)
    p = subprocess.run(['bash', str(ROOT / 'scripts' / script), *[a.format(**fill) for a in argv]],
                       capture_output=True, text=True, cwd=tmp_path, timeout=300, env={**OFFLINE_ENV, **env})
    err = [line for line in p.stderr.splitlines() if line.strip()]
    if says == 'cannot download':  # LOGS, made to fetch the teacher into, is left empty
        (tmp_path / 'logs').rmdir()
    assert_one_line_refusal(p.returncode, err, before, tmp_path, data, data_before, f'{script} {argv} {env}')
    assert says in err[0], err  # table1.sh and cifar100.sh pass cifar.py's line on
    if says == 'cannot download':  # and what to do about it
        assert 'TEACHER_WEIGHTS=' in err[0] and 'imagenet.py' not in p.stdout  # no run started
