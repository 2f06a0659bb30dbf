"""Environments for test subprocesses with several forced CPU devices, keeping conftest's flags."""

import os


def xla_flags(devices: int) -> str:
    """This process's XLA flags (conftest's) plus `devices` forced CPU devices."""
    return f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
