"""scripts/imagenet.sh: the paper's ImageNet row in one command. Its dry run, skip and resume logic,
a tiny end-to-end run (export, evaluate, train twice, evaluate, table), resume to a longer
schedule, and an interrupted run (its bad input: test_bad_input.py)."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import OFFLINE_ENV, ROOT
from test_imagenet import make_image_folder, random_torchvision

SCRIPT = ROOT / 'scripts' / 'imagenet.sh'
PY = sys.executable


def imagenet_sh(*args, cwd=None, timeout=600, **env):
    """Runs the script as a user would, offline, with this interpreter as its python."""
    return subprocess.run(['bash', str(SCRIPT), *args], capture_output=True, text=True, cwd=cwd, timeout=timeout,
                          env={**OFFLINE_ENV, 'PYTHON': PY, **env})


def dry_run(tmp_path, **env):
    data = tmp_path / 'data'
    (data / 'train').mkdir(parents=True, exist_ok=True)
    (data / 'val').mkdir(exist_ok=True)
    p = imagenet_sh('--dry-run', **{'IMAGENETPATH': str(data), 'LOGS': str(tmp_path / 'logs'), **env})
    assert p.returncode == 0 and p.stderr == '', p.stderr
    return p.stdout.splitlines()


def make_imagenet(root):
    """5 classes (top-5 needs 5), 2 train and 1 val JPEG each, at an ImageNet-like 500x375."""
    return make_image_folder(root, classes=5, train=2, val=1, size=(500, 375))


def test_help_prints_the_header_only():
    p = imagenet_sh('--help')
    assert p.returncode == 0 and p.stderr == ''
    lines = p.stdout.splitlines()
    assert all(line.startswith('#') for line in lines)
    for name in ('IMAGENETPATH', 'LOGS', 'EPOCHS', 'EPOCH_STEP', 'BATCH', 'NTHREAD', 'BETA [2e+3]',
                 'TEACHER_WEIGHTS', 'LAUNCH', 'EXTRA', '--dry-run'):
        assert name in p.stdout, name
    assert imagenet_sh('-h').stdout == p.stdout


def test_dry_run_lists_every_step(tmp_path):
    lines = dry_run(tmp_path)
    logs, data = tmp_path / 'logs', tmp_path / 'data'
    export = logs / 'resnet-34-export.pth'
    assert len(lines) == 7, lines  # export, its evaluation, 2 runs, 2 evaluations, the table
    assert lines[0].startswith(f'{PY} scripts/convert_teacher.py torchvision:resnet34 ') and lines[0].endswith(f' {export}')
    assert lines[1].startswith(f'{PY} imagenet.py --imagenetpath {data} --evaluate {export} --batch_size 256')
    train = "--epochs 100 --epoch_step '[30,60,90]' --batch_size 256"  # NTHREAD unset: imagenet.py's default
    assert lines[2] == f'{PY} imagenet.py --imagenetpath {data} --depth 18 --width 1 {train} --save {logs / "r18"}'
    assert lines[3] == (f'{PY} imagenet.py --imagenetpath {data} --depth 18 --width 1 --teacher_params {export} '
                        f'--beta 2e+3 {train} --save {logs / "at_r18_r34"}')
    for line, run in zip(lines[4:6], ('r18', 'at_r18_r34')):
        assert line.startswith(f'{PY} imagenet.py --imagenetpath {data} --depth 18 --width 1 '
                               f'--evaluate --resume {logs / run / "model.pt7"} ')
        assert f'tee {logs / run / "eval.txt"}' in line
    assert lines[6].startswith(f'{PY} - {logs / "imagenet_table.md"} ')
    assert not logs.exists()  # a dry run writes nothing
    # a local state_dict, offline; BETA and the rest from the environment
    (tmp_path / 'tv.pth').write_bytes(b'x')
    lines = dry_run(tmp_path, TEACHER_WEIGHTS=str(tmp_path / 'tv.pth'), BETA='1e+3', BATCH='64', NTHREAD='0',
                    EXTRA='--no_progress --dtype half')
    assert f'torchvision:resnet34:{tmp_path / "tv.pth"} ' in lines[0]
    assert '--beta 1e+3 ' in lines[3] and all('--batch_size 64 --nthread 0' in line for line in lines[1:6])
    assert all('--no_progress --dtype half' in line for line in lines[1:6]) and 'dtype' not in lines[0]


@pytest.mark.parametrize('launch', ['single', 'torchrun:2', 'ngpu:2'])
def test_dry_run_launch_variants(tmp_path, launch):
    lines = dry_run(tmp_path, LAUNCH=launch)
    trains, evals = lines[2:4], [lines[1], *lines[4:6]]
    start = {'single': f'{PY} imagenet.py --imagenetpath ',
             'torchrun:2': f'{PY} -m torch.distributed.run --standalone --nproc_per_node 2 imagenet.py --imagenetpath ',
             'ngpu:2': f'{PY} imagenet.py --imagenetpath '}[launch]
    assert all(line.startswith(start) for line in trains), trains
    assert all(('--ngpu 2 --gpu_id 0,1 ' in line) == (launch == 'ngpu:2') for line in trains)
    # evaluations run as one process, on one device
    assert all(line.startswith(f'{PY} imagenet.py ') and '--evaluate' in line and '--ngpu' not in line
               for line in evals)


def test_dry_run_short_schedules(tmp_path):
    def steps(**env):
        trains = dry_run(tmp_path, **env)[2:4]
        found = {re.search(r"--epochs (\d+) --epoch_step '(\[[\d,]*\])'", line).groups() for line in trains}
        assert len(found) == 1
        return found.pop()
    assert steps(EPOCHS='2') == ('2', '[2,3,4]')  # epoch 1 at the full lr; each listed epoch a drop
    assert steps(EPOCHS='10') == ('10', '[3,6,9]')
    assert steps(EPOCHS='1') == ('1', '[2,3,4]')
    assert steps(EPOCHS='120') == ('120', '[36,72,108]')
    assert steps(EPOCHS='10', EPOCH_STEP='[5]') == ('10', '[5]')


def test_dry_run_skips_done_steps_and_resumes_unfinished_runs(tmp_path):
    logs = tmp_path / 'logs'
    r18, at = logs / 'r18', logs / 'at_r18_r34'
    r18.mkdir(parents=True)
    at.mkdir()
    (logs / 'resnet-34-export.pth').write_bytes(b'x')
    (logs / 'resnet-34-export.eval.txt').write_text('t: top-1 error 70.00%, top-5 error 50.00% on 5 images\n')
    (r18 / 'log.txt').write_text(''.join(f'json_stats: {{"epoch": {e}, "epochs": 2, "epoch_step": "[2,3,4]"}}\n'
                                         for e in (1, 2)))
    (at / 'log.txt').write_text('json_stats: {"epoch": 1, "epochs": 2, "epoch_step": "[2,3,4]"}\n')
    for run in (r18, at):
        (run / 'model.pt7').write_bytes(b'x')
        (run / 'eval.txt').write_text('m: top-1 error 70.00%, top-5 error 50.00% on 5 images\n')
    os.utime(r18 / 'eval.txt', (1, 1))  # older than its model.pt7: evaluated again
    lines = dry_run(tmp_path, EPOCHS='2')
    assert lines[0] == f'# skip: {logs / "resnet-34-export.pth"} exists'
    assert lines[1].startswith(f'# skip: {logs / "resnet-34-export.eval.txt"} is done: t: top-1 error 70.00%')
    assert lines[2] == f'# skip: {r18} is done (2 of 2 epochs logged)'
    assert lines[3].endswith(f'--save {at} --resume auto') and '--teacher_params' in lines[3]
    assert lines[4].startswith(f'{PY} imagenet.py') and f'--resume {r18 / "model.pt7"}' in lines[4]
    assert lines[5].startswith(f'# skip: {at / "eval.txt"} is done')  # (a real run evaluates it again after training)
    assert len(lines) == 7
    # a finished run asked for another schedule is reported, not resumed from its decayed lr
    p = imagenet_sh('--dry-run', IMAGENETPATH=str(tmp_path / 'data'), LOGS=str(logs), EPOCHS='3')
    assert p.returncode == 0 and f'--save {r18}' not in p.stdout
    assert f'imagenet.sh: {r18} finished under another schedule (epochs 2, epoch_step [2,3,4])' in p.stderr


def table_rows(text):
    rows = [[c.strip() for c in line.strip('|').split('|')] for line in text.splitlines() if line.startswith('| ResNet')]
    assert [r[0] for r in rows] == ['ResNet-34 teacher', 'ResNet-18', 'ResNet-18 + AT (beta 2e+3)'], text
    return {r[0].split(' (')[0]: r[1:] for r in rows}


def logged(run):
    return [json.loads(line[len('json_stats: '):]) for line in (run / 'log.txt').read_text().splitlines()]


def error_of(eval_txt):
    found = re.findall(r'top-1 error ([\d.]+)%, top-5 error ([\d.]+)% on (\d+) images', eval_txt.read_text())
    assert len(found) == 1, eval_txt.read_text()
    return found[0]


@pytest.mark.slow
def test_end_to_end_skip_and_resume(tmp_path):
    """5 classes of 500x375 JPEGs (2 train, 1 val each) and a random torchvision ResNet-34 as TEACHER_WEIGHTS."""
    make_imagenet(tmp_path / 'data')
    torch.save(random_torchvision('resnet34', num_classes=5).state_dict(), tmp_path / 'resnet34.pth')
    logs = tmp_path / 'logs'
    r18, at = logs / 'r18', logs / 'at_r18_r34'
    # relative paths are the caller's
    env = dict(IMAGENETPATH='data', TEACHER_WEIGHTS='resnet34.pth', LOGS='logs', EPOCHS='1', BATCH='5',
               NTHREAD='0', EXTRA='--no_progress')

    def check(p):
        assert p.returncode == 0, f'{p.stdout}\n{p.stderr}'
        assert 'Traceback' not in p.stderr
        return p.stdout

    out = check(imagenet_sh(cwd=tmp_path, **env))
    assert (logs / 'resnet-34-export.pth').is_file() and not list(logs.rglob('*.part*'))
    assert [len(logged(run)) for run in (r18, at)] == [1, 1]
    assert logged(at)[0]['beta'] == 2000 and logged(r18)[0]['beta'] == 0
    assert error_of(logs / 'resnet-34-export.eval.txt')[2] == '5'
    table = (logs / 'imagenet_table.md').read_text()
    assert table in out  # printed too
    rows = table_rows(table)
    assert rows['ResNet-34 teacher'][2] == '26.1' and rows['ResNet-34 teacher'][4] == '8.3'
    assert rows['ResNet-18'][2:5:2] == ['30.4', '10.8'] and rows['ResNet-18 + AT'][2:5:2] == ['29.3', '10.0']
    for name, run in (('ResNet-18', r18), ('ResNet-18 + AT', at)):
        top1, top5 = logged(run)[-1]['test_acc']
        assert rows[name][0] == '1/1'
        # the table holds the evaluation of model.pt7, which is the run's last logged epoch
        assert (rows[name][1], rows[name][3]) == tuple(f'{100 - a:.2f}' for a in (top1, top5)) == error_of(run / 'eval.txt')[:2]
    assert tuple(rows['ResNet-34 teacher'][1:4:2]) == error_of(logs / 'resnet-34-export.eval.txt')[:2]
    for cells in rows.values():
        assert all(re.fullmatch(r'\d+\.\d\d', c) for c in cells[1:5:2])

    # the same command again: every step is done
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in logs.rglob('*') if p.is_file() and p.suffix != '.md'}
    out = check(imagenet_sh(cwd=tmp_path, **env))
    skipped = [line for line in out.splitlines() if line.startswith('# skip: ')]
    assert len(skipped) == 6, out
    assert not any(line.startswith(PY) and 'imagenet.py' in line for line in out.splitlines()), out
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in before} == before
    assert table_rows((logs / 'imagenet_table.md').read_text()) == rows

    # a longer schedule: finished runs are reported, not resumed under it (they ended at another lr)
    p = imagenet_sh(cwd=tmp_path, **{**env, 'EPOCHS': '2'})
    assert p.returncode == 0 and 'Traceback' not in p.stderr, p.stderr
    assert not any('--save' in line for line in p.stdout.splitlines()), p.stdout
    reported = p.stderr.splitlines()
    assert len(reported) == 2 and all('finished under another schedule (epochs 1,' in line and
                                      'not this one (epochs 2,' in line for line in reported), reported
    assert f'{r18} ' in reported[0] and f'{at} ' in reported[1]
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in before} == before


@pytest.mark.slow  # table1.sh's test, run every day, is the same behaviour
def test_an_interrupted_run_stops_the_script_with_its_status(tmp_path):
    """SIGTERM at the first training run's 1st step: imagenet.py exits 143, and the script stops there
    with that status, says how to go on, and starts neither the AT run nor the evaluations."""
    make_imagenet(tmp_path / 'data')
    torch.save(random_torchvision('resnet34', num_classes=5).state_dict(), tmp_path / 'resnet34.pth')
    p = imagenet_sh(cwd=tmp_path, IMAGENETPATH='data', TEACHER_WEIGHTS='resnet34.pth', LOGS='logs', EPOCHS='1',
                    BATCH='5', NTHREAD='0', EXTRA='--no_progress', AT_TEST_SIGNALS='1:TERM')
    assert p.returncode == 143, p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith('imagenet.sh: interrupted (exit 143); run the same command again')
    assert 'at_r18_r34' not in p.stdout and not (tmp_path / 'logs' / 'r18' / 'eval.txt').exists()
    assert 'Traceback' not in p.stderr
