"""The CUDA and multi-process paths, proved on the CPU: device choice, RNG states across devices,
augmentation per rank, resume without a shared disk, rank 0 downloading first, fused SGD, the
loss scale in checkpoints."""
import os
import re
import socket
import subprocess
import sys

import pytest
import torch

from conftest import OFFLINE_ENV, ROOT, read_log, run_cifar

sys.path.insert(0, str(ROOT))
from training import device  # noqa: E402
from training.data import DeviceLoader  # noqa: E402
from training.errors import UserError  # noqa: E402

SMALL = ['--depth', 10, '--batch_size', 16, '--nthread', 0]


@pytest.fixture
def two_gpus(monkeypatch):
    """torch.cuda as a machine with 2 visible GPUs would show it, without touching CUDA."""
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 2)
    chosen = []
    monkeypatch.setattr(torch.cuda, 'set_device', lambda d: chosen.append(torch.device(d)))
    monkeypatch.setattr(torch.backends.cudnn, 'benchmark', False)
    monkeypatch.delenv('WORLD_SIZE', raising=False)
    return chosen


def test_gpu_id_is_honoured_and_a_bad_index_is_one_line(two_gpus, monkeypatch):
    monkeypatch.setenv('CUDA_VISIBLE_DEVICES', '5,6')  # set by SLURM or a container
    assert device.select_device('cuda', '0', 1) == torch.device('cuda', 0)
    assert os.environ['CUDA_VISIBLE_DEVICES'] == '5,6'  # the default --gpu_id leaves it alone
    assert torch.backends.cudnn.benchmark  # as both 2017 scripts set it
    device.select_device('cuda:1', '2,3', 1)
    assert os.environ['CUDA_VISIBLE_DEVICES'] == '2,3' and two_gpus[-1] == torch.device('cuda', 1)
    with pytest.raises(UserError, match=r"--device cuda:2 asks for GPU 2, but 2 visible \(CUDA_VISIBLE_DEVICES='2,3'\)"):
        device.select_device('cuda:2', '2,3', 1)
    monkeypatch.setenv('WORLD_SIZE', '4')
    monkeypatch.setenv('LOCAL_RANK', '3')
    with pytest.raises(UserError, match='LOCAL_RANK asks for GPU 3, but 2 visible'):
        device.select_device('cuda', '0', 1)


def test_rng_states_of_more_gpus_than_visible(two_gpus, monkeypatch):
    restored = []
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 1)
    monkeypatch.setattr(torch.cuda, 'set_rng_state', lambda s, i: restored.append((int(s[0]), i)))
    state = device.rng_state()
    state['cuda'] = [torch.full((16,), 7, dtype=torch.uint8), torch.full((16,), 8, dtype=torch.uint8)]
    device.set_rng_state(state)
    assert restored == [(7, 0)]


def test_a_checkpoint_from_cuda_resumes_on_the_cpu(tiny_data, tmp_path):
    """A CUDA run's loader state (16 bytes) and CUDA RNG states, resumed on the CPU: one warning."""
    run_cifar([*SMALL, '--dataroot', tiny_data, '--epochs', 1, '--save', 'logs/c'], tmp_path)
    path = tmp_path / 'logs/c/model.pt7'
    state = torch.load(path, weights_only=True)
    assert state['rng']['loader'].numel() > 16  # a CPU generator's state
    state['rng']['loader'] = torch.zeros(16, dtype=torch.uint8)
    state['rng']['cuda'] = [torch.zeros(16, dtype=torch.uint8)] * 2
    torch.save(state, path)
    p = run_cifar([*SMALL, '--dataroot', tiny_data, '--epochs', 2, '--save', 'logs/c', '--resume', 'auto'], tmp_path)
    assert [line for line in p.stderr.splitlines() if line] == [
        "warning: the checkpoint's data order was drawn on another kind of device than cpu; "
        "it goes on from --seed, not where it left off"]
    assert [r['epoch'] for r in read_log(tmp_path / 'logs/c')] == [1, 2]


def loader(rank, world, batch, seed=0):
    # every image the same 8x8 ramp: what differs between two images is their crop and flip
    images = torch.arange(64, dtype=torch.uint8).view(1, 1, 8, 8).expand(24, 3, 8, 8).contiguous()
    return DeviceLoader(images, list(range(24)), batch_size=batch, mean=[0] * 3, std=[1 / 255] * 3, train=True,
                        pad=2, generator=torch.Generator().manual_seed(seed), rank=rank, world=world)


def test_ranks_draw_their_own_augmentation():
    """The j-th image of each rank's batch gets its own crop and flip, and together the ranks make
    exactly the global batches one process draws."""
    ranks = [list(loader(r, 2, 4)) for r in (0, 1)]
    whole = list(loader(0, 1, 8))
    assert len(ranks[0]) == len(ranks[1]) == len(whole) == 3
    for (x0, y0), (x1, y1), (x, y) in zip(*ranks, whole):
        assert torch.equal(torch.stack([x0, x1], 1).flatten(0, 1), x)
        assert torch.equal(torch.stack([y0, y1], 1).flatten(), y)
    # one seeded generator on both ranks, yet the j-th images of their batches are cropped differently
    assert not torch.equal(torch.cat([x for x, _ in ranks[0]]), torch.cat([x for x, _ in ranks[1]]))


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_a_rank_the_checkpoint_lacks_draws_from_its_own_seed():
    """Resumed on more ranks than were saved, a new rank's torchvision loader goes on from its own seed
    (rank_seed), not from rank 0's state, which would repeat rank 0's worker seeds; the fast loader's
    generator, which every rank keeps in step, takes rank 0's."""
    from types import SimpleNamespace
    from training.data import data_loader
    images = torch.zeros(8, 3, 4, 4, dtype=torch.uint8)
    dataset = torch.utils.data.TensorDataset(images, torch.zeros(8))
    saved = torch.Generator().manual_seed(3)
    torch.randperm(100, generator=saved)  # rank 0's generator, some epochs on
    state = {'rng': {'loader': saved.get_state()}}
    for make, in_step in ((lambda rank: data_loader(dataset, True, 2, 0, 3, torch.device('cpu'),
                                                    SimpleNamespace(rank=rank, world=2)), False),
                          (lambda rank: loader(rank, 2, 2, seed=3), True)):
        new = make(1)
        assert getattr(new, 'ranks_in_step', False) is in_step  # as fit reads it
        fresh = make(1).generator.get_state()
        device.set_rng_state(device.rank_rng_state(state, 1, in_step), new.generator)
        assert torch.equal(new.generator.get_state(), saved.get_state() if in_step else fresh)
    assert not torch.equal(fresh, saved.get_state())
    assert device.rank_rng_state(state, 0) is state['rng']


@pytest.mark.slow
def test_resume_where_only_rank_0_has_the_checkpoint(tiny_data, tmp_path):
    """Two machines without a shared disk: rank 1 starts from rank 0's checkpoint, not from scratch."""
    (tmp_path / 'a').mkdir()
    (tmp_path / 'b').mkdir()
    args = [*SMALL, '--dataroot', tiny_data, '--save', 'logs/r']
    run_cifar([*args, '--epochs', 1], tmp_path / 'a')
    env = {**OFFLINE_ENV, 'WORLD_SIZE': '2', 'MASTER_ADDR': '127.0.0.1', 'MASTER_PORT': str(free_port())}
    procs = [subprocess.Popen([sys.executable, str(ROOT / 'cifar.py'), '--no_progress', *map(str, args),
                               '--epochs', '3', '--resume', 'auto'], cwd=tmp_path / cwd, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env={**env, 'RANK': str(rank), 'LOCAL_RANK': str(rank)})
             for rank, cwd in ((0, 'a'), (1, 'b'))]
    try:
        outs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], outs
    assert 'resumed from logs/r/model.pt7 at epoch 1' in outs[0][0]
    assert [r['epoch'] for r in read_log(tmp_path / 'a/logs/r')] == [1, 2, 3]
    assert not (tmp_path / 'b/logs').exists()


@pytest.mark.slow
def test_rank_0_downloads_first_and_every_rank_stops_with_it(tmp_path):
    p = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                        str(ROOT / 'cifar.py'), '--no_progress', *map(str, SMALL), '--dataroot', 'no/data',
                        '--save', 'logs/x'], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env=OFFLINE_ENV)
    # every rank stops with rank 0's reason (torchrun may stop a rank before it says it: at least one does)
    ours = [line for line in p.stderr.splitlines() if line.startswith('cifar.py: error:')]
    assert p.returncode != 0 and 1 <= len(ours) <= 2, p.stderr
    for line in ours:
        assert re.fullmatch(r"cifar\.py: error: rank [01]: CIFAR10 is not in --dataroot 'no/data' and could not be "
                            r"downloaded \(\w+\); pass --dataroot .*", line), line
    assert not (tmp_path / 'no').exists() and not (tmp_path / 'logs').exists()


def test_fused_sgd_for_fp16_on_gpus_only():
    from training.loop import sgd
    from training.device import Precision
    p = {'w': torch.zeros(3, requires_grad=True), 'running_mean': torch.zeros(3)}
    assert sgd(p, 0, Precision('half', 'cuda'))(0.1).defaults['fused'] is True
    assert not sgd(p, 0, Precision('bfloat16', 'cuda'))(0.1).defaults['fused']
    assert not sgd(p, 0, Precision('half', 'cpu'))(0.1).defaults['fused']
    assert sgd(p, 0, Precision('half', 'cpu'))(0.1).param_groups[0]['params'] == [p['w']]


@pytest.fixture
def stale_memory(monkeypatch):
    """torch.empty_like handing out memory that held something else (NaN here), as a GPU's allocator does."""
    empty_like = torch.empty_like
    monkeypatch.setattr(torch, 'empty_like', lambda t, **kw: empty_like(t, **kw).fill_(float('nan')))


def scaled_steps(optimizers, w, xs):
    """A GradScaler's steps of the loss sum(w * x), optimizers[i] taking xs[i]'s: an inf in x is a step
    the scaler skips. A new optimizer is an lr restart, as the loop makes one."""
    scaler = torch.amp.GradScaler('cpu')
    for optimizer, steps in zip(optimizers, xs):
        for x in steps:
            optimizer.zero_grad()
            scaler.scale((w * x).sum()).backward()
            scaler.step(optimizer)
            scaler.update()
    return w.detach()


def test_a_skipped_first_step_leaves_no_stale_momentum(stale_memory):
    """torch's fused SGD makes missing momentum buffers with empty_like and leaves them unwritten when the
    GradScaler skips the step: the next step reads stale memory as momentum. The project's SGD has zero
    buffers from the start, and takes the non-fused SGD's steps after a skipped first step and after
    an lr restart."""
    from training.loop import sgd
    from training.device import Precision
    inf, one = torch.tensor([float('inf'), 1, 1]), torch.ones(3)
    steps = [[inf, one, one], [inf, one * 2, one]]  # a restart at lr 0.01, whose first step is skipped too

    def run(make):
        w = torch.ones(3, requires_grad=True)
        return scaled_steps([make([w], 0.1), make([w], 0.01)], w, steps)
    stale = run(lambda p, lr: torch.optim.SGD(p, lr, momentum=0.9, fused=True))
    reference = run(lambda p, lr: torch.optim.SGD(p, lr, momentum=0.9, foreach=False))
    assert stale.isnan().all() and reference.isfinite().all()
    ours = run(lambda p, lr: sgd({'w': p[0]}, 0, Precision('half', 'cuda'))(lr))
    torch.testing.assert_close(ours, reference)
    assert reference.tolist() == pytest.approx([1 - 0.1 - 0.19 - 0.02 - 0.028] * 3)


def test_zero_momentum_buffers_change_no_step():
    """From a zero buffer the first step is 0.9 * 0 + grad, the grad a missing buffer takes: each of
    torch's SGD paths gives the same bits either way, with weight decay and a -0 gradient."""
    from training.loop import zero_momentum
    for kind in ({'foreach': False}, {'foreach': True}, {'fused': True}):
        finals = []
        for premade in (False, True):
            w = torch.randn(8, 4, generator=torch.Generator().manual_seed(0)).requires_grad_()
            opt = torch.optim.SGD([w], 0.1, momentum=0.9, weight_decay=5e-4, **kind)
            opt = zero_momentum(opt) if premade else opt
            g = torch.Generator().manual_seed(1)
            for i in range(4):
                w.grad = torch.randn(8, 4, generator=g)
                w.grad[0, 0] = -0.0 if i == 0 else w.grad[0, 0]
                opt.step()
            finals.append((w.detach().clone(), opt.state[w]['momentum_buffer']))
        (a, ma), (b, mb) = finals
        assert torch.equal(a.view(torch.int32), b.view(torch.int32)) and torch.equal(ma, mb), kind


def test_a_resumed_optimizer_has_every_momentum_buffer():
    """A checkpoint whose optimizer holds no buffer for a tensor (or none that fits) resumes with zero
    buffers, not with the fused SGD's empty ones."""
    from training.loop import restore, sgd
    from training.device import Precision
    params = {'a': torch.ones(2, requires_grad=True), 'b': torch.ones(3, requires_grad=True)}
    saved = torch.optim.SGD([params['a'], params['b']], 0.1, momentum=0.9)
    params['a'].grad = torch.ones(2)
    saved.step()  # a buffer for a alone
    unfit = {**saved.state_dict(), 'state': {0: {'momentum_buffer': torch.ones(5)}}}  # 2017's tensor order
    for state, want in ((saved.state_dict(), [[1, 1], [0, 0, 0]]), (unfit, [[0, 0], [0, 0, 0]])):
        optimizer = sgd(params, 0, Precision('half', 'cuda'))(0.1)
        restore('model.pt7', {'params': params, 'optimizer': state}, params, optimizer)
        assert [optimizer.state[p]['momentum_buffer'].tolist() for p in params.values()] == want


def test_the_loss_scale_is_checkpointed(tiny_data, tmp_path):
    args = [*SMALL, '--dataroot', tiny_data, '--dtype', 'half', '--save', 'logs/h']
    run_cifar([*args, '--epochs', 1], tmp_path)
    path = tmp_path / 'logs/h/model.pt7'
    state = torch.load(path, weights_only=True)
    assert state['scaler']['scale'] == 2.0 ** 16  # GradScaler's initial scale: no step overflowed
    state['scaler']['scale'] = 1024.0  # as if fp16 overflows had halved it
    torch.save(state, path)
    run_cifar([*args, '--epochs', 2, '--resume', 'auto'], tmp_path)
    assert torch.load(path, weights_only=True)['scaler']['scale'] == 1024.0  # went on from there
