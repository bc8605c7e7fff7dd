"""run.json: where a run came from, written by rank 0 into its folder beside log.txt.

It holds a list of sessions: the first is the run's start, and each resume appends one, since a
resumed run may go on with other code, another torch or another machine, and a reader needs all
of them to trust the curves. Nothing in it can fail a run: what cannot be found reads "unknown".
"""
import json
import os
import platform
import shlex
import subprocess
import sys
import time

import torch

CODE = os.path.dirname(os.path.abspath(__file__))
# the CPU features that decide which kernels torch runs (fp32 vectorisation, bf16/fp16 autocast)
CPU_FLAGS = ('avx', 'avx2', 'fma', 'avx512f', 'avx512bw', 'avx512vl', 'avx512dq', 'avx512_vnni', 'avx512_bf16',
             'avx512_fp16', 'amx_tile', 'amx_bf16', 'amx_fp16', 'amx_int8', 'asimd', 'sve')
UNKNOWN = 'unknown'


def git(*args):
    try:
        p = subprocess.run(['git', '-C', CODE, *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):  # no git
        return None
    return p.stdout.strip() if p.returncode == 0 else None


def code_version():
    """The checkout's commit, and whether tracked files differ from it (untracked files do not count)."""
    commit = git('rev-parse', 'HEAD')
    status = git('status', '--porcelain', '--untracked-files=no') if commit else None
    return {'commit': commit or UNKNOWN, 'dirty': UNKNOWN if status is None else bool(status)}


def cpu():
    """The CPU's model name and its flags among CPU_FLAGS, from /proc/cpuinfo (Linux)."""
    try:
        with open('/proc/cpuinfo') as fh:
            lines = fh.read().splitlines()
    except OSError:
        return {'model': platform.processor() or UNKNOWN, 'flags': UNKNOWN}
    fields = {}
    for line in lines:
        key, _, value = line.partition(':')
        fields.setdefault(key.strip(), value.strip())
    flags = set(fields.get('flags', fields.get('Features', '')).split())
    return {'model': fields.get('model name', UNKNOWN), 'flags': [f for f in CPU_FLAGS if f in flags],
            'cores': os.cpu_count(), 'torch_capability': torch.backends.cpu.get_cpu_capability()}


def session(device, world, epoch):
    """What this process runs: its command line, code, libraries and devices."""
    try:
        import torchvision
        vision = torchvision.__version__
    except ImportError:
        vision = UNKNOWN
    cuda = device.type == 'cuda'
    return {
        'started': time.strftime('%Y-%m-%dT%H:%M:%S%z'), 'from_epoch': epoch,
        'command': shlex.join([os.path.basename(sys.executable), *sys.argv]), 'argv': sys.argv, 'cwd': os.getcwd(),
        'host': platform.node(), 'git': code_version(),
        'python': platform.python_version(), 'torch': torch.__version__, 'torchvision': vision,
        'cuda': torch.version.cuda or UNKNOWN,
        'cudnn': torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else UNKNOWN,
        'device': device.type, 'processes': world,
        'devices': [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        'cpu': cpu(),
    }


def record(folder, device, world, epoch):
    """Appends this session to folder/run.json, atomically: a kill leaves the old file or the new one."""
    path = os.path.join(folder, 'run.json')
    try:
        with open(path) as fh:
            sessions = json.load(fh)['sessions']
    except (OSError, ValueError, KeyError, TypeError):  # a new run, or a file no longer readable
        sessions = []
    sessions.append(session(device, world, epoch))
    with open(path + '.tmp', 'w') as fh:
        json.dump({'sessions': sessions}, fh, indent=1)
        fh.write('\n')
    os.replace(path + '.tmp', path)
    return sessions


def read(folder):
    """run.json's sessions, or [] where there is none."""
    try:
        with open(os.path.join(folder, 'run.json')) as fh:
            return json.load(fh)['sessions']
    except (OSError, ValueError, KeyError, TypeError):
        return []
