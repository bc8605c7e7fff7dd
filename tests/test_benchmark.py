"""scripts/benchmark.py runs its configurations side by side and prints one table row each."""
import json
import os
import re
import subprocess
import sys

import pytest

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
    base = rows['faithful']
    for r in rows.values():  # each ratio is the config's median img/s over the baseline's, train and eval
        assert float(r.group(2)) > 0 and float(r.group(4)) > 0
        assert abs(float(r.group(3)) - float(r.group(2)) / float(base.group(2))) <= 0.006 + 0.01 * float(r.group(3))
        assert abs(float(r.group(5)) - float(r.group(4)) / float(base.group(4))) <= 0.006 + 0.01 * float(r.group(5))
    assert p.stdout.count('# repeat') == 6 and 'WRN-10-1 student, WRN-10-2 teacher, AT, batch 8' in p.stdout


@pytest.mark.slow
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
            ['faithful', 'fast', 'fast-bf16', 'fast-half', 'fast-compile', 'fast-nocl', 'fast-grad', 'fast-stepsync',
             'fast-cl', 'fast-nobench', 'nn-loop'])]


@pytest.mark.slow
def test_benchmark_measures_both_memory_formats_and_cudnn_benchmark_off(tiny_data, tmp_path):
    """fast-cl and fast-nocl are both measured whatever the device's default; fast-nobench runs in a
    process of its own (cuDNN's kernel choice is per process); --json holds the figures."""
    out = tmp_path / 'bench.json'
    p = subprocess.run([sys.executable, str(ROOT / 'scripts' / 'benchmark.py'), '--dataroot', str(tiny_data),
                        '--configs', 'fast-cl,fast-nocl,fast-nobench', '--depth', '10', '--teacher', '10,2',
                        '--batch_size', '8', '--steps', '1', '--warmup', '1', '--repeats', '2', '--json', str(out)],
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, 'CUDA_VISIBLE_DEVICES': '', 'OMP_NUM_THREADS': '1'})
    assert p.returncode == 0, p.stderr
    rows = re.findall(r'^\| (\S+) \| [\d.]+ \| ([\d.]+)x \|', p.stdout, re.M)
    assert [r[0] for r in rows] == ['fast-cl', 'fast-nocl', 'fast-nobench'], p.stdout
    assert '# fast-nobench: measured by its own process' in p.stdout and p.stdout.count('# repeat') == 6
    assert '(decoded data shared)' in p.stdout  # fast-nocl reuses fast-cl's decoded images
    report = json.loads(out.read_text())
    assert list(report['configs']) == ['fast-cl', 'fast-nocl', 'fast-nobench'] and report['device'] == 'cpu'
    for f in report['configs'].values():
        assert len(f['train_img_s']) == 2 and f['train_median'] > 0 and f['peak_mib'] is None  # no GPU: RSS instead
    assert 'process peak RSS' in p.stdout


def test_benchmark_counts_each_configs_own_resident_bytes():
    """A config's peak adds its own dataset and weights on the device, each storage once."""
    import torch
    from types import SimpleNamespace

    sys.path.insert(0, str(ROOT / 'scripts'))
    import benchmark
    images, labels = torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.zeros(4, dtype=torch.long)
    net = torch.nn.Linear(2, 2)  # 6 float32 numbers
    run = SimpleNamespace(train_loader=SimpleNamespace(images=images, labels=labels),
                          test_loader=SimpleNamespace(images=images[:2], labels=labels),  # views: counted once
                          distiller=net)
    assert benchmark.resident_bytes(run, 'cpu') == 4 * 3 * 8 * 8 + 4 * 8 + 6 * 4
    assert benchmark.resident_bytes(run) == 0  # nothing of it on a GPU


def test_benchmark_nn_loop_beside_the_functional_path(tmp_path):
    """The CIFAR-100 pair resnet32x4 -> resnet8x4, as torch.nn modules in a plain loop and through cifar.py,
    side by side in one run (tiny images, one step: this checks the wiring, not the speed)."""
    from conftest import make_class_folders
    data = make_class_folders(tmp_path / 'c100', classes=4, train_per_class=2, test_per_class=2)
    out = tmp_path / 'bench.json'
    p = subprocess.run([sys.executable, str(ROOT / 'scripts' / 'benchmark.py'), '--dataroot', str(data),
                        '--configs', 'nn-loop,fast', '--model', 'resnet8x4', '--teacher', 'resnet32x4', '--batch_size', '4',
                        '--steps', '1', '--warmup', '0', '--repeats', '1', '--nthread', '0', '--json', str(out)],
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, 'CUDA_VISIBLE_DEVICES': '', 'OMP_NUM_THREADS': '1'})
    assert p.returncode == 0, p.stderr
    rows = re.findall(r'^\| (\S+) \| [\d.]+ \| ([\d.]+)x \|', p.stdout, re.M)
    assert rows[0] == ('nn-loop', '1.00') and [r[0] for r in rows] == ['nn-loop', 'fast'], p.stdout
    assert 'resnet8x4 student, resnet32x4 teacher, AT, batch 4' in p.stdout
    report = json.loads(out.read_text())
    assert (report['student'], report['teacher']) == ('resnet8x4', 'resnet32x4')


def test_benchmark_pipeline_mode_times_the_2017_and_new_pipelines(tmp_path):
    """--pipeline imagenet: a row per worker count and pipeline, the 2017 one the base of each count,
    the pixel differences of the torchvision decoder and the CPU flags (one tiny repeat: the wiring)."""
    out = tmp_path / 'pipe.json'
    p = subprocess.run([sys.executable, str(ROOT / 'scripts' / 'benchmark.py'), '--pipeline', 'imagenet', '--images', '4',
                        '--batch_size', '2', '--steps', '1', '--warmup', '0', '--repeats', '1', '--json', str(out)],
                       capture_output=True, text=True, timeout=300, env={**os.environ, 'CUDA_VISIBLE_DEVICES': ''})
    assert p.returncode == 0, p.stderr
    rows = re.findall(r'^\| (\d+) \| (\S+) \| ([\d.]+) \| ([\d.]+)x \| ([\d.]+) \|$', p.stdout, re.M)
    counts = sorted({1, min(2, len(os.sched_getaffinity(0))), len(os.sched_getaffinity(0))})
    assert [(int(w), n) for w, n, *_ in rows] == [(w, n) for w in counts for n in ('2017', 'pil', 'torchvision')]
    assert all(r[3] == '1.00' for r in rows if r[1] == '2017') and all(float(r[2]) > 0 for r in rows)
    assert re.search(r'torchvision train max [01], mean 0\.\d+, val max [01], mean 0\.\d+', p.stdout)
    assert ', flags ' in p.stdout
    report = json.loads(out.read_text())
    assert report['pixel_difference']['torchvision']['train']['max'] <= 1
    assert len(report['pipelines']) == 3 * len(counts)


def test_benchmark_needs_dataroot_or_pipeline():
    p = subprocess.run([sys.executable, str(ROOT / 'scripts' / 'benchmark.py')], capture_output=True, text=True)
    assert p.returncode != 0 and p.stderr.strip().splitlines() == [
        'benchmark.py: error: pass --dataroot DIR (CIFAR data), or --pipeline imagenet']
