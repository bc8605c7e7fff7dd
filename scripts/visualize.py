#!/usr/bin/env python
"""Attention maps as a PNG grid: one row per image, then each network's map per group.

    # CIFAR runs (teacher, students, ...) on the first test images
    python scripts/visualize.py logs/resnet_16_2_teacher logs/at_16_1_16_2 --dataroot /tmp/cifar10-jpg
    # gradient attention |dL/dx| instead of activation attention
    python scripts/visualize.py logs/resnet_16_2_teacher logs/at_16_1_16_2 --dataroot DIR --kind grad
    # an ImageNet export (.pth, .hkl, torchvision:NAME[:FILE]) on your own images
    python scripts/visualize.py --export resnet-34-export.pth cat.jpg dog.jpg

Activation maps are mean_c(x_c^2) of each group output (what at() normalises);
gradient maps are |dCE/dx| summed over colour channels, for the image's label
(CIFAR) or the network's own top class (ImageNet export). Each map is scaled to
[0, 1] for display.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
import numpy as np  # noqa: E402
import torch  # noqa: E402

from cifar import NORMALIZE  # noqa: E402
from training.data import channel_stats, check_classes, normalized, open_cifar  # noqa: E402
from training.errors import cli  # noqa: E402
from training.options import Parser  # noqa: E402
from training.teachers import load_teacher_export, load_teacher_run  # noqa: E402
from training.errors import UserError  # noqa: E402
from utils import input_grad  # noqa: E402

PROG = 'visualize.py'


def load_run(folder):
    """A CIFAR run folder's network as (name, f, params, info): a distilled run gives its student."""
    f, params, info = load_teacher_run(folder)
    return os.path.basename(os.path.normpath(folder)), f, params, info


def cifar_images(dataroot, dataset, n):
    """The first n test images of the runs' dataset (one per class in turn), as (uint8 HWC arrays,
    labels, the class count)."""
    ds = open_cifar(dataroot, dataset, False)
    check_classes(open_cifar(dataroot, dataset, True), ds, f'--dataroot {dataroot}')
    by_class = {}
    for i, label in enumerate(ds.targets):
        by_class.setdefault(label, []).append(i)
    order = [idx for group in zip(*by_class.values()) for idx in group][:n]
    images = [np.asarray(ds[i][0].convert('RGB')) for i in order]
    return images, [ds.targets[i] for i in order], len(ds.classes)


def normalise(images, normalize):
    """uint8 HWC images as a run's inputs: normalised by its own --normalize statistics."""
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
    return normalized(x, *channel_stats(*NORMALIZE[normalize], 'cpu'))


def maps(f, params, x, targets, kind):
    """Per image, a list of 2-D maps: one per group (act) or one (grad)."""
    if kind == 'grad':
        if targets is None:
            with torch.no_grad():
                targets = f(x, params, False)[0].argmax(1)
        j = input_grad(f, params, x, targets, False, create_graph=False)[0]
        return [[m] for m in j.abs().sum(1)]
    with torch.no_grad():
        groups = f(x, params, False)[1]
    return [[g[i].pow(2).mean(0) for g in groups] for i in range(len(x))]


def draw(images, columns, out, kind):
    """images: list of uint8 arrays; columns: list of (title, per-image list of maps)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    titles = ['image'] + [f'{name} g{g}' if kind == 'act' else f'{name} |J|'
                          for name, per_image in columns for g in range(len(per_image[0]))]
    rows, cols = len(images), len(titles)
    fig, axes = plt.subplots(rows, cols, figsize=(1.2 * cols, 1.2 * rows), dpi=100, squeeze=False)
    for r, img in enumerate(images):
        cells = [img] + [m for _, per_image in columns for m in per_image[r]]
        for c, cell in enumerate(cells):
            ax = axes[r][c]
            if c:
                cell = cell.detach().float()
                cell = ((cell - cell.min()) / (cell.max() - cell.min() + 1e-12)).numpy()
                ax.imshow(cell, cmap='jet', interpolation='bicubic')
            else:
                ax.imshow(cell)
            ax.axis('off')
            if r == 0:
                ax.set_title(titles[c], fontsize=6)
    fig.subplots_adjust(left=0.01, right=0.99, top=0.9, bottom=0.01, wspace=0.05, hspace=0.05)
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv=None):
    p = Parser(prog=PROG, description=__doc__.split('\n')[0])
    p.add_argument('inputs', nargs='*', help='CIFAR run folders, or image files with --export')
    p.add_argument('--export', default='', help='an ImageNet export: .pth, .hkl or torchvision:NAME[:FILE]')
    p.add_argument('--dataroot', default='.', help='CIFAR data, for run folders')
    p.add_argument('-n', type=int, default=6, help='how many CIFAR test images')
    p.add_argument('--kind', choices=['act', 'grad'], default='act')
    p.add_argument('--out', default='attention.png')
    args = p.parse_args(argv)
    if args.n < 1:
        raise UserError(f'-n must be at least 1, got {args.n}')
    if not args.inputs:
        raise UserError('name CIFAR run folders, or image files with --export')
    if args.export:
        from training import imagenet_data
        f, params = load_teacher_export(args.export)
        try:  # imagenet.py's val view: Resize(256), CenterCrop(224), normalised as its loader does
            views = [imagenet_data.pil_view(imagenet_data.open_rgb(path), None) for path in args.inputs]
        except OSError as e:
            raise UserError(f'cannot read image: {e}') from None
        images = [v.numpy() for v in views]
        x = imagenet_data.normalize(torch.stack(views).permute(0, 3, 1, 2), channels_last=False)
        columns = [(os.path.basename(args.export), maps(f, params, x, None, args.kind))]
    else:
        runs = [load_run(folder) for folder in args.inputs]
        datasets = sorted({info['dataset'] for *_, info in runs})
        if len(datasets) > 1:
            raise UserError(f'the runs were trained on {" and ".join(datasets)}: show runs of one dataset at a time')
        images, labels, classes = cifar_images(args.dataroot, datasets[0], args.n)
        for name, _, _, info in runs:  # the gradient of the loss of an image's label needs the run's classes
            if args.kind == 'grad' and info['num_classes'] != classes:
                raise UserError(f'{name} has {info["num_classes"]} classes, --dataroot {args.dataroot} {classes}: '
                                f'--kind grad needs the same classes; --kind act does not')
        columns = [(name, maps(f, params, normalise(images, info['normalize']), torch.tensor(labels), args.kind))
                   for name, f, params, info in runs]
    draw(images, columns, args.out, args.kind)
    print(f'{args.out}: {len(images)} images x {sum(len(c[1][0]) for c in columns)} maps')


if __name__ == '__main__':
    cli(main, PROG)
