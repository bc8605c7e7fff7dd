"""The run folder and its files: where a run may write; model.pt7 (the 2017 {params, optimizer,
epoch}, plus what this project adds) and log.txt (one `json_stats: {...}` line per finished epoch),
both written so that a kill at any instant loses at most the epoch in progress; and run.json, where
the run came from. Reading a teacher, summarizing runs and resuming one all go through here.

The one definition of a finished run: its last log.txt record is of the last epoch of its own
schedule (`epoch` == `epochs`), as the run itself wrote it. torch is imported only where a checkpoint
or a device is read: the scripts ask `python -m training.rundir status` whether a run is done."""
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from contextlib import contextmanager

from training.errors import UserError


def run_folder(resume, save, default_name, writes=True):
    """(--resume, --save) decided: --resume auto is --save's model.pt7 where there is one, else '' (a
    fresh start); --save defaults to the --resume folder, else logs/<default_name>. A run that `writes`
    may not start over a folder that holds a run: only resume it."""
    if resume == 'auto':
        if not save:
            raise UserError('--resume auto continues the run in --save: pass --save too')
        path = os.path.join(save, 'model.pt7')
        resume = path if os.path.exists(path) else ''
    if not save:
        save = (os.path.dirname(resume) or '.') if resume else os.path.join('logs', default_name)
    existing = [n for n in ('model.pt7', 'log.txt') if os.path.exists(os.path.join(save, n))]
    if writes and existing and not resume:
        raise UserError(f'--save {save} already holds a run ({existing[0]}); pass --resume '
                        f'{os.path.join(save, "model.pt7")} (or auto) to continue it, or choose another --save')
    return resume, save


def make_save(folder):
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, '.write_test')
        open(probe, 'w').close()
        os.remove(probe)
    except OSError as e:
        raise UserError(f'--save {folder} is not writable: {e.strerror}') from None


class WriteError(UserError):
    """A run folder's file that could not be written: a full disk, a quota, a lost mount. fit adds
    which epoch model.pt7 keeps."""


@contextmanager
def writing(path, tmp=None):
    """An OSError writing `path` is one line naming it; the half-written `tmp` goes, so that the whole
    file it was to replace stays and takes no more space."""
    try:
        yield
    except OSError as e:
        if tmp and os.path.exists(tmp):
            os.remove(tmp)
        raise WriteError(f'cannot write {path}: {e.strerror or e}') from None


def safe_load(path, what):
    """torch.load with weights_only=True (a file cannot run code); bad files raise UserError."""
    import torch
    if not os.path.isfile(path):
        raise UserError(f'no such {what}: {path}')
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise UserError(f'cannot read {what} {path}: {type(e).__name__}: '
                        f'{str(e).splitlines()[0] if str(e) else "corrupt file"}') from None


def load_checkpoint(path):
    """A model.pt7 as a dict; bad files raise UserError."""
    state = safe_load(path, 'checkpoint')
    if not isinstance(state, dict) or not isinstance(state.get('params'), dict):
        raise UserError(f'{path} is not a model.pt7 checkpoint (expected a dict with "params")')
    return state


def save_checkpoint(path, params, optimizer, epoch, **extra):
    """Writes {params, optimizer, epoch, **extra} atomically: a kill at any instant leaves
    either the previous file or the new one, whole."""
    import torch
    state = dict(params={k: v.detach().cpu() for k, v in params.items()},
                 optimizer=optimizer.state_dict(), epoch=epoch, **extra)
    tmp = path + '.tmp'
    with writing(path, tmp):
        with open(tmp, 'wb') as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)


def read_json_stats(log_path):
    """The json_stats records of a log.txt, in order."""
    records = []
    try:
        with open(log_path) as fh:
            lines = fh.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f'cannot read {log_path}: {getattr(e, "strerror", None) or "not a text file"}') from None
    for n, line in enumerate(lines, 1):
        i = line.find('json_stats: ')
        if i < 0:
            continue
        try:
            records.append(json.loads(line[i + len('json_stats: '):]))
        except json.JSONDecodeError:
            raise UserError(f'{log_path}, line {n}: not a valid json_stats line') from None
    return records


def append_log(log_path, record):
    size = os.path.getsize(log_path) if os.path.isfile(log_path) else 0
    with writing(log_path):
        try:
            with open(log_path, 'a') as fh:
                fh.write('json_stats: ' + json.dumps(record) + '\n')
                fh.flush()
                os.fsync(fh.fileno())
        except OSError:
            if os.path.isfile(log_path):
                os.truncate(log_path, size)  # no torn line; a resume writes the record back from model.pt7
            raise


def repair_log(log_path, epoch, record):
    """Makes log.txt hold exactly a checkpoint's epochs 1..`epoch`, whatever instant a kill came at: a
    line torn by a kill mid-write goes, and the checkpoint's own `record` comes back where a kill fell
    between the checkpoint and its line (log.txt may not exist yet: epoch 1)."""
    text = ''
    if os.path.exists(log_path):
        with open(log_path) as fh:
            text = fh.read()
    lines = text.split('\n')[:-1]  # a last line without its newline was torn
    kept = [line for line in lines if json_stats_epoch(line) is None or json_stats_epoch(line) < epoch]
    repaired = ''.join(line + '\n' for line in kept) + 'json_stats: ' + json.dumps(record) + '\n'
    if repaired != text:
        tmp = log_path + '.tmp'
        with writing(log_path, tmp):
            with open(tmp, 'w') as fh:
                fh.write(repaired)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, log_path)


def json_stats_epoch(line):
    """The epoch of a log.txt line, or None for a line that is not a whole json_stats record."""
    i = line.find('json_stats: ')
    try:
        return int(json.loads(line[i + len('json_stats: '):])['epoch']) if i >= 0 else None
    except (ValueError, KeyError, TypeError):
        return None


def student_params(params):
    """The student's tensors of a distilled checkpoint (student.*, teacher.*, adapter.*: the 2017
    layout), under plain names; a plain checkpoint as it is."""
    if not any(k.startswith('student.') for k in params):
        return params
    return {k[len('student.'):]: v for k, v in params.items() if k.startswith('student.')}


def checkpoint_params(state, saved):
    """A checkpoint's tensors under the names of a run that saves `saved`: a run that saves plain
    names takes the student of a distilled checkpoint."""
    params = state['params']
    return params if any(k.startswith('student.') for k in saved) else student_params(params)


def finished(folder):
    """The last log record of a run that finished its own schedule, else None."""
    log = os.path.join(folder, 'log.txt')
    records = read_json_stats(log) if os.path.isfile(log) else []
    last = records[-1] if records else None
    return last if last and last.get('epoch') is not None and last.get('epoch') == last.get('epochs') else None


def run_status(folder, epochs, epoch_step):
    """What a script is to do with a run folder asked for `epochs` under `epoch_step` (JSON text):
    'new' (no model.pt7), 'resume', 'done' (finished under that schedule), or 'other' (finished
    under another schedule: reported, never resumed under a new one from its decayed lr)."""
    from training.options import Schedule
    last = finished(folder)
    if last is None:
        return 'resume' if os.path.isfile(os.path.join(folder, 'model.pt7')) else 'new'
    def key(epochs, epoch_step):  # a log without the flag (none of this project's) compares its epochs alone
        return Schedule(dict(lr=0., lr_decay_ratio=1., epochs=epochs, epoch_step=epoch_step)).key()
    same = key(last['epochs'], last.get('epoch_step', epoch_step)) == key(epochs, epoch_step)
    return 'done' if same else 'other'


# ---------------------------------------------------------------- run.json: where a run came from
# It holds a list of sessions: the first is the run's start, and each resume appends one, since a
# resumed run may go on with other code, another torch or another machine, and a reader needs all of
# them to trust the curves. What cannot be found reads "unknown"; a run.json that cannot be read stops
# a resume (record_session) rather than being written over.

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


def cpu_info():
    """The CPU's model name and its flags among CPU_FLAGS, from /proc/cpuinfo (Linux)."""
    import torch
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
    import torch
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
        'cpu': cpu_info(),
    }


def record_session(folder, device, world, epoch, **extra):
    """Appends this session (with `extra`: the teacher's epochs) to folder/run.json, atomically: a kill
    leaves the old file or the new one."""
    path = os.path.join(folder, 'run.json')
    sessions = []
    if os.path.lexists(path):  # one this run cannot read is the user's to look at, not to lose
        try:
            with open(path) as fh:
                sessions = json.load(fh)['sessions']
            if not isinstance(sessions, list):
                raise TypeError
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f'cannot read {path} ({getattr(e, "strerror", None) or "not a run.json"}): move it '
                            f'away to go on without the record of earlier sessions') from None
    sessions.append({**session(device, world, epoch), **extra})
    with writing(path, path + '.tmp'):
        with open(path + '.tmp', 'w') as fh:
            json.dump({'sessions': sessions}, fh, indent=1)
            fh.write('\n')
        os.replace(path + '.tmp', path)
    return sessions


def read_sessions(folder):
    """run.json's sessions, or [] where there is none."""
    try:
        with open(os.path.join(folder, 'run.json')) as fh:
            return json.load(fh)['sessions']
    except (OSError, ValueError, KeyError, TypeError):
        return []


def main(argv):
    """`python -m training.rundir status FOLDER EPOCHS EPOCH_STEP`: run_status's word; for 'other', a tab and
    the run's own schedule."""
    if len(argv) != 4 or argv[0] != 'status' or not argv[2].isdigit():
        raise UserError('usage: python -m training.rundir status FOLDER EPOCHS EPOCH_STEP')
    status = run_status(argv[1], int(argv[2]), argv[3])
    last = finished(argv[1]) if status == 'other' else None
    print(status + (f'\tepochs {last["epochs"]}, epoch_step {last["epoch_step"]}' if last else ''))


if __name__ == '__main__':
    from training.errors import cli
    cli(lambda: main(sys.argv[1:]), 'rundir.py')
