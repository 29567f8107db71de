"""Run under `mpiexec -n 2`: a training run whose ranks' clocks disagree, with a SIGTERM at the same step.

Rank 0 receives a SIGTERM when it reads its clock at step TARGET, and from the next step on its clock runs an hour
ahead (so a time-based save falls due by its clock alone, while the signal is being acted on); rank 1's clock is
the real one and it gets no signal. A rank that acted on its own clock would save and stop a step before the
other, which would wait in its next all-reduce. Both ranks must stop at the same step. Each rank prints one line the test reads:

    rank R: exit C at step S after T s

    mpiexec -n 2 python tests/mpi_clock_sigterm.py CONFIG TARGET [--set KEY=VALUE ...]
"""

from __future__ import annotations

import os
import signal
import sys
import time

from training.config import load_training_config
from training.distributed import mpi_world
from training.train import Trainer, run_training

RANK = mpi_world()[0]
trainers: list[Trainer] = []
signalled_at: list[float] = []


def _python_call() -> None:
    pass


def main(config_path: str, target: int, sets: list[str]) -> int:
    original_init = Trainer.__init__

    def remember(self, *args, **kwargs) -> None:  # noqa: ANN001, ANN002, ANN003
        original_init(self, *args, **kwargs)
        trainers.append(self)

    def disagreeing_clock() -> float:
        now = time.monotonic()
        trainer = trainers[0]
        if RANK != 0 or trainer.step < target:
            return now
        if not signalled_at:
            signalled_at.append(now)
            os.kill(os.getpid(), signal.SIGTERM)
            _python_call()  # Python runs a pending signal's handler on entering a Python function
            assert trainer.stop.signum == signal.SIGTERM, "the SIGTERM handler did not run"
        return now + 3600.0 if trainer.step > target else now

    Trainer.__init__ = remember
    Trainer.clock = staticmethod(disagreeing_clock)
    config = load_training_config(config_path, sets)
    code = run_training(config, progress=False, log=lambda message: print(message, file=sys.stderr, flush=True))
    took = time.monotonic() - signalled_at[0] if signalled_at else float("nan")
    step = trainers[0].step if trainers else -1
    print(f"rank {RANK}: exit {code} at step {step} after {took:.2f} s", flush=True)
    return code


if __name__ == "__main__":
    arguments = sys.argv[1:]
    sets = [arguments[i + 1] for i, item in enumerate(arguments) if item == "--set"]
    sys.exit(main(arguments[0], int(arguments[1]), sets))
