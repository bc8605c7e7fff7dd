"""TensorBoard event files in a run folder: each epoch's figures, and every N steps the running train loss.

An epoch's points are written after its model.pt7 and log line, from its log record, so an event file
never holds an epoch that a resume would redo. The per-step points of the epoch in progress may be cut
by a kill; a resumed run opens a fresh event file whose purge_step makes TensorBoard drop them (every
point at or after the first step of the epoch the run goes on from), and writes back any checkpointed
epoch whose points the kill lost. Only rank 0 writes. tensorboard is optional: without it no event file
is written, and --tensorboard 1 says in one line how to install it.
"""
import glob
import os
import threading
from contextlib import contextmanager

from training.errors import UserError
from training.options import Schedule
from training.rundir import WriteError

LAST = 'test/loss'  # an epoch's points are written in one flush, this one last: where it is, the epoch is whole


def writer_class():
    """torch's SummaryWriter, or None without the tensorboard package."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch raises it when tensorboard is missing
        return None
    return SummaryWriter


def check_option(opt):
    """--tensorboard 1 insists on event files; --tensorboard_every counts steps."""
    if opt.tensorboard_every < 1:
        raise UserError(f'--tensorboard_every must be 1 or more, got {opt.tensorboard_every}')
    if opt.tensorboard and writer_class() is None:
        raise UserError('--tensorboard 1 needs the tensorboard package: pip install tensorboard')


def enabled(tensorboard):
    """--tensorboard decided: unset means on wherever tensorboard is installed."""
    return int(writer_class() is not None) if tensorboard is None else tensorboard


def lr_at(record):
    """The lr of an epoch, from its record's options, by the run's one schedule."""
    return Schedule(record).lr(record['epoch'])


def epoch_scalars(record, lr, images):
    """{tag: value} of one epoch from its log record; `images`: (train, test) images an epoch."""
    s = {'lr': lr, **({'beta': record['beta_now']} if 'beta_now' in record else {})}
    groups = record.get('at_group_list') or range(len(record['at_losses']))
    s.update({f'at_loss/group{g}': m for g, (m, _) in zip(groups, record['at_losses'])})
    # F-ActT, gradient AT, symmetry: [mean, std] over the epoch's batches
    s.update({f'train/{k}': v[0] for k, v in record.items()
              if k.endswith('_loss') and k not in ('train_loss', 'test_loss') and isinstance(v, list)})
    for split, n in zip(('train', 'test'), images):
        acc = record[f'{split}_acc']
        s.update({f'{split}/top{k}': a for k, a in zip((1, 5), acc if isinstance(acc, list) else [acc])})
        if record.get(f'{split}_time'):
            s[f'{split}/img_per_s'] = n / record[f'{split}_time']
    s['train/loss'] = record['train_loss']
    s[LAST] = record['test_loss']
    return s


def epochs_written(folder):
    """The epochs whose points the folder's event files hold whole."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    done = set()
    for path in glob.glob(os.path.join(folder, 'events.out.tfevents.*')):
        for event in EventFileLoader(path).Load():
            if any(v.tag == LAST for v in event.summary.value):
                done.add(event.step)
    return done


class Board:
    """Rank 0's event file. Steps are counted from the run's start: batch i (1-based) of epoch e is
    step (e-1) x steps_per_epoch + i, so a resumed run lands its points where the uninterrupted one did.
    The point at every `every`-th step is the mean train loss of the epoch's batches since the last one."""

    def __init__(self, folder, steps_per_epoch, images, every, start_epoch, records):
        self.folder, self.steps_per_epoch, self.images, self.every = folder, steps_per_epoch, images, every
        self.writer, self.broken = None, False
        written = epochs_written(folder)
        quiet_writer_thread()
        with self.writing():
            self.writer = writer_class()(folder, purge_step=start_epoch * steps_per_epoch + 1)
        for r in records:  # epochs a kill (or a session without tensorboard) left without points
            if r['epoch'] <= start_epoch and r['epoch'] not in written:
                self.epoch(r, lr_at(r))
        self.window, self.window_epoch = [], None

    @contextmanager
    def writing(self):
        """tensorboard writes from a thread of its own, and raises its error at the next call here."""
        try:
            yield
        except OSError as e:
            self.broken = True
            path = e.filename or (self.writer.file_writer.event_writer._file_name if self.writer else
                                  os.path.join(self.folder, 'events.out.tfevents.*'))
            raise WriteError(f'cannot write {path}: {e.strerror or e}') from None

    def steps(self, epoch, losses):
        """Train losses of batches (batch number within the epoch, loss), in order."""
        if epoch != self.window_epoch:
            self.window, self.window_epoch = [], epoch
        for batch, loss in losses:
            self.window.append(loss)
            step = (epoch - 1) * self.steps_per_epoch + batch
            if step % self.every == 0:
                with self.writing():
                    self.writer.add_scalar('step/train_loss', sum(self.window) / len(self.window), step)
                    self.writer.flush()  # watched live; a kill loses none of it
                self.window = []

    def epoch(self, record, lr):
        with self.writing():
            for tag, value in epoch_scalars(record, lr, self.images).items():
                self.writer.add_scalar(tag, value, record['epoch'])
            self.writer.flush()

    def flush(self):
        with self.writing():
            self.writer.flush()

    def close(self):
        if not self.broken:  # a broken writer fails its close too: its error is already out
            with self.writing():
                self.writer.close()


def quiet_writer_thread():
    """tensorboard's writer thread dies with the error its main-thread calls raise again (Board.writing):
    its own traceback would be a second report."""
    hook = threading.excepthook
    if getattr(hook, 'board', False):
        return
    def quiet(args):
        if type(args.thread).__name__ != '_AsyncWriterThread':
            hook(args)
    quiet.board = True
    threading.excepthook = quiet
