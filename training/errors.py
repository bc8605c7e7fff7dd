"""How a script stops: bad input is one line on stderr and a non-zero exit, never a traceback; a run
stopped by a signal exits 128 + its number. SIGINT/SIGTERM ask a run to stop after the current step;
a second one exits at once. The tests' hook (SignalPlan) makes the process send itself a signal at a
chosen step, so that signals land at a step, not at an instant."""
import os
import signal
import sys
from contextlib import contextmanager


class UserError(Exception):
    """Bad input: reported as one line on stderr, never as a traceback."""


class Stopped(Exception):
    """A run stopped cleanly by a signal after the current step, its last whole epoch saved. `signum`
    is set where the signal is known (fit knows it; the loop only knows it was asked to stop)."""

    def __init__(self, signum=None):
        super().__init__(signum)
        self.signum = signum


def die(prog, message, code=2):
    """One line on stderr and exit. Under torchrun each rank says it, naming itself, in one write
    (so that two ranks' lines never interleave), and leaves without tearing down the process group."""
    world = int(os.environ.get('WORLD_SIZE', 1))
    rank = f'rank {os.environ.get("RANK", "0")}: ' if world > 1 else ''
    sys.stdout.flush()
    os.write(2, f'{prog}: error: {rank}{message}\n'.encode())
    if world > 1:
        os._exit(code)
    sys.exit(code)


def leave(code=0):
    """Exits with `code`. Under torchrun, once every rank is done: exit together, without running the
    gloo/nccl teardown one rank at a time, which can abort a rank whose peers have already gone."""
    torch = sys.modules.get('torch')  # a script that never loaded torch has no process group
    if torch and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def message(e):
    """A UserError's line. One raised in a DataLoader worker comes back rebuilt around the worker's
    whole traceback (torch's ExceptionWrapper.reraise): its last line, less the type, is the message."""
    text = str(e)
    return text.splitlines()[-1].split(': ', 1)[-1] if '\nOriginal Traceback' in text else text


def cli(main, prog):
    """Runs a script's main: bad input is one line on stderr and exit 1, never a traceback. A run
    stopped by a signal exits 128 + its number (130 for SIGINT, 143 for SIGTERM), so that a shell
    script or a batch scheduler stops too."""
    try:
        main()
    except UserError as e:
        die(prog, message(e), code=1)
    except Stopped as e:
        leave(128 + (e.signum or 15))
    except KeyboardInterrupt:  # before training starts; during it, fit handles the signal
        print(f'\n{prog}: interrupted', file=sys.stderr)
        sys.exit(130)
    leave()


@contextmanager
def as_user_error(*kinds):
    """The paper's math and the networks (utils.py, resnet.py) import nothing from here: they raise
    plain exceptions (ValueError) for inputs that cannot fit, which become one line here."""
    try:
        yield
    except kinds as e:
        raise UserError(str(e)) from None


class Signals:
    """SIGINT/SIGTERM ask the run to stop after the current step (`name` is then set); a second one
    exits at once with 128 + its number."""

    def __init__(self, prog):
        self.prog, self.name = prog, None
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, self.handler)

    def handler(self, signum, frame):
        if self.name is not None:
            print(f'{self.prog}: second signal, exiting now', file=sys.stderr)
            os._exit(128 + signum)
        self.name = signal.Signals(signum).name


class SignalPlan:
    """For tests: AT_TEST_SIGNALS='WHEN:SIG,...' makes the process send itself SIG (INT, TERM, KILL) at
    WHEN: after its Nth training step ('12'), or after epoch E's checkpoint is written and before its
    log line ('ckpt2'). Without the variable it does nothing."""

    def __init__(self, spec=None):
        spec = os.environ.get('AT_TEST_SIGNALS', '') if spec is None else spec
        self.steps, self.plan = 0, {}
        for item in filter(None, spec.split(',')):
            when, sig = item.split(':')
            self.plan.setdefault(when, []).append(getattr(signal, 'SIG' + sig))

    def fire(self, when):
        for sig in self.plan.pop(str(when), []):
            os.kill(os.getpid(), sig)

    def step_done(self):
        self.steps += 1
        self.fire(self.steps)
