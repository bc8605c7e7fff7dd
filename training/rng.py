"""Every random state a run draws from: seeded at the start, saved with each epoch's checkpoint and
restored on resume, so that a resumed run repeats the uninterrupted one."""
import random
import sys

import numpy as np
import torch

def seed_everything(seed):
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
    """Restores rng_state's states. Those of devices this machine lacks (a run saved on CUDA and
    resumed on the CPU, or on fewer GPUs) are left out, with one line where it changes the run."""
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
