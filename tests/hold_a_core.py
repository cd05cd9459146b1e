"""Claim one core (shared.ray_engine.claimed_cores), print it and the process's affinity, and hold
it until killed: a stand-in for a run, for tests/test_grid.py."""

import os
import time

from shared.ray_engine import claimed_cores

with claimed_cores(1) as cores:
    print(cores[0], sorted(os.sched_getaffinity(0)), flush=True)
    time.sleep(600)
