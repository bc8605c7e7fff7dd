"""The oldest torch this project supports, and install.sh's pins.

Users train where a CUDA build of torch is already installed, often an older one than requirements.txt
pins. FLOOR is the oldest torch (and its torchvision) the code runs on: 2.4, the first release whose
torch.compile runs on Python 3.12, and one that has every unguarded API the code calls
(torch.amp.GradScaler(device) came in 2.3, SGD's fused= by then). Anything newer goes through a
guard function (POST_FLOOR names it); tests/test_compat.py fails where such a name appears outside it.

`python scripts/pins.py requirements FILE` prints FILE for install.sh: where the installed torch is at or
above the floor, torch (and torchvision) are pinned to what is installed, so pip keeps a CUDA build.
Only the standard library is imported at the top: install.sh runs this before torch may exist.
"""
import importlib.metadata
import re
import sys

FLOOR = {'torch': '2.4', 'torchvision': '0.19'}

# name as it appears in code -> (torch version that added it, the file and function that guard it)
POST_FLOOR = {
    'forward_sync_buffers': ('2.13', 'training/device.py', 'ddp_no_buffer_sync'),  # older: broadcast_buffers
    'fp32_precision': ('2.9', 'scripts/gpu_check.py', 'set_fp32_ieee'),  # older: allow_tf32 alone
    'InductorError': ('2.7', 'training/loop.py', 'compile_errors'),  # torch._inductor.exc (not in 2.4)
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


def main(argv):
    if len(argv) != 2 or argv[0] != 'requirements':
        print('usage: python scripts/pins.py requirements FILE', file=sys.stderr)
        return 2
    try:
        with open(argv[1]) as fh:
            lines = fh.read().splitlines()
    except OSError as e:
        print(f'pins.py: error: {argv[1]}: {e.strerror}', file=sys.stderr)
        return 2
    torch_v, tv_v = installed('torch'), installed('torchvision')
    try:
        out = requirements(lines, torch_v, tv_v)
    except ValueError as e:
        print(f'pins.py: error: {e}', file=sys.stderr)
        return 1
    if meets_floor('torch', torch_v):
        print(f'pins.py: keeping the installed torch {torch_v} (the floor is {FLOOR["torch"]})', file=sys.stderr)
    print('\n'.join(out))
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
