"""scripts/table1.sh lists and resumes every Table 1 cell; scripts/summarize.py rebuilds the table."""
import json
import os
import subprocess
import sys

import pytest

from conftest import OFFLINE_ENV, ROOT


def table1(tmp_path, **env):
    p = subprocess.run(['bash', str(ROOT / 'scripts' / 'table1.sh'), '--dry-run'], capture_output=True, text=True,
                       env={**os.environ, 'LOGS': str(tmp_path / 'logs'), **env})
    assert p.returncode == 0, p.stderr
    return p.stdout.splitlines()


def saves(lines):
    return [line.split('--save ')[1].split()[0].rsplit('/', 1)[1] for line in lines if '--save' in line]


def test_dry_run_lists_every_cell(tmp_path):
    names = saves(table1(tmp_path))
    teachers = ['nin_wide_teacher', 'resnet_16_2_teacher', 'resnet_40_1_teacher', 'resnet_40_2_teacher']
    baselines = ['nin_thin', 'resnet_16_1', 'resnet_16_2']
    transfer = [f'{m}_{p}' for p in ('nin_thin_nin_wide', '16_1_16_2', '16_1_40_1', '16_2_40_2')
                for m in ('at', 'factt', 'kd', 'atkd')]
    assert names == teachers + baselines + transfer  # teachers first: students name them
    assert len(transfer) == 16


def test_seeds_short_schedule_and_rows(tmp_path):
    lines = table1(tmp_path, SEEDS='0 1 2', EPOCHS='10', ROWS='16_1_16_2', METHODS='student at')
    assert saves(lines) == ['resnet_16_2_teacher', 'resnet_16_1', 'at_16_1_16_2', 'resnet_16_1_s1',
                            'at_16_1_16_2_s1', 'resnet_16_1_s2', 'at_16_1_16_2_s2']
    assert all("--epochs 10 --epoch_step '[3,6,8]'" in line for line in lines)
    # outside logs/ the student is handed the teacher's folder: cifar.py looks for bare names under logs/
    # epoch 1 at the full lr, and each listed epoch a drop of its own
    assert "--epochs 2 --epoch_step '[2,3,4]'" in table1(tmp_path, EPOCHS='2', ROWS='16_1_16_2')[0]
    assert '--seed 2' in lines[-1] and f"--teacher_id {tmp_path / 'logs' / 'resnet_16_2_teacher'} --beta 1e+3" in lines[-1]
    default = subprocess.run(['bash', str(ROOT / 'scripts' / 'table1.sh'), '--dry-run'], capture_output=True, text=True,
                             env={**os.environ, 'ROWS': '16_1_16_2', 'METHODS': 'at', 'LOGS': 'logs'}).stdout
    assert '--save logs/at_16_1_16_2 --depth 16 --width 1 --teacher_id resnet_16_2_teacher --beta 1e+3' in default


def test_skips_finished_and_resumes_unfinished(tmp_path):
    done, half = tmp_path / 'logs' / 'resnet_16_2_teacher', tmp_path / 'logs' / 'resnet_16_1'
    done.mkdir(parents=True)
    half.mkdir(parents=True)
    (done / 'log.txt').write_text(log(1, 2) + log(2, 2))
    (half / 'log.txt').write_text(log(1, 2))
    (half / 'model.pt7').write_bytes(b'x')
    lines = table1(tmp_path, EPOCHS='2', ROWS='16_1_16_2', METHODS='student')
    assert lines[0] == f'# done: {done}'
    assert '--resume auto' in lines[1] and 'resnet_16_1' in lines[1]


def log(epoch, epochs, epoch_step='[2,3,4]'):
    return 'json_stats: ' + json.dumps(dict(epoch=epoch, epochs=epochs, epoch_step=epoch_step)) + '\n'


def test_a_finished_run_asked_for_another_schedule_is_reported_not_resumed(tmp_path):
    """Raising EPOCHS scales EPOCH_STEP: the finished 2-epoch teacher is not resumed from its decayed lr."""
    done = tmp_path / 'logs' / 'resnet_16_2_teacher'
    done.mkdir(parents=True)
    (done / 'log.txt').write_text(log(1, 2) + log(2, 2))
    (done / 'model.pt7').write_bytes(b'x')
    p = subprocess.run(['bash', str(ROOT / 'scripts' / 'table1.sh'), '--dry-run'], capture_output=True, text=True,
                       env={**os.environ, 'LOGS': str(tmp_path / 'logs'), 'EPOCHS': '3', 'ROWS': '16_1_16_2',
                            'METHODS': 'student'})
    assert p.returncode == 0 and f'--save {done}' not in p.stdout
    assert p.stderr == (f'table1.sh: {done} finished under another schedule (epochs 2, epoch_step [2,3,4]), not this '
                        f'one (epochs 3, epoch_step [2,3,4]): not resumed; move it away to train it again\n')
    assert '# done' not in p.stdout and len(p.stdout.splitlines()) == 1  # the student alone


def fake_run(logs, name, errors, epochs=2):
    folder = logs / name
    folder.mkdir(parents=True)
    lines = [json.dumps({'epoch': e + 1, 'epochs': epochs, 'test_acc': 100 - err}) for e, err in enumerate(errors)]
    (folder / 'log.txt').write_text(''.join(f'json_stats: {line}\n' for line in lines))


def test_summarize_medians_missing_cells_and_plots(tmp_path):
    logs = tmp_path / 'logs'
    fake_run(logs, 'resnet_16_2_teacher', [5.5, 6.0])  # its best epoch is not its last
    for i, err in enumerate([8.0, 7.0, 9.5]):
        fake_run(logs, 'at_16_1_16_2' + (f'_s{i}' if i else ''), [12, err])
    fake_run(logs, 'kd_16_1_16_2', [12])  # unfinished (1 of 2 epochs): not counted
    p = subprocess.run([sys.executable, str(ROOT / 'scripts' / 'summarize.py'), logs, '--out', tmp_path / 'out' / 't1'],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    rows = json.loads((tmp_path / 'out' / 't1.json').read_text())
    cell = {(r['pair'], r['method']): r for r in rows}
    at = cell['16_1_16_2', 'at']
    assert at['ours'] == pytest.approx(8.0) and at['seeds'] == 3 and at['diff'] == pytest.approx(8.0 - 7.93)
    assert at['spread'] == [7.0, 9.5]
    assert cell['16_1_16_2', 'teacher']['ours'] == pytest.approx(6.0) == cell['16_1_16_2', 'teacher']['last']['median']
    assert cell['16_1_16_2', 'teacher']['best'] == {'median': 5.5, 'mean': 5.5, 'std': None}
    assert at['last']['mean'] == pytest.approx(24.5 / 3) and at['last']['std'] == pytest.approx((19 / 12) ** 0.5)
    assert cell['16_1_16_2', 'kd']['ours'] is None and cell['16_1_16_2', 'kd']['seeds'] == 0
    assert cell['16_2_40_2', 'teacher']['paper'] == 5.23
    md = (tmp_path / 'out' / 't1.md').read_text()
    assert '| WRN-16-1, 0.2M | WRN-16-2, 0.7M | AT | 7.93 | 8.00 | 8.17 ± 1.26 | 8.00 | 8.17 ± 1.26 | 3 |' in md
    assert '| WRN-16-1, 0.2M | WRN-16-2, 0.7M | teacher | 6.31 | 6.00 | 6.00 ± — | 5.50 | 5.50 ± — | 1 |' in md
    assert '| WRN-16-1, 0.2M | WRN-16-2, 0.7M | KD | 7.41 | — | — | — | — | 0 |' in md
    assert 'grad-AT' not in md  # not a Table 1 column: shown only where such runs exist
    assert (tmp_path / 'out' / 't1.csv').read_text().count('\n') == 1 + 4 * 7
    assert (tmp_path / 'out' / 'curves_16_1_16_2.png').stat().st_size > 1000
    assert not (tmp_path / 'out' / 'curves_16_2_40_2.png').exists()


def test_summarize_at_an_epoch_with_grad_at_column(tmp_path):
    """--epoch 1 compares a 2-epoch baseline with 1-epoch grad-AT runs at their common epoch."""
    logs = tmp_path / 'logs'
    for i, (base, grad) in enumerate([((40, 30), 35), ((50, 31), 41), ((45, 29), 38)]):
        suffix = f'_s{i}' if i else ''
        fake_run(logs, 'resnet_16_1' + suffix, base)
        fake_run(logs, 'gradat_16_1_16_2' + suffix, [grad], epochs=1)
    fake_run(logs, 'at_16_1_16_2', [44])  # stopped after epoch 1 of 2: counts at --epoch 1 only

    def summarize(*extra):
        p = subprocess.run([sys.executable, str(ROOT / 'scripts' / 'summarize.py'), logs, '--out', tmp_path / 't',
                            *extra], capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
        return {(r['pair'], r['method']): r for r in json.loads((tmp_path / 't.json').read_text())}, \
            (tmp_path / 't.md').read_text()

    cell, md = summarize('--epoch', '1')
    assert cell['16_1_16_2', 'student']['ours'] == pytest.approx(45) and cell['16_1_16_2', 'student']['seeds'] == 3
    assert cell['16_1_16_2', 'gradat']['ours'] == pytest.approx(38) and cell['16_1_16_2', 'gradat']['paper'] is None
    assert cell['16_1_16_2', 'at']['ours'] == pytest.approx(44)
    assert '| WRN-16-1, 0.2M | WRN-16-2, 0.7M | grad-AT | n/a | 38.00 | 38.00 ± 3.00 | 38.00 | 38.00 ± 3.00 | 3 |' in md
    assert md.count('| WRN-16-1, 0.2M | WRN-16-2') == 7 and 'NIN' in md  # grad-AT rows: shown where runs exist
    cell, md = summarize('--rows', '16_1_16_2 nin')
    firsts = [line.split(' | ')[0] for line in md.splitlines()[2:] if line.startswith('| ')]
    assert list(dict.fromkeys(firsts)) == ['| WRN-16-1, 0.2M', '| NIN-thin, 0.2M']
    cell, md = summarize()  # final epochs: the baseline at epoch 2; the unfinished AT run is missing
    assert cell['16_1_16_2', 'student']['ours'] == pytest.approx(30)
    assert cell['16_1_16_2', 'at']['ours'] is None
    p = subprocess.run([sys.executable, str(ROOT / 'scripts' / 'summarize.py'), logs, '--epoch', '0'],
                       capture_output=True, text=True)
    assert p.returncode != 0 and p.stderr.count('\n') == 1 and 'Traceback' not in p.stderr


def test_gradient_at_is_opt_in(tmp_path):
    assert not any('gradat' in line for line in table1(tmp_path))
    lines = table1(tmp_path, ROWS='16_1_16_2', METHODS='gradat', GRAD_BETA='50')
    assert saves(lines) == ['resnet_16_2_teacher', 'gradat_16_1_16_2'] and lines[-1].endswith('--grad_beta 50')


def test_summarize_bad_input_is_one_line(tmp_path):
    (tmp_path / 'logs').mkdir()
    for args, expected in ((['--rows', ''], '--rows names no row'), (['--rows', 'wrn'], "unknown row 'wrn'"),
                           (['--epoch', '0'], '--epoch must be 1 or more'), (['--epoch', 'x'], 'invalid int')):
        p = subprocess.run([sys.executable, str(ROOT / 'scripts' / 'summarize.py'), tmp_path / 'logs', *args],
                           capture_output=True, text=True, cwd=tmp_path)
        lines = p.stderr.strip().splitlines()
        assert p.returncode != 0 and len(lines) == 1 and lines[0].startswith('summarize.py: error: '), p.stderr
        assert expected in lines[0]


def test_an_interrupted_run_stops_the_script_with_its_status(tiny_data, tmp_path):
    """SIGINT lands in the first run (the teacher, at its 2nd step): cifar.py exits 130, and table1.sh
    stops there with that status and says how to go on, instead of going on to the students."""
    p = subprocess.run(['bash', str(ROOT / 'scripts' / 'table1.sh')], capture_output=True, text=True, timeout=300,
                       env={**OFFLINE_ENV, 'LOGS': str(tmp_path / 'logs'), 'PYTHON': sys.executable, 'EPOCHS': '1',
                            'ROWS': '16_1_16_2', 'METHODS': 'student', 'DATAROOT': str(tiny_data),
                            'EXTRA': '--no_progress --batch_size 16 --nthread 0', 'AT_TEST_SIGNALS': '2:INT'})
    assert p.returncode == 130, p.stderr
    commands = [line for line in p.stdout.splitlines() if ' cifar.py ' in line and '--save' in line]
    assert len(commands) == 1 and 'resnet_16_2_teacher' in commands[0]  # no student started
    assert p.stderr.strip().splitlines()[-1] == (
        f'table1.sh: interrupted in {tmp_path}/logs/resnet_16_2_teacher (exit 130); run the same command again '
        f'to resume: finished runs are skipped, {tmp_path}/logs/resnet_16_2_teacher continues')
    assert 'Traceback' not in p.stderr and not (tmp_path / 'logs' / 'resnet_16_1').exists()
