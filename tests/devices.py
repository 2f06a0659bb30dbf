"""Environments for test subprocesses with several forced CPU devices, keeping the XLA flags
this process was given."""

import os


def xla_flags(devices: int) -> str:
    """This process's XLA flags plus `devices` forced CPU devices."""
    return f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
