#!/usr/bin/env python
"""The driver of scripts/gpu_check.sh: checks a-f on a CUDA machine (or, with --rehearse, on the CPU
with tiny sizes), each in processes of its own within its share of the budget, into one JSON file.

    python scripts/gpu_check.py run --out OUT --dataroot DIR/cifar10-jpg [--rehearse] [--budget 480]
    python scripts/gpu_check.py tiny-cifar DIR          # the rehearsal's class-folder CIFAR

The CIFAR JPEGs are decoded once into torchvision's CIFAR-10 files, which every later process reads.
Then the checks, correctness first, so that a run cut short loses figures, not verdicts: a (CUDA
against CPU), d (resume), e (imagenet.py with a converted teacher), f (nvjpeg, PR 9606's race, fp16),
b (one AT epoch: fp32, bf16, --compile), c (benchmark.py). docs/gpu.md says what each proves, and why
each cap is what it is. Only the standard library is imported at the top: the workers (this file,
called as `worker ...`) import torch and the project.
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
CHECKS = ['a_cuda_vs_cpu', 'd_resume', 'e_imagenet', 'f_nvjpeg_half', 'b_at_epoch', 'c_benchmark']
# every step in the order it runs, (cap, least) in seconds; install and unpack are gpu_check.sh's.
# A step may run until the budget less MARGIN_S and the caps of the steps after it: its cap plus
# whatever earlier steps left unused, so the compile run gets all that is left but c's cap. A step
# with less than `least` left is skipped. Estimates for an H100; docs/gpu.md gives the reasoning.
STEPS = {'install': (15, 0), 'unpack': (15, 0), 'env': (20, 0), 'decode': (25, 0),
         'a_cuda_vs_cpu': (35, 20), 'd_resume': (45, 25), 'e_imagenet': (60, 35), 'f_nvjpeg_half': (45, 30),
         'b.fp32': (30, 15), 'b.bf16_cl': (25, 15), 'b.bf16_cl_compile': (100, 45), 'c_benchmark': (50, 30)}
MARGIN_S = 15  # after the last step: its kill (TERM, 5 s, KILL, 3 s), the last JSON, removing the scratch
B_RUNS = {'fp32': [], 'bf16_cl': ['--dtype', 'bfloat16', '--channels_last', '1'],
          'bf16_cl_compile': ['--dtype', 'bfloat16', '--channels_last', '1', '--compile']}
BENCH_CONFIGS = 'fast,fast-cl,fast-nocl,fast-half,fast-bf16,fast-nobench'
FELL_BACK = '--compile unavailable here'  # loop.Compiled's line when compiling failed and it ran eagerly
# check a: rel = max|device - cpu| / max|cpu|, both fp32 with TF32 off
RTOL = {'grads': 1e-3, 'grad_at_step_grads': 1e-3, 'grad_at_loss': 1e-3}
RTOL_DEFAULT = 1e-4
PIL_LEVELS = 2  # check f: an image's mean |decoded - PIL| below this (torchvision's own nvjpeg tests)
STALL_CYCLES = 10 ** 9  # check f's queued work: about 0.5 s of GPU clock, far longer than a decode
PACKAGES = ('torch', 'torchvision', 'numpy', 'pillow', 'h5py', 'tqdm', 'triton', 'torchnet', 'visdom', 'hickle',
            'six', 'websocket-client', 'jsonpatch', 'tornado', 'tensorboard')


def project(name):
    """A module of the project, imported where first needed: the driver starts before the wheels
    it may install."""
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    return importlib.import_module(name)


def read_log(folder):
    path = os.path.join(folder, 'log.txt')
    return project('training.rundir').read_json_stats(path) if os.path.exists(path) else []


def last_record(folder, keys):
    """`keys` of log.txt's last record, and the first number of each AT loss; {} without one."""
    log = read_log(folder)
    if not log:
        return {}
    out = {k: log[-1].get(k) for k in keys}
    if 'at_losses' in log[-1]:
        out['at_losses'] = [m[0] for m in log[-1]['at_losses']]
    return out


def environment():
    """Versions, the GPU and the CPU; run in a worker of its own (initialising CUDA can hang)."""
    from importlib import metadata
    env = {'python': sys.version.split()[0], 'executable': sys.executable, 'platform': platform.platform(),
           'cpu': {'machine': platform.machine()}, 'packages': {}, 'imports': {}}
    for name in PACKAGES:
        try:
            env['packages'][name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            env['packages'][name] = None
    try:
        import torch
        sys.path.insert(0, ROOT)
        env.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available(),
                   cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
                   threads=torch.get_num_threads())
        from pins import FLOOR
        from training.rundir import cpu_info
        env['cpu'].update(cpu_info())
        env['torch_floor'], env['tf32_default'] = FLOOR['torch'], tf32_state()
        if env['cuda_available']:
            p = torch.cuda.get_device_properties(0)
            env['gpu'] = {'name': p.name, 'capability': f'{p.major}.{p.minor}', 'memory_mib': p.total_memory // 2 ** 20,
                          'multiprocessors': p.multi_processor_count, 'count': torch.cuda.device_count(),
                          'bf16_supported': torch.cuda.is_bf16_supported()}
    except Exception as e:  # the checks will say more; the JSON must still be written
        env['torch_error'] = f'{type(e).__name__}: {e}'
    for name in ('torchnet', 'visdom', 'hickle'):  # what the carried wheels bring
        try:
            env['imports'][name] = f'ok: {importlib.import_module(name).__file__}'
        except Exception as e:
            env['imports'][name] = f'{type(e).__name__}: {e}'
    try:
        smi = subprocess.run(['nvidia-smi', '--query-gpu=name,driver_version,memory.total,clocks.max.sm',
                              '--format=csv,noheader'], capture_output=True, text=True, timeout=10)
        env['nvidia_smi'] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        env['nvidia_smi'] = f'unavailable ({type(e).__name__})'
    st = os.statvfs('/dev/shm') if os.path.isdir('/dev/shm') else None  # DataLoader workers pass batches there
    env['dev_shm_mib'] = st.f_blocks * st.f_frsize // 2 ** 20 if st else None
    h = hashlib.sha256()
    for name in sorted(os.listdir(ROOT)):
        if name.endswith('.py'):
            with open(os.path.join(ROOT, name), 'rb') as fh:
                h.update(name.encode() + fh.read())
    env['code_sha256'] = h.hexdigest()[:16]  # of the top-level .py files, to tie results to code
    return env


def unusable(env, mode):
    """Why no check can run on what the probe found (torch not importable; on the device, no GPU), or None."""
    if 'packages' in env and 'torch' not in env:  # the probe ran, and torch did not import
        return f'torch cannot be imported by {env.get("executable")} ({env.get("torch_error") or "not installed"})'
    if mode == 'device' and env.get('cuda_available') is False:
        return f'torch {env["torch"]} (CUDA {env.get("torch_cuda")}) sees no CUDA GPU'
    return None


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
    """The whole run's budget, from the shell script's start, and each step's share of it."""

    def __init__(self, start, budget):
        self.start, self.budget = start, budget

    def now(self):
        return time.time() - self.start

    def allow(self, step):
        """Seconds left for `step`: all but MARGIN_S and the caps of the steps after it."""
        later = list(STEPS)[list(STEPS).index(step) + 1:]
        return self.budget - MARGIN_S - sum(STEPS[s][0] for s in later) - self.now()


def run_proc(cmd, timeout, log, cwd=None, env=None, tag='', on_line=None):
    """Runs cmd in a process group of its own, its output streamed to the log (and to on_line, line
    by line); on timeout the group is ended (TERM, then KILL). Returns (returncode or None on timeout,
    output, seconds)."""
    timeout = max(timeout, 1)
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
        rc = p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        rc = None
        for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 3)):  # within MARGIN_S
            try:
                os.killpg(p.pid, sig)
                p.wait(timeout=wait)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
        log(f'  {tag}| timed out after {timeout:.0f}s: ended')
    reader.join(timeout=2)
    return rc, '\n'.join(lines), time.perf_counter() - t0


class CheckFailed(Exception):
    """(message, the check's results so far)"""


class Inconclusive(CheckFailed):
    """Nothing failed, but the check could not show what it is there for."""


def tail(text, n=3):
    """The last lines of a process's output, for an error message (without the long options echo)."""
    return ' / '.join([line for line in text.strip().splitlines() if not line.startswith('parsed options:')][-n:])


def worker(ctx, name, args, timeout, tag, on_line=None):
    """Runs `gpu_check.py worker NAME RESULT args...`; its result dict, and its output."""
    result = os.path.join(ctx.work, f'{tag}.result.json')
    if os.path.exists(result):
        os.remove(result)
    rc, out, seconds = run_proc([sys.executable, os.path.abspath(__file__), 'worker', name, result, *args],
                                timeout, ctx.log, cwd=ctx.work, env=ctx.env, tag=tag, on_line=on_line)
    res = {}
    if os.path.exists(result):
        with open(result) as fh:
            res = json.load(fh)
    res['wall_seconds'] = round(seconds, 2)
    if rc is None:
        res['error'] = f'timed out after {max(timeout, 1):.0f}s'
    elif rc != 0 and not res.get('error'):
        res['error'] = f'exit {rc}: {tail(out)}'
    if FELL_BACK in out:  # the compile fell back to eager: say so beside the figures
        res['compile_fell_back'] = next(line for line in out.splitlines() if FELL_BACK in line)
    return res, out


# ---------------------------------------------------------------- the checks (driver side)

def check_a(ctx):
    res, _ = worker(ctx, 'a', [ctx.dataroot, ctx.device, ctx.sizes['a_batch']], ctx.allow('a_cuda_vs_cpu'), 'a')
    if res.get('error'):
        raise CheckFailed(res['error'], res)
    if not res.get('passed'):
        raise CheckFailed('outside tolerance: ' + ', '.join(k for k, v in res['compare'].items() if not v['ok']), res)
    return res


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


def check_b(ctx):
    s = ctx.sizes
    teacher = project('synthetic').write_teacher_run(os.path.join(ctx.work, 'b_teacher'), 'wrn', s['b_depth'], 2,
                                                      ctx.classes, seed=0)
    runs, failed = {}, []
    for name, flags in B_RUNS.items():
        left, least = ctx.allow(f'b.{name}'), STEPS[f'b.{name}'][1]
        if left < least:
            runs[name] = {'status': 'skipped', 'note': f'{left:.0f}s left for it; it needs {least}s'}
            failed.append(f'{name} skipped')
            continue
        save = os.path.join(ctx.work, f'b_{name}')
        argv = ['--dataroot', ctx.dataroot, '--depth', str(s['b_depth']), '--teacher_id', teacher, '--beta', '1e+3',
                '--epochs', '1', '--save', save, '--no_progress', '--device', ctx.device, *s['b_flags'], *flags]
        res, _ = worker(ctx, 'main', ['cifar', *argv], left, f'b.{name}')
        res.update(last_record(save, ('epoch', 'train_time', 'test_time', 'train_acc', 'test_acc', 'train_loss',
                                      'test_loss', 'dtype', 'compile')), flags=flags, allowed_s=round(left))
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


REPEAT_LINE = re.compile(r'^# repeat \d+: (\S+): train ([\d.]+) img/s, eval ([\d.]+) img/s$')


def repeats(seen):
    """benchmark.py's finished repeats, {config: [(train, eval) img/s, ...]}, as medians."""
    import statistics
    return {n: {'train_median': statistics.median(t for t, _ in v), 'eval_median': statistics.median(e for _, e in v),
                'repeats': len(v)} for n, v in seen.items()}


def check_c(ctx):
    out_json, seen = os.path.join(ctx.work, 'c_benchmark.json'), {}

    def on_line(line):  # each repeat into the JSON as it finishes: a run cut short keeps them
        m = REPEAT_LINE.match(line)
        if m:
            seen.setdefault(m.group(1), []).append((float(m.group(2)), float(m.group(3))))
            ctx.progress({'partial': repeats(seen)})
    res, _ = worker(ctx, 'main', ['benchmark', '--dataroot', ctx.dataroot, '--configs', BENCH_CONFIGS, '--device',
                                  ctx.device, '--json', out_json, *ctx.sizes['c_flags']],
                    ctx.allow('c_benchmark'), 'c', on_line=on_line)
    if not os.path.exists(out_json):  # stopped before its table: the repeats it finished
        res['partial'] = repeats(seen)
    else:
        with open(out_json) as fh:
            res.update(json.load(fh))
    # every config without --dtype is fp32: say what that meant on this device
    res['fp32_configs'] = {'precision': precision_label(res.get('tf32')),
                           'configs': [n for n in BENCH_CONFIGS.split(',') if n not in ('fast-half', 'fast-bf16')]}
    if res.get('error'):
        raise CheckFailed(res['error'], res)
    missing = [n for n in BENCH_CONFIGS.split(',') if n not in res.get('configs', {})]
    if missing:
        raise CheckFailed(f'no figures for {", ".join(missing)}', res)
    return res


def check_d(ctx):
    import torch
    s, synthetic = ctx.sizes, project('synthetic')
    data = synthetic.make_tiny_cifar(os.path.join(ctx.work, 'd_data'), classes=10, train=s['d_train'], test=s['d_test'])
    teacher = synthetic.write_teacher_run(os.path.join(ctx.work, 'd_teacher'), 'wrn', 10, 2, 10, seed=0)
    common = ['--dataroot', data, '--depth', '10', '--teacher_id', teacher, '--beta', '1e+3', '--batch_size', '32',
              '--lr', '0.1', '--epoch_step', '[2]', '--lr_decay_ratio', '0.2', '--no_progress', '--device', ctx.device]
    save, straight = os.path.join(ctx.work, 'd_run'), os.path.join(ctx.work, 'd_straight')
    outputs = []
    for tag, argv in (('d.1', ['--epochs', '1', '--save', save]),
                      ('d.2', ['--epochs', '2', '--save', save, '--resume', 'auto']),
                      ('d.straight', ['--epochs', '2', '--save', straight])):
        rc, out, _ = run_proc([sys.executable, os.path.join(ROOT, 'cifar.py'), *common, *argv], ctx.allow('d_resume'),
                              ctx.log, cwd=ctx.work, env=ctx.env, tag=tag)
        if rc != 0:
            raise CheckFailed(f'{tag}: ' + ('timed out' if rc is None else f'exit {rc}: {tail(out)}'))
        outputs.append(out)
        if tag == 'd.1':
            first_line = open(os.path.join(save, 'log.txt')).read()
    log, ref = read_log(save), read_log(straight)
    state, sref = (torch.load(os.path.join(f, 'model.pt7'), map_location='cpu', weights_only=True)
                   for f in (save, straight))
    lr = state['optimizer']['param_groups'][0]['lr']
    res = {'epochs_logged': [r['epoch'] for r in log], 'checkpoint_epoch': state['epoch'], 'checkpoint_lr': lr,
           'expected_lr': 0.1 * 0.2, 'resumed_line': next((line for line in outputs[1].splitlines()
                                                           if line.startswith('resumed from')), None),
           'vs_uninterrupted': {  # information: bit-exact on the CPU; on a GPU nondeterministic kernels may differ
               'test_loss_diff': abs(log[-1]['test_loss'] - ref[-1]['test_loss']),
               'train_loss_diff': abs(log[-1]['train_loss'] - ref[-1]['train_loss']),
               'max_param_diff': max((state['params'][k].float() - sref['params'][k].float()).abs().max().item()
                                     for k in state['params'])}}
    problems = [m for bad, m in (
        (res['epochs_logged'] != [1, 2], f'log epochs {res["epochs_logged"]}, expected [1, 2]'),
        (not open(os.path.join(save, 'log.txt')).read().startswith(first_line), 'the first log line changed on resume'),
        (state['epoch'] != 2, f'checkpoint epoch {state["epoch"]}'),
        (abs(lr - res['expected_lr']) > 1e-12, f'checkpoint lr {lr}, expected 0.02'),
        (not res['resumed_line'], 'the second run did not say it resumed')) if bad]
    if problems:
        raise CheckFailed('; '.join(problems), res)
    return res


def check_e(ctx):
    import torch
    import torchvision
    s = ctx.sizes
    data = project('synthetic').make_image_folder(os.path.join(ctx.work, 'e_data'), s['e_classes'], s['e_train'],
                                                 s['e_val'])
    torch.manual_seed(0)
    model = torchvision.models.resnet34(weights=None, num_classes=s['e_classes'])
    for m in model.modules():  # non-trivial batch-norm statistics, for the folding to matter
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    tv, pth, hkl = (os.path.join(ctx.work, f'e_resnet34_{x}') for x in ('torchvision.pth', 'export.pth', 'export.hkl'))
    torch.save(model.state_dict(), tv)
    save = os.path.join(ctx.work, 'e_run')
    res, out = worker(ctx, 'main', ['convert_teacher', f'torchvision:resnet34:{tv}', pth, hkl, '--then', 'imagenet',
                                    '--imagenetpath', data, '--depth', '18', '--beta', '1e+3', '--epochs', '1',
                                    '--dtype', 'bfloat16', '--save', save, '--no_progress', '--device', ctx.device,
                                    '--teacher_params', pth, *s['e_flags']], ctx.allow('e_imagenet'), 'e')
    res.update(last_record(save, ('epoch', 'train_time', 'test_time', 'train_acc', 'test_acc', 'train_loss')),
               convert_output=[line for line in out.splitlines() if ' tensors, ' in line],
               images={'classes': s['e_classes'], 'train': s['e_classes'] * s['e_train'],
                       'val': s['e_classes'] * s['e_val'], 'size': '500x375 JPEG'})
    if res.get('error'):
        raise CheckFailed(res['error'], res)
    load = project('training.teachers').load_teacher_export
    p_pth, p_hkl = load(pth)[1], load(hkl)[1]
    res['hkl_equals_pth'] = set(p_pth) == set(p_hkl) and all(torch.equal(p_pth[k], p_hkl[k]) for k in p_pth)
    if len(res.get('at_losses', [])) != 4:
        raise CheckFailed(f'expected a log line with 4 AT losses, got {read_log(save)[-1:] or "none"}', res)
    if not res['hkl_equals_pth']:
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


def check_f(ctx):
    s = ctx.sizes
    data = project('synthetic').make_image_folder(os.path.join(ctx.work, 'f_data'), 5, s['f_train'], s['f_val'])
    save = os.path.join(ctx.work, 'f_run')
    # the CPU has no nvjpeg: the rehearsal decodes with libjpeg-turbo, and trains with pil
    decoder = 'nvjpeg' if ctx.device == 'cuda' else 'pil'
    args = [data, ctx.device, int(not ctx.unfixed), '--imagenetpath', data, '--depth', '18', '--epochs', '1', '--dtype',
            'half', '--channels_last', '1', '--decoder', decoder, '--save', save, '--no_progress', '--device',
            ctx.device, *s['f_flags']]
    res, _ = worker(ctx, 'f', args, ctx.allow('f_nvjpeg_half'), 'f')
    res.update(last_record(save, ('epoch', 'train_time', 'train_loss', 'train_acc', 'test_acc')), train_decoder=decoder)
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
    # the workers' torch.compile backend: the rehearsal's is dynamo's eager one, the same tracing,
    # guards and recompiles without inductor's C++ code generation (minutes on 2 CPU cores)
    backend = env.get('GPU_CHECK_COMPILE_BACKEND') or ('eager' if args.rehearse else '')
    env['GPU_CHECK_COMPILE_BACKEND'] = backend
    ctx = argparse.Namespace(log=log, work=work, env=env, dataroot=os.path.abspath(args.dataroot),
                             device='cpu' if args.rehearse else 'cuda', sizes=SIZES[mode], allow=clock.allow,
                             unfixed=args.unfixed)
    train_dir = os.path.join(ctx.dataroot, 'train')
    ctx.classes = len(os.listdir(train_dir)) if os.path.isdir(train_dir) else 10
    only = set(args.only.split(',')) if args.only else None
    report = {'mode': mode, 'started_utc': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(clock.start)),
              'budget_s': args.budget, 'caps_s': {k: v[0] for k, v in STEPS.items()}, 'margin_s': MARGIN_S,
              'order': CHECKS, 'dataroot': ctx.dataroot,
              'compile_backend': backend or 'inductor (torch.compile default)',
              'setup': json.loads(args.setup) if args.setup else {},
              'environment': {'status': 'pending'}, 'decode': {'status': 'pending'},
              **{name: {'status': 'pending'} for name in CHECKS}}
    lock = threading.Lock()

    def save():
        with lock:
            report['seconds'] = round(clock.now(), 1)
            with open(json_path + '.tmp', 'w') as fh:
                json.dump(report, fh, indent=1, default=str)
            os.replace(json_path + '.tmp', json_path)
    save()  # before anything that can hang: the JSON says how far the run got

    def progress(partial):  # a check's sub-results so far, into the JSON (from the output's thread too)
        report[current[0]] = {**report[current[0]], **partial}
        save()
    current, ctx.progress = [None], progress
    log(f'== environment ({mode})')
    res, _ = worker(ctx, 'env', [], clock.allow('env'), 'env')
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
    res, _ = worker(ctx, 'decode', [ctx.dataroot, decoded], clock.allow('decode'), 'decode')
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
        steps = [s for s in STEPS if s == name or s.startswith(name[0] + '.')]
        allowed, least = clock.allow(steps[-1]), STEPS[steps[0]][1]
        entry = {'cap_s': sum(STEPS[s][0] for s in steps), 'allowed_s': round(allowed),
                 'started_s': round(clock.now(), 1)}
        if only is not None and name[0] not in only and name not in only:
            entry.update(status='skipped', note=f'not selected (--only {args.only})')
        elif allowed < least:
            entry.update(status='skipped', note=f'{allowed:.0f}s of the {args.budget}s budget left for it; '
                                                 f'it needs at least {least}s to start')
        else:
            log(f'== {name} (up to {allowed:.0f}s; its cap {entry["cap_s"]}s)')
            current[0], report[name] = name, {**entry, 'status': 'running'}
            t = time.perf_counter()
            try:
                entry.update(RUNNERS[name](ctx), status='ok')
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
    """torch.compile with another backend than inductor, where one is named."""
    if backend:
        import functools
        import torch
        torch.compile = functools.partial(torch.compile, backend=backend)


def worker_a(argv, result):
    """argv: DATAROOT DEVICE BATCH"""
    import numpy as np
    import torch
    sys.path.insert(0, ROOT)
    from cifar import MEAN, STD
    from resnet import wrn, wrn_params
    from training.data import channel_stats, normalized, open_cifar
    from training.device import place_params
    from training.distill import Distiller, FunctionalNet
    precision = set_fp32_ieee()  # TF32 off, on every torch
    device = torch.device(argv[1])
    test = open_cifar(argv[0], 'CIFAR10', False)
    n = min(int(argv[2]), len(test))
    idx = [round(i * (len(test) - 1) / max(n - 1, 1)) for i in range(n)]  # spread over the classes
    if hasattr(test, 'data'):  # the decoded cache: torchvision's CIFAR10, pixels in memory
        x = torch.from_numpy(test.data[idx]).permute(0, 3, 1, 2)
    else:
        x = torch.stack([torch.from_numpy(np.asarray(test.loader(test.samples[i][0])).copy()).permute(2, 0, 1)
                         for i in idx])
    x = normalized(x, *channel_stats(MEAN, STD, 'cpu'))
    y = torch.tensor([test.targets[i] for i in idx])
    torch.manual_seed(0)
    p_s, p_t = wrn_params(16, 1, len(test.classes)), wrn_params(16, 2, len(test.classes))

    def forward(dev, dtype):
        def distiller(**kw):  # on fresh copies of the same weights
            s, t = {k: v.clone() for k, v in p_s.items()}, {k: v.clone() for k, v in p_t.items()}
            place_params(s, dev, dtype, False, True)
            place_params(t, dev, dtype, False, False)
            return s, Distiller(FunctionalNet(wrn, s), FunctionalNet(wrn, t), beta=1e3, alpha=0., **kw)

        def grads(s):
            return torch.cat([s[k].grad.flatten() for k in sorted(s) if s[k].grad is not None])
        s, d = distiller()
        xx, yy = x.to(dev, dtype), y.to(dev)
        logits, losses = d(xx, yy, True)
        losses['loss'].backward()
        out = {'logits': logits, 'loss': losses['loss'], 'grads': grads(s),
               **{f'at_loss_{i}': v for i, v in enumerate(v for k, v in losses.items() if k.startswith('at_loss.'))}}
        with torch.no_grad():
            d.alpha = 0.9  # KD + AT on the same batch
            out['loss_kd'] = d(xx, yy, True)[1]['loss']
            out['logits_eval'] = d(xx, yy, False)[0]  # running statistics after the two updates
        # one step of gradient-based AT: input gradients of both nets, the student's with a graph,
        # and backward through it (double backprop)
        s, g = distiller(grad_beta=1.)
        losses = g(xx, yy, True)[1]
        losses['loss'].backward()
        out.update(grad_at_loss=losses['grad_at_loss'], grad_at_step_grads=grads(s))
        return {k: v.detach().to('cpu', torch.float64) for k, v in out.items()}

    t0 = time.perf_counter()
    ref, cpu = forward(torch.device('cpu'), torch.float64), forward(torch.device('cpu'), torch.float32)
    t1 = time.perf_counter()
    dev = forward(device, torch.float32)
    if device.type == 'cuda':
        torch.cuda.synchronize()
    t2 = time.perf_counter()

    def rel(u, v):
        return (u - v).abs().max().item() / max(v.abs().max().item(), 1e-30)
    compare = {}
    for k in dev:
        r, rtol = rel(dev[k], cpu[k]), RTOL.get(k, RTOL_DEFAULT)
        compare[k] = {'max_abs': (dev[k] - cpu[k]).abs().max().item(), 'max_rel': r, 'rtol': rtol, 'ok': r <= rtol,
                      'cpu_vs_fp64_rel': rel(cpu[k], ref[k]), 'device_vs_fp64_rel': rel(dev[k], ref[k]),
                      **({'value': dev[k].item()} if dev[k].numel() == 1 else {})}
    json.dump({'device': str(device), 'batch': n, 'student': 'WRN-16-1', 'teacher': 'WRN-16-2', 'seed': 0,
               'beta': 1e3, 'tf32': False, 'precision_set': precision,
               'cudnn_benchmark': torch.backends.cudnn.benchmark, 'cpu_seconds': round(t1 - t0, 2),
               'device_seconds': round(t2 - t1, 2),
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


def main_in_process(module, argv, res):
    """A script's main(argv) (cifar, imagenet, benchmark, convert_teacher) in this process, into res
    with its seconds and the process's peak memory."""
    sys.path[:0] = [ROOT, os.path.join(ROOT, 'scripts')]
    t = time.perf_counter()
    res['error'] = call_main(module, argv)
    res.update({f'{module}_seconds': round(time.perf_counter() - t, 2)}, **memory_figures())
    import torch
    if torch.cuda.is_available():  # what "fp32" meant in this process: TF32 where it is on
        res['tf32'] = tf32_state()
    return res


def worker_main(argv, result):
    """argv: MODULE ARGS... [--then MODULE ARGS...]: each in turn, until one fails (a process start saved)."""
    calls, res = [[]], {}
    for a in argv:
        calls.append([]) if a == '--then' else calls[-1].append(a)
    for call in calls:
        if main_in_process(call[0], call[1:], res)['error']:
            break
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
    main_in_process('imagenet', rest, res)
    json.dump(res, open(result, 'w'), indent=1)
    return 1 if res['error'] else 0


WORKERS = {'a': worker_a, 'main': worker_main, 'f': worker_f, 'env': worker_env, 'decode': worker_decode}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ['worker']:
        name, result, rest = argv[1], argv[2], argv[3:]
        try:
            if name not in ('env', 'decode'):  # those two import no torch: the probe says whether it imports
                patch_compile(os.environ.get('GPU_CHECK_COMPILE_BACKEND', ''))
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
    c = sub.add_parser('cap', help="print a setup step's cap in seconds (gpu_check.sh's install and unpack)")
    c.add_argument('step', choices=['install', 'unpack'])
    t = sub.add_parser('tiny-cifar')
    t.add_argument('dir')
    st = sub.add_parser('stop', help='write the JSON of a run that cannot start (no wheels, no archive)')
    st.add_argument('--out', required=True)
    st.add_argument('--reason', required=True)
    st.add_argument('--mode', default='device')
    args = p.parse_args(argv)
    if args.cmd == 'cap':
        print(STEPS[args.step][0])
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
