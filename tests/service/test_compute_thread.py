"""ComputeThread: one named thread runs every call, results and exceptions come back, nested calls run inline."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from splitunet.service.compute import ComputeThread


def test_calls_from_many_threads_run_on_one_thread_and_return_or_raise() -> None:
    compute = ComputeThread("demo-torch")
    try:
        with ThreadPoolExecutor(4) as callers:
            names = set(callers.map(lambda _: compute.call(lambda: threading.current_thread().name), range(16)))
        assert len(names) == 1 and names.pop().startswith("demo-torch")
        assert compute.call(pow, 2, exp=10) == 1024
        with pytest.raises(ZeroDivisionError):
            compute.call(lambda: 1 / 0)
        # a call made on the compute thread runs inline instead of waiting for itself
        assert compute.call(lambda: compute.call(lambda: threading.current_thread().name)).startswith("demo-torch")
    finally:
        compute.close()
    with pytest.raises(RuntimeError):
        compute.call(int)
    with pytest.raises(ValueError, match="needs a name"):
        ComputeThread("")
