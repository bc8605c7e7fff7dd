#!/usr/bin/env python
"""Writes a ResNet teacher export (bn folded into the convs) as .pth and/or .hkl.

    python scripts/convert_teacher.py torchvision:resnet34 resnet-34-export.pth resnet-34-export.hkl
    python scripts/convert_teacher.py torchvision:resnet34:resnet34-b627a593.pth resnet-34-export.hkl
    python scripts/convert_teacher.py resnet-34-export.hkl resnet-34-export.pth

The source is anything imagenet.py's --teacher_params takes: a .pth/.pt or .hkl
export, or torchvision:NAME[:LOCAL_STATE_DICT] (folded here).
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
import torch  # noqa: E402

from training.errors import die  # noqa: E402
from training.teachers import load_teacher_export  # noqa: E402
from training.errors import UserError  # noqa: E402

PROG = 'convert_teacher.py'


def check_output(path):
    """Every output is checked before the first is written: a bad one leaves nothing behind."""
    if not path.endswith(('.pth', '.pt', '.hkl')):
        raise UserError(f'{path}: the output must end in .pth, .pt or .hkl')
    folder = os.path.dirname(path) or '.'
    if not os.path.isdir(folder):
        raise UserError(f'{path}: no such folder {folder}')
    if not os.access(folder, os.W_OK):
        raise UserError(f'{path}: folder {folder} is not writable')
    if os.path.isdir(path):
        raise UserError(f'{path} is a folder')


def write_export(params, path):
    """Written whole or not at all: through a temporary file in the same folder."""
    tmp = f'{path}.part{os.path.splitext(path)[1]}'
    try:
        if path.endswith('.hkl'):
            import hickle
            hickle.dump({k: v.numpy() for k, v in params.items()}, tmp, mode='w')
        else:
            torch.save(dict(params), tmp)
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise UserError(f'cannot write {path}: {e.strerror or e}') from None


def main(argv):
    if len(argv) < 2 or argv[0] in ('-h', '--help'):
        print(__doc__.strip())
        return 0 if argv and argv[0] in ('-h', '--help') else 2
    for out in argv[1:]:
        check_output(out)
    _, params = load_teacher_export(argv[0])
    for out in argv[1:]:
        write_export(params, out)
        print(f'{out}: {len(params)} tensors, {sum(v.numel() for v in params.values()):,} numbers')
    return 0


if __name__ == '__main__':
    try:
        sys.exit(main(sys.argv[1:]))
    except UserError as e:
        die(PROG, e, code=1)
