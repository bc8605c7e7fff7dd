"""ImageNet ResNet-18/34 students, alone or with attention transfer from a folded ResNet teacher.

    python imagenet.py --imagenetpath ~/ILSVRC2012 --depth 18 --width 1 \
        --teacher_params resnet-34-export.hkl --gpu_id 0,1 --ngpu 2 --beta 1e+3
    python imagenet.py --imagenetpath ~/ILSVRC2012 --evaluate resnet-18-at-export.pth
"""
import os
import time
from dataclasses import replace

import torch

from resnet import IMAGENET_BLOCKS, resnet_imagenet, resnet_imagenet_params
from utils import AT_MODES, check_params
from training import board
from training import errors
from training import loop
from training import imagenet_data
from training import options
from training import rundir
from training.data import check_classes, class_digest, image_folder, rank_batch
from training.loop import evaluate
from training.errors import UserError, as_user_error
from training.rundir import checkpoint_params, load_checkpoint
from training.options import derived, flag, shared
from training.device import Dist, Precision, seed_everything, select_device
from training.teachers import load_teacher_export

PROG = 'imagenet.py'


@options.options_class
class ImagenetOptions(options.Options):
    """imagenet.py's options, typed, in --help's order."""
    depth = flag(int, 18, '18 or 34', v2017=True)
    width = flag(float, 1, 'widening factor of the groups\' channels (the stem keeps 64)', v2017=True)
    imagenetpath = flag(str, '', 'folder with train/ and val/ in ImageFolder layout', v2017=True)
    dtype = shared('dtype')
    nthread = flag(int, None, 'loader workers per process (2017: 4; default: the CPUs this process may use '
                   '/ processes per machine)', v2017=True, may_change=True)
    teacher_params = flag(str, '', 'teacher export: .pth, .hkl, or torchvision:resnet34[:local_state_dict.pth]',
                          v2017=True)
    batch_size = shared('batch_size', 256)
    lr = shared('lr')
    epochs = shared('epochs', 100)
    weight_decay = shared('weight_decay', 1e-4)
    epoch_step = shared('epoch_step', '[30,60,90]')
    lr_decay_ratio = shared('lr_decay_ratio', 0.1)
    resume = shared('resume')
    temperature = shared('temperature')
    alpha = shared('alpha')
    beta = shared('beta')
    save = shared('save')
    ngpu = shared('ngpu')
    gpu_id = shared('gpu_id')
    cuda = shared('cuda')
    at_sum_replicas = shared('at_sum_replicas')
    at_groups = flag(str, '0,1,2,3', 'groups whose attention is transferred, e.g. 2,3')
    at_mode = shared('at_mode', choices=AT_MODES)
    evaluate = flag(str, '', 'only evaluate on val: the --resume student, or an export file (.pth, .hkl, '
                    'torchvision:NAME)', may_change=True, nargs='?', const='resume')
    seed = shared('seed')
    device = shared('device')
    compile = shared('compile')
    tensorboard = shared('tensorboard')
    tensorboard_every = shared('tensorboard_every')
    no_progress = shared('no_progress')
    decoder = flag(str, 'pil', 'pil: the 2017 pixels; torchvision: torchvision.io decode and a uint8 resize (faster, '
                   'at most 1 level off); nvjpeg: decode on the GPU', choices=imagenet_data.DECODERS)
    channels_last = flag(int, 1, 'channels_last memory format for inputs and weights', choices=[0, 1],
                         may_change=True)
    allow_change = shared('allow_change')
    at_group_list = derived(list, 'at_groups')  # --at_groups as numbers
    at_weight = derived(float, 'beta', 'ngpu', 'at_sum_replicas')  # beta on the whole batch (options.at_weight)


def build_parser():
    return ImagenetOptions.parser(PROG, 'ResNet training on ImageNet with attention transfer')


def parse_args(argv=None):
    opt = ImagenetOptions.from_namespace(build_parser().parse_args(argv))
    board.check_option(opt)
    options.check_options(opt)
    if int(64 * opt.width) < 1:
        raise UserError(f'--width {opt.width} leaves a group with no channels')
    if opt.depth not in IMAGENET_BLOCKS:
        raise UserError(f'--depth must be one of {sorted(IMAGENET_BLOCKS)}, got {opt.depth}')
    at_group_list(opt.at_groups)
    options.check_teacher_needed(opt, bool(opt.teacher_params), '--teacher_params', ['beta', 'alpha'])
    if opt.evaluate == 'resume' and not opt.resume:
        raise UserError('--evaluate without a FILE evaluates the --resume checkpoint: pass --resume too')
    if not opt.imagenetpath:
        raise UserError('pass --imagenetpath DIR (DIR/train/<class>/*.JPEG and DIR/val/<class>/*.JPEG)')
    return opt


def at_group_list(text):
    """--at_groups as numbers."""
    try:
        groups = [int(g) for g in text.split(',')]
    except ValueError:
        groups = None
    if not groups or not all(0 <= g < 4 for g in groups) or len(set(groups)) != len(groups):
        raise UserError(f'--at_groups must list distinct groups from 0 to 3, like 2,3; got {text!r}')
    return groups


def settle(opt, default_save):
    """The options as the run records them, decided once, here (Options are frozen): --nthread from
    the CPUs, --tensorboard from what is installed, --resume auto and --save from the run folder, and
    the derived at_group_list and at_weight. Evaluating writes no run: any --save will do."""
    resume, save = rundir.run_folder(opt.resume, opt.save, default_save, writes=not opt.evaluate)
    if opt.evaluate == 'resume' and not resume:
        raise UserError(f'--evaluate --resume auto: --save {opt.save} holds no model.pt7 to evaluate')
    return replace(opt, nthread=imagenet_data.default_workers() if opt.nthread is None else opt.nthread,
                   tensorboard=board.enabled(opt.tensorboard), resume=resume, save=save,
                   at_group_list=at_group_list(opt.at_groups), at_weight=options.at_weight(opt))


def open_split(opt, split):
    """The ImageFolder of train/ or val/, without transforms: imagenet_data makes the views."""
    folder = os.path.join(opt.imagenetpath, split)
    if not os.path.isdir(folder):
        raise UserError(f'--imagenetpath {opt.imagenetpath} has no {split}/ folder')
    dataset = image_folder(folder)
    if len(dataset.classes) < 5:  # top-5 error, as in 2017
        raise UserError(f'--imagenetpath: {split}/ has {len(dataset.classes)} classes; top-5 error needs at least 5')
    return dataset


def create_loader(opt, split, device):
    """A loader of this rank's share of train/ or val/ (normalised float batches on the device), and
    the split's class count."""
    if opt.decoder == 'nvjpeg' and device.type != 'cuda':
        raise UserError(f'--decoder nvjpeg decodes on a CUDA GPU; the device is {device.type} (use pil or torchvision)')
    dataset = open_split(opt, split)
    dist = Dist(device)
    batch = rank_batch(opt.batch_size, [len(dataset)], dist)
    return imagenet_data.image_loader(dataset, split == 'train', batch, opt.nthread, opt.seed, device, dist,
                                      opt.decoder, bool(opt.channels_last)), len(dataset.classes)


def build(opt):
    device = select_device(opt.device, opt.gpu_id, opt.ngpu)
    precision = Precision(opt.dtype, device.type, bool(opt.channels_last))
    seed_everything(opt.seed)
    train_loader, num_classes = create_loader(opt, 'train', device)
    val_loader, _ = create_loader(opt, 'val', device)
    check_classes(train_loader.dataset, val_loader.dataset, f'--imagenetpath {opt.imagenetpath}', ('train', 'val'))
    params_s = resnet_imagenet_params(opt.depth, opt.width, num_classes)
    f_t, params_t = load_teacher_export(opt.teacher_params) if opt.teacher_params else (None, {})
    if f_t and opt.alpha and params_t['fc.weight'].shape[0] != num_classes:  # attention maps know no classes
        raise UserError(f'teacher {opt.teacher_params} has {params_t["fc.weight"].shape[0]} classes, the dataset '
                        f'{num_classes}: KD (--alpha) compares class scores; AT alone (--alpha 0) would do')
    distiller, make_optimizer = loop.make_distiller(opt, PROG, device, precision, resnet_imagenet, params_s, f_t,
                                                    params_t, at_groups=opt.at_group_list)
    # a teacher export is a fixed file: only the student is checkpointed
    return loop.Run(opt, device, precision, train_loader, val_loader, num_classes, params_s, distiller,
                    make_optimizer, saved=params_s, topk=(1, 5),
                    data=dict(class_digest=class_digest(train_loader.dataset.classes)),
                    description=f'student ResNet-{opt.depth}' + (f', teacher {opt.teacher_params}' if f_t else ''))


def evaluate_only(opt):
    """Top-1/top-5 error on val of an export file or of the --resume student."""
    device = select_device(opt.device, opt.gpu_id, opt.ngpu)
    loader, num_classes = create_loader(opt, 'val', device)
    if opt.evaluate == 'resume':
        with torch.device('meta'):
            expected = resnet_imagenet_params(opt.depth, opt.width, num_classes)
        params = checkpoint_params(load_checkpoint(opt.resume), expected)
        with as_user_error(ValueError):
            check_params(params, expected, f'--resume {opt.resume}')
        f, params = resnet_imagenet, {k: params[k] for k in expected}
    else:
        try:
            f, params = load_teacher_export(opt.evaluate)
        except UserError:
            if is_run_checkpoint(opt.evaluate):  # an export's names are not a run's: say what was meant
                raise UserError(f'--evaluate {opt.evaluate} is a run\'s checkpoint, not an export: pass --evaluate '
                                f'--resume {opt.evaluate}') from None
            raise
        if params['fc.weight'].shape[0] != num_classes:
            raise UserError(f'{opt.evaluate} has {params["fc.weight"].shape[0]} classes, val/ has {num_classes}: '
                            f'its errors would mean nothing')
    params = {k: v.to(device) for k, v in params.items()}
    dist = Dist(device)
    (top1, top5), n = evaluate(f, params, loader, device, Precision(opt.dtype, device.type),
                               progress=not opt.no_progress and dist.rank == 0, dist=dist)
    if dist.rank == 0:  # every rank evaluated its share; the figures are over all of val/
        name = opt.resume if opt.evaluate == 'resume' else opt.evaluate
        print(f'{name}: top-1 error {100 - top1:.2f}%, top-5 error {100 - top5:.2f}% on {n} images')
    return top1, top5


def is_run_checkpoint(path):
    """Whether `path` is a model.pt7 that a run wrote ({params, optimizer, epoch}), not an export."""
    try:
        return 'epoch' in load_checkpoint(path)
    except UserError:
        return False


def main(argv=None):
    opt = settle(parse_args(argv), time.strftime('imagenet_%Y%m%d-%H%M%S'))
    if opt.evaluate:
        return evaluate_only(opt)
    print('parsed options:', vars(opt))
    options.check_resume(opt)
    loop.fit(opt, build(opt), PROG)


if __name__ == '__main__':
    errors.cli(main, PROG)
