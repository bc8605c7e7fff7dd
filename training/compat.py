"""The oldest torch this project supports, and every torch API newer than it, each behind its guard.

Users train where a CUDA build of torch is already installed, often an older one than requirements.txt
pins. FLOOR is the oldest torch (and its torchvision) the code runs on: 2.4, the first release whose
torch.compile runs on Python 3.12, and one that has every unguarded API the code calls
(torch.amp.GradScaler(device) came in 2.3, SGD's fused= by then). Anything newer goes through a
function here; tests/test_compat.py fails where a name in POST_FLOOR appears anywhere else in the code.

`python -m training.compat requirements FILE` prints FILE for install.sh: where the installed torch is at or
above the floor, torch (and torchvision) are pinned to what is installed, so pip keeps a CUDA build.
Only the standard library is imported at the top: install.sh runs this before torch may exist.
"""
import importlib.metadata
import inspect
import re
import sys

FLOOR = {'torch': '2.4', 'torchvision': '0.19'}

# name as it appears in code -> (torch version that added it, the function here that guards it)
POST_FLOOR = {
    'forward_sync_buffers': ('2.13', 'ddp_no_buffer_sync'),  # DDP argument; older: broadcast_buffers=False
    'fp32_precision': ('2.9', 'set_fp32_ieee'),  # torch.backends.*.fp32_precision; older: allow_tf32
    'InductorError': ('2.7', 'compile_errors'),  # torch._inductor.exc.InductorError (not in 2.4)
}


def version_tuple(v):
    """'2.11.0+cu128' -> (2, 11, 0); pre-releases count as their release."""
    return tuple(int(x) for x in re.findall(r'\d+', v.split('+')[0])[:3])


def meets_floor(package, version):
    return version is not None and version_tuple(version)[:2] >= version_tuple(FLOOR[package])[:2]


def installed(package):
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


# the local tags of PyTorch's own builds (torch 2.4.1+cu121, +rocm6.1, +cpu, +xpu), each with an index
# of its own that holds the matching torchvision
PYTORCH_INDEX = 'https://download.pytorch.org/whl/'
BUILD_TAG = re.compile(r'cu\d+|rocm\d+(\.\d+)*|cpu|xpu')


def requirements(lines, torch_version, torchvision_version):
    """requirements.txt's lines as install.sh should install them, given what is installed.

    torch at or above the floor is kept (pinned to itself); so is torchvision at or above its floor,
    and where it is missing or older, the torchvision release made for that torch (0.(minor + 15),
    a rule since torch 2.0). Otherwise the pinned versions, unchanged.

    A torch built for one CUDA (a +cuXYZ tag) needs a torchvision built for the same: the default
    index's may be built for another CUDA major version and fail on import. So its torchvision comes
    from PyTorch's index for that tag (an --extra-index-url line; pip prefers 0.N.M+cuXYZ to 0.N.M).
    A tag that is no PyTorch build raises ValueError, saying which torchvision to install by hand."""
    if not meets_floor('torch', torch_version):
        return list(lines)
    release = f'0.{version_tuple(torch_version)[1] + 15}.*'
    index = []
    if meets_floor('torchvision', torchvision_version):
        tv = f'torchvision=={torchvision_version}'
    else:
        tv, tag = f'torchvision=={release}', torch_version.partition('+')[2]
        if tag and not BUILD_TAG.fullmatch(tag):
            raise ValueError(f'torch {torch_version} is a build of its own (+{tag}) and torchvision is '
                             f'{"missing" if torchvision_version is None else torchvision_version}: install the '
                             f'torchvision {release} built for it, then run install.sh again')
        index = [f'--extra-index-url {PYTORCH_INDEX}{tag}'] if tag else []
    pins = {'torch': f'torch=={torch_version}', 'torchvision': tv}
    name = lambda line: re.match(r'\s*([A-Za-z0-9_.-]*)', line).group(1).lower()  # noqa: E731
    return index + [pins.get(name(line), line) for line in lines]


# ---------------------------------------------------------------- the guards (torch imported inside)

def ddp_no_buffer_sync():
    """DistributedDataParallel's keywords for "do not re-send buffers at every forward".

    torch >= 2.13: forward_sync_buffers=False (buffers are still sent once, at construction).
    Older: broadcast_buffers=False, which also skips that first send: sync_buffers_once() does it."""
    from torch.nn.parallel import DistributedDataParallel
    if 'forward_sync_buffers' in inspect.signature(DistributedDataParallel.__init__).parameters:
        return {'forward_sync_buffers': False}
    return {'broadcast_buffers': False}


def sync_buffers_once(module, kwargs):
    """Rank 0's buffers to every rank, where the DDP keywords left that out (torch < 2.13)."""
    import torch
    if 'broadcast_buffers' in kwargs:
        for b in module.buffers():
            torch.distributed.broadcast(b.data, 0)


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


def compile_errors():
    """The exceptions that mean torch.compile itself failed (no compiler, an unsupported op, ...).

    What fails while compiling a forward, dynamo wraps in BackendCompilerFailed, a TorchDynamoException on
    every torch. The backward is compiled lazily, inside loss.backward(), where AOTAutograd calls inductor
    itself: before torch 2.7 inductor's errors come out of it raw (a LoweringException or another
    OperatorIssue, a CppCompileError, ...: torch/_inductor/exc.py); from 2.7 on inductor wraps them in
    InductorError, a BackendCompilerFailed. So: TorchDynamoException, and each of inductor's own error
    classes that this torch has."""
    from torch._dynamo.exc import TorchDynamoException
    from torch._inductor import exc
    names = ('InductorError', 'OperatorIssue', 'SubgraphLoweringException', 'CppWrapperCodeGenError',
             'CppWrapperCodegenError', 'CppCompileError', 'InvalidCxxCompiler', 'CUDACompileError')
    return (TorchDynamoException, *(getattr(exc, n) for n in names if hasattr(exc, n)))


def main(argv):
    if len(argv) != 2 or argv[0] != 'requirements':
        print('usage: python -m training.compat requirements FILE', file=sys.stderr)
        return 2
    try:
        with open(argv[1]) as fh:
            lines = fh.read().splitlines()
    except OSError as e:
        print(f'compat.py: error: {argv[1]}: {e.strerror}', file=sys.stderr)
        return 2
    torch_v, tv_v = installed('torch'), installed('torchvision')
    try:
        out = requirements(lines, torch_v, tv_v)
    except ValueError as e:
        print(f'compat.py: error: {e}', file=sys.stderr)
        return 1
    if meets_floor('torch', torch_v):
        print(f'compat.py: keeping the installed torch {torch_v} (the floor is {FLOOR["torch"]})', file=sys.stderr)
    print('\n'.join(out))
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
