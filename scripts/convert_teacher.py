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

from runs import die  # noqa: E402
from teachers import load_teacher_export  # noqa: E402
from utils import UserError  # noqa: E402

PROG = 'convert_teacher.py'


def write_export(params, path):
    if path.endswith('.hkl'):
        import hickle
        hickle.dump({k: v.numpy() for k, v in params.items()}, path, mode='w')
    elif path.endswith(('.pth', '.pt')):
        torch.save(dict(params), path)
    else:
        raise UserError(f'{path}: the output must end in .pth, .pt or .hkl')


def main(argv):
    if len(argv) < 2 or argv[0] in ('-h', '--help'):
        print(__doc__.strip())
        return 0 if argv and argv[0] in ('-h', '--help') else 2
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
