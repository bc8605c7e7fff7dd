"""Functional networks on torch's parallel engines: the nn.Module wrapper, DDP with fp16 loss
scaling, meters combined over ranks, and errors on any rank."""
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT

sys.path.insert(0, str(ROOT))
from training.distill import FunctionalNet  # noqa: E402
from training.errors import leave  # noqa: E402
from resnet import wrn, wrn_params  # noqa: E402
from utils import set_requires_grad_except_bn_  # noqa: E402


def test_functional_net_is_the_function_and_shares_the_dict():
    torch.manual_seed(0)
    params = wrn_params(10, 1, 5)
    set_requires_grad_except_bn_(params)
    reference = {k: v.detach().clone() for k, v in params.items()}
    net = FunctionalNet(wrn, params)
    x = torch.randn(4, 3, 32, 32)
    y, groups = net(x, False)
    y_ref, groups_ref = wrn(x, reference, False)
    assert torch.equal(y, y_ref) and all(torch.equal(a, b) for a, b in zip(groups, groups_ref))
    # the dict now holds the module's own tensors: what the optimizer steps is what runs and is saved
    trained = dict(net.named_parameters())
    assert len(trained) == sum(1 for k in params if not k.endswith(('running_mean', 'running_var')))
    assert all(params[k] is getattr(net, FunctionalNet.attr(k)) for k in params)
    assert set(dict(net.named_buffers())) == {FunctionalNet.attr(k) for k in params if k.endswith('running_mean')} | \
        {FunctionalNet.attr(k) for k in params if k.endswith('running_var')}
    net(x, True)  # training mode updates the running statistics in the dict itself
    assert not torch.equal(params['bn.running_mean'], reference['bn.running_mean'])


def test_forward_in_a_thread_computes_in_the_asked_dtype():
    """DataParallel runs replicas in threads, which do not inherit autocast: the wrapper enters it."""
    params = wrn_params(10, 1, 5)
    net = FunctionalNet(wrn, params, amp_dtype=torch.bfloat16)
    out = {}
    t = threading.Thread(target=lambda: out.setdefault('y', net(torch.randn(2, 3, 32, 32), False)[0]))
    t.start()
    t.join()
    assert out['y'].dtype == torch.bfloat16
    assert FunctionalNet(wrn, wrn_params(10, 1, 5))(torch.randn(2, 3, 32, 32), False)[0].dtype == torch.float32


class InfGrad(torch.autograd.Function):
    """The identity, whose gradient is inf: an fp16 overflow on one rank."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * float('inf')


class Linear(torch.nn.Module):
    """A model in the Trainer's contract; on rank 1 its 3rd training step has inf gradients."""

    def __init__(self, rank):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(12, 10) / 12)
        self.rank, self.calls = rank, 0

    def forward(self, x, y, mode):
        logits = x @ self.w
        if mode:
            self.calls += 1
            if self.rank == 1 and self.calls == 3:
                logits = InfGrad.apply(logits)
        return logits, {'loss': F.cross_entropy(logits, y)}


def _fp16_worker(rank, init, out):
    from training.loop import Trainer
    from training.device import Dist, distributed
    torch.distributed.init_process_group('gloo', init_method=init, rank=rank, world_size=2)
    g = torch.Generator().manual_seed(rank)
    batches = [(torch.randn(8, 12, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(5)]
    model = distributed(Linear(rank), torch.device('cpu'))
    params = list(model.parameters())
    sgd = lambda lr: torch.optim.SGD(params, lr)  # noqa: E731
    from training.device import Precision
    trainer = Trainer(model, sgd, torch.device('cpu'), epochs=1, precision=Precision('half'), progress=False,
                      dist=Dist('cpu'))
    trainer.train(batches, None, sgd(0.1))
    torch.save({'w': params[0].detach(), 'scale': trainer.scaler.get_scale()}, f'{out}/{rank}.pt')
    leave()


def test_fp16_under_ddp_with_an_inf_on_one_rank_ends(tmp_path):
    """Gradients are averaged before the GradScaler looks: both ranks skip the same step, in step."""
    ctx = torch.multiprocessing.start_processes(_fp16_worker, args=(f'file://{tmp_path}/init', str(tmp_path)),
                                                nprocs=2, join=False, start_method='spawn')
    for _ in range(240):  # 2 minutes; a hang would wait forever in the all-reduce
        if ctx.join(timeout=0.5):
            break
    else:
        for p in ctx.processes:
            p.kill()
        pytest.fail('the two ranks hung')
    a, b = (torch.load(tmp_path / f'{r}.pt') for r in (0, 1))
    assert torch.equal(a['w'], b['w'])  # the same updates on both ranks
    assert a['scale'] == b['scale'] == 2.0 ** 16 / 2  # one skipped step halved the scale, on both


def _meters_worker(rank, init, out):
    import torchnet as tnt
    from training.device import Dist
    torch.distributed.init_process_group('gloo', init_method=init, rank=rank, world_size=2)
    acc, loss = tnt.meter.ClassErrorMeter(topk=[1], accuracy=True), tnt.meter.AverageValueMeter()
    # rank 0 gets 3 of 4 right, rank 1 gets 0 of 2; losses 1, 2 and 6
    if rank == 0:
        acc.add(torch.eye(4), torch.tensor([0, 1, 2, 0]))
        loss.add(1.0)
        loss.add(2.0)
    else:
        acc.add(torch.eye(2), torch.tensor([1, 0]))
        loss.add(6.0)
    Dist(torch.device('cpu')).sync_meters([acc, loss])
    torch.save({'acc': acc.value()[0], 'loss': loss.value()}, f'{out}/{rank}.pt')
    leave()


def test_meters_are_combined_over_ranks(tmp_path):
    torch.multiprocessing.spawn(_meters_worker, args=(f'file://{tmp_path}/init', str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        r = torch.load(tmp_path / f'{rank}.pt', weights_only=False)
        assert r['acc'] == pytest.approx(100 * 3 / 6)
        assert r['loss'][0] == pytest.approx(3.0)
        assert r['loss'][1] == pytest.approx(np.std([1.0, 2.0, 6.0], ddof=1))  # not rank 0's std of [1, 2]


def test_an_error_on_any_rank_is_one_line_naming_it(tmp_path):
    script = tmp_path / 'fails.py'
    script.write_text(f'import sys; sys.path.insert(0, {str(ROOT)!r})\n'
                      'from training import errors\n'
                      'def main():\n'
                      '    raise errors.UserError("only this rank read a broken file")\n'
                      'errors.cli(main, "prog")\n')
    for rank, world, expected in (('1', '2', 'prog: error: rank 1: only this rank read a broken file'),
                                  ('0', '1', 'prog: error: only this rank read a broken file')):
        p = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                           env={**os.environ, 'RANK': rank, 'WORLD_SIZE': world})
        assert p.returncode == 1 and p.stderr.strip().splitlines() == [expected]


def network_cases():
    from resnet import CIFAR_MODELS, cifar_model_params, resnet_imagenet, resnet_imagenet_params
    cases = [(name, CIFAR_MODELS[name], lambda n=name: cifar_model_params(n, 16, 1, 10), 32) for name in CIFAR_MODELS]
    # an F-ActT adapter is a bare 1x1 conv weight: applied as distill applies it
    adapter = lambda x, p, mode: (F.conv2d(x, p['w']).sum(1), ())  # noqa: E731
    return cases + [('resnet18', resnet_imagenet, lambda: resnet_imagenet_params(18, 0.25, 10), 64),
                    ('adapter', adapter, lambda: {'w': torch.randn(16, 3, 1, 1)}, 8)]


@pytest.mark.parametrize('channels_last', [True, False])
def test_every_parameter_has_its_gradients_strides(channels_last):
    """torch 2.4's fused SGD refuses a parameter whose strides differ from its gradient's, even in a
    size-1 dimension (a 1x1 conv's), and DDP warns of them: place_params writes the strides out."""
    from training.device import place_params
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for name, f, make, size in network_cases():
        torch.manual_seed(0)
        params = make()
        place_params(params, torch.device('cpu'), torch.float32, channels_last, True)
        x = torch.randn(2, 3, size, size).contiguous(memory_format=fmt)
        f(x, params, True)[0].sum().backward()
        trained = {k: v for k, v in params.items() if v.requires_grad}
        assert trained and all(v.grad is not None for v in trained.values()), name
        unlike = {k: (v.stride(), v.grad.stride()) for k, v in trained.items() if v.stride() != v.grad.stride()}
        assert unlike == {}, name
