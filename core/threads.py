"""CPU threads for the model runtimes: how many cores there are, and OpenMP threads that sleep while idle.

llama.cpp's CPU build (in each local model's server process) and torch (the local
embedding model, in this process) both run on OpenMP (libgomp). By default libgomp's idle
threads spin for a while before they sleep; on shared cores a spinning thread takes the
core that another process's busy thread needs, and both stall. Measured with the xllamacpp
server on 2 cores beside a busy process: single answers sometimes took 26-150 s instead of
about 1 s; with `OMP_WAIT_POLICY=PASSIVE` and `GOMP_SPINCOUNT=0` it held a steady 35-37
tokens/s. libgomp reads these once, when it loads, so they must be in the environment
before then.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

QUIET_OPENMP: dict[str, str] = {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "0"}


def quiet_openmp(environ: MutableMapping[str, str]) -> None:
    """Put the sleep-while-idle OpenMP policy into `environ` where its variables are unset.

    An operator who set `OMP_WAIT_POLICY` or `GOMP_SPINCOUNT` keeps their value.
    """
    for name, value in QUIET_OPENMP.items():
        environ.setdefault(name, value)


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, where the platform has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def openmp_threads(environ: MutableMapping[str, str]) -> int | None:
    """The thread count an operator set in `OMP_NUM_THREADS` (a positive whole number), else None."""
    value = environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    return int(value) if value.isdigit() and int(value) > 0 else None
