"""ImageNet ResNet-18/34 students, alone or with attention transfer from a folded ResNet teacher.

    python imagenet.py --imagenetpath ~/ILSVRC2012 --depth 18 --width 1 \
        --teacher_params resnet-34-export.hkl --gpu_id 0,1 --ngpu 2 --beta 1e+3
    python imagenet.py --imagenetpath ~/ILSVRC2012 --evaluate resnet-18-at-export.pth
"""
import argparse
import os
import time
from types import SimpleNamespace

import torch
from torch.utils.data.distributed import DistributedSampler

import utils
from resnet import IMAGENET_BLOCKS, load_teacher, resnet_imagenet, resnet_imagenet_params
from utils import UserError

PROG = 'imagenet.py'
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


class Parser(argparse.ArgumentParser):
    def error(self, message):
        utils.die(PROG, message)


def build_parser():
    p = Parser(prog=PROG, description='ResNet training on ImageNet with attention transfer')
    a = p.add_argument
    a('--depth', default=18, type=int, help='18 or 34')
    a('--width', default=1, type=float)
    a('--imagenetpath', default='', type=str, help='folder with train/ and val/ in ImageFolder layout')
    a('--dtype', default='float', type=str, help='float, double, or half / bfloat16 (autocast)')
    a('--nthread', default=4, type=int)
    a('--teacher_params', default='', type=str,
      help='teacher export: .pth, .hkl, or torchvision:resnet34[:local_state_dict.pth]')
    a('--batch_size', default=256, type=int)
    a('--lr', default=0.1, type=float)
    a('--epochs', default=100, type=int)
    a('--weight_decay', default=1e-4, type=float)
    a('--epoch_step', default='[30,60,90]', type=str)
    a('--lr_decay_ratio', default=0.1, type=float)
    a('--resume', default='', type=str)
    a('--temperature', default=4, type=float)
    a('--alpha', default=0, type=float)
    a('--beta', default=0, type=float)
    a('--save', default='', type=str)
    a('--ngpu', default=1, type=int)
    a('--gpu_id', default='0', type=str)
    # new
    a('--at_groups', default='0,1,2,3', type=str, help='groups whose attention is transferred, e.g. 2,3')
    a('--evaluate', default='', nargs='?', const='resume',
      help='only evaluate on val: the --resume student, or an export file (.pth, .hkl, torchvision:NAME)')
    a('--seed', default=0, type=int)
    a('--device', default='', type=str)
    a('--compile', action='store_true')
    a('--no_progress', action='store_true')
    return p


def parse_args(argv=None):
    opt = build_parser().parse_args(argv)
    utils.parse_epoch_step(opt.epoch_step)
    if opt.depth not in IMAGENET_BLOCKS:
        raise UserError(f'--depth must be one of {sorted(IMAGENET_BLOCKS)}, got {opt.depth}')
    try:
        groups = [int(g) for g in opt.at_groups.split(',')]
    except ValueError:
        groups = None
    if not groups or not all(0 <= g < 4 for g in groups) or len(set(groups)) != len(groups):
        raise UserError(f'--at_groups must list distinct groups from 0 to 3, like 2,3; got {opt.at_groups!r}')
    opt.at_group_list = groups
    for name in ('batch_size', 'ngpu'):
        if getattr(opt, name) <= 0:
            raise UserError(f'--{name} must be positive, got {getattr(opt, name)}')
    if opt.width <= 0 or opt.nthread < 0 or opt.epochs < 0 or opt.temperature <= 0:
        raise UserError('--width and --temperature must be positive; --nthread and --epochs not negative')
    if opt.dtype not in {**utils.AMP_DTYPES, **utils.PARAM_DTYPES}:
        raise UserError(f'--dtype must be float, double, half or bfloat16, got {opt.dtype!r}')
    if opt.evaluate == 'resume' and not opt.resume:
        raise UserError('--evaluate without a FILE evaluates the --resume checkpoint: pass --resume too')
    if not opt.imagenetpath:
        raise UserError('pass --imagenetpath DIR (DIR/train/<class>/*.JPEG and DIR/val/<class>/*.JPEG)')
    return opt


def create_loader(opt, split, device):
    import torchvision.transforms as T
    from torchvision import datasets
    folder = os.path.join(opt.imagenetpath, split)
    if not os.path.isdir(folder):
        raise UserError(f'--imagenetpath {opt.imagenetpath} has no {split}/ folder')
    if split == 'train':
        transform = T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)])
    else:
        transform = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize(MEAN, STD)])
    try:
        dataset = datasets.ImageFolder(folder, transform)
    except (FileNotFoundError, OSError) as e:
        raise UserError(f'cannot read class folders in {folder}: {e}') from None
    dist = utils.Dist(device)
    if opt.batch_size % dist.world or dist.world > len(dataset):
        raise UserError(f'{dist.world} torchrun processes need a --batch_size that divides by them and at '
                        f'least as many images ({len(dataset)} in {split}/)')
    if dist.world == 1:
        sampler = None
    elif split == 'train':
        sampler = DistributedSampler(dataset, dist.world, dist.rank, shuffle=True, seed=opt.seed)
    else:
        sampler = range(dist.rank, len(dataset), dist.world)
    return torch.utils.data.DataLoader(
        dataset, batch_size=opt.batch_size // dist.world, shuffle=split == 'train' and sampler is None,
        sampler=sampler, num_workers=opt.nthread, pin_memory=device.type == 'cuda',
        generator=torch.Generator().manual_seed(opt.seed)), len(dataset.classes)


def build(opt):
    device = utils.select_device(opt)
    utils.seed_everything(opt.seed)
    train_loader, num_classes = create_loader(opt, 'train', device)
    val_loader, val_classes = create_loader(opt, 'val', device)
    if val_classes != num_classes:
        raise UserError(f'--imagenetpath: train has {num_classes} classes, val has {val_classes}')
    params_s = resnet_imagenet_params(opt.depth, opt.width, num_classes)
    f_t, params_t = load_teacher(opt.teacher_params) if opt.teacher_params else (None, {})
    if f_t and params_t['fc.weight'].shape[0] != num_classes:
        raise UserError(f'teacher {opt.teacher_params} has {params_t["fc.weight"].shape[0]} classes, '
                        f'the dataset {num_classes}')
    utils.place_params(params_s, params_t, device, opt.dtype, False)
    f_s = utils.compiled(resnet_imagenet, opt.compile, PROG)
    compute = utils.make_compute(f_s, params_s, f_t and utils.compiled(f_t, opt.compile, PROG), params_t,
                                 opt, at_groups=opt.at_group_list)
    return SimpleNamespace(
        device=device, train_loader=train_loader, test_loader=val_loader, num_classes=num_classes,
        params_s=params_s, compute=compute, n_at=len(opt.at_group_list) if f_t else 0, topk=(1, 5),
        make_optimizer=utils.sgd_factory(params_s, opt.weight_decay),
        description=f'student ResNet-{opt.depth}' + (f', teacher {opt.teacher_params}' if f_t else ''),
        # a teacher export is a fixed file: only the student is checkpointed
        saved=params_s)


def evaluate(opt):
    """Top-1/top-5 error on val of an export file or of the --resume student."""
    device = utils.select_device(opt)
    loader, num_classes = create_loader(opt, 'val', device)
    if opt.evaluate == 'resume':
        state = utils.load_checkpoint(opt.resume)
        params = resnet_imagenet_params(opt.depth, opt.width, num_classes)
        utils.check_params(state['params'], params, f'--resume {opt.resume}')
        f, params = resnet_imagenet, {k: state['params'][k] for k in params}
    else:
        f, params = load_teacher(opt.evaluate)
    params = {k: v.to(device) for k, v in params.items()}
    top1, top5 = utils.evaluate(f, params, loader, device, opt.dtype, progress=not opt.no_progress)
    name = opt.resume if opt.evaluate == 'resume' else opt.evaluate
    print(f'{name}: top-1 error {100 - top1:.2f}%, top-5 error {100 - top5:.2f}% on {len(loader.dataset)} images')
    return top1, top5


def main(argv=None):
    opt = parse_args(argv)
    if opt.evaluate:
        return evaluate(opt)
    print('parsed options:', vars(opt))
    utils.check_save(opt, time.strftime('imagenet_%Y%m%d-%H%M%S'))
    utils.fit(opt, build(opt), PROG)


if __name__ == '__main__':
    utils.cli(main, PROG)
