#!/usr/bin/env python
"""The driver of scripts/gpu_check.sh: checks a-f on a CUDA machine (or, with --rehearse, on the CPU
with tiny sizes), each in processes of its own with a time budget, into one JSON file.

    python scripts/gpu_check.py run --out OUT --dataroot DIR/cifar10-jpg [--rehearse] [--budget 480]
    python scripts/gpu_check.py tiny-cifar DIR          # the rehearsal's class-folder CIFAR

The checks, in this order: correctness first, speed last, so that a run cut short by its budget
loses figures, not verdicts.
  a_cuda_vs_cpu  one batch of real images through WRN-16-1 <- WRN-16-2 (random init, fixed seed) on the
                 GPU and on the CPU in fp32 with TF32 off: logits, losses, the 3 AT losses, gradients,
                 and one step of gradient-based AT (its loss and gradients, double backprop)
  d_resume       a tiny run: 1 epoch, then --resume auto to 2; the log and the checkpoint's lr
  e_imagenet     imagenet.py, ResNet-18 <- a ResNet-34 export folded by convert_teacher.py, bfloat16,
                 a few steps on a generated ImageFolder of 500x375 JPEGs
  f_nvjpeg_half  nvjpeg against PIL; torchvision PR 9606's race provoked on a control (the decode
                 without the side-stream fix) and on the decode under test, which passes only where
                 the control showed the race; then imagenet.py --dtype half, channels_last,
                 --decoder nvjpeg for a few steps (fused SGD on fp16, GradScaler)
  b_at_epoch     one AT epoch of cifar.py on the whole dataset: fp32 (TF32 convolutions, torch's
                 default, and so labelled), bf16 + channels_last, and that with --compile; batch 200,
                 which divides both splits, so compiling sees one shape; train/test seconds, accuracy,
                 peak GPU memory. A compile that fell back to eager is marked so, and fails the check.
  c_benchmark    scripts/benchmark.py: channels_last on/off, fp16 + GradScaler, bf16, cudnn.benchmark
                 off (no compile: b measures it; a compile here would start cold, its flags not b's)
b and c write each sub-result into the JSON as it finishes. Where torch cannot be imported (or, on
the device, sees no GPU) the run stops after the probe, with the reason in the JSON.
Before them, the CIFAR JPEGs are decoded once, in parallel, into torchvision's CIFAR-10 batch files,
which every later process reads (decoding 60,000 JPEGs per process cost each of them seconds).
Only the standard library is imported at the top: the workers (this file, called as
`worker ...`) import torch and the project.
"""
import argparse
import hashlib
import importlib
import json
import os
import platform
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROG = 'gpu_check'
CHECKS = ['a_cuda_vs_cpu', 'd_resume', 'e_imagenet', 'f_nvjpeg_half', 'b_at_epoch', 'c_benchmark']
# seconds each check may take at most, and the least left for it to start at all; with the setup's
# caps (SETUP_S: gpu_check.sh's install and unpack, the probe, the decode) they sum to 465 of the
# default 480 s, the rest for the driver's own steps between them
BUDGETS = {'a_cuda_vs_cpu': 40, 'd_resume': 40, 'e_imagenet': 55, 'f_nvjpeg_half': 50, 'b_at_epoch': 130,
           'c_benchmark': 45}
MIN_START = {'a_cuda_vs_cpu': 20, 'd_resume': 25, 'e_imagenet': 35, 'f_nvjpeg_half': 30, 'b_at_epoch': 45,
             'c_benchmark': 30}
SETUP_S = {'install': 20, 'unpack': 15, 'env': 30, 'decode': 40}
# (name, flags, cap): an epoch is 250 steps, seconds on an H200 (estimated); compiling takes most of the third
B_RUNS = [('fp32', [], 30), ('bf16_cl', ['--dtype', 'bfloat16', '--channels_last', '1'], 25),
          ('bf16_cl_compile', ['--dtype', 'bfloat16', '--channels_last', '1', '--compile'], 75)]
BENCH_CONFIGS = 'fast,fast-cl,fast-nocl,fast-half,fast-bf16,fast-nobench'
FELL_BACK = '--compile unavailable here'  # engine.Compiled's line when compiling failed and it ran eagerly
# check a: rel = max|device - cpu| / max|cpu|, both fp32 with TF32 off
RTOL = {'grads': 1e-3, 'grad_at_step_grads': 1e-3, 'grad_at_loss': 1e-3}
RTOL_DEFAULT = 1e-4
PIL_LEVELS = 2  # check f: an image's mean |decoded - PIL| below this (torchvision's own nvjpeg tests)
STALL_CYCLES = 10 ** 9  # check f's queued work: about 0.5 s of GPU clock, far longer than a decode


# ---------------------------------------------------------------- data made here

def project(name):
    """A module of the project (synthetic data, file formats), imported where first needed: the
    driver starts before the wheels it may install."""
    sys.path.insert(0, ROOT)
    return importlib.import_module(name)


def read_log(folder):
    path = os.path.join(folder, 'log.txt')
    return project('training.rundir').read_json_stats(path) if os.path.exists(path) else []


def cpu_info():
    try:
        return {'machine': platform.machine(), **project('training.rundir').cpu_info()}
    except ImportError as e:  # provenance imports torch: the probe must still say what it found
        return {'machine': platform.machine(), 'error': f'{type(e).__name__}: {e}'}


def environment():
    """Versions, the GPU and the CPU; run in a worker of its own (it initialises CUDA, which can hang)."""
    env = {'python': sys.version.split()[0], 'executable': sys.executable, 'platform': platform.platform(),
           'cpu': cpu_info(), 'packages': {}}
    from importlib import metadata
    for name in ('torch', 'torchvision', 'numpy', 'pillow', 'h5py', 'tqdm', 'triton', 'torchnet', 'visdom', 'hickle',
                 'six', 'websocket-client', 'jsonpatch', 'tornado', 'tensorboard'):
        try:
            env['packages'][name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            env['packages'][name] = None
    try:
        import torch
        env['torch'] = torch.__version__
        env['torch_cuda'] = torch.version.cuda
        env['cudnn'] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        env['cuda_available'] = torch.cuda.is_available()
        env['threads'] = torch.get_num_threads()
        sys.path.insert(0, ROOT)
        from pins import FLOOR
        env['torch_floor'], env['tf32_default'] = FLOOR['torch'], tf32_state()
        try:
            env['cpu']['mkldnn_bf16'] = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            env['cpu']['mkldnn_bf16'] = None
        if env['cuda_available']:
            p = torch.cuda.get_device_properties(0)
            env['gpu'] = {'name': p.name, 'capability': f'{p.major}.{p.minor}', 'memory_mib': p.total_memory // 2 ** 20,
                          'multiprocessors': p.multi_processor_count, 'count': torch.cuda.device_count(),
                          'bf16_supported': torch.cuda.is_bf16_supported()}
    except Exception as e:  # the checks will say more; the JSON must still be written
        env['torch_error'] = f'{type(e).__name__}: {e}'
    try:
        smi = subprocess.run(['nvidia-smi', '--query-gpu=name,driver_version,memory.total,clocks.max.sm',
                              '--format=csv,noheader'], capture_output=True, text=True, timeout=30)
        env['nvidia_smi'] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        env['nvidia_smi'] = f'unavailable ({type(e).__name__})'
    try:
        st = os.statvfs('/dev/shm')  # DataLoader workers (imagenet.py) pass batches through it
        env['dev_shm_mib'] = st.f_blocks * st.f_frsize // 2 ** 20
    except OSError:
        env['dev_shm_mib'] = None
    env['imports'] = {}
    for name in ('torchnet', 'visdom', 'hickle'):  # what the carried wheels bring
        try:
            env['imports'][name] = f'ok: {importlib.import_module(name).__file__}'
        except Exception as e:
            env['imports'][name] = f'{type(e).__name__}: {e}'
    h = hashlib.sha256()
    for name in sorted(os.listdir(ROOT)):
        if name.endswith('.py'):
            with open(os.path.join(ROOT, name), 'rb') as fh:
                h.update(name.encode() + fh.read())
    env['code_sha256'] = h.hexdigest()[:16]  # of the project's top-level .py files, to tie results to code
    return env


# ---------------------------------------------------------------- running processes

class Log:
    """Everything goes to stdout and to the log file."""

    def __init__(self, path):
        self.fh = open(path, 'a', buffering=1)
        self.lock = threading.Lock()

    def __call__(self, line):
        with self.lock:
            sys.stdout.write(line + '\n')
            sys.stdout.flush()
            self.fh.write(line + '\n')


class Clock:
    """The whole run's deadline (the shell script's start + --budget)."""

    def __init__(self, start, budget):
        self.start, self.budget = start, budget

    def now(self):
        return time.time() - self.start

    def left(self):
        return self.budget - self.now()


def run_proc(cmd, timeout, log, cwd=None, env=None, tag='', on_line=None):
    """Runs cmd in a process group of its own, its output streamed to the log (and to on_line, line
    by line); on timeout the group is ended (TERM, then KILL). Returns (returncode or None on timeout,
    output, seconds)."""
    log(f'$ {" ".join(map(str, cmd))}' + (f'   (cwd {cwd})' if cwd else '') + f'   [timeout {timeout:.0f}s]')
    t0 = time.perf_counter()
    p = subprocess.Popen([str(c) for c in cmd], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, errors='replace', start_new_session=True)
    lines = []

    def pump():
        for line in p.stdout:
            line = line.rstrip('\n')
            lines.append(line)
            log(f'  {tag}| {line}')
            if on_line:
                on_line(line)
    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        rc = p.wait(timeout=max(timeout, 1))
    except subprocess.TimeoutExpired:
        rc = None
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                break
            try:
                p.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        log(f'  {tag}| timed out after {timeout:.0f}s: ended')
    reader.join(timeout=10)
    return rc, '\n'.join(lines), time.perf_counter() - t0


class CheckFailed(Exception):
    """(message, the check's results so far)"""


class Inconclusive(CheckFailed):
    """Nothing failed, but the check could not show what it is there for."""


def tail(text, n=3):
    """The last lines of a process's output, for an error message (without the long options echo)."""
    return ' / '.join([line for line in text.strip().splitlines() if not line.startswith('parsed options:')][-n:])


def worker(ctx, name, args, timeout, tag, on_line=None):
    """Runs `gpu_check.py worker NAME RESULT -- args`; its result dict, and its output."""
    result = os.path.join(ctx.work, f'{tag}.result.json')
    if os.path.exists(result):
        os.remove(result)
    rc, out, seconds = run_proc([sys.executable, os.path.abspath(__file__), 'worker', name, result,
                                 '--compile-backend', ctx.compile_backend, '--', *args],
                                timeout, ctx.log, cwd=ctx.work, env=ctx.env, tag=tag, on_line=on_line)
    res = {}
    if os.path.exists(result):
        with open(result) as fh:
            res = json.load(fh)
    res['wall_seconds'] = round(seconds, 2)
    if rc is None:
        res['error'] = f'timed out after {timeout:.0f}s'
    elif rc != 0 and not res.get('error'):
        res['error'] = f'exit {rc}: {tail(out)}'
    if FELL_BACK in out:  # engine.compiled fell back to eager: say so beside the figures
        res['compile_fell_back'] = next(line for line in out.splitlines() if FELL_BACK in line)
    return res, out


# ---------------------------------------------------------------- the checks (driver side)

def check_a(ctx, timeout):
    res, _ = worker(ctx, 'a', ['--dataroot', ctx.dataroot, '--device', ctx.device, '--batch', str(ctx.sizes['a_batch'])],
                 timeout, 'a')
    if res.get('error'):
        raise CheckFailed(res['error'], res)
    if not res.get('passed'):
        worst = [k for k, v in res['compare'].items() if not v['ok']]
        raise CheckFailed(f'outside tolerance: {", ".join(worst)}', res)
    return res


def cifar_record(folder):
    log = read_log(folder)
    if not log:
        return {}
    r = log[-1]
    keep = ('epoch', 'train_time', 'test_time', 'train_acc', 'test_acc', 'train_loss', 'test_loss', 'dtype', 'compile')
    out = {k: r.get(k) for k in keep}
    out['at_losses'] = [m[0] for m in r.get('at_losses', [])]
    return out


def check_b(ctx, timeout):
    s = ctx.sizes
    teacher = project('synthetic').write_teacher_run(os.path.join(ctx.work, 'b_teacher'), 'wrn', s['b_depth'], 2,
                                                      ctx.classes, seed=0)
    runs, failed, t_end = {}, [], time.perf_counter() + timeout
    for name, flags, budget in B_RUNS:
        left = t_end - time.perf_counter()
        if left < 15:
            runs[name] = {'status': 'skipped', 'note': f'{left:.0f}s left of the check\'s budget'}
            failed.append(f'{name} skipped')
            continue
        save = os.path.join(ctx.work, f'b_{name}')
        argv = ['--dataroot', ctx.dataroot, '--depth', str(s['b_depth']), '--teacher_id', teacher, '--beta', '1e+3',
                '--epochs', '1', '--save', save, '--no_progress', '--device', ctx.device, *s['b_flags'], *flags]
        res, _ = worker(ctx, 'main', ['cifar', *argv], min(budget * ctx.scale, left), f'b.{name}')
        res.update(cifar_record(save))
        res['flags'] = flags
        if name == 'fp32':  # torch's default: convolutions in TF32 on CUDA
            res['precision'] = precision_label(res.get('tf32'))
        res['status'] = sub_status(res, '--compile' in flags)
        if res['status'] == 'failed':
            failed.append(f'{name}: {res["error"]}')
        elif res['status'] == 'fell_back_to_eager':
            failed.append(f'{name}: --compile fell back to eager ({res["compile_fell_back"]})')
        runs[name] = res
        ctx.progress({'runs': runs})  # into the JSON now: a run cut short keeps what finished
    out = {'student': f'WRN-{s["b_depth"]}-1', 'teacher': f'WRN-{s["b_depth"]}-2 (random init)', 'runs': runs,
           'peak_gpu_memory': 'torch.cuda.max_memory_allocated / max_memory_reserved of the process running '
                              'cifar.main (MiB); the dataset on the GPU included'}
    if failed:
        raise CheckFailed('; '.join(failed), out)
    return out


def sub_status(res, compiled):
    """A sub-run's status: 'failed' (an error, or no epoch-1 line), 'fell_back_to_eager' (asked to
    compile, it ran eagerly: its times are no compiled figures), or 'ok'."""
    if not res.get('error') and res.get('epoch') != 1:
        res['error'] = f'log.txt has no epoch-1 line ({res.get("epoch")})'
    if res.get('error'):
        return 'failed'
    return 'fell_back_to_eager' if compiled and res.get('compile_fell_back') else 'ok'


def precision_label(tf32):
    """What an fp32 figure measured: 'fp32', or 'tf32 (conv, matmul)' naming the kinds TF32 was on for."""
    on = [k for k, v in (tf32 or {}).items() if v]
    return f'tf32 ({", ".join(on)})' if on else 'fp32'


REPEAT_LINE = re.compile(r'^# repeat \d+: (\S+): train ([\d.]+) img/s, eval ([\d.]+) img/s$')


def repeats(seen):
    """benchmark.py's finished repeats, {config: [(train, eval) img/s, ...]}, as medians."""
    import statistics
    return {n: {'train_median': statistics.median(t for t, _ in v), 'eval_median': statistics.median(e for _, e in v),
                'repeats': len(v)} for n, v in seen.items()}


def check_c(ctx, timeout):
    s = ctx.sizes
    out_json = os.path.join(ctx.work, 'c_benchmark.json')
    args = ['benchmark', '--dataroot', ctx.dataroot, '--configs', BENCH_CONFIGS, '--device', ctx.device,
            '--json', out_json, *s['c_flags']]
    seen = {}

    def on_line(line):  # each repeat into the JSON as it finishes: a run cut short keeps them
        m = REPEAT_LINE.match(line)
        if m:
            seen.setdefault(m.group(1), []).append((float(m.group(2)), float(m.group(3))))
            ctx.progress({'partial': repeats(seen)})
    res, out = worker(ctx, 'main', args, timeout, 'c', on_line=on_line)
    if not os.path.exists(out_json):  # stopped before its table: the repeats it finished
        res['partial'] = repeats(seen)
    else:
        with open(out_json) as fh:
            bench = json.load(fh)
        res.update({k: bench[k] for k in ('where', 'student', 'teacher', 'batch_size', 'steps', 'warmup', 'repeats',
                                          'peak_definition')})
        r3 = lambda v: round(v, 3) if isinstance(v, float) else [r3(x) for x in v] if isinstance(v, list) else v  # noqa: E731
        res['configs'] = {n: {k: r3(v) for k, v in f.items()
                              if k in ('train_median', 'train_ratio', 'eval_median', 'eval_ratio', 'peak_mib',
                                       'train_img_s', 'eval_img_s')}
                          for n, f in bench['configs'].items()}
    # every config without --dtype is fp32: say what that meant on this device
    res['fp32_configs'] = {'precision': precision_label(res.get('tf32')),
                           'configs': [n for n in BENCH_CONFIGS.split(',') if n not in ('fast-half', 'fast-bf16')]}
    if res.get('error'):
        raise CheckFailed(res['error'], res)
    missing = [n for n in BENCH_CONFIGS.split(',') if n not in res.get('configs', {})]
    if missing:
        raise CheckFailed(f'no figures for {", ".join(missing)}', res)
    return res


def check_d(ctx, timeout):
    import torch
    s = ctx.sizes
    synthetic = project('synthetic')
    data = synthetic.make_tiny_cifar(os.path.join(ctx.work, 'd_data'), classes=10, train=s['d_train'], test=s['d_test'])
    teacher = synthetic.write_teacher_run(os.path.join(ctx.work, 'd_teacher'), 'wrn', 10, 2, 10, seed=0)
    t_end = time.perf_counter() + timeout
    common = ['--dataroot', data, '--depth', '10', '--teacher_id', teacher, '--beta', '1e+3', '--batch_size', '32',
              '--lr', '0.1', '--epoch_step', '[2]', '--lr_decay_ratio', '0.2', '--no_progress', '--device', ctx.device]
    save, straight = os.path.join(ctx.work, 'd_run'), os.path.join(ctx.work, 'd_straight')
    outputs = []
    for tag, argv in (('d.1', ['--epochs', '1', '--save', save]),
                      ('d.2', ['--epochs', '2', '--save', save, '--resume', 'auto']),
                      ('d.straight', ['--epochs', '2', '--save', straight])):
        rc, out, _ = run_proc([sys.executable, os.path.join(ROOT, 'cifar.py'), *common, *argv],
                              max(t_end - time.perf_counter(), 1), ctx.log, cwd=ctx.work, env=ctx.env, tag=tag)
        if rc != 0:
            raise CheckFailed(f'{tag}: ' + ('timed out' if rc is None else f'exit {rc}: {tail(out)}'))
        outputs.append(out)
        if tag == 'd.1':
            first_line = open(os.path.join(save, 'log.txt')).read()
    log, ref = read_log(save), read_log(straight)
    state = torch.load(os.path.join(save, 'model.pt7'), map_location='cpu', weights_only=True)
    lr = state['optimizer']['param_groups'][0]['lr']
    res = {'epochs_logged': [r['epoch'] for r in log], 'checkpoint_epoch': state['epoch'], 'checkpoint_lr': lr,
           'expected_lr': 0.1 * 0.2, 'resumed_line': next((line for line in outputs[1].splitlines()
                                                           if line.startswith('resumed from')), None)}
    sref = torch.load(os.path.join(straight, 'model.pt7'), map_location='cpu', weights_only=True)
    res['vs_uninterrupted'] = {  # information: bit-exact on the CPU; on a GPU nondeterministic kernels may differ
        'test_loss_diff': abs(log[-1]['test_loss'] - ref[-1]['test_loss']),
        'train_loss_diff': abs(log[-1]['train_loss'] - ref[-1]['train_loss']),
        'max_param_diff': max((state['params'][k].float() - sref['params'][k].float()).abs().max().item()
                              for k in state['params'])}
    problems = []
    if res['epochs_logged'] != [1, 2]:
        problems.append(f'log epochs {res["epochs_logged"]}, expected [1, 2]')
    if not open(os.path.join(save, 'log.txt')).read().startswith(first_line):
        problems.append('the first log line changed on resume')
    if state['epoch'] != 2:
        problems.append(f'checkpoint epoch {state["epoch"]}')
    if abs(lr - res['expected_lr']) > 1e-12:
        problems.append(f'checkpoint lr {lr}, expected {res["expected_lr"]}')
    if not res['resumed_line']:
        problems.append('the second run did not say it resumed')
    if problems:
        raise CheckFailed('; '.join(problems), res)
    return res


def check_e(ctx, timeout):
    s = ctx.sizes
    data = project('synthetic').make_image_folder(os.path.join(ctx.work, 'e_data'), s['e_classes'], s['e_train'],
                                                 s['e_val'])
    save = os.path.join(ctx.work, 'e_run')
    args = [os.path.join(ctx.work, 'e_resnet34_export.pth'), str(s['e_classes']),
            '--imagenetpath', data, '--depth', '18', '--beta', '1e+3', '--epochs', '1', '--dtype', 'bfloat16',
            '--save', save, '--no_progress', '--device', ctx.device, *s['e_flags']]
    res, _ = worker(ctx, 'e', args, timeout, 'e')
    log = read_log(save)
    if log:
        r = log[-1]
        res.update({k: r.get(k) for k in ('epoch', 'train_time', 'test_time', 'train_acc', 'test_acc', 'train_loss')})
        res['at_losses'] = [m[0] for m in r.get('at_losses', [])]
    res['images'] = {'classes': s['e_classes'], 'train': s['e_classes'] * s['e_train'], 'val': s['e_classes'] * s['e_val'],
                     'size': '500x375 JPEG'}
    if res.get('error'):
        raise CheckFailed(res['error'], res)
    if not log or len(res['at_losses']) != 4:
        raise CheckFailed(f'expected one log line with 4 AT losses, got {log[-1:] or "none"}', res)
    if not res.get('hkl_equals_pth'):
        raise CheckFailed('the .hkl export does not load to the .pth export\'s tensors', res)
    return res


def race_verdict(control, tested, fixed):
    """Check f's judgement of torchvision PR 9606's race from two trials (race_trial's dicts): the
    control decodes without the side-stream fix, `tested` is the decode under test (with the fix
    where `fixed`). 'caught' where the tested decode was corrupted; 'pass' only where the control was
    corrupted under the same setup and the tested decode, with the fix, was not; else 'inconclusive'."""
    def corrupted(t):
        return t['reads_changed'] + t['images_changed']
    if corrupted(tested):
        return {'verdict': 'caught', 'why': f'{tested["reads_changed"]} queued reads of freed memory changed and '
                                            f'{tested["images_changed"]} of {tested["images"]} images came out '
                                            f'otherwise than decoded without queued work'}
    if not (control['queued_at_return'] and tested['queued_at_return']):
        why = 'the queued work had finished when a decode returned: the race was not set up'
    elif not corrupted(control):
        why = 'the control (no fix) came through clean: the setup did not provoke the race'
    elif not fixed:
        why = 'the decode under test has no fix: it came through clean this time, which proves nothing'
    else:
        return {'verdict': 'pass', 'why': 'the control (no fix) was corrupted, the decode with the fix was not'}
    return {'verdict': 'inconclusive', 'why': why}


def check_f(ctx, timeout):
    s = ctx.sizes
    data = project('synthetic').make_image_folder(os.path.join(ctx.work, 'f_data'), 5, s['f_train'], s['f_val'])
    save = os.path.join(ctx.work, 'f_run')
    # the CPU has no nvjpeg: the rehearsal decodes with libjpeg-turbo, and trains with pil
    decoder = 'nvjpeg' if ctx.device == 'cuda' else 'pil'
    args = [data, ctx.device, int(not ctx.unfixed), '--imagenetpath', data, '--depth', '18', '--epochs', '1', '--dtype',
            'half', '--channels_last', '1', '--decoder', decoder, '--save', save, '--no_progress', '--device',
            ctx.device, *s['f_flags']]
    res, _ = worker(ctx, 'f', args, timeout, 'f')
    log = read_log(save)
    if log:
        res.update({k: log[-1].get(k) for k in ('epoch', 'train_time', 'train_loss', 'train_acc', 'test_acc')})
    res['train_decoder'] = decoder
    if res.get('error'):
        raise CheckFailed(res['error'], res)
    problems = [f'{split} views {d["mean"]:.2f} levels off PIL\'s on average (max {d["max"]:.0f})'
                for split, d in res['views_vs_pil'].items() if d['mean'] > 1]
    if res['decoded_vs_pil']['off']:
        problems.append(f'{res["decoded_vs_pil"]["off"]} images decoded {PIL_LEVELS}+ levels off PIL on average')
    if res['race']['verdict'] == 'caught':
        problems.append(f'PR 9606\'s race caught: {res["race"]["why"]}')
    if not isinstance(res.get('train_loss'), float) or res['train_loss'] != res['train_loss']:
        problems.append(f'expected a log line with a finite train loss, got {read_log(save)[-1:] or "none"}')
    if problems:
        raise CheckFailed('; '.join(problems), res)
    if res['race']['verdict'] != 'pass':
        raise Inconclusive(f'PR 9606\'s race {res["race"]["verdict"]}: {res["race"]["why"]}', res)
    return res


RUNNERS = {'a_cuda_vs_cpu': check_a, 'b_at_epoch': check_b, 'c_benchmark': check_c, 'd_resume': check_d,
           'e_imagenet': check_e, 'f_nvjpeg_half': check_f}

# sizes: the real run, and the rehearsal's tiny ones
SIZES = {
    # b: batch 200 divides both splits (50,000 and 10,000): no partial batch, so --compile sees one
    # shape; c measures at the same batch, eagerly
    'device': dict(a_batch=128, b_depth=16, b_flags=['--batch_size', '200'],
                   c_flags=['--batch_size', '200', '--steps', '30', '--warmup', '5', '--repeats', '3'],
                   d_train=32, d_test=16, e_classes=5, e_train=64, e_val=10,
                   e_flags=['--batch_size', '32', '--nthread', '4'],
                   f_train=32, f_val=4, f_flags=['--batch_size', '32', '--nthread', '4']),
    'rehearsal': dict(a_batch=16, b_depth=10, b_flags=['--batch_size', '16'],
                      c_flags=['--depth', '10', '--teacher', '10,2', '--batch_size', '8', '--steps', '1',
                               '--warmup', '1', '--repeats', '2', '--nthread', '0'],
                      d_train=4, d_test=2, e_classes=5, e_train=1, e_val=1,
                      e_flags=['--batch_size', '5', '--nthread', '0'],
                      f_train=2, f_val=1, f_flags=['--batch_size', '5', '--nthread', '0', '--width', '0.25']),
}


def unusable(env, mode):
    """Why no check can run on what the probe found (torch not importable; on the device, no GPU), or None."""
    if 'packages' in env and 'torch' not in env:  # the probe ran, and torch did not import
        return f'torch cannot be imported by {env.get("executable")} ({env.get("torch_error") or "not installed"})'
    if mode == 'device' and env.get('cuda_available') is False:
        return f'torch {env["torch"]} (CUDA {env.get("torch_cuda")}) sees no CUDA GPU'
    return None


def run(args):
    clock = Clock(args.start or time.time(), args.budget)
    os.makedirs(args.out, exist_ok=True)
    log = Log(os.path.join(args.out, 'gpu_check.log'))
    json_path = os.path.join(args.out, 'gpu_check.json')
    mode = 'rehearsal' if args.rehearse else 'device'
    work = os.path.abspath(args.work) if args.work else tempfile.mkdtemp(prefix='gpu_check.')
    os.makedirs(work, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    if args.rehearse:
        env['CUDA_VISIBLE_DEVICES'] = ''
    # the rehearsal compiles with dynamo's eager backend: the same tracing, guards and recompiles,
    # without inductor's C++ code generation, which takes minutes on 2 CPU cores
    backend = args.compile_backend or ('eager' if args.rehearse else '')
    ctx = argparse.Namespace(log=log, work=work, env=env, dataroot=os.path.abspath(args.dataroot),
                             device='cpu' if args.rehearse else 'cuda', sizes=SIZES[mode],
                             scale=1 if not args.rehearse else 2, compile_backend=backend, unfixed=args.unfixed)
    train_dir = os.path.join(ctx.dataroot, 'train')
    ctx.classes = len(os.listdir(train_dir)) if os.path.isdir(train_dir) else 10
    only = set(args.only.split(',')) if args.only else None
    report = {'mode': mode, 'started_utc': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(clock.start)),
              'budget_s': args.budget, 'order': CHECKS, 'dataroot': ctx.dataroot,
              'compile_backend': backend or 'inductor (torch.compile default)',
              'setup': json.loads(args.setup) if args.setup else {}}

    lock = threading.Lock()

    def save():
        with lock:
            report['seconds'] = round(clock.now(), 1)
            tmp = json_path + '.tmp'
            with open(tmp, 'w') as fh:
                json.dump(report, fh, indent=1, default=str)
            os.replace(tmp, json_path)

    report['environment'] = {'status': 'pending'}
    report['decode'] = {'status': 'pending'}
    for name in CHECKS:
        report[name] = {'status': 'pending'}
    save()  # before anything that can hang: the JSON says how far the run got

    def progress(partial):  # a check's sub-results so far, into the JSON (from the output's thread too)
        report[current[0]] = {**report[current[0]], **partial}
        save()
    current, ctx.progress = [None], progress
    log(f'== environment ({mode})')
    res, _ = worker(ctx, 'env', [], min(SETUP_S['env'], max(clock.left(), 1)), 'env')
    report['environment'] = res
    log(json.dumps(res))
    save()
    why = unusable(res, mode)
    if why:  # every check would fail on it: say why at once
        log(f'== stopped: {why}')
        report.update(status='failed', error=why, failed=[], inconclusive=[], decode={'status': 'not run', 'note': why},
                      **{c: {'status': 'not run', 'note': why} for c in CHECKS})
        save()
        return 1
    log('== decode the CIFAR JPEGs once, for every later process')
    decoded = os.path.join(work, 'decoded')
    res, _ = worker(ctx, 'decode', [ctx.dataroot, decoded], min(SETUP_S['decode'], max(clock.left(), 1)), 'decode')
    res['status'] = 'failed' if res.get('error') else 'ok'
    if res['status'] == 'ok':  # else the checks read the JPEGs themselves
        ctx.dataroot = decoded
        # every later Python process, its children too, trusts the decoded files (gpu_check_site/)
        site = os.path.join(ROOT, 'scripts', 'gpu_check_site')
        ctx.env.update(GPU_CHECK_DECODED=decoded,
                       PYTHONPATH=site + (os.pathsep + ctx.env['PYTHONPATH'] if ctx.env.get('PYTHONPATH') else ''))
    report['decode'] = res
    save()
    for name in CHECKS:
        letter = name[0]
        budget = BUDGETS[name] * ctx.scale
        entry = {'budget_s': budget, 'started_s': round(clock.now(), 1)}
        if only is not None and letter not in only and name not in only:
            entry.update(status='skipped', note=f'not selected (--only {args.only})')
        elif clock.left() < MIN_START[name]:
            entry.update(status='skipped', note=f'{clock.left():.0f}s of the {args.budget}s budget left; '
                                                 f'it needs at least {MIN_START[name]}s to start')
        else:
            timeout = min(budget, clock.left())
            log(f'== {name} (up to {timeout:.0f}s; {clock.left():.0f}s left)')
            current[0], report[name] = name, {**entry, 'status': 'running'}
            t = time.perf_counter()
            try:
                entry.update(RUNNERS[name](ctx, timeout))
                entry['status'] = 'ok'
            except CheckFailed as e:
                entry.update(e.args[1] if len(e.args) > 1 else {})
                entry.update(status='inconclusive' if isinstance(e, Inconclusive) else 'failed', error=e.args[0])
            except Exception as e:  # a bug here must not lose the other checks
                log(traceback.format_exc())
                entry.update(status='failed', error=f'{type(e).__name__}: {e}')
            entry['seconds'] = round(time.perf_counter() - t, 1)
        report[name] = entry
        log(f'== {name}: {entry["status"]}' + (f' ({entry.get("error") or entry.get("note")})'
                                               if entry['status'] != 'ok' else f' in {entry["seconds"]}s'))
        save()
    report['failed'] = [n for n in CHECKS if report[n]['status'] == 'failed']
    report['inconclusive'] = [n for n in CHECKS if report[n]['status'] == 'inconclusive']
    # an inconclusive check is no pass, and no failure of the code: it says so, and the exit status is 0
    report['status'] = 'failed' if report['failed'] else 'inconclusive' if report['inconclusive'] else 'ok'
    save()
    if not args.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    log(f'== gpu_check {mode}: {report["status"]} in {clock.now():.0f}s; '
        + ', '.join(f'{n} {report[n]["status"]}' for n in CHECKS) + f'; {json_path}')
    return 1 if report['failed'] else 0


# ---------------------------------------------------------------- workers (their own processes)

def set_fp32_ieee():
    """fp32 matmuls and convolutions in full fp32 (TF32 off): allow_tf32 on every torch, and the
    fp32_precision settings where they exist (torch >= 2.9, which warns when the two disagree).
    Returns the fp32_precision values set, by name."""
    import torch
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    done = {}
    for name, obj in (('matmul', torch.backends.cuda.matmul), ('conv', getattr(torch.backends.cudnn, 'conv', None))):
        if hasattr(obj, 'fp32_precision'):
            obj.fp32_precision = 'ieee'
            done[name] = obj.fp32_precision
    return done


def tf32_state():
    """Whether fp32 matmuls and convolutions on CUDA run in TF32 now: {'matmul': bool, 'conv': bool}."""
    import torch
    state = {'matmul': torch.backends.cuda.matmul.allow_tf32, 'conv': torch.backends.cudnn.allow_tf32}
    for name, obj in (('matmul', torch.backends.cuda.matmul), ('conv', getattr(torch.backends.cudnn, 'conv', None))):
        p = getattr(obj, 'fp32_precision', None)
        if p in ('tf32', 'ieee'):
            state[name] = p == 'tf32'
    return state


def patch_compile(backend):
    """--compile-backend: torch.compile with another backend (eager: dynamo's tracing without codegen)."""
    if backend:
        import functools
        import torch
        torch.compile = functools.partial(torch.compile, backend=backend)


def worker_a(argv, result):
    p = argparse.ArgumentParser()
    p.add_argument('--dataroot', required=True)
    p.add_argument('--device', required=True)
    p.add_argument('--batch', type=int, required=True)
    a = p.parse_args(argv)
    import numpy as np
    import torch
    sys.path.insert(0, ROOT)
    from cifar import MEAN, STD
    from training.data import channel_stats, normalized, open_cifar
    from training.distill import Distiller
    from training.distill import FunctionalNet
    from training.device import place_params
    from resnet import wrn, wrn_params
    precision = set_fp32_ieee()  # TF32 off, on every torch
    device = torch.device(a.device)

    test = open_cifar(a.dataroot, 'CIFAR10', False)
    n = min(a.batch, len(test))
    idx = [round(i * (len(test) - 1) / max(n - 1, 1)) for i in range(n)]  # spread over the classes
    if hasattr(test, 'data'):  # the decoded cache: torchvision's CIFAR10, pixels in memory
        x = torch.from_numpy(test.data[idx]).permute(0, 3, 1, 2)
    else:
        x = torch.stack([torch.from_numpy(np.asarray(test.loader(test.samples[i][0])).copy()).permute(2, 0, 1)
                         for i in idx])
    x = normalized(x, *channel_stats(MEAN, STD, 'cpu'))
    y = torch.tensor([test.targets[i] for i in idx])
    torch.manual_seed(0)
    classes = len(test.classes)
    p_s, p_t = wrn_params(16, 1, classes), wrn_params(16, 2, classes)

    def forward(dev, dtype):
        s, t = {k: v.clone() for k, v in p_s.items()}, {k: v.clone() for k, v in p_t.items()}
        place_params(s, dev, dtype, False, True)
        place_params(t, dev, dtype, False, False)
        d = Distiller(FunctionalNet(wrn, s), FunctionalNet(wrn, t), beta=1e3, alpha=0.)
        xx, yy = x.to(dev, dtype), y.to(dev)
        logits, losses = d(xx, yy, True)
        losses['loss'].backward()
        out = {'logits': logits, 'loss': losses['loss'],
               **{f'at_loss_{i}': v for i, v in enumerate(v for k, v in losses.items() if k.startswith('at_loss.'))},
               'grads': torch.cat([s[k].grad.flatten() for k in sorted(s) if s[k].grad is not None])}
        with torch.no_grad():
            d.alpha = 0.9  # KD + AT on the same batch
            out['loss_kd'] = d(xx, yy, True)[1]['loss']
            out['logits_eval'] = d(xx, yy, False)[0]  # running statistics after the two updates
        # one step of gradient-based AT: input gradients of both nets, the student's with a graph,
        # and backward through it (double backprop), on fresh copies of the same weights
        s, t = {k: v.clone() for k, v in p_s.items()}, {k: v.clone() for k, v in p_t.items()}
        place_params(s, dev, dtype, False, True)
        place_params(t, dev, dtype, False, False)
        g = Distiller(FunctionalNet(wrn, s), FunctionalNet(wrn, t), beta=1e3, alpha=0., grad_beta=1.)
        losses = g(xx, yy, True)[1]
        losses['loss'].backward()
        out['grad_at_loss'] = losses['grad_at_loss']
        out['grad_at_step_grads'] = torch.cat([s[k].grad.flatten() for k in sorted(s) if s[k].grad is not None])
        return {k: v.detach().to('cpu', torch.float64) for k, v in out.items()}

    t0 = time.perf_counter()
    ref = forward(torch.device('cpu'), torch.float64)
    cpu = forward(torch.device('cpu'), torch.float32)
    t1 = time.perf_counter()
    dev = forward(device, torch.float32)
    if device.type == 'cuda':
        torch.cuda.synchronize()
    t2 = time.perf_counter()

    def diff(u, v):
        m = (u - v).abs().max().item()
        return m, m / max(v.abs().max().item(), 1e-30)
    compare = {}
    for k in dev:
        ab, rel = diff(dev[k], cpu[k])
        rtol = RTOL.get(k, RTOL_DEFAULT)
        compare[k] = {'max_abs': ab, 'max_rel': rel, 'rtol': rtol, 'ok': rel <= rtol,
                      'cpu_vs_fp64_rel': diff(cpu[k], ref[k])[1], 'device_vs_fp64_rel': diff(dev[k], ref[k])[1]}
        if dev[k].numel() == 1:
            compare[k]['value'] = dev[k].item()
    json.dump({'device': str(device), 'batch': n, 'student': 'WRN-16-1', 'teacher': 'WRN-16-2', 'seed': 0,
               'beta': 1e3, 'tf32': False, 'precision_set': precision,
               'cudnn_benchmark': torch.backends.cudnn.benchmark, 'cpu_seconds': round(t1 - t0, 2), 'device_seconds': round(t2 - t1, 2),
               'tolerance': f'rel = max|{device.type} - cpu| / max|cpu| (fp32 both) <= rtol: '
                            f'{RTOL_DEFAULT:g} for logits and losses, {RTOL["grads"]:g} for the gradients '
                            f'and the gradient-AT step (its loss compares normalised input gradients)',
               'passed': all(c['ok'] for c in compare.values()), 'compare': compare}, open(result, 'w'), indent=1)
    return 0


def call_main(module, argv):
    """module.main(argv) as its CLI runs it; the error line, or None."""
    from training.errors import UserError
    try:
        importlib.import_module(module).main(argv)
    except UserError as e:
        print(f'{module}.py: error: {e}', file=sys.stderr)
        return f'{module}.py: error: {e}'
    except SystemExit as e:
        return None if e.code in (0, None) else f'{module}.py exited {e.code}'
    return None


def memory_figures():
    import torch
    out = {'peak_rss_mib': round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out['peak_allocated_mib'] = round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)
        out['peak_reserved_mib'] = round(torch.cuda.max_memory_reserved() / 2 ** 20, 1)
    else:
        out['peak_allocated_mib'] = out['peak_reserved_mib'] = None
    return out


def worker_main(argv, result):
    """cifar / imagenet / benchmark main(argv) in this process, then its peak memory."""
    module, argv = argv[0], argv[1:]
    sys.path[:0] = [ROOT, os.path.join(ROOT, 'scripts')]
    t = time.perf_counter()
    error = call_main(module, argv)
    res = {'error': error, 'main_seconds': round(time.perf_counter() - t, 2), **memory_figures()}
    import torch
    if torch.cuda.is_available():  # what "fp32" meant in this process: TF32 where it is on
        res['tf32'] = tf32_state()
    json.dump(res, open(result, 'w'), indent=1)
    return 1 if error else 0


def worker_e(argv, result):
    """A random torchvision ResNet-34, folded by convert_teacher.py's CLI, teaches imagenet.py.
    argv: EXPORT_PATH CLASSES imagenet.py-arguments..."""
    teacher_out, classes, rest = argv[0], int(argv[1]), argv[2:]
    import torch
    import torchvision
    torch.manual_seed(0)
    model = torchvision.models.resnet34(weights=None, num_classes=classes).eval()
    for m in model.modules():  # non-trivial batch-norm statistics, for the folding to matter
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    tv = teacher_out + '.torchvision.pth'
    torch.save(model.state_dict(), tv)
    t = time.perf_counter()
    hkl = os.path.splitext(teacher_out)[0] + '.hkl'  # the 2017 format too: hickle and h5py on this machine
    conv = subprocess.run([sys.executable, os.path.join(ROOT, 'scripts', 'convert_teacher.py'),
                           f'torchvision:resnet34:{tv}', teacher_out, hkl], capture_output=True, text=True)
    print(conv.stdout + conv.stderr, end='')
    res = {'convert_seconds': round(time.perf_counter() - t, 2), 'convert_output': conv.stdout.strip()}
    if conv.returncode != 0:
        res['error'] = f'convert_teacher.py exit {conv.returncode}: {tail(conv.stderr or conv.stdout)}'
        json.dump(res, open(result, 'w'), indent=1)
        return 1
    sys.path[:0] = [ROOT]
    from training.teachers import load_teacher_export
    p_pth, p_hkl = load_teacher_export(teacher_out)[1], load_teacher_export(hkl)[1]
    res['hkl_equals_pth'] = set(p_pth) == set(p_hkl) and all(torch.equal(p_pth[k], p_hkl[k]) for k in p_pth)
    t = time.perf_counter()
    res['error'] = call_main('imagenet', [*rest, '--teacher_params', teacher_out])
    res['main_seconds'] = round(time.perf_counter() - t, 2)
    res.update(memory_figures())
    json.dump(res, open(result, 'w'), indent=1)
    return 1 if res['error'] else 0


def worker_env(argv, result):
    json.dump(environment(), open(result, 'w'), indent=1, default=str)
    return 0


def read_rgb(path):
    import numpy as np
    from PIL import Image
    with Image.open(path) as im:
        return np.asarray(im.convert('RGB'))


def worker_decode(argv, result):
    """SRC (class folders of 32x32 JPEGs) -> DST/cifar-10-batches-py as torchvision writes CIFAR-10:
    5 train batches, test_batch and batches.meta, pixels in CHW rows; classes in sorted folder order,
    as ImageFolder numbers them."""
    import pickle
    from multiprocessing import Pool
    import numpy as np
    src, dst = argv
    t = time.perf_counter()
    classes = sorted(d for d in os.listdir(os.path.join(src, 'train')) if os.path.isdir(os.path.join(src, 'train', d)))
    out = os.path.join(dst, 'cifar-10-batches-py')
    os.makedirs(out)
    counts = {}
    with Pool(min(os.cpu_count() or 1, 16)) as pool:
        for split in ('train', 'test'):
            files = [(os.path.join(src, split, c, f), i) for i, c in enumerate(classes)
                     for f in sorted(os.listdir(os.path.join(src, split, c)))]
            data = np.stack(pool.map(read_rgb, [f for f, _ in files], chunksize=256))
            if data.shape[1:] != (32, 32, 3):
                raise ValueError(f'{split}: images of {data.shape[1:]}, not 32x32 RGB')
            rows, labels = data.transpose(0, 3, 1, 2).reshape(len(data), -1), np.array([c for _, c in files])
            parts = np.array_split(np.arange(len(rows)), 5) if split == 'train' else [np.arange(len(rows))]
            names = [f'data_batch_{i}' for i in range(1, 6)] if split == 'train' else ['test_batch']
            for name, idx in zip(names, parts):
                with open(os.path.join(out, name), 'wb') as fh:
                    pickle.dump({'data': rows[idx], 'labels': labels[idx].tolist()}, fh)
            counts[split] = len(rows)
    with open(os.path.join(out, 'batches.meta'), 'wb') as fh:
        pickle.dump({'label_names': classes}, fh)
    json.dump({'images': counts, 'classes': len(classes), 'decode_seconds': round(time.perf_counter() - t, 2)},
              open(result, 'w'), indent=1)
    return 0


def off_pil(images, pil):
    """Per image, mean |decoded - PIL's decode| in levels: their mean, the worst, and how many are
    PIL_LEVELS or more off."""
    means = [(a.cpu().float() - b.float()).abs().mean().item() for a, b in zip(images, pil)]
    return {'mean': sum(means) / len(means), 'worst': max(means), 'off': sum(m >= PIL_LEVELS for m in means)}


def race_trial(decode, files, pil, device):
    """decode(files, device) once under torchvision PR 9606's race. The decoder is warmed first (built,
    its buffers made). Then the current stream stalls, and behind the stall reads and overwrites tensors
    of the decoded images' own sizes (the caching allocator's small pool, under 1 MiB), which are freed
    at once: the pool holds free blocks of just the size the decoder's outputs will ask for, while the
    work on them is still queued. A decode that is handed them writes them before the reads run (the
    copies change), and the queued writes then overwrite its images."""
    import torch
    torch.cuda.empty_cache()  # no free blocks of that size but the ones freed below
    calm = [x.cpu() for x in decode(files, device)]
    fill = 77
    copies = [torch.empty_like(x, device=device) for x in calm]  # the blocks the warm decode left free
    freed = [torch.full_like(x, fill, device=device) for x in calm]
    torch.cuda.synchronize(device)
    torch.cuda._sleep(STALL_CYCLES)
    stalled = torch.cuda.Event()
    stalled.record()
    for i in range(len(freed)):
        copies[i].copy_(freed[i])
        freed[i].zero_()
    del freed
    raced = decode(files, device)
    queued = not stalled.query()  # the stall still running: none of the reads and writes had run
    raced = [x.cpu() for x in raced]
    return {'images': len(files), 'queued_at_return': queued,
            'reads_changed': sum(not bool((c == fill).all()) for c in copies),
            'images_changed': sum(not torch.equal(a, b) for a, b in zip(raced, calm)),
            'calm_vs_pil': off_pil(calm, pil), 'raced_vs_pil': off_pil(raced, pil)}


def worker_f(argv, result):
    """nvjpeg's images and training views against PIL's; PR 9606's race provoked on a control without
    the fix and on the decode under test (the project's, with the fix, where FIX is 1); then imagenet.py.
    argv: FOLDER DEVICE FIX imagenet.py-arguments..."""
    folder, device, fixed, rest = argv[0], argv[1], argv[2] == '1', argv[3:]
    import numpy as np
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg, read_file
    sys.path[:0] = [ROOT]
    from training import imagenet_data as D
    from training.data import image_folder
    ds, dev = image_folder(os.path.join(folder, 'train')), torch.device(device)
    views = D.decoder_difference(ds, 'nvjpeg', device)  # the training views, as the Feed makes them
    res = {'views_vs_pil': {k: {'max': m, 'mean': a} for k, (m, a) in views.items()}}
    files = [read_file(p) for p, _ in ds.samples]
    pil = [torch.from_numpy(np.asarray(D.open_rgb(p))).permute(2, 0, 1) for p, _ in ds.samples]

    def plain(files, device):  # torchvision's own: the outputs come from the current stream
        return decode_jpeg(files, mode=ImageReadMode.RGB, device=device)
    if dev.type == 'cuda':
        control = race_trial(plain, files, pil, dev)
        tested = race_trial(D.decode_jpegs_apart if fixed else plain, files, pil, dev)
        res['race'] = {'fix': fixed, 'control': control, 'tested': tested, **race_verdict(control, tested, fixed)}
        res['decoded_vs_pil'] = tested['calm_vs_pil']
    else:
        res['race'] = {'fix': fixed, 'verdict': 'untested', 'why': 'no CUDA here: the race is between CUDA streams'}
        res['decoded_vs_pil'] = off_pil(plain(files, dev), pil)
    res['decoded_on'] = device + (' (nvjpeg)' if dev.type == 'cuda' else ' (libjpeg-turbo: the CPU has no nvjpeg)')
    res['criterion'] = f'per image, mean |decoded - PIL| < {PIL_LEVELS} levels; views: mean <= 1'
    t = time.perf_counter()
    res['error'] = call_main('imagenet', rest)
    res['main_seconds'] = round(time.perf_counter() - t, 2)
    res.update(memory_figures())
    json.dump(res, open(result, 'w'), indent=1)
    return 1 if res['error'] else 0


WORKERS = {'a': worker_a, 'main': worker_main, 'e': worker_e, 'f': worker_f, 'env': worker_env,
           'decode': worker_decode}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ['worker']:
        name, result, rest = argv[1], argv[2], argv[3:]
        backend = ''
        if rest[:1] == ['--compile-backend']:
            backend, rest = rest[1], rest[2:]
        rest = rest[1:] if rest[:1] == ['--'] else rest
        try:
            if name not in ('env', 'decode'):  # those two import no torch: the probe says whether it imports
                patch_compile(backend)
            return WORKERS[name](rest, result)
        except Exception as e:
            traceback.print_exc()
            try:
                figures = memory_figures()
            except ImportError:
                figures = {}
            json.dump({'error': f'{type(e).__name__}: {e}', **figures}, open(result, 'w'))
            return 1
    p = argparse.ArgumentParser(prog='gpu_check.py', description=__doc__.split('\n')[0])
    sub = p.add_subparsers(dest='cmd', required=True)
    r = sub.add_parser('run')
    r.add_argument('--out', required=True)
    r.add_argument('--dataroot', required=True, help='the unpacked cifar10-jpg folder (train/ and test/)')
    r.add_argument('--rehearse', action='store_true', help='CPU, tiny sizes')
    r.add_argument('--budget', type=float, default=480, help='seconds for the whole run, from --start')
    r.add_argument('--start', type=float, default=0, help='the time (epoch seconds) the budget counts from')
    r.add_argument('--only', default='', help='comma list of checks to run (letters a-f or names); others are skipped')
    r.add_argument('--unfixed', action='store_true',
                   help='check f tests the nvjpeg decode without the side-stream fix: it must not pass')
    r.add_argument('--setup', default='', help='JSON: what the shell script did before (install, unpack)')
    r.add_argument('--work', default='', help='scratch folder (default: a new temporary one), removed at the end')
    r.add_argument('--keep-work', action='store_true')
    r.add_argument('--compile-backend', default=os.environ.get('GPU_CHECK_COMPILE_BACKEND', ''),
                   help='torch.compile backend in the workers (default: inductor, torch\'s own default)')
    c = sub.add_parser('cap', help="print a setup step's cap in seconds (gpu_check.sh's install and unpack)")
    c.add_argument('step', choices=list(SETUP_S))
    t = sub.add_parser('tiny-cifar')
    t.add_argument('dir')
    st = sub.add_parser('stop', help='write the JSON of a run that cannot start (no wheels, no archive)')
    st.add_argument('--out', required=True)
    st.add_argument('--reason', required=True)
    st.add_argument('--mode', default='device')
    args = p.parse_args(argv)
    if args.cmd == 'cap':
        print(SETUP_S[args.step])
        return 0
    if args.cmd == 'tiny-cifar':
        project('synthetic').make_tiny_cifar(args.dir)
        return 0
    if args.cmd == 'stop':
        os.makedirs(args.out, exist_ok=True)
        report = {'mode': args.mode, 'status': 'failed', 'error': args.reason, 'order': CHECKS, 'failed': [],
                  **{c: {'status': 'not run', 'note': args.reason} for c in CHECKS}}
        with open(os.path.join(args.out, 'gpu_check.json'), 'w') as fh:
            json.dump(report, fh, indent=1)
        return 0
    return run(args)


if __name__ == '__main__':
    sys.exit(main())
