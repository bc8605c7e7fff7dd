"""The run folder: where a run may write, and its files written and read back. model.pt7 holds
{params, optimizer, epoch} as in 2017, plus every RNG state and the epoch's log record; log.txt one
`json_stats: {...}` line per finished epoch. Both are written so that a kill at any instant loses at
most the epoch in progress, and a resumed run repeats the uninterrupted one."""
import json
import os
import sys

import torch

from training.errors import UserError
from training.formats import append_log, checkpoint_params, load_checkpoint, save_checkpoint
from training.rng import rng_state
from utils import check_params, n_trained

def check_save(opt, default_name):
    """Resolves --save and --resume auto; refuses to touch a folder that holds a run, unless resuming it."""
    if opt.resume == 'auto':
        if not opt.save:
            raise UserError('--resume auto continues the run in --save: pass --save too')
        path = os.path.join(opt.save, 'model.pt7')
        opt.resume = path if os.path.exists(path) else ''
    if not opt.save:
        opt.save = (os.path.dirname(opt.resume) or '.') if opt.resume else os.path.join('logs', default_name)
    existing = [n for n in ('model.pt7', 'log.txt') if os.path.exists(os.path.join(opt.save, n))]
    if existing and not opt.resume:
        raise UserError(f'--save {opt.save} already holds a run ({existing[0]}); pass --resume '
                        f'{os.path.join(opt.save, "model.pt7")} (or auto) to continue it, or choose another --save')


def make_save(folder):
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, '.write_test')
        open(probe, 'w').close()
        os.remove(probe)
    except OSError as e:
        raise UserError(f'--save {folder} is not writable: {e.strerror}') from None

def read_resume(path, saved):
    """A model.pt7 to resume, its params checked against `saved` and under its names."""
    state = load_checkpoint(path)
    state['params'] = checkpoint_params(state, saved)
    check_params(state['params'], saved, f'--resume {path}')
    return state


def restore(path, state, saved, optimizer):
    """Loads a checkpoint (read_resume's) into `saved` params and the optimizer."""
    params = state['params']
    with torch.no_grad():
        for k, v in saved.items():
            v.copy_(params[k])
    try:
        if state.get('optimizer'):
            optimizer.load_state_dict(state['optimizer'])
        state['epoch'] = int(state.get('epoch', 0))
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f'--resume {path}: optimizer state does not fit this model ({e})') from None
    trained = [p for g in optimizer.param_groups for p in g['params']]
    if any(s.get('momentum_buffer') is not None and s['momentum_buffer'].shape != p.shape
           for p in trained for s in [optimizer.state.get(p, {})]):
        # a 2017 checkpoint may list its tensors in another order: the weights are right, the momentum is not
        print(f'note: --resume {path}: its momentum does not fit this model\'s tensor order; momentum restarts',
              file=sys.stderr)
        optimizer.state.clear()
    return state


class EpochWriter:
    """on_epoch_end of rank 0: model.pt7 first, then its log line, then the epoch's TensorBoard points
    (`board`, where there is one), then one line on stdout."""

    def __init__(self, opt, run, generator, plan):
        self.opt, self.run, self.generator, self.plan = opt, run, generator, plan
        self.board = None
        self.log_path = os.path.join(opt.save, 'log.txt')
        # log.txt's n_parameters is the 2017 count, of every tensor of the student's dict (batch-norm
        # statistics too); the trained count is printed beside it
        self.n_parameters = sum(v.numel() for v in run.params_s.values())
        self.n_trained = n_trained(run.params_s)

    def __call__(self, stats, optimizer, rng=None):
        """rng: rank_rng_states' (rank 0's, [other ranks']) under torchrun; else this process's, read here."""
        opt = self.opt
        rng, rng_ranks = rng or (rng_state(self.generator), [])
        # plain JSON types (meters give numpy floats), which torch.load(weights_only=True) accepts
        record = json.loads(json.dumps({**opt.record(), **stats, 'num_classes': self.run.num_classes,
                                        **(self.run.data or {}),
                                        'n_parameters': self.n_parameters,
                                        **({'beta_now': self.run.distiller.beta} if self.run.scheduled() else {})}))
        scaler = getattr(optimizer, 'scaler', None)  # fp16: the loss scale goes on where it was
        if self.board:  # the epoch's per-step points reach the disk before model.pt7 says the epoch is done
            self.board.flush()
        save_checkpoint(os.path.join(opt.save, 'model.pt7'), self.run.saved, optimizer, stats['epoch'],
                        rng=rng, record=record, **({'rng_ranks': rng_ranks} if rng_ranks else {}),
                        **({'scaler': scaler.state_dict()} if scaler else {}))
        self.plan.fire(f'ckpt{stats["epoch"]}')
        append_log(self.log_path, record)
        if self.board:
            self.board.epoch(record, optimizer.param_groups[0]['lr'])
        def pct(acc):  # top-1, or top-1/top-5
            return '/'.join(f'{a:.2f}' for a in (acc if isinstance(acc, list) else [acc])) + '%'
        print(f'==> epoch {stats["epoch"]}/{opt.epochs}: train loss {stats["train_loss"]:.4f} acc '
              f'{pct(stats["train_acc"])}, test loss {stats["test_loss"]:.4f} acc {pct(stats["test_acc"])} '
              f'({stats["train_time"]:.1f}s + {stats["test_time"]:.1f}s)')
