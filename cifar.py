"""Wide ResNets on CIFAR: teachers, and students with attention transfer (--beta) and KD (--alpha).

    python cifar.py --save logs/resnet_16_2_teacher --depth 16 --width 2
    python cifar.py --save logs/at_16_1_16_2 --teacher_id resnet_16_2_teacher --beta 1e+3
    python cifar.py --preset crd --model resnet8x4 --teacher_id logs/cifar100/resnet32x4_teacher --beta 1e+3
"""
import sys
import time
from dataclasses import replace

import torch

from resnet import (CIFAR_MODELS, INITS, INITS_OF, cifar_model_groups, cifar_model_name, cifar_model_params,
                    wrn_depth_to_blocks)
from utils import AT_MODES, AT_POOLS
from training import board
from training import errors
from training import loop
from training import options
from training import rundir
from training.data import (PAD_MODES, DeviceLoader, check_classes, class_digest, data_loader, decode_all,
                           image_shape, one_size, open_cifar, rank_batch)
from training.distill import check_at, factt_adapters
from training.errors import UserError
from training.options import derived, flag, shared
from training.device import Dist, Precision, seed_everything, select_device
from training.teachers import check_teacher_data, load_teacher_run, teacher_record

PROG = 'cifar.py'
MEAN = [125.3 / 255, 123.0 / 255, 113.9 / 255]
STD = [63.0 / 255, 62.1 / 255, 66.7 / 255]
# --normalize: the 2017 statistics (CIFAR-10's, used for both datasets then), or the CIFAR-100 ones
# of RepDistiller's dataset/cifar100.py
NORMALIZE = {'2017': (MEAN, STD), 'cifar100': ([0.5071, 0.4867, 0.4408], [0.2675, 0.2565, 0.2761])}
# --preset crd: the recipe of RepDistiller's train_student.py (docs/cifar100.md). Its lr is 0.05 x 0.1^k,
# k the decay epochs (150, 180, 210) the current 1-based epoch exceeds: here, drops at the start of 151,
# 181 and 211. AT pools feature maps of different sizes as its distiller_zoo/AT.py does; the WRNs start
# from its models/wrn.py's initialisation. Flags given on the command line override it.
PRESETS = {'crd': dict(dataset='CIFAR100', epochs=240, batch_size=64, lr=0.05, weight_decay=5e-4,
                       epoch_step='[151,181,211]', lr_decay_ratio=0.1, lr_restart_momentum=0,
                       pad_mode='zeros', normalize='cifar100', at_pool='features', init='crd')}
# ... and per network: train_student.py and train_teacher.py set lr 0.01 for MobileNetV2 (that code's
# mobile_half), ShuffleV1 and ShuffleV2, as students and as teachers
PRESET_MODELS = {'crd': {name: dict(lr=0.01) for name in ('MobileNetV2', 'ShuffleV1', 'ShuffleV2')}}
DATASETS = {'CIFAR10': 10, 'CIFAR100': 100}  # their class counts: a class-folder copy must have as many
WIDTH_MODELS = ('wrn', 'nin')  # the networks --width shapes; the benchmark's are fixed by their names
CHANNELS_LAST = {'cpu': True, 'cuda': False}  # CPU: about 1.1x end to end (docs/speed.md); CUDA: not measured yet


@options.options_class
class CifarOptions(options.Options):
    """cifar.py's options, typed, in --help's order."""
    depth = flag(int, 16, 'WRN depth, 6n+4', v2017=True)
    width = flag(float, 1, 'WRN widening factor k; for NIN, 1 is NIN-wide and 0.45 NIN-thin', v2017=True)
    dataset = flag(str, 'CIFAR10', 'CIFAR10 or CIFAR100', v2017=True)
    dataroot = flag(str, '.', 'torchvision CIFAR folder (downloaded when missing), or a class-folder dataset with '
                    'train/ and test/', v2017=True)
    dtype = shared('dtype')
    nthread = flag(int, 4, 'DataLoader workers', v2017=True, may_change=True)
    teacher_id = flag(str, '', 'teacher run: a name under logs/, or a run folder', v2017=True)
    batch_size = shared('batch_size', 128)
    lr = shared('lr')
    epochs = shared('epochs', 200)
    weight_decay = shared('weight_decay', 0.0005)
    epoch_step = shared('epoch_step', '[60,120,160]')
    lr_decay_ratio = shared('lr_decay_ratio', 0.2)
    resume = shared('resume')
    randomcrop_pad = flag(float, 4, 'pixels of padding (--pad_mode) before the random crop back to the image size '
                          '(2017 declared it and always padded 4)', v2017=True)
    temperature = shared('temperature')
    alpha = shared('alpha')
    beta = shared('beta')
    cuda = shared('cuda')
    save = shared('save')
    ngpu = shared('ngpu')
    gpu_id = shared('gpu_id')
    model = flag(str, 'wrn', 'wrn: Wide ResNet (--depth, --width); nin: Network-in-Network (--width); the CIFAR-100 '
                 'benchmark\'s resnet8, 14, 20, 32, 44, 56, 110, resnet8x4, resnet32x4, vgg8, 11, 13, 16, 19 '
                 '(named in full), ResNet50, MobileNetV2, ShuffleV1, ShuffleV2',
                 choices=list(CIFAR_MODELS), metavar='MODEL')
    preset = flag(str, 'none', 'crd: the CIFAR-100 recipe of RepDistiller (240 epochs, batch 64, lr 0.05 (0.01 for '
                  'MobileNetV2, ShuffleV1, ShuffleV2), x0.1 after 150, 180, 210, momentum kept, zero padding, '
                  'CIFAR-100 mean/std, --at_pool features, --init crd); flags given override it',
                  choices=['none', 'crd'])
    init = flag(str, None, 'initialisation of the WRN: 2017 (kaiming fan_in convs, bn weights uniform in '
                '[0, 1), kaiming linear) or crd (RepDistiller\'s wrn.py: kaiming fan_out convs, bn '
                'weight 1, torch\'s linear weight, zero bias); default: 2017 for wrn and nin, crd for '
                'the benchmark\'s other networks (their only one)', choices=list(INITS))
    lr_restart_momentum = flag(int, 1, '1: a fresh optimizer at each lr step, so the momentum restarts (2017); 0: '
                               'only the lr changes', choices=[0, 1])
    pad_mode = flag(str, 'reflect', 'padding before the random crop: reflect (2017) or zeros (torchvision '
                    'RandomCrop\'s default)', choices=['reflect', 'zeros'])
    normalize = flag(str, '2017', 'mean/std: 2017 (the reference\'s, for both datasets) or cifar100 (the CIFAR-100 '
                     'statistics)', choices=list(NORMALIZE))
    at_sum_replicas = shared('at_sum_replicas')
    at_pool = flag(str, 'attention', 'AT between maps of different sizes: attention (2017: average-pool the larger '
                   'attention map; whole multiples only) or features (RepDistiller: adaptive-average-pool the '
                   'larger feature map; any sizes)', choices=AT_POOLS)
    at_mode = shared('at_mode', choices=AT_MODES)
    beta_decay = flag(str, 'none', 'AT weight schedule: none (2017), step (times lr_decay_ratio whenever the lr '
                      'drops), linear (down to beta/epochs at the last epoch)',
                      choices=['none', 'step', 'linear'])
    factt_beta = flag(float, 0, 'F-ActT (full-activation transfer) weight; 1x1 adapters where the channels differ, '
                      'trained with the student and saved as adapter.*')
    grad_beta = flag(float, 0, 'gradient-based AT weight (paper section 3.2; needs a teacher)')
    sym_beta = flag(float, 0, 'flip-symmetry weight on the gradient attention')
    seed = shared('seed')
    device = shared('device')
    loader = flag(str, 'fast', 'fast: whole dataset on the device, batched augmentation; torchvision: the 2017 '
                  'per-image path', choices=['fast', 'torchvision'])
    channels_last = flag(int, None, 'channels_last memory format (default: where it measured faster for '
                         'this device type)', choices=[0, 1], may_change=True)
    compile = shared('compile')
    tensorboard = shared('tensorboard')
    tensorboard_every = shared('tensorboard_every')
    no_progress = shared('no_progress')
    allow_change = shared('allow_change')
    at_weight = derived(float, 'beta', 'ngpu', 'at_sum_replicas')  # beta on the whole batch (options.at_weight)


def build_parser():
    return CifarOptions.parser(PROG, 'Wide ResNet training on CIFAR with attention transfer')


def parse_args(argv=None):
    p = build_parser()
    known = p.parse_known_args(argv)[0]
    if known.preset != 'none':
        p.set_defaults(**{**PRESETS[known.preset], **PRESET_MODELS[known.preset].get(known.model, {})})
    opt = CifarOptions.from_namespace(p.parse_args(argv))
    own = inits(opt.model)
    if opt.init not in (None, *own):
        raise UserError(f'--init {opt.init}: {cifar_model_name(opt.model, opt.depth, opt.width)} has only the '
                        f'{own[0]} initialisation; pass --init {own[0]}')
    board.check_option(opt)
    if opt.model not in WIDTH_MODELS and opt.width != CifarOptions.width:
        raise UserError(f'--model {opt.model} has no --width: its name fixes its channels (drop --width {opt.width:g})')
    if opt.model != 'wrn' and opt.depth != CifarOptions.depth:
        raise UserError(f'--model {opt.model} has no --depth: its name fixes its layers (drop --depth {opt.depth})')
    options.check_options(opt, positive=['width'] if opt.model in WIDTH_MODELS else [],
                       not_negative=['randomcrop_pad', 'factt_beta', 'grad_beta', 'sym_beta'])
    if opt.randomcrop_pad != int(opt.randomcrop_pad):
        raise UserError(f'--randomcrop_pad is a number of pixels, a whole number; got {opt.randomcrop_pad:g}')
    if opt.model == 'wrn':
        try:
            wrn_depth_to_blocks(opt.depth)
        except ValueError as e:
            raise UserError(str(e)) from None
    if opt.model in WIDTH_MODELS and int(16 * opt.width) < 1:
        raise UserError(f'--width {opt.width} leaves a group with no channels')
    if opt.dataset not in DATASETS:
        raise UserError(f'--dataset must be one of {", ".join(DATASETS)}, got {opt.dataset!r}')
    if opt.grad_beta and not opt.teacher_id:
        raise UserError('--grad_beta matches the teacher\'s gradient attention: pass --teacher_id')
    options.check_teacher_needed(opt, bool(opt.teacher_id), '--teacher_id', ['beta', 'alpha', 'factt_beta'])
    if opt.grad_beta or opt.sym_beta:
        if Precision(opt.dtype).compute or opt.ngpu > 1 or opt.compile:
            raise UserError('--grad_beta and --sym_beta need double backprop, eagerly, in full precision, on one '
                            'device: use --dtype float and --ngpu 1, without --compile')
    return opt


def inits(model):
    """The initialisations of a network, its default first: the WRN has both, NIN only 2017's
    (RepDistiller has no NIN to take one from), the benchmark's other networks only crd (their code's;
    2017 had none of them)."""
    return INITS_OF.get(model, ('crd',))


def settle(opt, device, default_save):
    """The options as the run records them, decided once, here (Options are frozen): --init from
    --model, --channels_last from the device, --tensorboard from what is installed, --resume auto and
    --save from the run folder, and the derived at_weight."""
    resume, save = rundir.run_folder(opt.resume, opt.save, default_save)
    return replace(opt, init=opt.init or inits(opt.model)[0], resume=resume, save=save,
                   channels_last=int(CHANNELS_LAST[device.type]) if opt.channels_last is None else opt.channels_last,
                   tensorboard=board.enabled(opt.tensorboard), at_weight=options.at_weight(opt))


def setup(argv=None):
    """A run's options, parsed, checked and settled, and its device."""
    opt = parse_args(argv)
    device = select_device(opt.device, opt.gpu_id, opt.ngpu)
    return settle(opt, device, time.strftime('cifar_%Y%m%d-%H%M%S')), device


# ---------------------------------------------------------------- data

def torchvision_transform(pad, train, size=(32, 32), pad_mode='reflect', normalize='2017'):
    """The 2017 per-image pipeline: a random crop back to the images' own size."""
    import torchvision.transforms as T
    transform = T.Compose([T.ToTensor(), T.Normalize(*NORMALIZE[normalize])])
    if train:
        transform = T.Compose([T.RandomCrop(size, padding=int(pad), padding_mode=PAD_MODES[pad_mode]),
                               T.RandomHorizontalFlip(), transform])
    return transform


def create_loaders(opt, device):
    """(train loader, test loader, class names, image (height, width)): the fast device-resident
    loader, or the 2017 one. Any one image size trains (the networks pool globally); train and
    test must share it and their class folders."""
    faithful, dist, where = opt.loader == 'torchvision', Dist(device), f'--dataroot {opt.dataroot}'
    train_set, test_set = (dist.rank0_first(lambda: open_cifar(opt.dataroot, opt.dataset, train))
                           for train in (True, False))  # rank 0 downloads, if anyone must
    if len(train_set) == 0 or len(test_set) == 0:
        raise UserError(f'{where}: empty train or test set')
    check_classes(train_set, test_set, where)
    count = len(train_set.classes)
    if count in DATASETS.values() and count != DATASETS[opt.dataset]:  # a copy of the other CIFAR
        raise UserError(f'{where} has {count} classes, --dataset {opt.dataset} {DATASETS[opt.dataset]}: '
                        f'pass --dataset {next(k for k, v in DATASETS.items() if v == count)}')
    if faithful:
        sizes = image_shape(train_set), image_shape(test_set)
    else:
        (train_x, train_y), (test_x, test_y) = decode_all(train_set), decode_all(test_set)
        sizes = tuple(train_x.shape[-2:]), tuple(test_x.shape[-2:])
    if sizes[0] != sizes[1]:
        raise UserError(f'{where}: train images are {sizes[0][0]}x{sizes[0][1]} and test images '
                        f'{sizes[1][0]}x{sizes[1][1]} (height x width); both need the same size')
    size = one_size(set(sizes), where)
    if opt.randomcrop_pad >= min(size):
        raise UserError(f'--randomcrop_pad {opt.randomcrop_pad:g} must be smaller than the images ({min(size)} pixels)')
    batch = rank_batch(opt.batch_size, (len(train_set), len(test_set)), dist)
    if faithful:
        train_set.transform = torchvision_transform(opt.randomcrop_pad, True, size, opt.pad_mode, opt.normalize)
        test_set.transform = torchvision_transform(opt.randomcrop_pad, False, normalize=opt.normalize)
        return (data_loader(train_set, True, batch, opt.nthread, opt.seed, device, dist),
                data_loader(test_set, False, batch, opt.nthread, opt.seed, device, dist), train_set.classes, size)
    mean, std = NORMALIZE[opt.normalize]
    kw = dict(batch_size=batch, mean=mean, std=std, device=device, channels_last=opt.channels_last,
              rank=dist.rank, world=dist.world)
    gen = torch.Generator().manual_seed(opt.seed)  # on the CPU for every device (data.DeviceLoader says why)
    return (DeviceLoader(train_x, train_y, train=True, pad=opt.randomcrop_pad, pad_mode=opt.pad_mode,
                         generator=gen, **kw),
            DeviceLoader(test_x, test_y, train=False, **kw), train_set.classes, size)


# ---------------------------------------------------------------- run

def build(opt, device):
    """Everything a run needs, from settled options (setup): data, networks, loss and optimizer."""
    precision = Precision(opt.dtype, device.type, bool(opt.channels_last))
    seed_everything(opt.seed)
    train_loader, test_loader, classes, size = create_loaders(opt, device)
    num_classes, data = len(classes), dict(image_size=list(size), class_digest=class_digest(classes))
    params_s = cifar_model_params(opt.model, opt.depth, opt.width, num_classes, opt.init)
    check_fits(CIFAR_MODELS[opt.model], params_s, size, f'--model {opt.model}')
    # KD and gradient AT compare class scores: they need the teacher's classes; attention maps know no classes
    f_t, params_t, info = load_teacher_run(opt.teacher_id, num_classes if opt.alpha or opt.grad_beta else None) \
        if opt.teacher_id else (None, {}, None)
    if f_t:
        check_teacher_data(info, dict(normalize=opt.normalize, **data),
                           compare_classes=bool(opt.alpha or opt.grad_beta))
        if not info['finished'] and Dist(device).rank == 0:  # an early-stopped teacher may be meant: a warning
            print(f'warning: teacher {info["folder"]} did not finish its schedule: it trained {info["epoch"]} of '
                  f'{info["epochs"]} epochs', file=sys.stderr)
        data.update(teacher_record(info))
    n_groups, at_groups = cifar_model_groups(opt.model), None
    if f_t and cifar_model_groups(info['model']) != n_groups:
        if opt.beta or opt.factt_beta:
            raise UserError(f'teacher {info["name"]} has {cifar_model_groups(info["model"])} group outputs and '
                            f'student {cifar_model_name(opt.model, opt.depth, opt.width)} {n_groups}: AT (--beta, '
                            f'--factt_beta) pairs them one to one; KD (--alpha) needs none')
        at_groups = ()  # no AT asked, and no pairing to log AT terms by
    if f_t and opt.beta:
        check_at(CIFAR_MODELS[opt.model], params_s, f_t, params_t, (1, 3, *size), opt.at_pool, at_groups)
    # F-ActT's 1x1 adapters train with the student, and are saved as adapter.*
    adapters = factt_adapters(CIFAR_MODELS[opt.model], params_s, f_t, params_t, (1, 3, *size)) \
        if f_t and opt.factt_beta else {}
    distiller, make_optimizer = loop.make_distiller(
        opt, PROG, device, precision, CIFAR_MODELS[opt.model], params_s, f_t, params_t, adapters,
        at_groups=at_groups, at_pool=opt.at_pool, factt_beta=opt.factt_beta, grad_beta=opt.grad_beta,
        sym_beta=opt.sym_beta)
    return loop.Run(
        opt, device, precision, train_loader, test_loader, num_classes, params_s, distiller, make_optimizer,
        # the 2017 checkpoint names: plain for a teacher run, prefixed when distilling
        saved=({**{'student.' + k: v for k, v in params_s.items()},
                **{'teacher.' + k: v for k, v in params_t.items()},
                **{'adapter.' + k: v for k, v in adapters.items()}} if f_t else params_s),
        description=f'student {cifar_model_name(opt.model, opt.depth, opt.width)}' + (
            f', teacher {info["name"]} from {info["folder"]} (epoch {info["epoch"]} of {info["epochs"]})'
            if f_t else ''), data=data)


def check_fits(f, params, size, name):
    """A network pools its images down: ones too small for it are one line, not a traceback mid-step."""
    try:
        with torch.no_grad():
            f(torch.zeros(1, 3, *size), params, False)
    except RuntimeError:
        raise UserError(f'{name} cannot take {size[0]}x{size[1]} images: they are too small for its '
                        f'poolings') from None


def main(argv=None):
    opt, device = setup(argv)
    print('parsed options:', vars(opt))
    options.check_resume(opt)
    loop.fit(opt, build(opt, device), PROG)


if __name__ == '__main__':
    errors.cli(main, PROG)
