"""Stopping a run cleanly: SIGINT/SIGTERM ask it to stop after the current step; a second one exits at once.

The tests' hook lives apart from the production handler: SignalPlan makes the process send itself a
signal at a chosen step, so that signals land at a step, not at an instant."""
import os
import signal
import sys


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
