"""scripts/gpu_check.sh: the CPU rehearsal of the GPU check writes every check, in order, into one JSON;
failures are recorded and the run goes on; scripts/make_wheelhouse.sh builds what the GPU machine lacks."""
import json
import os
import subprocess
import sys
import time

import pytest

from conftest import OFFLINE_ENV, ROOT

CHECKS = ['a_cuda_vs_cpu', 'd_resume', 'e_imagenet', 'f_nvjpeg_half', 'b_at_epoch', 'c_benchmark']  # correctness first
TOP_KEYS = {'mode', 'started_utc', 'budget_s', 'caps_s', 'margin_s', 'order', 'dataroot', 'compile_backend', 'setup',
            'environment', 'decode', *CHECKS, 'seconds', 'failed', 'inconclusive', 'status'}
BENCH = ['fast', 'fast-cl', 'fast-nocl', 'fast-half', 'fast-bf16', 'fast-nobench']


def log_order(text):
    return [c for line in text.splitlines() for c in CHECKS if line.startswith(f'== {c} (')]


def pip_reaches_index(tmp_path):
    """Whether pip, as configured here, can fetch torchnet's sdist (the wheelhouse needs an index)."""
    try:
        p = subprocess.run([sys.executable, '-m', 'pip', 'download', '-q', '--no-deps', '--no-build-isolation',
                            'torchnet==0.0.4', '-d', str(tmp_path / 'probe')], capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return False, 'timed out'
    return p.returncode == 0, (p.stderr.strip().splitlines() or [''])[-1]


@pytest.fixture(scope='module')
def wheelhouse(tmp_path_factory):
    """scripts/make_wheelhouse.sh's wheelhouse, built once (pip's own configuration: the sdists come from
    the package index); None where no index is reachable."""
    tmp = tmp_path_factory.mktemp('wheelhouse')
    ok, why = pip_reaches_index(tmp)
    if not ok:
        return None, why
    wheels = tmp / 'wheels'
    p = subprocess.run(['bash', str(ROOT / 'scripts' / 'make_wheelhouse.sh'), '--wheelhouse', str(wheels), '--no-data'],
                       env={**os.environ, 'PYTHON': sys.executable}, capture_output=True, text=True, timeout=600)
    return (wheels, p), ''


@pytest.mark.slow
def test_rehearsal_runs_every_check_in_order(tmp_path, wheelhouse):
    """The whole check on the CPU, installing a wheelhouse built here as the device does (where pip
    reaches an index to build one)."""
    out = tmp_path / 'out'
    built = wheelhouse[0] and wheelhouse[0][1].returncode == 0
    install = ['--install', '--wheelhouse', str(wheelhouse[0][0])] if built else []
    t = time.perf_counter()
    p = subprocess.run(['bash', str(ROOT / 'scripts' / 'gpu_check.sh'), '--rehearse', *install], cwd=tmp_path,
                       env={**OFFLINE_ENV, 'OUT': str(out), 'PYTHON': sys.executable},
                       capture_output=True, text=True, timeout=900)  # a loaded 2-core machine: up to about 7 min
    seconds = time.perf_counter() - t
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
    report = json.loads((out / 'gpu_check.json').read_text())
    assert set(report) == TOP_KEYS
    # f cannot provoke PR 9606's race without CUDA: inconclusive, not a pass, and so is the run
    assert report['mode'] == 'rehearsal' and report['failed'] == [] and report['inconclusive'] == ['f_nvjpeg_half']
    assert report['status'] == 'inconclusive' and report['order'] == CHECKS
    assert [report[c]['status'] for c in CHECKS] == ['ok', 'ok', 'ok', 'inconclusive', 'ok', 'ok'], {
        c: report[c].get('error') for c in CHECKS}
    starts = [report[c]['started_s'] for c in CHECKS]
    assert starts == sorted(starts) and len(set(starts)) == 6
    log = (out / 'gpu_check.log').read_text()
    assert log_order(log) == CHECKS
    assert sorted(os.listdir(out)) == ['gpu_check.json', 'gpu_check.log']  # nothing else comes back

    env = report['environment']
    assert env['torch'] and env['cuda_available'] is False and 'flags' in env['cpu'] and env['torch_floor'] == '2.4'
    assert report['setup']['install'] == ('ok' if built else 'skipped') and report['setup']['unpack'] == 'ok'
    if built:  # torchnet, visdom and hickle came from the installed wheelhouse, not this venv
        assert all(v.startswith('ok') and '/site/' in v for v in env['imports'].values()), env['imports']
    assert report['decode']['status'] == 'ok' and report['decode']['images'] == {'train': 160, 'test': 80}
    assert report['dataroot'].endswith('cifar10-jpg') and report['b_at_epoch']['runs']['fp32']['precision'] == 'fp32'
    a = report['a_cuda_vs_cpu']
    assert a['passed'] and {'logits', 'loss', 'at_loss_0', 'at_loss_1', 'at_loss_2', 'grads', 'grad_at_loss',
                            'grad_at_step_grads'} <= set(a['compare'])
    assert a['compare']['grad_at_loss']['value'] > 0
    b = report['b_at_epoch']['runs']
    assert list(b) == ['fp32', 'bf16_cl', 'bf16_cl_compile']
    for run in b.values():
        assert run['status'] == 'ok' and run['epoch'] == 1 and run['train_time'] > 0 and run['test_acc'] is not None
        assert len(run['at_losses']) == 3 and 'peak_allocated_mib' in run
    assert list(report['c_benchmark']['configs']) == BENCH
    d = report['d_resume']
    assert d['epochs_logged'] == [1, 2] and d['checkpoint_lr'] == pytest.approx(0.02)
    assert d['vs_uninterrupted']['max_param_diff'] == 0  # on the CPU a resumed run repeats the straight one
    e = report['e_imagenet']
    assert len(e['at_losses']) == 4 and e['hkl_equals_pth'] and e['epoch'] == 1 and len(e['test_acc']) == 2
    f = report['f_nvjpeg_half']  # on the CPU: decode_batch through libjpeg-turbo, and fp16 autocast
    assert f['epoch'] == 1 and f['views_vs_pil']['train']['max'] <= 1 and f['views_vs_pil']['val']['max'] <= 1
    assert f['decoded_vs_pil']['off'] == 0 and f['decoded_vs_pil']['worst'] < 2
    assert f['race']['verdict'] == 'untested' and f['error'] == f"PR 9606's race untested: {f['race']['why']}"
    print(f'rehearsal: {seconds:.0f}s')


@pytest.mark.slow
def test_a_failed_check_is_recorded_and_the_next_ones_run(tmp_path):
    """No data for a: it fails; d makes its own data and passes; the others are not selected. Exit 1."""
    out = tmp_path / 'out'
    p = subprocess.run([sys.executable, str(ROOT / 'scripts' / 'gpu_check.py'), 'run', '--rehearse',
                        '--out', str(out), '--dataroot', str(tmp_path / 'nothing'), '--only', 'a,d'],
                       cwd=tmp_path, env={**OFFLINE_ENV, 'OMP_NUM_THREADS': '1'},
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 1, p.stdout[-3000:] + p.stderr
    report = json.loads((out / 'gpu_check.json').read_text())
    assert set(report) == TOP_KEYS
    assert report['status'] == 'failed' and report['failed'] == ['a_cuda_vs_cpu']
    assert report['a_cuda_vs_cpu']['error']
    assert report['d_resume']['status'] == 'ok'
    for c in ('b_at_epoch', 'c_benchmark', 'e_imagenet', 'f_nvjpeg_half'):
        assert report[c]['status'] == 'skipped' and 'not selected' in report[c]['note']


def test_checks_are_skipped_when_the_budget_is_spent(tmp_path):
    out = tmp_path / 'out'
    p = subprocess.run([sys.executable, str(ROOT / 'scripts' / 'gpu_check.py'), 'run', '--rehearse',
                        '--out', str(out), '--dataroot', str(tmp_path), '--budget', '5', '--start', str(time.time() - 10)],
                       cwd=tmp_path, env=OFFLINE_ENV, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr  # skipped is not failed
    report = json.loads((out / 'gpu_check.json').read_text())
    assert [report[c]['status'] for c in CHECKS] == ['skipped'] * 6
    assert all('budget' in report[c]['note'] for c in CHECKS)


def test_bad_option_is_one_line(tmp_path):
    p = subprocess.run(['bash', str(ROOT / 'scripts' / 'gpu_check.sh'), '--fast'], capture_output=True, text=True,
                       env={**OFFLINE_ENV, 'OUT': str(tmp_path)})
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        'gpu_check.sh: error: unknown option --fast (see --help)']


@pytest.mark.slow
def test_make_wheelhouse_builds_what_the_device_lacks(wheelhouse):
    """Built in a venv of its own (whatever this Python's setuptools), then installed with no index
    into an empty folder and imported from there."""
    if not wheelhouse[0]:
        pytest.skip(f'pip cannot fetch torchnet 0.0.4 here, so no wheelhouse can be built: {wheelhouse[1]}')
    wheels, p = wheelhouse[0]
    assert p.returncode == 0, p.stdout + p.stderr
    assert 'from the wheelhouse alone: imported torchnet, visdom, hickle\n' in p.stdout
    names = sorted(f.split('-')[0].lower() for f in os.listdir(wheels))
    assert names == ['hickle', 'jsonpatch', 'jsonpointer', 'torchnet', 'tornado', 'visdom', 'websocket_client']
    assert all(f.endswith('-py3-none-any.whl') or ('abi3' in f and 'x86_64' in f) for f in os.listdir(wheels))
    assert 'every requirement is on the device or in' in p.stdout and 'of 64 MiB' in p.stdout


def run_schedule(tmp_path, monkeypatch, took, shell_s=0):
    """The driver's scheduler alone, on a fake clock, gpu_check.sh's install and unpack having taken
    shell_s: each step takes took(step, seconds allowed). Returns the gpu_check module, the report,
    {step: seconds allowed} and the seconds the whole run took."""
    import types
    sys.path.insert(0, str(ROOT / 'scripts'))
    import gpu_check
    now, allowed = [1000.0], {}

    def step(name, seconds):
        allowed[name] = seconds
        now[0] += took(name, seconds)
    steps = {c: [c] for c in CHECKS}
    steps['b_at_epoch'] = ['b.fp32', 'b.bf16_cl', 'b.bf16_cl_compile']
    monkeypatch.setattr(gpu_check, 'time', types.SimpleNamespace(time=lambda: now[0], perf_counter=lambda: now[0],
                                                                 strftime=time.strftime, gmtime=time.gmtime))
    monkeypatch.setattr(gpu_check, 'worker', lambda ctx, name, args, timeout, tag: (step(tag, timeout), ({}, ''))[1])
    monkeypatch.setattr(gpu_check, 'RUNNERS', {c: lambda ctx, c=c: [step(s, ctx.allow(s)) for s in steps[c]] and {}
                                               for c in CHECKS})
    (tmp_path / 'data' / 'train').mkdir(parents=True)
    start = now[0] - shell_s
    gpu_check.main(['run', '--out', str(tmp_path / 'out'), '--dataroot', str(tmp_path / 'data'),
                    '--budget', '480', '--start', str(start), '--work', str(tmp_path / 'work')])
    return gpu_check, json.loads((tmp_path / 'out' / 'gpu_check.json').read_text()), allowed, now[0] - start


def test_every_step_hung_still_ends_within_the_budget_each_check_given_its_cap(tmp_path, monkeypatch):
    """Every step takes all it is allowed (a hung worker): each check still gets its whole cap, in
    order, and the run ends MARGIN_S before the budget (the last kill and the JSON fit in it)."""
    gpu_check, report, allowed, seconds = run_schedule(tmp_path, monkeypatch, lambda step, allowed: allowed)
    caps = {k: cap for k, (cap, _) in gpu_check.STEPS.items()}
    assert sum(caps.values()) + gpu_check.MARGIN_S <= 480 and seconds == 480 - gpu_check.MARGIN_S
    assert allowed['env'] == caps['install'] + caps['unpack'] + caps['env']  # the shell's steps took no time here
    assert {k: v for k, v in allowed.items() if k != 'env'} == {k: v for k, v in caps.items()
                                                                if k not in ('install', 'unpack', 'env')}
    assert report['order'] == CHECKS and all(report[c]['status'] == 'ok' for c in CHECKS)
    started = [report[c]['started_s'] for c in CHECKS]
    assert started == sorted(started)
    assert 'compile' not in gpu_check.BENCH_CONFIGS  # c would compile cold: b's flags are not its
    flags = gpu_check.SIZES['device']['b_flags']
    batch = int(flags[flags.index('--batch_size') + 1])
    assert 50000 % batch == 0 and 10000 % batch == 0  # no partial batch: --compile sees one shape


def test_unused_seconds_carry_to_the_compile_run_and_c_keeps_its_cap(tmp_path, monkeypatch):
    """The shell's install and unpack took 10 s of their 30, every step before the compile run half its
    cap: the compile run may take its cap and all those unused seconds, and c still gets its cap."""
    def took(step, allowed):
        return allowed if step == 'b.bf16_cl_compile' else cap(step) / 2

    def cap(step):
        return gpu_check.STEPS[step][0]
    import gpu_check
    _, report, allowed, seconds = run_schedule(tmp_path, monkeypatch, took, shell_s=10)
    before = list(gpu_check.STEPS)[:list(gpu_check.STEPS).index('b.bf16_cl_compile')]
    unused = cap('install') + cap('unpack') - 10 + sum(cap(s) / 2 for s in before[2:])
    assert allowed['b.bf16_cl_compile'] == pytest.approx(cap('b.bf16_cl_compile') + unused) and unused > 150
    assert allowed['c_benchmark'] == pytest.approx(cap('c_benchmark'))
    assert seconds == pytest.approx(480 - gpu_check.MARGIN_S - cap('c_benchmark') / 2)
    assert report['b_at_epoch']['allowed_s'] == round(480 - gpu_check.MARGIN_S - cap('c_benchmark') - (
        10 + sum(cap(s) / 2 for s in before[2:] if not s.startswith('b.'))))


@pytest.mark.parametrize('case', ['no wheels', 'no archive'])
def test_no_wheels_or_no_archive_stops_at_once_with_the_json(tmp_path, case):
    (tmp_path / 'w').mkdir()
    (tmp_path / 'w' / 'x-1-py3-none-any.whl').write_bytes(b'')
    wheels, archive = tmp_path / ('nowheels' if case == 'no wheels' else 'w'), tmp_path / 'none.tar.gz'
    reason = (f'no wheels in {wheels}: run scripts/make_wheelhouse.sh here and carry {wheels}' if case == 'no wheels'
              else f'no archive {archive}: run scripts/make_wheelhouse.sh here and carry {tmp_path}')
    out = tmp_path / 'out'
    p = subprocess.run(['bash', str(ROOT / 'scripts' / 'gpu_check.sh'), '--wheelhouse', str(wheels), '--archive',
                        str(archive)], env={**OFFLINE_ENV, 'OUT': str(out), 'PYTHON': sys.executable},
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and p.stdout.strip().splitlines() == [f'gpu_check.sh: stopped: {reason}']
    report = json.loads((out / 'gpu_check.json').read_text())
    assert report['status'] == 'failed' and report['error'] == reason and report['order'] == CHECKS
    assert all(report[c]['status'] == 'not run' for c in CHECKS)


def test_decoded_cifar_is_trusted_by_place_and_other_sitecustomize_still_runs(tmp_path):
    """scripts/gpu_check_site: files in GPU_CHECK_DECODED pass torchvision's md5 check, others do not;
    a sitecustomize it hides on PYTHONPATH still runs."""
    (tmp_path / 'decoded').mkdir()
    (tmp_path / 'decoded' / 'data_batch_1').write_bytes(b'not the original bytes')
    (tmp_path / 'outside').write_bytes(b'not the original bytes')
    (tmp_path / 'other').mkdir()
    (tmp_path / 'other' / 'sitecustomize.py').write_text(f"open({str(tmp_path / 'ran')!r}, 'w').close()\n")
    code = ('import torchvision.datasets.cifar as c; '
            f"print(c.check_integrity({str(tmp_path / 'decoded' / 'data_batch_1')!r}, '0' * 32), "
            f"c.check_integrity({str(tmp_path / 'outside')!r}, '0' * 32))")
    p = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=tmp_path,
                       env={**OFFLINE_ENV, 'GPU_CHECK_DECODED': str(tmp_path / 'decoded'),
                            'PYTHONPATH': f"{ROOT / 'scripts' / 'gpu_check_site'}{os.pathsep}{tmp_path / 'other'}"})
    assert p.returncode == 0 and p.stdout.split() == ['True', 'False'], p.stderr
    assert (tmp_path / 'ran').exists()


def test_no_torch_stops_after_the_probe_with_the_reason(tmp_path):
    """A torch that does not import: every check would fail, so none runs, and the JSON says why."""
    (tmp_path / 'shadow' / 'torch').mkdir(parents=True)
    (tmp_path / 'shadow' / 'torch' / '__init__.py').write_text("raise ImportError('no torch on this machine')\n")
    out = tmp_path / 'out'
    p = subprocess.run([sys.executable, str(ROOT / 'scripts' / 'gpu_check.py'), 'run', '--rehearse',
                        '--out', str(out), '--dataroot', str(tmp_path)], cwd=tmp_path,
                       env={**OFFLINE_ENV, 'PYTHONPATH': str(tmp_path / 'shadow')}, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 1, p.stdout + p.stderr
    report = json.loads((out / 'gpu_check.json').read_text())
    why = f'torch cannot be imported by {sys.executable} (ImportError: no torch on this machine)'
    assert report['status'] == 'failed' and report['error'] == why
    assert report['decode'] == {'status': 'not run', 'note': why}
    assert all(report[c] == {'status': 'not run', 'note': why} for c in CHECKS)
    assert f'== stopped: {why}' in (out / 'gpu_check.log').read_text()


def test_b_and_c_write_each_sub_result_as_it_finishes_and_a_fallback_is_no_ok(tmp_path, monkeypatch):
    """The driver's b and c with their processes stood in for: after each sub-run (b) or repeat (c)
    the JSON holds it; a --compile that ran eagerly is 'fell_back_to_eager' and fails b."""
    import argparse
    sys.path.insert(0, str(ROOT / 'scripts'))
    import gpu_check
    seen = []
    ctx = argparse.Namespace(work=str(tmp_path), sizes=gpu_check.SIZES['rehearsal'], classes=10, allow=lambda step: 100,
                             device='cpu', dataroot=str(tmp_path), progress=lambda partial: seen.append(
                                 json.loads(json.dumps(partial))))

    def fake_worker(ctx, name, args, timeout, tag, on_line=None):
        if name == 'main' and args[0] == 'cifar':
            save = args[args.index('--save') + 1]
            os.makedirs(save)
            with open(os.path.join(save, 'log.txt'), 'w') as fh:
                fh.write('json_stats: ' + json.dumps({'epoch': 1, 'at_losses': [[1.0, 0.0]]}) + '\n')
            fell = {'compile_fell_back': 'cifar.py: --compile unavailable here (X); running eagerly'}
            return ({**fell} if '--compile' in args else {}), ''
        for line in ('# repeat 1: fast: train 10.0 img/s, eval 20.0 img/s', 'other output',
                     '# repeat 2: fast: train 30.0 img/s, eval 40.0 img/s'):
            on_line(line)
        return {'error': 'ended early'}, ''
    monkeypatch.setattr(gpu_check, 'worker', fake_worker)
    with pytest.raises(gpu_check.CheckFailed) as e:
        gpu_check.check_b(ctx)
    assert [list(p['runs']) for p in seen] == [['fp32'], ['fp32', 'bf16_cl'], ['fp32', 'bf16_cl', 'bf16_cl_compile']]
    assert [r['status'] for r in seen[-1]['runs'].values()] == ['ok', 'ok', 'fell_back_to_eager']
    assert e.value.args[0] == ('bf16_cl_compile: --compile fell back to eager '
                               '(cifar.py: --compile unavailable here (X); running eagerly)')
    seen.clear()
    with pytest.raises(gpu_check.CheckFailed):
        gpu_check.check_c(ctx)
    assert seen == [{'partial': {'fast': {'train_median': 10.0, 'eval_median': 20.0, 'repeats': 1}}},
                    {'partial': {'fast': {'train_median': 20.0, 'eval_median': 30.0, 'repeats': 2}}}]


def trial(queued=True, reads=0, images=0):
    return {'images': 10, 'queued_at_return': queued, 'reads_changed': reads, 'images_changed': images}


@pytest.mark.parametrize('control, tested, fixed, verdict', [
    (trial(reads=10, images=10), trial(), True, 'pass'),
    (trial(reads=10), trial(images=1), True, 'caught'),  # the fix failed
    (trial(reads=10), trial(reads=10, images=10), False, 'caught'),  # a run without the fix, caught
    (trial(reads=10), trial(), False, 'inconclusive'),  # without the fix and clean by chance: no pass
    (trial(), trial(), True, 'inconclusive'),  # the control clean: the setup provoked nothing
    (trial(reads=10, queued=False), trial(queued=False), True, 'inconclusive'),  # the work ran before the decode
    (trial(reads=10), trial(queued=False), True, 'inconclusive'),
])
def test_check_f_passes_only_where_its_control_shows_the_race(control, tested, fixed, verdict):
    sys.path.insert(0, str(ROOT / 'scripts'))
    import gpu_check
    assert gpu_check.race_verdict(control, tested, fixed)['verdict'] == verdict


@pytest.mark.parametrize('verdict, raised', [('pass', None), ('caught', 'CheckFailed'),
                                             ('inconclusive', 'Inconclusive'), ('untested', 'Inconclusive')])
def test_check_f_reports_a_race_it_did_not_rule_out_as_no_pass(tmp_path, monkeypatch, verdict, raised):
    """The driver's f with its process stood in for: only a race verdict of 'pass' passes it; 'caught'
    fails it; 'inconclusive' (and the CPU's 'untested') make it inconclusive, not a pass."""
    import argparse
    sys.path.insert(0, str(ROOT / 'scripts'))
    import gpu_check
    ctx = argparse.Namespace(work=str(tmp_path), sizes=gpu_check.SIZES['rehearsal'], allow=lambda step: 100,
                             device='cuda', unfixed=False)

    def fake_worker(ctx, name, args, timeout, tag, on_line=None):
        assert name == 'f' and args[2] == 1 and '--decoder' in args and args[args.index('--decoder') + 1] == 'nvjpeg'
        save = args[args.index('--save') + 1]
        os.makedirs(save)
        with open(os.path.join(save, 'log.txt'), 'w') as fh:
            fh.write('json_stats: ' + json.dumps({'epoch': 1, 'train_loss': 1.5}) + '\n')
        return {'views_vs_pil': {'train': {'max': 1, 'mean': 0.1}}, 'decoded_vs_pil': {'off': 0},
                'race': {'verdict': verdict, 'why': 'the reason'}}, ''
    monkeypatch.setattr(gpu_check, 'worker', fake_worker)
    if raised is None:
        assert gpu_check.check_f(ctx)['train_loss'] == 1.5
        return
    with pytest.raises(gpu_check.CheckFailed) as e:
        gpu_check.check_f(ctx)
    assert type(e.value).__name__ == raised and 'the reason' in e.value.args[0]
