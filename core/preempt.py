"""Pre-emption: SIGTERM (SLURM, Kubernetes, `kill`) or SIGINT (Ctrl-C) ends a training run cleanly.

The first signal asks the loop to stop: it finishes the current step, writes a checkpoint and exits with status
128 + the signal number (143 for SIGTERM, 130 for SIGINT), saying how to continue. A second signal, later than
`repeat_s` after the first, exits at once (status 128 + its number); a checkpoint being written is then
abandoned and its temporary folder removed, the earlier checkpoints are untouched.

A repeat within `repeat_s` counts as the same request: `accelerate launch` (torchrun) forwards the signal it gets
to every process, and SLURM signals every process of a job, so each process commonly sees one signal twice.

With several processes, all must stop after the same step (a checkpoint is a collective save): every step the
loop asks `agreed()`, which combines the processes' flags (a one-number gather).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(SystemExit):
    """Raised to end the run after a signal; its code is 128 + the signal number."""


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _say(message: str) -> None:
    """Write to stderr from a signal handler: straight to the file descriptor, since the handler may interrupt a
    write to sys.stderr (the progress bar's), and a buffered stream refuses to be re-entered."""
    try:
        os.write(2, message.encode())
    except OSError:
        pass


class Preemption:
    """A context manager that turns SIGTERM/SIGINT into a request to stop after the current step.

        with Preemption(accelerator) as preemption:
            for step in ...:
                ...
                stop = preemption.agreed()      # every process, every step
                if stop: save a checkpoint
                if stop: preemption.exit(step, checkpoint)
    """

    def __init__(self, accelerator=None, signals=SIGNALS, repeat_s: float = 2.0):
        self.accelerator = accelerator
        self.signals = tuple(signals)
        self.repeat_s = repeat_s
        self.requested: int | None = None  # the first signal this process got
        self._first_at = 0.0
        self._previous: dict = {}
        self._pid = os.getpid()

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self._pid:  # a forked DataLoader worker: the main process decides
            return
        now = time.monotonic()
        if self.requested is None:
            self.requested, self._first_at = signum, now
            _say(f"\n{signal_name(signum)} received: finishing the current step, then writing a checkpoint and "
                 f"stopping (send it again to stop at once, without a checkpoint)\n")
            return
        if now - self._first_at < self.repeat_s:  # the same request, delivered twice (launcher, scheduler)
            return
        _say(f"\n{signal_name(signum)} received again: stopping at once\n")
        raise Preempted(128 + signum)

    def __enter__(self) -> Preemption:
        if threading.current_thread() is threading.main_thread():
            for signum in self.signals:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def agreed(self) -> bool:
        """Whether any process was asked to stop: the same answer on every process (a collective call)."""
        acc = self.accelerator
        if acc is None or acc.num_processes == 1:
            return self.requested is not None
        import torch

        flags = acc.gather(torch.tensor([self.requested or 0], device=acc.device))
        signum = int(flags.max())
        if signum and self.requested is None:  # another process got it: stop with the same status, and take the
            self.requested, self._first_at = signum, time.monotonic()  # launcher's copy of it as the same request
        return bool(signum)

    @property
    def exit_code(self) -> int:
        return 128 + (self.requested or signal.SIGTERM)

    def exit(self, step: int, checkpoint=None) -> None:
        """End the run after the checkpoint of `step` was written: one message (main process), then Preempted."""
        acc = self.accelerator
        if acc is not None:
            acc.wait_for_everyone()  # the main process may still be writing the run folder's weights
            acc.end_training()  # flush the trackers (and end the process group)
        if acc is None or acc.is_main_process:
            where = f"; checkpoint {checkpoint} written" if checkpoint is not None else ""
            print(f"stopped by {signal_name(self.requested or signal.SIGTERM)} after step {step}{where}: continue "
                  f"with --resume (exit status {self.exit_code})", file=sys.stderr, flush=True)
        raise Preempted(self.exit_code)
