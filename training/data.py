"""Data: CIFAR and class-folder datasets, the device-resident CIFAR loader, and the per-rank
loaders that both scripts use under torchrun."""
import hashlib
import os
import shutil
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data.distributed import DistributedSampler

from training.errors import UserError
from training.device import memory_format, rank_seed


PAD_MODES = {'reflect': 'reflect', 'zeros': 'constant'}  # --pad_mode: torch's and torchvision's names


# ---------------------------------------------------------------- datasets

@contextmanager
def reading_image(path):
    """A file that cannot be read or decoded, whatever the decoder says, is one line naming it: in a
    DataLoader worker too (errors.message takes it back out of torch's wrapping)."""
    try:
        yield
    except Exception as e:
        empty = os.path.isfile(path) and os.path.getsize(path) == 0
        reason = ('empty file' if empty else e.strerror if isinstance(e, OSError) and e.strerror else
                  'not an image file that can be decoded' if type(e).__name__ == 'UnidentifiedImageError' else
                  (str(e).strip().splitlines() or [type(e).__name__])[0])
        raise UserError(f'cannot read image {path}: {reason}') from None


def open_rgb(path):
    """The file as an RGB PIL image, as ImageFolder's loader gives it (without its copy of RGB files)."""
    from PIL import Image
    with reading_image(path), open(path, 'rb') as fh:
        img = Image.open(fh)
        img.load()
        return img if img.mode == 'RGB' else img.convert('RGB')


def image_folder(folder, transform=None):
    from torchvision import datasets
    try:
        return datasets.ImageFolder(folder, transform, loader=open_rgb)
    except (FileNotFoundError, OSError) as e:
        raise UserError(f'cannot read class folders in {folder}: {e}') from None


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


def open_cifar(dataroot, dataset, train, transform=None):
    """The train or test split under `dataroot`: a class-folder dataset, or torchvision's
    CIFAR10/CIFAR100 files, downloaded when missing as in 2017."""
    from torchvision import datasets
    folder = class_folder_split(dataroot, train)
    if folder:
        return image_folder(folder, transform)
    if os.path.isdir(os.path.join(dataroot, 'train')):
        raise UserError(f'{dataroot} has train/ but no test/ folder')
    cls = getattr(datasets, dataset)
    try:
        return cls(dataroot, train=train, download=False, transform=transform)
    except RuntimeError:
        pass  # not there yet: download
    made = first_missing_dir(dataroot)
    try:
        return cls(dataroot, train=train, download=True, transform=transform)
    except Exception as e:
        if made and not any(files for _, _, files in os.walk(made)):
            shutil.rmtree(made)  # torchvision made these folders for the failed download
        raise UserError(
            f'{dataset} is not in --dataroot {dataroot!r} and could not be downloaded '
            f'({type(e).__name__}); pass --dataroot DIR holding the torchvision files, or a class-folder '
            f'dataset (DIR/train/<class>/*.png, DIR/test/<class>/*.png)') from None


def check_classes(train, test, where, names=('train', 'test')):
    """Train and test must name the same classes in the same order: labels are indices into them."""
    if train.classes == test.classes:
        return
    for i, (a, b) in enumerate(zip(train.classes, test.classes)):
        if a != b:
            raise UserError(f'{where}: class {i} is {a!r} in {names[0]}/ but {b!r} in {names[1]}/; '
                            f'both need the same class folders')
    more, fewer = (names, (train, test)) if len(train.classes) > len(test.classes) else (names[::-1], (test, train))
    raise UserError(f'{where}: {more[0]}/ has a class {fewer[0].classes[len(fewer[1].classes)]!r} that {more[1]}/ '
                    f'lacks; both need the same class folders')


def class_digest(names):
    """A short digest of a dataset's class names, in order: a run's log record keeps it, so that a
    teacher of other classes is recognised without a list of a thousand names on every line."""
    return hashlib.sha1('\n'.join(names).encode()).hexdigest()[:16]


def one_size(sizes, where):
    """The one (height, width) of a dataset's images, from a set of them; several is one line."""
    if len(sizes) > 1:
        shown = ', '.join(f'{h}x{w}' for h, w in sorted(sizes)[:3])
        raise UserError(f'{where}: images of several sizes ({shown}{", ..." if len(sizes) > 3 else ""}, '
                        f'height x width); every image needs the same size')
    return next(iter(sizes))


def image_shape(dataset):
    """(height, width) of every image of a dataset, read from the headers alone; several is one line."""
    if hasattr(dataset, 'data'):  # torchvision's CIFAR keeps (N, H, W, C) arrays
        return tuple(np.asarray(dataset.data).shape[1:3])
    from PIL import Image

    def size(path):
        with reading_image(path), Image.open(path) as im:
            return im.size[::-1]
    with ThreadPoolExecutor(os.cpu_count()) as pool:  # PIL releases the GIL while it reads
        return one_size(set(pool.map(size, [path for path, _ in dataset.samples])), dataset.root)


def decode_all(dataset):
    """A dataset's images as one uint8 (N, C, H, W) tensor, and its labels."""
    if hasattr(dataset, 'data'):  # torchvision's CIFAR keeps (N, H, W, C) arrays
        images = np.asarray(dataset.data)
    else:  # decode every file once; PIL releases the GIL, so threads help
        with ThreadPoolExecutor(os.cpu_count()) as pool:
            arrays = list(pool.map(lambda s: np.asarray(dataset.loader(s[0])), dataset.samples))
        one_size({a.shape[:2] for a in arrays}, dataset.root)
        images = np.stack(arrays)
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), list(dataset.targets)


# ---------------------------------------------------------------- loaders

def channel_stats(mean, std, device):
    """Mean and std as (1, C, 1, 1) tensors on the device, made once per loader, not per batch."""
    return (torch.tensor(mean, device=device).view(1, -1, 1, 1), torch.tensor(std, device=device).view(1, -1, 1, 1))


def normalized(x, mean, std, memory_format=torch.contiguous_format):
    """Images (uint8, or float in 0-255) as float, normalised with the same float ops as ToTensor and
    Normalize, so equal to theirs bit for bit."""
    return x.float().div_(255).sub_(mean).div_(std).contiguous(memory_format=memory_format)


def rank_batch(batch_size, sizes, dist):
    """Each rank's share of the global --batch_size, once the data can be split over the ranks."""
    if batch_size % dist.world:
        raise UserError(f'--batch_size {batch_size} is the global batch: it must divide by the '
                        f'{dist.world} torchrun processes')
    if dist.world > min(sizes):
        raise UserError(f'{dist.world} torchrun processes for {min(sizes)} images: '
                        f'too few images to give each process some')
    return batch_size // dist.world


def data_loader(dataset, train, batch, nthread, seed, device, dist):
    """A DataLoader of this rank's share: under torchrun a seeded DistributedSampler for training
    (a fresh order each epoch, set by the loop) and every world-th image for testing. Workers are not
    persistent: each epoch seeds fresh ones from the generator, which resume restores. Each rank's
    generator has a seed of its own (rank_seed), so that the ranks' workers crop and flip apart; the
    sampler's seed is the same on every rank, so that their shares make one order."""
    # the 2017 default of 4 workers exceeds small machines' cores; that is fine, say nothing
    warnings.filterwarnings('ignore', message='This DataLoader will create')
    kw = dict(batch_size=batch, num_workers=nthread, pin_memory=device.type == 'cuda')
    if not train:
        return torch.utils.data.DataLoader(dataset, shuffle=False, **kw, **(
            {'sampler': range(dist.rank, len(dataset), dist.world)} if dist.world > 1 else {}))
    gen = torch.Generator().manual_seed(rank_seed(seed, dist.rank))
    if dist.world > 1:
        return torch.utils.data.DataLoader(dataset, generator=gen, sampler=DistributedSampler(
            dataset, dist.world, dist.rank, shuffle=True, seed=seed), **kw)
    return torch.utils.data.DataLoader(dataset, shuffle=True, generator=gen, **kw)


def crop_flip(padded, top, left, flip, size):
    """Per-sample crops of `padded` (B,C,H,W) at (top, left), of `size` (an int, or (height, width)),
    mirrored where `flip`: one gather."""
    b, c = padded.shape[:2]
    height, width = (size, size) if isinstance(size, int) else size
    rows = (top[:, None] + torch.arange(height, device=padded.device))[:, None, :, None]
    cols = left[:, None] + torch.arange(width, device=padded.device)
    cols = torch.where(flip[:, None], cols.flip(1), cols)[:, None, None, :]
    return padded[torch.arange(b, device=padded.device)[:, None, None, None],
                  torch.arange(c, device=padded.device)[None, :, None, None], rows, cols]


class DeviceLoader:
    """A whole image dataset as one uint8 tensor on the training device, batched there.

    Training batches get what the torchvision pipeline gives one image at a time:
    reflect-pad (or zero-pad), a random crop back to full size and a random horizontal flip,
    then scaling to [0,1] and normalisation, vectorised over the batch. The
    order is reshuffled every epoch from `generator`. It yields (inputs, targets)
    like a DataLoader, already on the device.

    `generator` is a CPU generator, whatever the device: the order, crops and flips are drawn on the
    CPU and copied over once an epoch (epoch_plan). A CUDA generator's numbers depend on the GPU model (which element gets which
    Philox number follows the launch grid, sized by the multiprocessor count: calc_execution_policy in
    ATen/native/cuda/DistributionTemplates.h), so ranks on different GPUs would read different orders,
    some images twice and some never; the CPU's numbers are one order for every device.

    Under torchrun every rank draws the same numbers from the same seeded generator, for the whole
    global batch, and keeps its own share of images and of crops and flips: the ranks' generators
    stay in step (rank 0's state resumes them all) while each image gets its own augmentation.
    """
    ranks_in_step = True  # device.rank_rng_state: a rank the checkpoint lacks takes rank 0's generator

    def __init__(self, images, labels, *, batch_size, mean, std, train, pad=4, pad_mode='reflect', device='cpu',
                 generator=None, channels_last=False, rank=0, world=1):
        device = torch.device(device)
        self.rank, self.world = rank, world
        self.images = images.to(device)  # (N, C, H, W) uint8
        self.labels = torch.as_tensor(labels, dtype=torch.long).to(device)
        self.batch_size, self.train, self.pad = batch_size, train, int(pad)
        self.pad_mode = PAD_MODES[pad_mode]
        self.mean, self.std = channel_stats(mean, std, device)
        self.generator = generator
        self.memory_format = memory_format(channels_last)

    def __len__(self):
        return -(-self.shard_size() // self.batch_size)

    def shard_size(self):
        n = len(self.labels)
        if self.world == 1:
            return n
        # training shards are padded to one size, so every rank takes as many steps
        return -(-n // self.world) if self.train else len(range(self.rank, n, self.world))

    def augment(self, x, draws):
        """Crops at (draws[0], draws[1]) and flips where draws[2], of the padded images."""
        size = x.shape[-2:]
        if self.pad:
            x = F.pad(x, [self.pad] * 4, mode=self.pad_mode)  # constant: 0, a black pixel before normalising
        return crop_flip(x, draws[0], draws[1], draws[2].bool(), size)

    def epoch_plan(self):
        """The epoch's order and, per image, its crop offsets and flip: a (4, n) tensor on the device.
        Drawn on the CPU (see the class), each global batch's three draws after the order, as they were
        once drawn batch by batch, and copied over at once: a copy from pageable memory makes the host
        wait for the device, which every step's own copy did."""
        g, n = self.generator, len(self.labels)
        order = torch.randperm(n, generator=g)
        if self.world > 1:  # one size for every rank's share, so all take as many steps
            order = torch.cat([order, order[:self.shard_size() * self.world - n]])
        span = 2 * self.pad + 1
        draws = [torch.stack([torch.randint(0, span, (len(c),), generator=g),  # top, left, flip
                              torch.randint(0, span, (len(c),), generator=g),
                              torch.randint(0, 2, (len(c),), generator=g)])
                 for c in order.split(self.batch_size * self.world)]
        return torch.cat([order[None], torch.cat(draws, 1)]).to(self.labels.device)

    def __iter__(self):
        n = len(self.labels)
        plan = self.epoch_plan() if self.train else torch.arange(n, device=self.labels.device)[None]
        # global batches of the same seeded order on every rank; each rank takes every world-th image
        for chunk in plan.split(self.batch_size * self.world, 1):
            mine = chunk[:, self.rank::self.world]
            idx = mine[0]
            if not len(idx):  # the test split's last chunk may hold fewer images than ranks
                break
            x = self.images[idx].float()
            if self.train:
                x = self.augment(x, mine[1:])
            x = normalized(x, self.mean, self.std, self.memory_format)
            yield x, self.labels[idx]
