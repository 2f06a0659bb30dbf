"""Multi-host start-up: `jax.distributed.initialize` before any device is touched.

Every process runs the same program. On a Cloud TPU pod slice `initialize()` needs no arguments; on a
GPU cluster the coordinator address, process count and process id come from the environment.
"""

from __future__ import annotations

import os

import jax


def initialize() -> None:
    """Join the multi-process job when the environment describes one; a no-op for a single process."""
    coordinator = os.environ.get("SIMCLR_COORDINATOR_ADDRESS")
    if coordinator:
        jax.distributed.initialize(
            coordinator_address=coordinator,
            num_processes=int(os.environ["SIMCLR_NUM_PROCESSES"]),
            process_id=int(os.environ["SIMCLR_PROCESS_ID"]),
        )
