"""The device and the processes: which device, the torchrun process group, what --dtype means there,
DataParallel and DistributedDataParallel over the student, every random state a run draws from, and
the guards of the torch APIs newer than the floor (scripts/pins.py)."""
import inspect
import math
import os
import random
import sys
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torchnet as tnt
from torch.torch_version import TorchVersion

from training.errors import UserError
from utils import set_requires_grad_except_bn_


AMP_DTYPES = {'half': torch.float16, 'float16': torch.float16, 'bfloat16': torch.bfloat16}
PARAM_DTYPES = {'float': torch.float32, 'float32': torch.float32,
                'double': torch.float64, 'float64': torch.float64}
NAMES = {**AMP_DTYPES, **PARAM_DTYPES}


def memory_format(channels_last):
    """The memory format of images and conv weights under --channels_last."""
    return torch.channels_last if channels_last else torch.contiguous_format


@dataclass(frozen=True)
class Precision:
    """--dtype NAME on a device of type `device_type`, handed to whoever needs it.

    params: the dtype of weights and inputs (float32, or float64 for --dtype double); with autocast
        the weights stay float32 (master weights) and `compute` is the dtype the ops run in.
    compute: the autocast dtype (float16, bfloat16), or None for no autocast.
    channels_last: the memory format of images and conv weights.
    """
    name: str = 'float'
    device_type: str = 'cpu'
    channels_last: bool = False

    @property
    def params(self):
        return PARAM_DTYPES.get(self.name, torch.float32)

    @property
    def compute(self):
        return AMP_DTYPES.get(self.name)

    @property
    def scaled(self):
        """A GradScaler scales the loss: fp16 gradients underflow without it."""
        return self.compute == torch.float16

    @property
    def fused_sgd(self):
        """The fused SGD takes the GradScaler's inf check on the GPU, so the host does not wait for it."""
        return self.device_type == 'cuda' and self.scaled

    def autocast(self):
        """Mixed precision: compute in `compute` under autocast, master weights in float32."""
        return torch.autocast(self.device_type, dtype=self.compute) if self.compute else nullcontext()

    def scaler(self, state=None):
        """A GradScaler where the loss needs one, resumed from a checkpoint's `state`; else None."""
        if not self.scaled:
            return None
        scaler = torch.amp.GradScaler(self.device_type)
        if state:
            scaler.load_state_dict(state)
        return scaler

    def emulated(self):
        """True where autocast would run on a CPU with no native kernels for `compute`: without
        AVX-512 bf16/fp16 (an AVX2-only CPU), oneDNN emulates the low-precision convolutions and a
        step runs several times slower than fp32 (docs/speed.md)."""
        if self.device_type != 'cpu' or self.compute is None:
            return False
        native = {torch.bfloat16: '_is_mkldnn_bf16_supported', torch.float16: '_is_mkldnn_fp16_supported'}
        try:
            return not getattr(torch.ops.mkldnn, native[self.compute])()
        except (AttributeError, RuntimeError):  # the check is private to torch: never fail a run on it
            return False


def select_device(device_name, gpu_id, ngpu):
    """The device, and the torchrun process group when WORLD_SIZE > 1 (nccl on CUDA, gloo on CPU).

    --gpu_id sets CUDA_VISIBLE_DEVICES, as in 2017; where the environment already sets it (SLURM,
    containers), the default --gpu_id 0 leaves it alone and any other --gpu_id replaces it.
    """
    if device_name not in ('', 'cpu', 'cuda') and not device_name.startswith('cuda:'):
        raise UserError(f'--device must be cpu or cuda, got {device_name!r}')
    world = int(os.environ.get('WORLD_SIZE', 1))
    if device_name != 'cpu' and world == 1 and (gpu_id != '0' or 'CUDA_VISIBLE_DEVICES' not in os.environ):
        os.environ['CUDA_VISIBLE_DEVICES'] = gpu_id  # before CUDA initialises
    try:
        device = torch.device(device_name or ('cuda' if torch.cuda.is_available() else 'cpu'))
    except RuntimeError:
        raise UserError(f'--device must be cpu, cuda or cuda:N, got {device_name!r}') from None
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise UserError(f'--device cuda, but no CUDA GPU is available (--gpu_id {gpu_id}; try --device cpu)')
    available = torch.cuda.device_count() if device.type == 'cuda' else 0
    if ngpu > 1 and ngpu > available:
        raise UserError(f'--ngpu {ngpu} needs {ngpu} GPUs; {available} visible '
                        f'(--gpu_id {gpu_id}, device {device.type})')
    if world > 1 and ngpu > 1:
        raise UserError('--ngpu splits batches inside one process; under torchrun use one GPU per process')
    if device.type == 'cuda':
        index = int(os.environ.get('LOCAL_RANK', 0)) if world > 1 else (device.index or 0)
        if index >= available:
            visible = os.environ.get('CUDA_VISIBLE_DEVICES', '')
            raise UserError(f'{"LOCAL_RANK" if world > 1 else "--device " + device_name} asks for GPU {index}, but '
                            f'{available} visible (CUDA_VISIBLE_DEVICES={visible!r})')
        device = torch.device('cuda', index)
        torch.cuda.set_device(device)
    if world > 1:
        torch.distributed.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick its fastest kernels
    return device


class Dist:
    """The torchrun world as the training loop needs it; world 1 is a no-op."""

    def __init__(self, device):
        on = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.rank = torch.distributed.get_rank() if on else 0
        self.world = torch.distributed.get_world_size() if on else 1
        self.device = device

    def sum(self, values):
        """Element-wise sum over ranks of a list of numbers."""
        if self.world == 1:
            return list(values)
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def any(self, flag):
        return bool(self.sum([bool(flag)])[0]) if self.world > 1 else bool(flag)

    def broadcast_object(self, obj):
        """Rank 0's object (a checkpoint) on every rank: other machines need not share its disk."""
        if self.world == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, 0, device=self.device if self.device.type == 'cuda' else None)
        return box[0]

    def gather_object(self, obj):
        """Every rank's object, in rank order, on rank 0 (None on the others)."""
        if self.world == 1:
            return [obj]
        box = [None] * self.world if self.rank == 0 else None
        torch.distributed.gather_object(obj, box, 0)
        return box

    def rank0_first(self, make):
        """make() on rank 0 first (a download), then on the others; if rank 0 fails, every rank
        stops with rank 0's reason."""
        if self.world == 1:
            return make()
        result, failure = None, None
        if self.rank == 0:
            try:
                result = make()
            except UserError as e:
                failure = str(e)
        failure = self.broadcast_object(failure)
        if failure:
            raise UserError(failure)
        return result if self.rank == 0 else make()

    def broadcast_(self, tensors):
        """Rank 0's values into every rank's tensors (batch-norm statistics before a test pass)."""
        if self.world > 1:
            for t in tensors:
                torch.distributed.broadcast(t.data, 0)

    def sync_meters(self, meters):
        """Meters over the whole data, not one rank's shard: counts, sums and the spread
        (Chan et al.'s pooled sum of squared deviations) are combined over ranks."""
        if self.world == 1:
            return
        for m in meters:
            if isinstance(m, tnt.meter.ClassErrorMeter):
                n, *sums = self.sum([m.n] + [m.sum[k] for k in m.topk])
                m.n, m.sum = int(n), {k: s for k, s in zip(m.topk, sums)}
                continue
            # per rank: n, sum, the squared deviations from its own mean, and n * mean^2
            n, total, m2, n_mean2 = self.sum([m.n, m.sum, m.m_s if m.n > 1 else 0.0,
                                              m.sum ** 2 / m.n if m.n else 0.0])
            m.n, m.sum = int(n), total
            m.mean = m.mean_old = total / n if n else float('nan')
            m.m_s = m2 + n_mean2 - total ** 2 / n if n else 0.0
            m.std = math.sqrt(max(m.m_s, 0.0) / (n - 1)) if n > 1 else (math.inf if n == 1 else float('nan'))


def data_parallel(net, ngpu):
    """--ngpu N: torch's DataParallel splits each batch over N GPUs in one process. As in 2017,
    batch-norm statistics are updated from the first GPU's share. A frozen network (a teacher) is
    copied to the GPUs once, not at every step."""
    if ngpu <= 1:
        return net
    return nn.DataParallel(net, device_ids=list(range(ngpu))) if any(True for _ in net.parameters()) \
        else FrozenDataParallel(net, list(range(ngpu)))


class FrozenDataParallel(nn.Module):
    """DataParallel for a network that never changes: replicated onto the GPUs at its first call."""

    def __init__(self, net, device_ids):
        super().__init__()
        self.net, self.device_ids, self.replicas = net, device_ids, None

    def forward(self, x, mode):
        if self.replicas is None:
            self.replicas = nn.parallel.replicate(self.net, self.device_ids, detach=True)
        inputs = nn.parallel.scatter(x, self.device_ids)
        outputs = nn.parallel.parallel_apply(self.replicas[:len(inputs)], [(i, mode) for i in inputs],
                                             devices=self.device_ids[:len(inputs)])
        return nn.parallel.gather(outputs, self.device_ids[0])


def distributed(model, device):
    """torchrun: DistributedDataParallel sends rank 0's weights to every rank once, then averages
    gradients in buckets overlapped with backward, before a GradScaler looks at them. Buffers are not
    re-sent each step: batch-norm statistics stay per rank between test passes (the loop broadcasts
    rank 0's before each), and a frozen teacher is sent once."""
    if not torch.distributed.is_initialized():
        return model
    kw = ddp_no_buffer_sync()  # its keyword changed in torch 2.13 (below)
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == 'cuda' else None, **kw)
    sync_buffers_once(model, kw)
    return ddp


def place_params(params, device, dtype, channels_last, trained):
    """Moves a param dict to the device (in place). Trained: every tensor but batch-norm statistics
    learns; otherwise all are frozen (a teacher).

    Conv weights get the memory format's own strides, written out in full: .contiguous() keeps a 1x1
    conv's (C, 1, 1, 1) strides, which already pass as channels_last, while its gradient comes out with
    (C, 1, C, C). The same memory, but torch 2.4's fused SGD compares strides of size-1 dimensions too
    and refuses the pair (ATen/native/ForeachUtils.h check_fast_path_restrictions; relaxed in torch
    PR 134546, 2.5), and DDP warns that the grad strides do not match its bucket views."""
    fmt = memory_format(channels_last)
    for k, v in params.items():
        v = v.to(device, dtype).requires_grad_(False)
        params[k] = torch.empty_like(v, memory_format=fmt).copy_(v) if v.dim() == 4 else v
    if trained:
        set_requires_grad_except_bn_(params)


# ---------------------------------------------------------------- random states

def rank_seed(seed, rank):
    """The seed of a rank's own random streams: --seed itself on rank 0 (a one-process run is unchanged),
    mixed with the rank on the others (SeedSequence), so that no two ranks draw alike."""
    return seed if rank == 0 else int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


def seed_everything(seed):
    """Seeds torch, numpy and random. Under torchrun each rank takes a seed of its own (rank_seed):
    with --loader torchvision the transforms draw from these streams (with --nthread 0; the workers'
    from the loader's generator), and alike on every rank they would give every rank's share the same
    crops and flips. Weights drawn here differ between ranks too, but DistributedDataParallel starts
    every rank from rank 0's."""
    seed = rank_seed(seed, Dist(torch.device('cpu')).rank)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state(generator=None):
    """Every random state a run draws from, in types torch.load(weights_only=True) accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {'torch': torch.get_rng_state(), 'python': random.getstate(),
             'numpy': [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)]}
    if torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state_all()
    if generator is not None:
        state['loader'] = generator.get_state()
    return state


def set_rng_state(state, generator=None):
    """Restores rng_state's states (those it holds: see rank_rng_state). Those of devices this machine
    lacks (a run saved on CUDA and resumed on the CPU, or on fewer GPUs) are left out, with one line
    where it changes the run."""
    if 'torch' in state:
        torch.set_rng_state(state['torch'])
        version, internal, gauss = state['python']
        random.setstate((version, tuple(internal), gauss))
        kind, keys, pos, has_gauss, gauss = state['numpy']
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if state.get('cuda') and torch.cuda.is_available():
        for i, s in enumerate(state['cuda'][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)
    if generator is not None and 'loader' in state:
        if state['loader'].numel() == generator.get_state().numel():
            generator.set_state(state['loader'])
        else:  # CPU and CUDA generators keep states of different kinds
            print(f'warning: the checkpoint\'s data order was drawn on another kind of device than '
                  f'{generator.device.type}; it goes on from --seed, not where it left off', file=sys.stderr)


def rank_rng_states(dist, generator):
    """At an epoch's end, on every rank: (rank 0's rng_state, [those of ranks 1 ..]) on rank 0, which
    saves them (model.pt7's 'rng' and 'rng_ranks'); None on the others. Under torchrun each rank
    draws augmentations of its own (seed_everything), so each keeps its own state across a resume."""
    states = dist.gather_object(rng_state(generator))
    return states and (states[0], states[1:])


def rank_rng_state(state, rank, in_step=False):
    """A checkpoint's random states for `rank`: its own where the checkpoint has them (rank 0's is 'rng').
    Else (a run saved with fewer processes) this rank's streams go on from its own seed (rank_seed), as
    they were made; a loader whose generator every rank keeps `in_step` (the fast loader) takes rank 0's."""
    others = state.get('rng_ranks') or []
    if rank == 0:
        return state['rng']
    if rank <= len(others):
        return others[rank - 1]
    return {k: v for k, v in state['rng'].items() if k == 'loader' and in_step}


# ---------------------------------------------------------------- torch newer than the floor

def ddp_no_buffer_sync():
    """DistributedDataParallel's keywords for "do not re-send buffers at every forward".

    torch >= 2.13: forward_sync_buffers=False (buffers are still sent once, at construction).
    Older: broadcast_buffers=False, which also skips that first send: sync_buffers_once() does it."""
    if 'forward_sync_buffers' in inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters:
        return {'forward_sync_buffers': False}
    return {'broadcast_buffers': False}


def fused_sgd_skips_size1_strides():
    """Whether this torch's fused SGD compares strides only in dimensions of size > 1. --ngpu N's
    DataParallel sends gradients back contiguous (comm.reduce_add_coalesced), and autograd keeps one
    that differs from its parameter only in size-1 dimensions: a 1x1 conv's under channels_last,
    (C, 1, 1, 1) against (C, 1, C, C). torch 2.4 compares every stride and refuses the pair
    (ATen/native/ForeachUtils.h _check_tensors_share_sizes_and_strides; PR 134546, in 2.5 by PR 136426)."""
    return TorchVersion(torch.__version__) >= (2, 5)


def sync_buffers_once(module, kwargs):
    """Rank 0's buffers to every rank, where the DDP keywords left that out (torch < 2.13)."""
    if 'broadcast_buffers' in kwargs:
        for b in module.buffers():
            torch.distributed.broadcast(b.data, 0)
