"""The device-resident loader gives what the 2017 torchvision pipeline gives, image for image."""
import itertools

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from training import data
from training import loop
import utils
from training.device import Precision
from cifar import MEAN, STD


def torchvision_view(img, top, left, flip):
    """The 2017 pipeline with its random draws fixed: reflect-pad 4, crop, flip, normalise."""
    x = TF.crop(TF.pad(img, 4, padding_mode='reflect'), top, left, 32, 32)
    x = TF.hflip(x) if flip else x
    return TF.normalize(TF.to_tensor(x), MEAN, STD)


@pytest.fixture(scope='module')
def image():
    return np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)


def loader(images, labels, train, batch_size=500, seed=0):
    return data.DeviceLoader(images, labels, batch_size=batch_size, mean=MEAN, std=STD, train=train,
                              generator=torch.Generator().manual_seed(seed))


def test_each_offset_and_flip_equals_torchvision(image):
    pil = Image.fromarray(image)
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    padded = torch.nn.functional.pad(x, [4] * 4, mode='reflect')
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    for top, left, flip in itertools.product(range(9), range(9), (False, True)):
        out = data.crop_flip(padded, torch.tensor([top]), torch.tensor([left]), torch.tensor([flip]), 32)
        out = out.div_(255).sub_(mean).div_(std)[0]
        assert torch.equal(out, torchvision_view(pil, top, left, flip)), (top, left, flip)


def test_random_crops_cover_all_81_offsets_by_2_flips(image):
    pil = Image.fromarray(image)
    views = {(t, l, f): torchvision_view(pil, t, l, f) for t in range(9) for l in range(9) for f in (0, 1)}
    keys = {v.numpy().tobytes(): k for k, v in views.items()}
    assert len(keys) == 162  # a random image: every view distinct
    images = torch.from_numpy(image).permute(2, 0, 1)[None].repeat(3000, 1, 1, 1)
    seen = []
    for x, _ in loader(images, [0] * 3000, train=True):
        seen += [keys[v.numpy().tobytes()] for v in x]  # KeyError: an output torchvision cannot give
    counts = {k: seen.count(k) for k in views}
    assert min(counts.values()) > 0 and len(seen) == 3000
    # roughly uniform, as RandomCrop and RandomHorizontalFlip are
    assert max(counts.values()) < 3 * 3000 / 162
    assert abs(sum(k[2] for k in seen) / 3000 - 0.5) < 0.05


def test_shuffle_is_seeded_and_fresh_each_epoch():
    images = torch.arange(50, dtype=torch.uint8).view(50, 1, 1, 1).expand(50, 3, 32, 32).contiguous()
    labels = list(range(50))

    def epochs(seed):
        ld = loader(images, labels, train=True, batch_size=16, seed=seed)
        return [torch.cat([y for _, y in ld]).tolist() for _ in range(2)]

    a, b, c = epochs(0), epochs(0), epochs(1)
    assert a == b and a != c
    assert a[0] != a[1] and sorted(a[0]) == sorted(a[1]) == labels


def test_each_batch_takes_the_draws_of_the_batch_by_batch_order():
    """The epoch's draws are made at its start, in the order they were once made batch by batch: the
    order (randperm), then each batch's tops, lefts and flips. Every batch of two epochs equals
    torchvision's view of its images at the offsets that sequence gives."""
    images = np.random.default_rng(1).integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
    ld = loader(torch.from_numpy(images).permute(0, 3, 1, 2), list(range(10)), train=True, batch_size=4, seed=5)
    g = torch.Generator().manual_seed(5)
    for _ in range(2):
        order = torch.randperm(10, generator=g)
        for (x, y), idx in zip(ld, order.split(4)):
            top, left, flip = (torch.randint(0, k, (len(idx),), generator=g) for k in (9, 9, 2))
            assert torch.equal(y, idx)
            for v, i, t, l, f in zip(x, idx, top, left, flip):
                assert torch.equal(v, torchvision_view(Image.fromarray(images[i]), int(t), int(l), bool(f)))
    assert torch.equal(ld.generator.get_state(), g.get_state())


def test_an_epoch_reaches_the_device_in_one_copy():
    """A copy from pageable host memory makes the host wait for the GPU: the order, crops and flips
    go over once an epoch, not once a step. The meta device stands in for a GPU; every copy from the
    CPU to it is counted."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Copies(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            ins = [a for a in args if isinstance(a, torch.Tensor)]
            if func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default) and \
                    {t.device.type for t in ins + [out]} == {'cpu', 'meta'}:
                Copies.n += 1
            return out
    images = torch.zeros(50, 3, 8, 8, dtype=torch.uint8)
    for train, copies in ((True, 1), (False, 0)):
        ld = data.DeviceLoader(images, [0] * 50, batch_size=5, mean=MEAN, std=STD, train=train, device='meta',
                               generator=torch.Generator().manual_seed(0))
        Copies.n = 0
        with Copies():
            assert len(list(ld)) == 10
        assert Copies.n == copies, train


def test_test_split_is_plain_and_in_order(image):
    images = torch.from_numpy(image).permute(2, 0, 1)[None].repeat(7, 1, 1, 1)
    ld = loader(images, list(range(7)), train=False, batch_size=3)
    batches = list(ld)
    assert len(ld) == 3 and [len(y) for _, y in batches] == [3, 3, 1]
    assert torch.cat([y for _, y in batches]).tolist() == list(range(7))
    plain = TF.normalize(TF.to_tensor(Image.fromarray(image)), MEAN, STD)
    assert all(torch.equal(v, plain) for x, _ in batches for v in x)


def test_channels_last_changes_layout_not_values(image):
    images = torch.from_numpy(image).permute(2, 0, 1)[None].repeat(4, 1, 1, 1)
    a = next(iter(loader(images, [0] * 4, train=False)))[0]
    ld = data.DeviceLoader(images, [0] * 4, batch_size=4, mean=MEAN, std=STD, train=False, channels_last=True)
    b = next(iter(ld))[0]
    assert torch.equal(a, b) and b.is_contiguous(memory_format=torch.channels_last)


def compile_raising(error):
    def compile(f, **kw):  # as torch.compile(f, dynamic=False)
        def fail(*a, **k):
            raise error
        return fail
    return compile


def test_compiled_falls_back_to_eager_with_one_line(monkeypatch, capsys):
    from torch._dynamo.exc import Unsupported
    monkeypatch.setattr(torch, 'compile', compile_raising(Unsupported('an op dynamo cannot trace')))
    f = loop.compiled(lambda x: x + 1, True, 'prog')
    assert f(1) == 2 and f(2) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ['prog: --compile unavailable here (Unsupported); running eagerly']
    assert loop.compiled(len, False, 'prog') is len


def shape_error():
    """What dynamo raises for the program's own error met while tracing (a shape mismatch)."""
    from torch._dynamo.exc import TorchRuntimeError
    error = TorchRuntimeError.__new__(TorchRuntimeError)  # its constructor's arguments vary between versions
    RuntimeError.__init__(error, 'mat1 and mat2 shapes cannot be multiplied')
    return error


@pytest.mark.parametrize('error', [torch.OutOfMemoryError('CUDA out of memory'), ValueError('a bad input'),
                                   shape_error()])
def test_compiled_raises_what_is_not_a_compile_failure(monkeypatch, capsys, error):
    monkeypatch.setattr(torch, 'compile', compile_raising(error))
    with pytest.raises(type(error)):
        loop.compiled(lambda x: x + 1, True, 'prog')(1)
    assert capsys.readouterr().err == ''


def test_a_compile_error_in_the_backward_pass_falls_back_too(monkeypatch, capsys):
    """torch compiles backward lazily: its error comes out of loss.backward() inside the engine's step.
    The step is taken again eagerly, and the weights end as an eager run's."""
    from torch._inductor.exc import InductorError
    from training.data import DeviceLoader
    from training.distill import Distiller
    from training.distill import FunctionalNet
    from resnet import wrn, wrn_params

    class FailingBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            raise InductorError(RuntimeError('a kernel that does not build'), None)

    def compile(f, **kw):  # as torch.compile(f, dynamic=False)
        return lambda x, params, mode: (FailingBackward.apply(f(x, params, mode)[0]), f(x, params, mode)[1])
    monkeypatch.setattr(torch, 'compile', compile)
    g = torch.Generator().manual_seed(0)
    images, labels = torch.randint(0, 255, (24, 3, 8, 8), dtype=torch.uint8, generator=g), [i % 3 for i in range(24)]
    weights = {}
    for enabled in (False, True):
        torch.manual_seed(0)
        params = wrn_params(10, 0.25, 3)
        utils.set_requires_grad_except_bn_(params)
        model = Distiller(FunctionalNet(loop.compiled(wrn, enabled, 'prog'), params))
        loader = DeviceLoader(images, labels, batch_size=8, mean=[0.5] * 3, std=[0.25] * 3, train=True,
                              generator=torch.Generator().manual_seed(1))
        make = loop.sgd(params, 5e-4, Precision())
        loop.Trainer(model, make, torch.device('cpu'), epochs=1, progress=False).train(loader, None, make(0.1))
        weights[enabled] = {k: v.detach().clone() for k, v in params.items() if utils.is_trained(k)}
    assert capsys.readouterr().err.strip().splitlines() == [
        'prog: --compile unavailable here (InductorError); running eagerly']
    assert all(torch.equal(weights[False][k], weights[True][k]) for k in weights[False])


def test_the_order_is_drawn_on_the_cpu_whatever_the_device(tmp_path):
    """A CUDA generator's numbers depend on the GPU model, so the order, crops and flips come from a
    CPU generator on every device. The meta device stands in for a GPU: its loader takes the same
    numbers from the same CPU generator as the CPU's, whose order is torch.randperm's of --seed."""
    import cifar
    from conftest import make_class_folders
    root = make_class_folders(tmp_path, classes=3, train_per_class=4, test_per_class=2)
    opt = cifar.parse_args(['--dataroot', str(root), '--batch_size', '5', '--seed', '3', '--channels_last', '0'])
    cpu, meta = (cifar.create_loaders(opt, torch.device(d))[0] for d in ('cpu', 'meta'))
    assert meta.generator.device.type == 'cpu' and meta.images.device.type == 'meta'
    labels = torch.cat([y for _, y in cpu])
    order = torch.randperm(12, generator=torch.Generator().manual_seed(3))
    assert torch.equal(labels, cpu.labels[order])
    shapes = [(tuple(x.shape), tuple(y.shape)) for x, y in meta]
    assert shapes == [((5, 3, 32, 32), (5,)), ((5, 3, 32, 32), (5,)), ((2, 3, 32, 32), (2,))]
    assert torch.equal(cpu.generator.get_state(), meta.generator.get_state())  # the same draws, on the CPU
