"""Lists every image under DIR that cannot be read or decoded, with its reason, decoding each in full
as training would (the images ImageFolder would list: its extensions, in any folder below DIR).
Exits 1 if there is any, 0 otherwise. A training run meets a bad file only where it reads it (an
ImageNet epoch may be hours in); this finds them all first, on every core.

    python scripts/check_images.py DIR [--workers N]
"""
import os
import sys
from concurrent.futures import ProcessPoolExecutor

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
from training.data import open_rgb  # noqa: E402
from training.errors import UserError, cli  # noqa: E402
from training.options import Parser  # noqa: E402

PROG = 'check_images.py'


def problem(path):
    """None for a good image, else its one line."""
    try:
        open_rgb(path)
    except UserError as e:
        return str(e)


def images(root):
    from torchvision.datasets.folder import IMG_EXTENSIONS
    return sorted(os.path.join(d, f) for d, _, files in os.walk(root) for f in files
                  if f.lower().endswith(IMG_EXTENSIONS))


def main(argv=None):
    p = Parser(prog=PROG, description=__doc__.split('\n')[0])
    p.add_argument('dir', help='a folder of images, e.g. an ImageFolder root or its train/')
    p.add_argument('--workers', type=int, default=os.cpu_count(), help='processes decoding (default: every CPU)')
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error(f'--workers must be 1 or more, got {args.workers}')
    if not os.path.isdir(args.dir):
        raise UserError(f'no such folder: {args.dir}')
    from tqdm import tqdm
    paths = images(args.dir)
    with ProcessPoolExecutor(args.workers) as pool:
        found = [line for line in tqdm(pool.map(problem, paths, chunksize=64), total=len(paths), unit='img',
                                       desc='checking', dynamic_ncols=True, file=sys.stderr) if line]
    for line in found:
        print(line)
    print(f'{PROG}: {len(found)} of {len(paths)} images under {args.dir} cannot be read', file=sys.stderr)
    if found:
        sys.exit(1)


if __name__ == '__main__':
    cli(main, PROG)
