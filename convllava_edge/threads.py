"""How many CPU threads a backend may use: what this process may run on, bounded."""

from __future__ import annotations

import os

from .errors import ConfigError

MAX_THREADS_PER_CORE = 4  # past this, threads only contend: 1000 threads took 75 s for a 1 s answer


def default_threads() -> int:
    """The CPUs this process may run on (honours taskset/cgroup limits, unlike os.cpu_count())."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def check_threads(threads: int | None) -> None:
    """A thread count the machine can use: 1 to its cores x MAX_THREADS_PER_CORE (None: all cores)."""
    if threads is None:
        return
    limit = default_threads() * MAX_THREADS_PER_CORE
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= limit:
        raise ConfigError(f"threads must be in 1..{limit} ({default_threads()} cores x {MAX_THREADS_PER_CORE}), got {threads}")
