"""Every random state a run draws from: seeded at the start, saved with each epoch's checkpoint and
restored on resume, so that a resumed run repeats the uninterrupted one."""
import random
import sys

import numpy as np
import torch

from training.data import rank_seed
from training.parallel import Dist


def seed_everything(seed):
    """Seeds torch, numpy and random. Under torchrun each rank takes a seed of its own (data.rank_seed):
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


def rank_rng_state(state, rank):
    """A checkpoint's random states for `rank`: its own where the checkpoint has them (rank 0's is 'rng');
    else (a run saved with fewer processes) rank 0's data-order generator alone, which the fast loader
    keeps in step on every rank, while this rank's own streams go on from its seed."""
    others = state.get('rng_ranks') or []
    if rank == 0:
        return state['rng']
    if rank <= len(others):
        return others[rank - 1]
    return {k: v for k, v in state['rng'].items() if k == 'loader'}
