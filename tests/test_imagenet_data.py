"""The ImageNet pipeline (imagenet_data.py) against the 2017 torchvision transforms: the same views
for the same seeds, bit for bit with PIL and within a level with torchvision's decoder; the same
distribution of boxes where the seeds differ; the same batches at any worker count and on resume."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image
from torchvision.datasets.folder import default_loader

from training import imagenet_data as D
from training.data import image_folder

SIZES = [(500, 375), (375, 500), (300, 40), (260, 300)]  # (width, height); 300x40 forces get_params' fallback
ONE = SimpleNamespace(rank=0, world=1)


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    """JPEGs of smooth noise (as photographs, not white noise) in two classes, and one PNG."""
    root, rng = tmp_path_factory.mktemp('inet'), np.random.default_rng(0)
    for i, (w, h) in enumerate(SIZES + [(320, 240)]):
        d = root / f'c{i % 2}'
        d.mkdir(exist_ok=True)
        img = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
        img = np.asarray(img).astype(np.int16) + rng.integers(-20, 20, (h, w, 3))
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(d / (f'{i}.png' if i == len(SIZES) else f'{i}.JPEG'),
                                                                quality=90)
    return image_folder(str(root))


def the_2017(train):
    norm = [T.ToTensor(), T.Normalize(D.MEAN, D.STD)]
    return T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), *norm] if train else
                     [T.Resize(256), T.CenterCrop(224), *norm])


def as_input(view):
    """A worker's uint8 HWC view as the network gets it."""
    return D.normalize(view.permute(2, 0, 1)[None], channels_last=False)[0]


def test_train_views_equal_the_2017_transforms_seed_for_seed(folder):
    ds, ref, fallbacks = D.Images(folder, True, 'pil', seed=3), the_2017(True), 0
    for index, (path, _) in enumerate(folder.samples):
        for epoch in range(1, 7):
            seed = D.sample_seed(3, epoch, index)
            torch.manual_seed(seed)
            expected = ref(default_loader(path))
            assert torch.equal(as_input(ds[index, epoch][0]), expected), (path, epoch)
            w, h = Image.open(path).size
            box = D.draw_box(h, w, torch.Generator().manual_seed(seed))
            fallbacks += box[:4] == (0, (w - 53) // 2, 40, 53)  # the central crop of ratio 4/3
    assert fallbacks > 0


def test_val_views_equal_the_2017_transforms(folder):
    ds, ref = D.Images(folder, False, 'pil'), the_2017(False)
    for index, (path, _) in enumerate(folder.samples):
        assert torch.equal(as_input(ds[index][0]), ref(default_loader(path))), path


@pytest.mark.parametrize('train', [True, False])
def test_torchvision_decoder_is_within_a_level_of_pil(folder, train):
    pil, tv = D.Images(folder, train, 'pil', seed=1), D.Images(folder, train, 'torchvision', seed=1)
    diffs = []
    for index in range(len(folder.samples)):
        for key in ([(index, e) for e in (1, 2, 3)] if train else [index]):
            a, b = pil[key][0], tv[key][0]
            assert a.shape == b.shape == (224, 224, 3) and a.dtype == b.dtype == torch.uint8
            diffs.append((a.int() - b.int()).abs().flatten())
    d = torch.cat(diffs).float()
    assert d.max() <= 1 and d.mean() < 0.2  # rounding in the resize; the decodes are equal


@pytest.mark.parametrize('train', [True, False])
def test_device_decoding_equals_the_torchvision_decoder(folder, train):
    """decode_batch, the nvjpeg path, run on the CPU: the same boxes and views, PNG included."""
    files, tv = D.Images(folder, train, 'nvjpeg', seed=2), D.Images(folder, train, 'torchvision', seed=2)
    keys = [(i, 4) for i in range(len(files))] if train else list(range(len(files)))
    (raw, boxes, paths), labels = D.collate_files([files[k] for k in keys])
    out = D.decode_batch(raw, boxes, paths, torch.device("cpu"), train)
    assert torch.equal(out, torch.stack([tv[k][0].permute(2, 0, 1) for k in keys]))
    assert labels.tolist() == [tv[k][1] for k in keys]


@pytest.mark.parametrize('error, falls_back', [
    (RuntimeError('Error while decoding JPEG images: Failed to get image info: 2'), True),  # a PNG
    (torch.cuda.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 MiB'), False),
    (RuntimeError('Error while decoding JPEG images: CUDA out of memory. Tried to allocate 2.00 MiB'), False),
    (RuntimeError('CUDA error: an illegal memory access was encountered'), False)])
def test_only_a_files_error_falls_back_to_decoding_one_by_one(folder, monkeypatch, error, falls_back):
    """A batch nvjpeg cannot decode (a PNG in it) is decoded file by file on the CPU; an out-of-memory
    or CUDA error is raised, not turned silently into slow decoding."""
    import torchvision.io

    def fail(*a, **kw):
        raise error
    files = D.Images(folder, False, 'nvjpeg')
    (raw, boxes, paths), _ = D.collate_files([files[i] for i in range(len(files))])
    monkeypatch.setattr(torchvision.io, 'decode_jpeg', fail)
    if falls_back:
        assert D.decode_batch(raw, boxes, paths, torch.device('cpu'), False).shape == (len(files), 3, 224, 224)
    else:
        with pytest.raises(type(error), match='CUDA'):
            D.decode_batch(raw, boxes, paths, torch.device('cpu'), False)


def test_nvjpeg_decodes_on_one_stream_per_gpu_from_unpinned_files(folder, monkeypatch):
    """decode_jpegs_apart makes its side stream once per GPU; the files' bytes are not pinned for nvjpeg,
    which copies them itself, while decoded views' batches are."""
    import contextlib
    import torchvision.io
    made = []
    monkeypatch.setattr(D, 'DECODE_STREAMS', {})
    monkeypatch.setattr(torch.cuda, 'Stream', lambda device: made.append(device) or SimpleNamespace(device=device))
    monkeypatch.setattr(torch.cuda, 'current_stream', lambda device: SimpleNamespace(wait_stream=lambda s: None))
    monkeypatch.setattr(torch.cuda, 'stream', lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torchvision.io, 'decode_jpeg', lambda files, **kw: [])
    gpu = torch.device('cuda', 0)
    for _ in range(3):
        D.decode_jpegs_apart([], gpu)
    assert made == [gpu]
    monkeypatch.setattr(D, 'channel_stats', lambda *a: (None, None))  # no GPU to hold them
    assert [D.image_loader(folder, True, 2, 0, 5, gpu, ONE, decoder=d).loader.pin_memory
            for d in ('nvjpeg', 'torchvision', 'pil')] == [False, True, True]


@pytest.mark.parametrize('decoder', ['torchvision', 'nvjpeg'])
def test_decoder_difference_reports_levels_off_the_2017_views(folder, decoder):
    """What the device check reports for nvjpeg on a GPU; on the CPU both decoders are libjpeg-turbo."""
    diff = D.decoder_difference(folder, decoder, 'cpu')
    assert set(diff) == {'train', 'val'} and all(m <= 1 and 0 < a < 0.2 for m, a in diff.values())
    assert D.decoder_difference(folder, 'pil') == {'train': (0, 0), 'val': (0, 0)}


def test_per_image_seeds_draw_the_2017_distribution():
    """One stream per (seed, epoch, index) against the 2017 single stream: boxes and flips alike
    (two-sample Kolmogorov-Smirnov distances under 0.05, the 0.1 % level for 3000 draws each)."""
    n, (h, w) = 3000, (375, 500)
    ours = np.array([D.draw_box(h, w, torch.Generator().manual_seed(D.sample_seed(0, 1, i))) for i in range(n)], float)
    torch.manual_seed(0)
    theirs = np.array([(*T.RandomResizedCrop.get_params(torch.empty(3, h, w), [0.08, 1.0], [3 / 4, 4 / 3]),
                        float(torch.rand(1) < 0.5)) for _ in range(n)])

    def features(b):
        top, left, bh, bw, flip = b.T
        return {'area': bh * bw / (h * w), 'log ratio': np.log(bw / bh), 'centre y': (top + bh / 2) / h,
                'centre x': (left + bw / 2) / w, 'flip': flip}
    fa, fb = features(ours), features(theirs)
    for name in fa:
        grid = np.union1d(fa[name], fb[name])
        cdf = [np.searchsorted(np.sort(f[name]), grid, side='right') / n for f in (fa, fb)]
        assert np.abs(cdf[0] - cdf[1]).max() < 0.05, name


def batches(loader, epochs):
    out = []
    for e in epochs:
        loader.sampler.set_epoch(e)
        out.append([(x.clone(), y.clone()) for x, y in loader])
    return out


def test_worker_count_persistence_and_resume_give_the_same_batches(folder):
    cpu = torch.device('cpu')
    alone = D.image_loader(folder, True, 2, 0, 5, cpu, ONE)
    first = batches(alone, [1])[0]
    state = alone.generator.get_state()  # what fit.fit checkpoints at an epoch's end
    second = batches(alone, [2])[0]
    workers = D.image_loader(folder, True, 2, 2, 5, cpu, ONE)  # persistent: alive for both epochs
    assert workers.loader.persistent_workers
    resumed = D.image_loader(folder, True, 2, 1, 5, cpu, ONE)
    resumed.generator.set_state(state)
    for got in (batches(workers, [1, 2]), [first] + batches(resumed, [2])):
        for a, b in zip([first, second], got):
            assert len(a) == len(b) == 3 and all(torch.equal(x, u) and torch.equal(y, v) for (x, y), (u, v) in zip(a, b))
    assert not torch.equal(torch.cat([x for x, _ in first]), torch.cat([x for x, _ in second]))  # fresh augmentation
    x = first[0][0]
    assert x.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last)


def test_default_workers_share_the_cpus_of_a_machine(monkeypatch):
    import os
    cpus = len(os.sched_getaffinity(0))
    monkeypatch.setenv('LOCAL_WORLD_SIZE', '1')
    assert D.default_workers() == min(32, cpus)
    monkeypatch.setenv('LOCAL_WORLD_SIZE', str(2 * cpus))
    assert D.default_workers() == 1
