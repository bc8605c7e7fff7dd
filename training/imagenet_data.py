"""The ImageNet input pipeline: workers decode and crop to uint8 images, the training device
converts and normalises them.

The views are the 2017 ones: RandomResizedCrop(224) and a flip for training, Resize(256) and
CenterCrop(224) for val. A training image's crop box and flip come from its own generator, seeded
from (seed, epoch, index), drawn as torchvision's RandomResizedCrop.get_params and
RandomHorizontalFlip draw them: with the PIL decoder an image's batch row equals the 2017
transforms' output under torch.manual_seed of that generator's seed, bit for bit. So the
augmentation depends on neither the worker count nor the workers' lives (they persist across
epochs), and a resumed run repeats an uninterrupted one.

Decoders: `pil` (the 2017 pixels), `torchvision` (torchvision.io's libjpeg-turbo decode and a uint8
antialiased resize: at most 1 level off the PIL resize), `nvjpeg` (decode_jpeg on the GPU: workers
only read the files and draw the boxes).
"""
import math
import os

import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler
from torch.utils.data.distributed import DistributedSampler

from training.data import channel_stats, normalized, open_rgb, reading_image
from training.device import memory_format

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
SIZE, VAL_RESIZE = 224, 256
SCALE, RATIO = (0.08, 1.0), (3 / 4, 4 / 3)
DECODERS = ('pil', 'torchvision', 'nvjpeg')


def default_workers():
    """Loader workers per process: the CPUs this process may use, shared by the torchrun processes
    on this machine; at least 1, at most 32 (more only add memory)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1
    return max(1, min(32, cpus // int(os.environ.get('LOCAL_WORLD_SIZE', 1))))


def sample_seed(seed, epoch, index):
    """The seed of one training image's augmentation in one epoch: SeedSequence mixes the three, so
    that neighbouring images and epochs get unrelated streams."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


def draw_box(height, width, g):
    """(top, left, h, w, flip): torchvision's RandomResizedCrop.get_params, then RandomHorizontalFlip's
    draw, taking the same numbers from `g` as they take from torch's global generator."""
    area, log_ratio = height * width, torch.log(torch.tensor(RATIO))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(*SCALE, generator=g).item()
        aspect_ratio = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=g)).item()
        w, h = int(round(math.sqrt(target_area * aspect_ratio))), int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = torch.randint(0, height - h + 1, size=(1,), generator=g).item()
            left = torch.randint(0, width - w + 1, size=(1,), generator=g).item()
            break
    else:  # torchvision's fallback: the central crop of the nearest allowed aspect ratio
        in_ratio = width / height
        if in_ratio < min(RATIO):
            w, h = width, int(round(width / min(RATIO)))
        elif in_ratio > max(RATIO):
            h, w = height, int(round(height * max(RATIO)))
        else:
            w, h = width, height
        top, left = (height - h) // 2, (width - w) // 2
    return top, left, h, w, bool(torch.rand(1, generator=g) < 0.5)


def pil_view(img, box):
    """The 2017 view of a PIL image (`box` from draw_box for training, None for val) as uint8 HWC."""
    from PIL import Image
    import torchvision.transforms.functional as TF
    if box is None:
        img = TF.center_crop(TF.resize(img, VAL_RESIZE), SIZE)
    else:  # TF.resized_crop and TF.hflip, as RandomResizedCrop and RandomHorizontalFlip call them
        top, left, h, w, flip = box
        img = img.crop((left, top, left + w, top + h)).resize((SIZE, SIZE), Image.BILINEAR)
        img = img.transpose(Image.FLIP_LEFT_RIGHT) if flip else img
    return torch.from_numpy(np.array(img))


def read_tensor(path):
    """The file as a uint8 (3, H, W) tensor, decoded by torchvision.io (libjpeg-turbo, as PIL)."""
    from torchvision.io import ImageReadMode, decode_image, read_file
    with reading_image(path):
        return decode_image(read_file(path), mode=ImageReadMode.RGB)


def tensor_view(x, box):
    """pil_view of a uint8 (3, H, W) tensor, on its device: torch's antialiased bilinear resize is
    at most 1 level off PIL's (rounding)."""
    from torchvision.transforms.v2 import functional as F
    if box is None:
        return F.center_crop(F.resize(x, [VAL_RESIZE], antialias=True), [SIZE])
    top, left, h, w, flip = box
    x = F.resized_crop(x, top, left, h, w, [SIZE, SIZE], antialias=True)
    return F.horizontal_flip(x) if flip else x


class Images(torch.utils.data.Dataset):
    """An ImageFolder's images as uint8 (224, 224, 3) views; a training item's key is (index, epoch).
    With the nvjpeg decoder an item is the file's bytes, its box and its path, for decode_batch."""

    def __init__(self, folder, train, decoder='pil', seed=0):
        self.classes, self.samples, self.targets = folder.classes, folder.samples, folder.targets
        self.root, self.train, self.decoder, self.seed = folder.root, train, decoder, seed

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, key):
        index, epoch = key if self.train else (key, None)
        path, label = self.samples[index]
        g = torch.Generator().manual_seed(sample_seed(self.seed, epoch, index)) if self.train else None
        if self.decoder == 'pil':
            img = open_rgb(path)
            return pil_view(img, draw_box(img.height, img.width, g) if g else None), label
        if self.decoder == 'torchvision':
            x = read_tensor(path)
            return tensor_view(x, draw_box(*x.shape[1:], g) if g else None).permute(1, 2, 0), label
        from PIL import Image
        from torchvision.io import read_file
        with reading_image(path), Image.open(path) as img:  # the header alone: the box needs the size
            box = draw_box(img.height, img.width, g) if g else (0, 0, 0, 0, False)  # val: unused
            return read_file(path), torch.tensor(box, dtype=torch.long), path, label


def collate_files(items):
    """A batch of (file bytes, box, path, label) items: the files stay a list (their sizes differ)."""
    files, boxes, paths, labels = zip(*items)
    return (list(files), torch.stack(boxes), paths), torch.tensor(labels)


DECODE_STREAMS = {}  # per GPU: the stream nvjpeg's outputs are allocated on (decode_jpegs_apart)


def decode_jpegs_apart(files, device):
    """decode_jpeg(files, device=GPU), made safe while the current stream still has kernels queued.

    torchvision allocates the decoded images on the caller's current stream and decodes on a private
    stream, making the current one wait only after the decode (csrc/io/image/cuda/decode_jpegs_cuda.cpp:
    prepare_buffers, then decode_images, then event.block). The caching allocator hands a block out
    again as soon as it is freed on its stream, so the decoder can be given memory that queued kernels
    of the last step still read, and overwrite it: nearly every image corrupted on an H100 upstream
    (torchvision PR 9606, closed; torchcodec PR 1634 moved the fix there and found that nvJPEG's
    hardware engine does not keep to stream order at all). Here the outputs come from a stream of
    their own, whose pool never holds a block the training stream may still use: each decoded image
    is lent to the training stream with record_stream, and the allocator takes it back only once it
    has seen, on the host, that stream pass its last use. The training stream waits for the decode.
    torchvision already waits on the host for the decode, so this costs no time; it costs the memory
    of the decode stream's own pool (docs/imagenet.md)."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg
    main = torch.cuda.current_stream(device)
    if device not in DECODE_STREAMS:  # made once: setdefault would build a stream at every call
        DECODE_STREAMS[device] = torch.cuda.Stream(device)
    side = DECODE_STREAMS[device]
    with torch.cuda.stream(side):
        images = decode_jpeg(files, mode=ImageReadMode.RGB, device=device)
    main.wait_stream(side)
    for x in images:
        x.record_stream(main)
    return images


def device_failure(error):
    """Whether a RuntimeError is the device's, not a file's: out of memory, or a CUDA error
    (AcceleratorError from torch 2.8 on, a plain RuntimeError before; both say "CUDA error").
    torchvision rewraps whatever decoding raised, out of memory too, as a plain RuntimeError that
    keeps the message ("Error while decoding JPEG images: ...", csrc/io/image/cuda/decode_jpegs_cuda.cpp)."""
    return isinstance(error, torch.cuda.OutOfMemoryError) or any(
        s in str(error) for s in ('CUDA error', 'CUDA out of memory'))


def decode_batch(files, boxes, paths, device, train):
    """A batch's uint8 (B, 3, 224, 224) views, decoded on `device` (nvjpeg on a GPU, decode_jpegs_apart)."""
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg
    try:
        images = (decode_jpegs_apart(files, device) if device.type == 'cuda' else
                  decode_jpeg(files, mode=ImageReadMode.RGB, device=device))
    except RuntimeError as e:  # a file that is no JPEG (ImageNet has a few PNGs): one at a time, on the CPU
        if device_failure(e):  # not the files' fault: out of memory, or the GPU itself
            raise
        images = []
        for f, path in zip(files, paths):
            with reading_image(path):
                images.append(decode_image(f, mode=ImageReadMode.RGB).to(device))
    return torch.stack([tensor_view(x, box if train else None) for x, box in zip(images, boxes.tolist())])


def decoder_difference(folder, decoder, device='cpu', seed=0, epoch=1):
    """{'train': (max, mean), 'val': (max, mean)}: |decoder's views - the 2017 (pil) views| in uint8
    levels over an ImageFolder's images, with the same boxes; nvjpeg decodes on `device`."""
    out = {}
    for train in (True, False):
        keys = [(i, epoch) if train else i for i in range(len(folder.samples))]
        ref = torch.stack([Images(folder, train, 'pil', seed)[k][0] for k in keys]).permute(0, 3, 1, 2)
        other = Images(folder, train, decoder, seed)
        if decoder == 'nvjpeg':
            (files, boxes, paths), _ = collate_files([other[k] for k in keys])
            got = decode_batch(files, boxes, paths, torch.device(device), train).cpu()
        else:
            got = torch.stack([other[k][0] for k in keys]).permute(0, 3, 1, 2)
        d = (ref.int() - got.int()).abs().float()
        out['train' if train else 'val'] = (d.max().item(), d.mean().item())
    return out


class EpochSampler:
    """A sampler's indices as (index, epoch) keys, so that workers seed each image's augmentation
    from (seed, epoch, index); the training loop sets the epoch."""

    def __init__(self, sampler):
        self.sampler, self.epoch = sampler, 0

    def set_epoch(self, epoch):
        self.epoch = epoch
        if hasattr(self.sampler, 'set_epoch'):
            self.sampler.set_epoch(epoch)  # DistributedSampler: a fresh, seeded order

    def __iter__(self):
        return ((i, self.epoch) for i in self.sampler)

    def __len__(self):
        return len(self.sampler)


def normalize(x, channels_last=True):
    """uint8 (B, 3, H, W) images as float, normalised with the ImageNet mean and std, bit for bit
    as ToTensor and Normalize do (one-off uses; Feed keeps its statistics on the device)."""
    return normalized(x, *channel_stats(MEAN, STD, x.device), memory_format(channels_last))


class Feed:
    """A DataLoader of uint8 views, giving what the training loop takes: float batches on the
    device, normalised there, channels_last where asked. Copies leave pinned memory without
    blocking, so the next batch's copy overlaps the current step."""

    def __init__(self, loader, device, generator, channels_last, decoder):
        self.loader, self.device, self.generator = loader, device, generator
        self.dataset, self.sampler = loader.dataset, loader.sampler
        self.memory_format, self.decoder = memory_format(channels_last), decoder
        self.mean, self.std = channel_stats(MEAN, STD, device)

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for x, y in self.loader:
            if self.decoder == 'nvjpeg':
                x = decode_batch(*x, self.device, self.dataset.train)
            else:  # (B, H, W, 3) as it stands is a channels_last (B, 3, H, W)
                x = x.to(self.device, non_blocking=True).permute(0, 3, 1, 2)
            yield normalized(x, self.mean, self.std, self.memory_format), y.to(self.device, non_blocking=True)


def image_loader(folder, train, batch, nthread, seed, device, dist, decoder='pil', channels_last=True):
    """A Feed of this rank's share of an ImageFolder: for training a seeded shuffle (a
    DistributedSampler under torchrun) whose generator fit.fit checkpoints; for val every
    world-th image. Workers persist across epochs."""
    dataset = Images(folder, train, decoder, seed)
    order = torch.Generator().manual_seed(seed)
    if train:
        sampler = EpochSampler(DistributedSampler(dataset, dist.world, dist.rank, shuffle=True, seed=seed)
                               if dist.world > 1 else RandomSampler(dataset, generator=order))
    else:
        sampler = range(dist.rank, len(dataset), dist.world)
    loader = DataLoader(dataset, batch, sampler=sampler, num_workers=nthread, persistent_workers=nthread > 0,
                        # nvjpeg copies the files' bytes itself: pinning them first would cost for nothing
                        pin_memory=device.type == 'cuda' and decoder != 'nvjpeg',
                        collate_fn=collate_files if decoder == 'nvjpeg' else None,
                        # the workers' own seeds, drawn once per iterator: from a generator of their own, so
                        # that neither the order's generator nor torch's global one depends on worker lives
                        generator=torch.Generator().manual_seed(seed))
    return Feed(loader, device, order, channels_last, decoder)
