"""Unit tests of the profile's helpers (``python -m splitunet.bench.profile``; the run itself is a benchmark,
never part of the suite)."""

from __future__ import annotations

from pathlib import Path

import pytest

from splitunet.bench.profile import COMPONENTS, RATE, bench_case, top_functions


def test_top_functions_count_inclusive_once_per_stack_and_self_at_the_leaf(tmp_path: Path) -> None:
    run = "run (/x/lib/python3.11/site-packages/uvicorn/main.py:3)"
    step = "step (/w/shared/splitunet/protocol.py:9)"
    conv = "conv (/x/lib/python3.11/site-packages/torch/nn/conv.py:1)"
    raw = tmp_path / "svc.pyspy.txt"
    raw.write_text(f"{run};{step};{conv} 300\n{run};{step} 100\n{run};{run} 100\n")
    top = top_functions(raw, steps=2)
    assert top["active_s_per_step"] == pytest.approx(500 / RATE / 2)
    inclusive, own = dict(top["inclusive"]), dict(top["self"])
    assert inclusive["run (uvicorn/main.py)"] == pytest.approx(500 / RATE / 2)  # counted once per stack
    assert inclusive["step (splitunet/protocol.py)"] == pytest.approx(400 / RATE / 2)
    assert own["conv (torch/nn/conv.py)"] == pytest.approx(300 / RATE / 2)
    assert own["run (uvicorn/main.py)"] == pytest.approx(100 / RATE / 2)


def test_the_profiled_case_is_the_bench_p2_row_and_every_component_has_a_phase() -> None:
    case = bench_case()
    assert (case.dims, case.cut_level, case.sites, case.roi, case.batch) == (2, 0, 4, (128, 128), 8)
    assert set(COMPONENTS.values()) == {"plan", "forward", "aggregator", "backward"}
