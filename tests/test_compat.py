"""The torch floor (scripts/pins.py). Each guarded call against a stand-in with the floor's signature
(torch 2.4 cannot be installed here), no post-floor API outside its guard, install.sh's keep-or-pin choice,
and torch.compile's caches: one per network, static shapes."""
import functools
import inspect
import re
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from conftest import ROOT

sys.path.insert(0, str(ROOT))
import gpu_check  # noqa: E402
import pins  # noqa: E402
from training import device  # noqa: E402
from training import distill  # noqa: E402
from training import loop  # noqa: E402
from training.errors import UserError  # noqa: E402


class DDP24:
    """torch 2.4's DistributedDataParallel.__init__ signature (torch/nn/parallel/distributed.py, v2.4.0)."""
    made = []

    def __init__(self, module, device_ids=None, output_device=None, dim=0, broadcast_buffers=True,
                 process_group=None, bucket_cap_mb=None, find_unused_parameters=False, check_reduction=False,
                 gradient_as_bucket_view=False, static_graph=False, delay_all_reduce_named_params=None,
                 param_to_hook_all_reduce=None, mixed_precision=None, device_mesh=None):
        self.made.append({'module': module, 'device_ids': device_ids, 'broadcast_buffers': broadcast_buffers})


class DDP213(DDP24):
    """From 2.13 on: forward_sync_buffers (the stand-in keeps 2.4's other parameters)."""

    def __init__(self, module, device_ids=None, broadcast_buffers=None, forward_sync_buffers=None):
        self.made.append({'module': module, 'broadcast_buffers': broadcast_buffers,
                          'forward_sync_buffers': forward_sync_buffers})


@pytest.fixture
def process_group(monkeypatch):
    """torch.distributed as an initialised group would show it; broadcasts are recorded."""
    sent = []
    monkeypatch.setattr(torch.distributed, 'is_initialized', lambda: True)
    monkeypatch.setattr(torch.distributed, 'broadcast', lambda t, src: sent.append((t, src)))
    DDP24.made.clear()
    return sent


def student():
    return distill.FunctionalNet(lambda x, p, mode: x * p['w'], {'w': torch.ones(2, requires_grad=True),
                                                                  'bn.running_mean': torch.zeros(2)})


def test_distributed_on_the_floors_ddp(process_group, monkeypatch):
    """torch 2.4 has no forward_sync_buffers: broadcast_buffers=False, then rank 0's buffers sent once."""
    monkeypatch.setattr(nn.parallel, 'DistributedDataParallel', DDP24)
    net = student()
    assert isinstance(device.distributed(net, torch.device('cpu')), DDP24)
    assert DDP24.made == [{'module': net, 'device_ids': None, 'broadcast_buffers': False}]
    assert [(t.data_ptr(), src) for t, src in process_group] == [(net.bn__running_mean.data_ptr(), 0)]


def test_distributed_on_newer_ddp(process_group, monkeypatch):
    monkeypatch.setattr(nn.parallel, 'DistributedDataParallel', DDP213)
    net = student()
    device.distributed(net, torch.device('cpu'))
    assert DDP24.made == [{'module': net, 'broadcast_buffers': None, 'forward_sync_buffers': False}]
    assert process_group == []  # DDP itself sends them at construction


def test_the_installed_ddp_takes_the_keywords():
    """What ddp_no_buffer_sync picks for the torch installed here binds to its real DistributedDataParallel."""
    sig = inspect.signature(nn.parallel.DistributedDataParallel.__init__)
    sig.bind(None, nn.Linear(1, 1), device_ids=None, **device.ddp_no_buffer_sync())


def test_fp32_ieee_without_fp32_precision(monkeypatch):
    """torch < 2.9 has no fp32_precision: allow_tf32 alone is set, and the state reads it."""
    class Old:
        allow_tf32 = True
    monkeypatch.setattr(torch.backends.cuda, 'matmul', Old())
    monkeypatch.setattr(torch.backends, 'cudnn', Old())
    assert gpu_check.set_fp32_ieee() == {}
    assert torch.backends.cuda.matmul.allow_tf32 is False and torch.backends.cudnn.allow_tf32 is False
    assert gpu_check.tf32_state() == {'matmul': False, 'conv': False}


def test_compile_errors_without_inductor_error(monkeypatch):
    from torch._dynamo.exc import TorchDynamoException
    from torch._inductor import exc
    monkeypatch.delattr(exc, 'InductorError')
    errors = loop.compile_errors()
    assert errors[0] is TorchDynamoException and all(isinstance(e, type) for e in errors)


def code_files():
    return sorted(p for p in [*ROOT.glob('*.py'), *ROOT.glob('training/*.py'), *ROOT.glob('scripts/*.py')]
                  if p.name != 'pins.py')


def test_no_post_floor_api_outside_its_guard():
    assert len(code_files()) > 10
    found = [f'{p.relative_to(ROOT)}:{i}: {name} (torch {since}; use {where} {guard})'
             for p in code_files() for i, line in enumerate(p.read_text().splitlines(), 1)
             for name, (since, where, guard) in pins.POST_FLOOR.items()
             if re.search(rf'\b{name}\b', line) and str(p.relative_to(ROOT)) != where]
    assert found == []
    for since, where, guard in pins.POST_FLOOR.values():
        assert pins.version_tuple(since) > pins.version_tuple(pins.FLOOR['torch'])
        assert re.search(rf'^def {guard}\(', (ROOT / where).read_text(), re.M)


def test_the_floor_users_read_is_the_one_install_keeps():
    """README and docs/install.md say which torch is kept; install.sh keeps by pins.requirements:
    an installed torch at the floor they name is kept, one a minor release below it is replaced."""
    req = [line for line in (ROOT / 'requirements.txt').read_text().splitlines() if line and not line.startswith('#')]
    for doc in ('README.md', 'docs/install.md'):
        torch_v, tv_v = re.search(r'torch (\d+\.\d+) / torchvision (\d+\.\d+)', (ROOT / doc).read_text()).groups()
        kept = pins.requirements(req, torch_v + '.0', tv_v + '.0')
        assert f'torch=={torch_v}.0' in kept and f'torchvision=={tv_v}.0' in kept, doc
        major, minor = map(int, torch_v.split('.'))
        below = f'{major}.{minor - 1}.0'
        assert pins.requirements(req, below, tv_v + '.0') == req, doc  # the tested pins instead


REQ = ['torch==2.14.1', 'torchvision==0.29.1', 'torchnet==0.0.4', 'numpy>=1.26']


@pytest.mark.parametrize('torch_v, tv_v, want', [
    ('2.11.0+cu128', '0.26.0+cu128', ['torch==2.11.0+cu128', 'torchvision==0.26.0+cu128']),
    ('2.4.1', None, ['torch==2.4.1', 'torchvision==0.19.*']),  # at the floor, no torchvision yet
    # torchvision below its floor, or missing, for a CUDA build: the matching build, from PyTorch's index
    ('2.11.0+cu130', '0.18.1', ['--extra-index-url https://download.pytorch.org/whl/cu130', 'torch==2.11.0+cu130',
                                'torchvision==0.26.*']),
    ('2.4.1+cu118', None, ['--extra-index-url https://download.pytorch.org/whl/cu118', 'torch==2.4.1+cu118',
                           'torchvision==0.19.*']),
    ('2.6.0+rocm6.1', None, ['--extra-index-url https://download.pytorch.org/whl/rocm6.1', 'torch==2.6.0+rocm6.1',
                             'torchvision==0.21.*']),
    ('2.5.1+cpu', None, ['--extra-index-url https://download.pytorch.org/whl/cpu', 'torch==2.5.1+cpu',
                         'torchvision==0.20.*']),
    ('2.3.1', '0.18.1', REQ[:2]),  # below the floor: the pinned versions
    (None, None, REQ[:2]),  # none: the pinned versions
])
def test_install_keeps_a_torch_at_or_above_the_floor(torch_v, tv_v, want):
    assert pins.requirements(REQ, torch_v, tv_v) == want + REQ[2:]


def test_install_stops_for_a_torch_of_its_own_build_without_torchvision(tmp_path, monkeypatch):
    """A local tag that is no PyTorch build (a source build): no index has its torchvision; one line."""
    with pytest.raises(ValueError, match=r'^torch 2\.6\.0\+git1a2b3c is a build of its own \(\+git1a2b3c\) and '
                                         r'torchvision is missing: install the torchvision 0\.21\.\* built for it, '
                                         r'then run install\.sh again$'):
        pins.requirements(REQ, '2.6.0+git1a2b3c', None)
    (tmp_path / 'req.txt').write_text('\n'.join(REQ) + '\n')
    monkeypatch.setattr(pins, 'installed', {'torch': '2.6.0+git1a2b3c', 'torchvision': None}.get)
    assert pins.main(['requirements', str(tmp_path / 'req.txt')]) == 1


def test_install_plan_from_the_command_line(tmp_path):
    """install.sh's call; this venv's torch (2.14.1, above the floor) is kept as it is."""
    (tmp_path / 'req.txt').write_text('\n'.join(REQ) + '\n')
    p = subprocess.run([sys.executable, 'scripts/pins.py', 'requirements', str(tmp_path / 'req.txt')], cwd=ROOT,
                       capture_output=True, text=True)
    here = pins.installed('torch')
    assert p.returncode == 0 and p.stdout.splitlines()[0] == f'torch=={here}'
    assert p.stderr.startswith(f'pins.py: keeping the installed torch {here}')
    p = subprocess.run([sys.executable, 'scripts/pins.py', 'requirements', str(tmp_path / 'nope.txt')], cwd=ROOT,
                       capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.splitlines() == [
        f'pins.py: error: {tmp_path / "nope.txt"}: No such file or directory']


import torch._dynamo  # noqa: E402

LIMIT = next(n for n in ('recompile_limit', 'cache_size_limit') if hasattr(torch._dynamo.config, n))


@pytest.fixture
def counted_compiles(monkeypatch):
    """torch.compile with a backend that counts the graphs it is given (and runs them eagerly), and a
    dynamo cache of one entry per code object, so that sharing one shows."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append([tuple(t.shape) for t in example_inputs if isinstance(t, torch.Tensor)])
        return gm.forward
    torch._dynamo.reset()
    monkeypatch.setattr(torch, 'compile', functools.partial(torch.compile, backend=backend))
    with torch._dynamo.config.patch(**{LIMIT: 1}):
        yield graphs
    torch._dynamo.reset()


def linear(x, params, mode):
    return x @ params['w']


def test_student_and_teacher_compile_into_caches_of_their_own(counted_compiles):
    s, t = loop.Compiled(linear, 'prog'), loop.Compiled(linear, 'prog')
    x = torch.ones(4, 3)
    s(x, {'w': torch.ones(3, 2)}, True)
    t(x, {'w': torch.ones(3, 5)}, True)  # another width: a shared cache would be full (limit 1) and run eagerly
    assert len(counted_compiles) == 2


def test_compiled_shapes_are_static(counted_compiles):
    """A last partial batch compiles once more for its size; the full batches keep their static graph."""
    s, p = loop.Compiled(linear, 'prog'), {'w': torch.ones(3, 2)}
    with torch._dynamo.config.patch(**{LIMIT: 8}):
        for n in (4, 3, 2, 4):
            s(torch.ones(n, 3), p, True)
    assert [g[0] for g in counted_compiles] == [(4, 3), (3, 3), (2, 3)]  # automatic dynamic shapes: 2 graphs


@pytest.mark.parametrize('name', ['LoweringException', 'MissingOperatorWithoutDecomp', 'MissingOperatorWithDecomp',
                                  'CppCompileError', 'InvalidCxxCompiler', 'BackendCompilerFailed', 'InductorError'])
def test_each_torchs_compile_errors_in_the_backward_pass_fall_back(monkeypatch, capsys, name):
    """What compiling the backward raises: before torch 2.7 inductor's errors come out raw (a
    LoweringException, ...), from 2.7 on as InductorError; dynamo's are BackendCompilerFailed. Each,
    raised from loss.backward(), ends in one eager step, as if compile had never been asked for."""
    from torch._dynamo import exc as dynamo_exc
    from torch._inductor import exc as inductor_exc
    cls = getattr(inductor_exc, name, None) or getattr(dynamo_exc, name)
    error = cls.__new__(cls)  # their constructors' arguments changed between versions; what is raised did not
    Exception.__init__(error, 'made by the test')

    class FailingBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            raise error
    monkeypatch.setattr(torch, 'compile', lambda f, **kw: lambda x, w: FailingBackward.apply(f(x, w)))
    f = loop.compiled(lambda x, w: (x * w).sum(), True, 'prog')
    w = torch.ones(3, requires_grad=True)
    optimizer = loop.EagerOnCompileError(torch.optim.SGD([w], 0.1), [f])

    def closure():
        optimizer.zero_grad()
        loss = f(torch.arange(3.), w)
        loss.backward()
        return loss
    optimizer.step(closure)
    assert capsys.readouterr().err.splitlines() == [f'prog: --compile unavailable here ({name}); running eagerly']
    assert torch.equal(w.detach(), torch.tensor([1., 0.9, 0.8]))  # one plain SGD step: w - 0.1 x


def failing_backward(error, world):
    """w, and one step of an EagerOnCompileError whose compiled backward raises `error`, in a world of
    `world` ranks."""
    class FailingBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            raise error
    f = loop.Compiled(lambda x, w: (x * w).sum(), 'prog')
    f.current = lambda x, w: FailingBackward.apply(f.f(x, w))  # as torch.compile's function
    w = torch.ones(3, requires_grad=True)
    optimizer = loop.EagerOnCompileError(torch.optim.SGD([w], 0.1), [f], world)

    def closure():
        optimizer.zero_grad()
        loss = f(torch.arange(3.), w)
        loss.backward()
        return loss
    return w, lambda: optimizer.step(closure)


def test_under_torchrun_a_backward_compile_error_stops_with_one_line(capsys):
    """DDP still waits for the failed backward's gradients: no step can be retried, so the run stops."""
    from torch._inductor.exc import InductorError
    w, step = failing_backward(InductorError(RuntimeError('a kernel that does not build'), None), 2)
    with pytest.raises(UserError, match=r'^--compile failed in the backward pass \(InductorError\); under torchrun '
                                        r'the step cannot be taken again eagerly: run without --compile$'):
        step()
    assert capsys.readouterr().err == '' and torch.equal(w.detach(), torch.ones(3))
    w, step = failing_backward(InductorError(RuntimeError('a kernel that does not build'), None), 1)
    step()  # one process: the step is taken again eagerly
    assert torch.equal(w.detach(), torch.tensor([1., 0.9, 0.8]))


def test_a_shape_error_found_while_tracing_goes_through(capsys):
    """TorchRuntimeError is the program's own error, met while tracing: raised as it is, not announced
    as --compile being unavailable, in the forward and in the backward."""
    from torch._dynamo.exc import TorchRuntimeError
    error = TorchRuntimeError.__new__(TorchRuntimeError)
    RuntimeError.__init__(error, 'shapes cannot be multiplied')
    for world in (1, 2):
        w, step = failing_backward(error, world)
        with pytest.raises(TorchRuntimeError, match='shapes cannot be multiplied'):
            step()
    f = loop.Compiled(lambda x: x + 1, 'prog')
    f.current = lambda x: (_ for _ in ()).throw(error)
    with pytest.raises(TorchRuntimeError):
        f(1)
    assert f.current is not f.f and capsys.readouterr().err == ''


def test_ngpu_on_torch_24_takes_the_foreach_sgd(monkeypatch):
    """--ngpu N: DataParallel sends gradients back contiguous (comm's _unflatten_dense_tensors), and a 1x1
    conv's then differs from its channels_last weight in size-1 strides. torch 2.4's fused SGD compares
    every stride (simulated here around the real kernel) and refuses it; before 2.5 --ngpu N takes the
    foreach SGD, which steps; from 2.5 on, or without channels_last, the fused one stays."""
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    class DataParallelGrad(torch.autograd.Function):  # what Broadcast's backward hands autograd
        @staticmethod
        def forward(ctx, w):
            return w.clone()

        @staticmethod
        def backward(ctx, g):
            return _unflatten_dense_tensors(_flatten_dense_tensors([g]), [g])[0]
    fused_sgd = torch._fused_sgd_

    def fused_sgd_24(params, grads, bufs, **kw):  # ForeachUtils.h in 2.4: every stride must match
        if any(p.stride() != t.stride() for p, *ts in zip(params, grads, bufs) for t in ts):
            raise RuntimeError('params, grads and momentum buffers must have the same layout')
        return fused_sgd(params, grads, bufs, **kw)
    monkeypatch.setattr(torch, '_fused_sgd_', fused_sgd_24)

    def step(ngpu, version, channels_last=True):
        monkeypatch.setattr(torch, '__version__', version)
        params = {'w': torch.randn(4, 3, 1, 1)}
        device.place_params(params, torch.device('cpu'), torch.float32, channels_last, True)
        optimizer = loop.sgd(params, 0, device.Precision('half', 'cuda', channels_last), ngpu)(0.1)
        scaler = torch.amp.GradScaler('cpu')
        scaler.scale((DataParallelGrad.apply(params['w']) * torch.randn(4, 3, 1, 1)).sum()).backward()
        assert params['w'].grad.stride() == (3, 1, 1, 1) != params['w'].stride() or not channels_last
        scaler.step(optimizer)
        return optimizer.defaults['fused']
    assert step(2, '2.4.1') is None  # foreach: it steps
    with pytest.raises(RuntimeError, match='same layout'):
        step(1, '2.4.1')  # one GPU keeps the fused SGD: the simulated check would refuse these gradients
    assert step(2, '2.4.1', channels_last=False) is True
    monkeypatch.setattr(torch, '_fused_sgd_', fused_sgd)
    assert step(2, '2.5.1') is True  # the real kernel, which takes them
