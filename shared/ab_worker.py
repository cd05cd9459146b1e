"""One side of an A/B benchmark (shared.ab): training steps of one implementation, each timed
when asked, run from the code of one tree.

shared.ab loads this file by its path in a process started in the tree to measure, so that
every module it imports (the network, the implementation, the data loader) comes from that
tree, which may be an older commit without this file (but with shared.profile.timing_setup:
cb70b92, 2026-11-27, and after). Only the standard library is imported at the top. On stdout,
one line each: "ready" once compiled and warm; then, for every line read from stdin until
stdin closes, the seconds of one training step taken right after an untimed one.
"""

from __future__ import annotations

import os
import sys
import time


def serve(impl: str, arch: str, batch_size: int, warmup_seconds: float) -> None:
    """Step the network `arch` in `impl` at `batch_size` on request, as benchmark.py times it
    (train.py's defaults, real batches, no flips)."""
    # stdout carries the answers alone: whatever the tree's code prints goes to stderr.
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    from shared.profile import timing_setup  # shared.profile of the tree measured

    backend, state, data, stream = timing_setup(impl, arch, batch_size, flip=False)

    def step() -> float:
        nonlocal state
        start = time.perf_counter()
        state, _, _ = backend.train_step(state, data, next(stream), 0.01)
        return time.perf_counter() - start

    step()  # JAX compiles here
    warm_until = time.perf_counter() + warmup_seconds
    while time.perf_counter() < warm_until:
        step()
    print("ready", file=answers)
    for _ in sys.stdin:
        # The first step after the other side's turn finds this side's threads parked: on an
        # Intel Xeon (family 6 model 167) JAX's `strong` step at 128 took 62.8 ms so, against
        # 42.5 after an untimed step and 42 in the benchmark's back-to-back steps.
        step()
        print(f"{step():.9f}", file=answers)


if __name__ == "__main__":
    serve(sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]))
