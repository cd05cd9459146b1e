"""One side of an A/B benchmark (shared.ab): training steps of one implementation, each timed
when asked, run from the code of one tree.

shared.ab loads this file by its path in a process started in the tree to measure, so that
every module it imports (the network, the implementation, the data loader) comes from that
tree, which may be an older commit without this file (but with shared.profile.timing_setup:
cb70b92, 2026-11-27, and after). Only the standard library is imported at the top. On stdout,
one line each: "ready" once compiled and warm; then, for every line read from stdin until
stdin closes, the mean seconds of TIMED_STEPS training steps taken back to back after
untimed ones for WARM_SECONDS (one at least).
"""

from __future__ import annotations

import os
import sys
import time

# A step soon after the other side's turn ran slower than one among others, JAX's the most: on
# an Intel Xeon (family 6 model 167), JAX's `lab` step at 128 took 12.5 ms so, 9.1 after one
# untimed step, 5.4 after 0.1 s of them, against 5.1 in the benchmark's back-to-back steps
# (docs/PERFORMANCE.md, "Method").
WARM_SECONDS = 0.1
TIMED_STEPS = 4


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
        warm_until = time.perf_counter() + WARM_SECONDS
        step()
        while time.perf_counter() < warm_until:
            step()
        print(f"{sum(step() for _ in range(TIMED_STEPS)) / TIMED_STEPS:.9f}", file=answers)


if __name__ == "__main__":
    serve(sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]))
