"""``ComputeThread``: the one thread that runs a service's torch work.

FastAPI runs ``def`` routes in a pool of worker threads, and any of them may serve the next request. Torch's CPU
kernels use OpenMP, and libgomp gives every thread that starts a parallel region a team of its own; once a process
holds more OpenMP threads than cores, libgomp stops spinning between parallel regions, and every region then waits
for its workers to wake up. Measured on 2 cores with the bench's 2D cut-0 step in process (2 torch threads):
0.26 s per step in the process's only OpenMP team, 0.33 s once another thread had run torch work. A service whose
torch work all goes through one :class:`ComputeThread` keeps one team, whichever worker thread took the request.

The calls are serialised, which a service with one model per run on a few cores wants anyway. A call made from the
compute thread itself runs inline, so a method may call another one that also goes through it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")


class ComputeThread:
    """Runs callables on one dedicated thread, named ``name``, and waits for their results (or exceptions)."""

    def __init__(self, name: str) -> None:
        if not name:
            raise ValueError("a compute thread needs a name (it shows in thread dumps and profiles)")
        self.name = name
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._ident: int | None = None
        self._pool.submit(self._remember).result()

    def _remember(self) -> None:
        self._ident = threading.get_ident()

    def call(self, function: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """``function(*args, **kwargs)`` on the compute thread; its exception is raised here."""
        if threading.get_ident() == self._ident:
            return function(*args, **kwargs)
        return self._pool.submit(function, *args, **kwargs).result()

    def close(self) -> None:
        """Finish the calls already queued and stop the thread."""
        self._pool.shutdown(wait=True)
