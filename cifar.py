"""Wide ResNets on CIFAR: teachers, and students with attention transfer (--beta) and KD (--alpha).

    python cifar.py --save logs/resnet_16_2_teacher --depth 16 --width 2
    python cifar.py --save logs/at_16_1_16_2 --teacher_id resnet_16_2_teacher --beta 1e+3
"""
import argparse
import os
import shutil
import time
import warnings
from types import SimpleNamespace
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch.utils.data.distributed import DistributedSampler

import utils
from resnet import nin, nin_params, wrn, wrn_depth_to_blocks, wrn_params
from utils import UserError

PROG = 'cifar.py'
MEAN = [125.3 / 255, 123.0 / 255, 113.9 / 255]
STD = [63.0 / 255, 62.1 / 255, 66.7 / 255]
DATASETS = {'CIFAR10': 10, 'CIFAR100': 100}


MODELS = {'wrn': wrn, 'nin': nin}


def model_params(model, depth, width, num_classes):
    return wrn_params(depth, width, num_classes) if model == 'wrn' else nin_params(width, num_classes)


def model_name(model, depth, width):
    return f'WRN-{depth}-{width:g}' if model == 'wrn' else f'NIN-{width:g}'


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage + message
        utils.die(PROG, message)


def build_parser():
    p = Parser(prog=PROG, description='Wide ResNet training on CIFAR with attention transfer')
    a = p.add_argument
    # the 2017 flags: same names, types and defaults
    a('--model', default='wrn', choices=list(MODELS), help='wrn: Wide ResNet; nin: Network-in-Network')
    a('--depth', default=16, type=int, help='WRN depth, 6n+4')
    a('--width', default=1, type=float, help='WRN widening factor k; for NIN, 1 is NIN-wide and 0.45 NIN-thin')
    a('--dataset', default='CIFAR10', type=str, help='CIFAR10 or CIFAR100')
    a('--dataroot', default='.', type=str,
      help='torchvision CIFAR folder (downloaded when missing), or a class-folder dataset with train/ and test/')
    a('--dtype', default='float', type=str, help='float, double, or half / bfloat16 (autocast)')
    a('--nthread', default=4, type=int, help='DataLoader workers')
    a('--teacher_id', default='', type=str, help='teacher run: a name under logs/, or a run folder')
    a('--batch_size', default=128, type=int)
    a('--lr', default=0.1, type=float)
    a('--epochs', default=200, type=int)
    a('--weight_decay', default=0.0005, type=float)
    a('--epoch_step', default='[60,120,160]', type=str, help='JSON list: epochs at whose start lr *= lr_decay_ratio')
    a('--lr_decay_ratio', default=0.2, type=float)
    a('--resume', default='', type=str, help='model.pt7 to continue from')
    a('--randomcrop_pad', default=4, type=float, help='reflect padding before the random 32x32 crop')
    a('--temperature', default=4, type=float, help='KD temperature')
    a('--alpha', default=0, type=float, help='KD weight')
    a('--beta', default=0, type=float, help='AT weight')
    a('--beta_decay', default='none', choices=['none', 'step', 'linear'],
      help='AT weight schedule: none (2017), step (times lr_decay_ratio at each epoch_step), linear (to 0)')
    a('--factt_beta', default=0, type=float, help='F-ActT (full-activation transfer) weight')
    a('--grad_beta', default=0, type=float, help='gradient-based AT weight (paper section 3.2; needs a teacher)')
    a('--sym_beta', default=0, type=float, help='flip-symmetry weight on the gradient attention')
    a('--cuda', action='store_true', help='(2017 flag, kept for compatibility; see --device)')
    a('--save', default='', type=str, help='run folder for model.pt7 and log.txt (default: logs/<time>)')
    a('--ngpu', default=1, type=int, help='GPUs to split each batch over')
    a('--gpu_id', default='0', type=str, help='CUDA_VISIBLE_DEVICES')
    # new
    a('--seed', default=0, type=int, help='seeds torch, numpy, random and the data order')
    a('--device', default='', type=str, help='cpu or cuda (default: cuda when available)')
    a('--loader', default='fast', choices=['fast', 'torchvision'],
      help='fast: whole dataset on the device, batched augmentation; torchvision: the 2017 per-image path')
    a('--channels_last', default=None, type=int, choices=[0, 1],
      help='channels_last memory format (default: where it measured faster for this device type)')
    a('--compile', action='store_true', help='torch.compile the student and teacher forward passes')
    a('--no_progress', action='store_true', help='no tqdm bars')
    return p


def parse_args(argv=None):
    opt = build_parser().parse_args(argv)
    utils.parse_epoch_step(opt.epoch_step)
    if opt.model == 'wrn':
        try:
            wrn_depth_to_blocks(opt.depth)
        except ValueError as e:
            raise UserError(str(e)) from None
    if opt.width <= 0 or int(16 * opt.width) < 1:
        raise UserError(f'--width must be positive, got {opt.width}')
    for name in ('batch_size', 'epochs', 'ngpu'):
        if getattr(opt, name) <= 0 and not (name == 'epochs' and getattr(opt, name) == 0):
            raise UserError(f'--{name} must be positive, got {getattr(opt, name)}')
    if opt.nthread < 0:
        raise UserError(f'--nthread must be >= 0, got {opt.nthread}')
    if opt.dataset not in DATASETS:
        raise UserError(f'--dataset must be one of {", ".join(DATASETS)}, got {opt.dataset!r}')
    if opt.dtype not in {**utils.AMP_DTYPES, **utils.PARAM_DTYPES}:
        raise UserError(f'--dtype must be float, double, half or bfloat16, got {opt.dtype!r}')
    if opt.temperature <= 0:
        raise UserError(f'--temperature must be positive, got {opt.temperature}')
    if opt.grad_beta or opt.sym_beta:
        if opt.grad_beta and not opt.teacher_id:
            raise UserError('--grad_beta matches the teacher\'s gradient attention: pass --teacher_id')
        if opt.dtype in utils.AMP_DTYPES or opt.ngpu > 1:
            raise UserError('--grad_beta and --sym_beta need double backprop in full precision on one device: '
                            'use --dtype float and --ngpu 1')
    return opt


# ---------------------------------------------------------------- data

def class_folder_split(root, train):
    """train/ or test/ (also val/) of a class-folder dataset under root, else None."""
    names = ['train'] if train else ['test', 'val']
    for n in names:
        if os.path.isdir(os.path.join(root, n)) and os.path.isdir(os.path.join(root, 'train')):
            return os.path.join(root, n)
    return None


def first_missing_dir(path):
    path, missing = os.path.abspath(path), None
    while not os.path.exists(path):
        path, missing = os.path.dirname(path), path
    return missing


def open_dataset(opt, train, transform=None):
    """The train or test split under --dataroot: a class-folder dataset, or torchvision's."""
    from torchvision import datasets
    folder = class_folder_split(opt.dataroot, train)
    if folder:
        try:
            return datasets.ImageFolder(folder, transform)
        except (FileNotFoundError, OSError) as e:
            raise UserError(f'cannot read class folders in {folder}: {e}') from None
    if os.path.isdir(os.path.join(opt.dataroot, 'train')):
        raise UserError(f'{opt.dataroot} has train/ but no test/ folder')
    cls = getattr(datasets, opt.dataset)
    try:
        return cls(opt.dataroot, train=train, download=False, transform=transform)
    except RuntimeError:
        pass  # not there yet: download, as the 2017 code does
    made = first_missing_dir(opt.dataroot)
    try:
        return cls(opt.dataroot, train=train, download=True, transform=transform)
    except Exception as e:
        if made and not any(files for _, _, files in os.walk(made)):
            shutil.rmtree(made)  # torchvision made these folders for the failed download
        raise UserError(
            f'{opt.dataset} is not in --dataroot {opt.dataroot!r} and could not be downloaded '
            f'({type(e).__name__}); pass --dataroot DIR holding the torchvision files, or a class-folder '
            f'dataset (DIR/train/<class>/*.png, DIR/test/<class>/*.png)') from None


def torchvision_transform(opt, train):
    """The 2017 per-image pipeline."""
    import torchvision.transforms as T
    transform = T.Compose([T.ToTensor(), T.Normalize(MEAN, STD)])
    if train:
        transform = T.Compose([T.RandomCrop(32, padding=int(opt.randomcrop_pad), padding_mode='reflect'),
                               T.RandomHorizontalFlip(), transform])
    return transform


def decode_all(dataset):
    """A dataset's images as one uint8 (N, C, H, W) tensor, and its labels."""
    if hasattr(dataset, 'data'):  # torchvision's CIFAR keeps (N, H, W, C) arrays
        images = np.asarray(dataset.data)
    else:  # decode every file once; PIL releases the GIL, so threads help
        with ThreadPoolExecutor(os.cpu_count()) as pool:
            arrays = list(pool.map(lambda s: np.asarray(dataset.loader(s[0])), dataset.samples))
        shapes = sorted({a.shape for a in arrays})
        if len(shapes) > 1:
            raise UserError(f'images of several sizes {shapes[:2]} in {dataset.root}; '
                            f'the fast loader needs one size: pass --loader torchvision')
        images = np.stack(arrays)
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), list(dataset.targets)


def num_classes_of(dataset, opt):
    return len(dataset.classes) if hasattr(dataset, 'classes') else DATASETS[opt.dataset]


def create_loaders(opt, device):
    faithful = opt.loader == 'torchvision'
    train_set = open_dataset(opt, True, torchvision_transform(opt, True) if faithful else None)
    test_set = open_dataset(opt, False, torchvision_transform(opt, False) if faithful else None)
    if len(train_set) == 0 or len(test_set) == 0:
        raise UserError(f'--dataroot {opt.dataroot}: empty train or test set')
    if len(train_set.classes) != len(test_set.classes):
        raise UserError(f'--dataroot {opt.dataroot}: train has {len(train_set.classes)} classes, '
                        f'test has {len(test_set.classes)}')
    num_classes = num_classes_of(train_set, opt)
    dist = utils.Dist(device)
    if opt.batch_size % dist.world:
        raise UserError(f'--batch_size {opt.batch_size} is the global batch: it must divide by the '
                        f'{dist.world} torchrun processes')
    if dist.world > min(len(train_set), len(test_set)):
        raise UserError(f'{dist.world} torchrun processes for {min(len(train_set), len(test_set))} images: '
                        f'too few images to give each process some')
    batch = opt.batch_size // dist.world
    if not faithful:
        kw = dict(batch_size=batch, mean=MEAN, std=STD, device=device, channels_last=opt.channels_last,
                  rank=dist.rank, world=dist.world)
        gen = torch.Generator(device).manual_seed(opt.seed)
        return (utils.DeviceLoader(*decode_all(train_set), train=True, pad=opt.randomcrop_pad,
                                   generator=gen, **kw),
                utils.DeviceLoader(*decode_all(test_set), train=False, **kw), num_classes)
    # the 2017 default of 4 workers exceeds small machines' cores; that is fine, say nothing
    warnings.filterwarnings('ignore', message='This DataLoader will create')
    # workers are not persistent: each epoch seeds fresh ones from the generator, which resume restores
    kw = dict(batch_size=batch, num_workers=opt.nthread, pin_memory=device.type == 'cuda')
    gen = torch.Generator().manual_seed(opt.seed)
    if dist.world > 1:
        train_loader = torch.utils.data.DataLoader(train_set, generator=gen, sampler=DistributedSampler(
            train_set, dist.world, dist.rank, shuffle=True, seed=opt.seed), **kw)
        test_loader = torch.utils.data.DataLoader(test_set, sampler=range(dist.rank, len(test_set), dist.world), **kw)
    else:
        train_loader = torch.utils.data.DataLoader(train_set, shuffle=True, generator=gen, **kw)
        test_loader = torch.utils.data.DataLoader(test_set, shuffle=False, **kw)
    return train_loader, test_loader, num_classes


# ---------------------------------------------------------------- teacher

def split_prefixed(params, prefix):
    return {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)}


def resolve_run_folder(run_id):
    for folder in (os.path.join('logs', run_id), run_id):
        if os.path.isdir(folder):
            return folder
    raise UserError(f'--teacher_id {run_id!r}: no run folder logs/{run_id} or {run_id}')


def load_teacher(run_id, num_classes):
    """A finished CIFAR run (2017 format too) as (f, params, info); num_classes None takes the run's."""
    folder = resolve_run_folder(run_id)
    for name in ('log.txt', 'model.pt7'):
        if not os.path.isfile(os.path.join(folder, name)):
            raise UserError(f'teacher run folder {folder} has no {name}')
    stats = utils.read_json_stats(os.path.join(folder, 'log.txt'))
    if not stats:
        raise UserError(f'teacher {folder}/log.txt has no json_stats line')
    info = stats[0]
    model = info.get('model', 'wrn')  # 2017 logs name no model: WRN
    try:
        depth, width = int(info.get('depth', 16)), float(info['width'])
        if model == 'wrn':
            wrn_depth_to_blocks(depth)
        elif model not in MODELS:
            raise ValueError
    except (KeyError, TypeError, ValueError):
        raise UserError(f'teacher {folder}/log.txt does not give a valid model, depth and width') from None
    params = utils.load_checkpoint(os.path.join(folder, 'model.pt7'))['params']
    if any(k.startswith('student.') for k in params):  # a distilled run: its student is the teacher
        params = split_prefixed(params, 'student.')
    fc = params.get('fc.weight')
    if num_classes is None and fc is not None:  # any class count will do
        num_classes = fc.shape[0]
    if fc is not None and fc.shape[0] != num_classes:
        raise UserError(f'teacher {folder} was trained on {fc.shape[0]} classes, this dataset has {num_classes}')
    with torch.device('meta'):
        expected = model_params(model, depth, width, num_classes)
    utils.check_params(params, expected, f'teacher {folder}/model.pt7')
    return MODELS[model], {k: params[k].float() for k in expected}, dict(
        name=model_name(model, depth, width), folder=folder)


# ---------------------------------------------------------------- run

CHANNELS_LAST = {'cpu': True, 'cuda': False}  # measured on CPU (1.35x step); CUDA not yet measured


def build(opt):
    """Everything a run needs, from parsed options: data, parameters, loss and optimizer."""
    device = utils.select_device(opt)
    if opt.channels_last is None:
        opt.channels_last = int(CHANNELS_LAST[device.type])
    utils.seed_everything(opt.seed)
    train_loader, test_loader, num_classes = create_loaders(opt, device)

    params_s = model_params(opt.model, opt.depth, opt.width, num_classes)
    teacher = load_teacher(opt.teacher_id, num_classes) if opt.teacher_id else None
    params_t = teacher[1] if teacher else {}
    # F-ActT's 1x1 adapters train with the student, and are saved as adapter.*
    adapters = utils.factt_adapters(MODELS[opt.model], params_s, teacher[0], params_t, (1, 3, 32, 32)) \
        if teacher and opt.factt_beta else {}
    utils.place_params(params_s, params_t, device, opt.dtype, opt.channels_last)
    utils.place_params(adapters, {}, device, opt.dtype, opt.channels_last)
    f_s = utils.compiled(MODELS[opt.model], opt.compile, PROG)
    f_t = teacher and utils.compiled(teacher[0], opt.compile, PROG)
    compute = utils.make_compute(f_s, params_s, f_t, params_t, opt, adapters=adapters)

    return SimpleNamespace(
        device=device, train_loader=train_loader, test_loader=test_loader, num_classes=num_classes,
        params_s=params_s, compute=compute, n_at=3 if teacher else 0, topk=(1,),
        make_optimizer=utils.sgd_factory({**params_s, **adapters}, opt.weight_decay),
        description=f'student {model_name(opt.model, opt.depth, opt.width)}' + (
            f', teacher {teacher[2]["name"]} from {teacher[2]["folder"]}' if teacher else ''),
        # the 2017 checkpoint names: plain for a teacher run, prefixed when distilling
        saved=({**{'student.' + k: v for k, v in params_s.items()},
                **{'teacher.' + k: v for k, v in params_t.items()},
                **{'adapter.' + k: v for k, v in adapters.items()}} if teacher else params_s))


def main(argv=None):
    opt = parse_args(argv)
    print('parsed options:', vars(opt))
    utils.check_save(opt, time.strftime('cifar_%Y%m%d-%H%M%S'))
    utils.fit(opt, build(opt), PROG)


if __name__ == '__main__':
    utils.cli(main, PROG)
