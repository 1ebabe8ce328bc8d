"""CPU threads of a trial: the cores this process is given, split between the workers of one machine.

PyTorch sizes its intra-op pool from the machine's cores, not from what the process may use: in a
container limited by a CPU quota, or with several workers on one machine, that oversubscribes the
cores (threads wait on each other instead of computing). A trial therefore runs with
:func:`resolve_threads` threads: an explicit number, else ``$POFT_THREADS``, else the cores available
to this process (CPU affinity, capped by a cgroup quota) divided by the workers sharing them.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from poft_autotune.errors import InvalidConfigError

THREADS_ENV = "POFT_THREADS"


def _cgroup_quota() -> float | None:
    """CPUs allowed by a cgroup quota (v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us``), None if unlimited."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period_us = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return None if quota_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None


def available_cores() -> int:
    """Cores this process may run on: its CPU affinity set, capped by a cgroup CPU quota (at least 1)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    quota = _cgroup_quota()
    if quota is not None:
        cores = min(cores, math.ceil(quota))
    return max(1, cores)


def _check(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise InvalidConfigError(f"`{name}` must be a positive integer, got {value!r}.")
    return value


def resolve_threads(threads: int | None = None, *, workers: int = 1) -> int:
    """Threads for one trial: ``threads`` if given, else ``$POFT_THREADS``, else available cores // workers.

    ``workers``: trial processes sharing this machine's cores (each gets an equal share, at least 1).
    Example: ``resolve_threads(workers=2)`` on 16 available cores gives 8.
    """
    if threads is not None:
        return _check("threads", threads)
    env = os.environ.get(THREADS_ENV)
    if env:
        try:
            value = int(env)
        except ValueError:
            value = 0
        if value <= 0:
            raise InvalidConfigError(f"${THREADS_ENV} must be a positive integer, got {env!r}.")
        return value
    return max(1, available_cores() // _check("workers", workers))


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[int]:
    """Run the body with ``torch.set_num_threads(threads)``; the previous setting is restored after.

    Example::

        with torch_threads(resolve_threads()):
            run_trial(plan, context)
    """
    previous = torch.get_num_threads()
    if threads != previous:
        torch.set_num_threads(_check("threads", threads))
    try:
        yield threads
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)
