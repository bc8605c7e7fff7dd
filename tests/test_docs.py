"""Every command that README.md and docs/ give still runs: each is parsed as its script parses it,
with the script's own value checks, without training (shell scripts: --dry-run, or bash -n)."""
import argparse
import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import OFFLINE_ENV, ROOT

PAGES = [ROOT / 'README.md', *sorted((ROOT / 'docs').glob('*.md'))]
PROGRAMS = ('python', 'bash', 'scripts/', 'torchrun', 'tensorboard')
ENV = re.compile(r'^[A-Z_]+=')


def commands(page):
    """The shell commands of a page's code blocks (fenced, or indented by 4), continuation lines joined."""
    found, fenced, pending = [], False, ''
    for line in page.read_text().splitlines():
        if line.strip().startswith('```'):
            fenced = not fenced
            continue
        if not (fenced or line.startswith('    ')):
            continue
        text = pending + line.strip()
        if text.endswith('\\'):
            pending = text[:-1] + ' '
            continue
        pending = ''
        words = shlex.split(text, comments=True)
        while words:
            part, words = (words[:words.index('&&')], words[words.index('&&') + 1:]) if '&&' in words else (words, [])
            program = next((w for w in part if not ENV.match(w)), '')
            if program.startswith(PROGRAMS) and program != '.':
                found.append(shlex.join(part))
    return found


ALL = [(page.relative_to(ROOT).as_posix(), c) for page in PAGES for c in commands(page)]


class Parsed(Exception):
    """Raised by argparse once a script's command line has parsed: nothing runs after it."""


def load(path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_python(script, args, monkeypatch, tmp_path):
    """Parses `script args` as the script does: cifar.py and imagenet.py with their checks, the others
    through their main up to the end of argparse; convert_teacher.py with its sources stubbed."""
    path = ROOT / script
    assert path.is_file(), script
    module = load(path)
    if hasattr(module, 'parse_args') and script.endswith(('cifar.py', 'imagenet.py', 'benchmark.py')):
        return module.parse_args(args)
    if script.endswith('convert_teacher.py'):
        monkeypatch.chdir(tmp_path)  # the outputs, empty, land there
        monkeypatch.setattr(module, 'load_teacher_export', lambda source: (None, {}))
        assert module.main(args) == 0
        return
    original = argparse.ArgumentParser.parse_args

    def parse_and_stop(self, *a, **k):
        raise Parsed(original(self, *a, **k))
    monkeypatch.setattr(argparse.ArgumentParser, 'parse_args', parse_and_stop)
    with pytest.raises(Parsed):
        module.main(args)


def test_the_docs_give_commands():
    pages = {p for p, _ in ALL}
    assert {'README.md', 'docs/table1.md', 'docs/imagenet.md', 'docs/gpu.md', 'docs/tensorboard.md'} <= pages
    assert len(ALL) > 30


@pytest.mark.parametrize('page,command', ALL, ids=[f'{p}:{c[:60]}' for p, c in ALL])
def test_command_parses(page, command, monkeypatch, tmp_path):
    words = shlex.split(command)
    env = {}
    while ENV.match(words[0]):
        key, _, value = words.pop(0).partition('=')
        env[key] = re.sub(r'^~', str(tmp_path / 'home'), value)  # as the shell would, in a home of our own
    program, args = words[0], words[1:]
    if program == 'tensorboard':
        tb = pytest.importorskip('tensorboard.program')  # optional for the code
        tb.TensorBoard().configure(argv=[None, *args])
    elif program == 'torchrun':
        from torch.distributed.run import get_args_parser
        opts = get_args_parser().parse_args(args)
        parse_python(opts.training_script, opts.training_script_args, monkeypatch, tmp_path)
    elif program.startswith('python'):
        if args[0] == '-m':
            assert importlib.util.find_spec(args[1]), args[1]
        else:
            parse_python(args[0], args[1:], monkeypatch, tmp_path)
    else:  # a shell script: its --dry-run where it has one, else bash's own parse of it
        script = ROOT / (args[0] if program == 'bash' else program)
        args = args[1:] if program == 'bash' else args
        for split in ('train', 'val') if 'IMAGENETPATH' in env else ():  # the data it names, empty
            Path(env['IMAGENETPATH'], split).mkdir(parents=True)
        dry = '--dry-run)' in script.read_text()
        cmd = ['bash', str(script), *args, *(['--dry-run'] if dry and '--dry-run' not in args else [])] \
            if dry else ['bash', '-n', str(script)]
        p = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120,
                           env={**OFFLINE_ENV, 'PYTHON': sys.executable, **env})
        assert p.returncode == 0, p.stderr


def test_flags_page_is_what_the_options_say():
    p = subprocess.run([sys.executable, str(ROOT / 'scripts' / 'flags_doc.py')], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert (ROOT / 'docs' / 'flags.md').read_text() == p.stdout, \
        'docs/flags.md differs from the options: python scripts/flags_doc.py > docs/flags.md'


def counts(text):
    return [int(n.replace(',', '')) for n in re.findall(r'\b\d{1,3}(?:,\d{3})+\b', text)]


def count_of(name, classes, trained=True):
    """The parameters of a network named as the docs name it (WRN-16-1, NIN-thin, ResNet-18, resnet8x4)."""
    import resnet
    import utils
    with torch.device('meta'):
        if name.startswith('WRN-'):
            depth, width = name[4:].split('-')
            params = resnet.wrn_params(int(depth), float(width), classes)
        elif name.startswith('NIN-'):
            params = resnet.nin_params({'thin': 0.45, 'wide': 1}[name[4:]], classes)
        elif name.startswith('ResNet-'):
            params = resnet.resnet_imagenet_params(int(name[7:]), 1, classes)
        else:
            params = resnet.cifar_model_params(name, 16, 1, classes)
    return utils.n_trained(params) if trained else sum(v.numel() for v in params.values())


def test_parameter_counts_in_the_docs_are_the_codes():
    """Every parameter count the docs give, against the networks built here."""
    page = {name: (ROOT / 'docs' / name).read_text() for name in ('tests.md', 'formats.md', 'imagenet.md',
                                                                  'table1.md', 'cifar100.md')}
    r18, r34 = count_of('ResNet-18', 1000), count_of('ResNet-34', 1000)
    assert counts(page['tests.md'].split('parameter counts (')[1].split(');')[0]) == \
        [count_of('WRN-16-1', 10), count_of('WRN-40-2', 10), r18, r34]
    assert counts(page['formats.md'].split('`n_parameters` is the 2017 count')[1].split('\n\n')[0]) == \
        [count_of('WRN-16-1', 10, trained=False), count_of('WRN-16-1', 10)]
    assert counts(page['imagenet.md'].split('trained parameters')[0].split('\n')[-1]) == [r18, r34]
    assert counts(page['table1.md'].split('NIN-thin is NIN-wide')[1].split('mlpconv')[0]) == \
        [count_of('NIN-thin', 10), count_of('NIN-wide', 10)]
    table = page['cifar100.md'].split('Trainable parameters, 100 classes')[1].split('\n\n')[1]
    rows = re.findall(r'\| ([\w-]+) \| ([\d,]+) \|', table)
    assert len(rows) == 21 and all(int(n.replace(',', '')) == count_of(name, 100) for name, n in rows), rows
    totals = page['cifar100.md'].split('also counts the batch-norm statistics')[1].split('\n\n')[0]
    assert counts(totals) == [count_of(n, 100, trained=False) for n in ('ResNet50', 'MobileNetV2', 'ShuffleV1',
                                                                         'ShuffleV2')]
