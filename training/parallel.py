"""Devices and parallelism: device choice, the torchrun process group, and functional networks as
torch.nn.Modules, so that torch's own DataParallel (--ngpu N) and DistributedDataParallel (torchrun)
carry them."""
import math
import os
from contextlib import nullcontext

import torch
import torch.nn as nn
import torchnet as tnt

from training.compat import ddp_no_buffer_sync, sync_buffers_once
from training.errors import UserError
from training.precision import memory_format
from utils import set_requires_grad_except_bn_


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


class FunctionalNet(nn.Module):
    """A functional network f(input, params, mode) and its flat dict of tensors as a torch.nn.Module.

    Trained tensors become Parameters and the others (batch-norm statistics, a frozen teacher)
    buffers. The dict passed in is updated to hold those same tensor objects, so the optimizer,
    checkpoints (with the 2017 names) and the module all see one set of weights.
    """

    def __init__(self, f, params, amp_dtype=None):
        super().__init__()
        self.f, self.names, self.amp_dtype = f, list(params), amp_dtype
        for k in self.names:
            if params[k].requires_grad:
                params[k] = nn.Parameter(params[k])
                self.register_parameter(self.attr(k), params[k])
            else:
                self.register_buffer(self.attr(k), params[k])

    @staticmethod
    def attr(name):
        return name.replace('.', '__')  # module attributes cannot hold dots

    @property
    def params(self):
        """The 2017 dict; in a DataParallel replica, the replica's own copies."""
        return {k: getattr(self, self.attr(k)) for k in self.names}

    def forward(self, x, mode):
        # autocast state is per thread, and DataParallel's replica threads re-enter it without the
        # dtype: each replica enters it here, with the dtype the run asked for
        amp = torch.autocast(x.device.type, dtype=self.amp_dtype) if self.amp_dtype else nullcontext()
        with amp:
            return self.f(x, self.params, mode)


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
    kw = ddp_no_buffer_sync()  # its keyword changed in torch 2.13 (compat.py)
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
