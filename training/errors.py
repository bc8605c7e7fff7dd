"""How a script stops: bad input is one line on stderr and a non-zero exit, never a traceback; a run
stopped by a signal exits 128 + its number."""
import os
import sys


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


def cli(main, prog):
    """Runs a script's main: bad input is one line on stderr and exit 1, never a traceback. A run
    stopped by a signal exits 128 + its number (130 for SIGINT, 143 for SIGTERM), so that a shell
    script or a batch scheduler stops too."""
    try:
        main()
    except UserError as e:
        die(prog, e, code=1)
    except Stopped as e:
        leave(128 + (e.signum or 15))
    except KeyboardInterrupt:  # before training starts; during it, fit handles the signal
        print(f'\n{prog}: interrupted', file=sys.stderr)
        sys.exit(130)
    leave()
