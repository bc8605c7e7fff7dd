"""scripts/benchmark.py runs its configurations side by side and prints one table row each."""
import os
import re
import subprocess
import sys

from conftest import ROOT


def test_benchmark_prints_a_row_per_config(tiny_data):
    p = subprocess.run([sys.executable, str(ROOT / 'scripts' / 'benchmark.py'), '--dataroot', str(tiny_data),
                        '--configs', 'faithful,fast,fast-stepsync', '--depth', '10', '--teacher', '10,2',
                        '--batch_size', '8', '--steps', '2', '--warmup', '1', '--repeats', '2', '--nthread', '0'],
                       capture_output=True, text=True, timeout=300, env={**os.environ, 'CUDA_VISIBLE_DEVICES': ''})
    assert p.returncode == 0, p.stderr
    rows = {m.group(1): m for m in re.finditer(r'^\| (\S+) \| ([\d.]+) \| ([\d.]+)x \| ([\d.]+) \| ([\d.]+)x \|$',
                                               p.stdout, re.M)}
    assert list(rows) == ['faithful', 'fast', 'fast-stepsync'], p.stdout
    assert rows['faithful'].group(3) == '1.00' and all(float(r.group(2)) > 0 for r in rows.values())
    assert p.stdout.count('# repeat') == 6 and 'WRN-10-1 student, WRN-10-2 teacher, AT, batch 8' in p.stdout


def test_benchmark_bad_options_are_one_line(tiny_data):
    for args, expected in ((['--teacher', '16'], "--teacher must be DEPTH,WIDTH"),
                           (['--teacher', '11,2'], "--teacher must be DEPTH,WIDTH"),
                           (['--steps', '0'], '--steps must be positive'),
                           (['--warmup', '-1'], '--warmup must not be negative'),
                           (['--steps', 'many'], "invalid int value: 'many'")):
        p = subprocess.run([sys.executable, str(ROOT / 'scripts' / 'benchmark.py'), '--dataroot', str(tiny_data),
                            *args], capture_output=True, text=True)
        lines = p.stderr.strip().splitlines()
        assert p.returncode != 0 and len(lines) == 1 and lines[0].startswith('benchmark.py: error: '), p.stderr
        assert expected in lines[0]


def test_benchmark_refuses_an_unknown_config(tiny_data):
    p = subprocess.run([sys.executable, str(ROOT / 'scripts' / 'benchmark.py'), '--dataroot', str(tiny_data),
                        '--configs', 'fast,warp'], capture_output=True, text=True)
    assert p.returncode != 0 and p.stderr.strip().splitlines() == [
        "benchmark.py: error: unknown config 'warp'; choose from " + ', '.join(
            ['faithful', 'fast', 'fast-bf16', 'fast-half', 'fast-compile', 'fast-nocl', 'fast-grad', 'fast-stepsync'])]
