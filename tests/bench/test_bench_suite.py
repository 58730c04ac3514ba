"""Smoke test of ``splitunet bench --quick`` (real processes; figures checked for shape and sanity, never speed),
and unit tests of the benchmark's helpers."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from typer.testing import CliRunner

from splitunet.bench.machine import peak_rss_bytes
from splitunet.bench.split_step import StepCase, after_warmup, site_names
from splitunet.cli import app


def test_site_names_repeat_modalities_beyond_four():
    names = site_names(8)
    assert [n for n, _ in names[:4]] == ["t1", "t1ce", "t2", "flair"]
    assert names[4] == ("t1-2", "t1") and names[7] == ("flair-2", "flair")
    assert len({n for n, _ in names}) == 8
    with pytest.raises(ValueError, match="sites"):
        site_names(0)


def test_analytic_bytes_are_fp16_forward_plus_fp32_backward():
    case = StepCase(dims=2, cut_level=0, roi=(16, 16), sites=2, batch=3, features=(4, 8, 16))
    # cut 0: one tensor per site of B x features[0] x 16 x 16
    per_site = 3 * 4 * 16 * 16
    assert case.analytic_bytes() == 2 * per_site * (2 + 4)
    with pytest.raises(ValueError, match="sizes"):
        StepCase(dims=3, cut_level=0, roi=(16, 16), sites=2, batch=1, features=(4, 8, 16))


def test_after_warmup_and_peak_rss():
    assert after_warmup([5.0, 1.0, 2.0], 1) == [1.0, 2.0]
    assert after_warmup([5.0], 3) == [5.0]
    assert peak_rss_bytes(os.getpid()) > 10 * 2**20
    child = subprocess.Popen(["true"])
    child.wait()
    assert peak_rss_bytes(child.pid) is None  # reaped: no /proc entry


def test_bench_quick_writes_every_figure(tmp_path):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, ["bench", "--quick", "--dims", "2", "--json", str(out)])
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    assert doc["quick"] is True
    assert doc["p1_wire_efficiency"] > 0
    p2 = doc["p2_split_overhead"]
    assert set(p2) == {"cut0_2d", "cut2_2d", "cut0_3d", "cut2_3d"}
    assert p2["cut0_2d"] > 0 and p2["cut2_2d"] > 0
    assert p2["cut0_3d"] is None and p2["cut2_3d"] is None  # --dims 2: not measured, never filled in
    delayed = doc["p2_split_overhead_delayed"]
    assert set(delayed) == set(p2) and delayed["cut0_2d"] > 0 and delayed["cut2_3d"] is None
    wire = doc["wire"]
    assert wire["transfer_s"] > 0 and wire["decode_s"] > 0 and wire["cast_s"] > 0
    assert 0 < wire["p1_cast_bound"] < 1 and wire["http_s"] > wire["encode_s"]
    # bundle frames add a header to the tensor payload: never fewer bytes than the planner's analytic figure
    assert doc["p3_bytes_ratio"] >= 1.0
    assert [(r["dims"], r["cut_level"]) for r in doc["runs"]] == [(2, 0), (2, 2)]
    for run in doc["runs"]:
        assert set(run["phases_s"]) == {"plan", "forward", "aggregator", "backward"}
        assert run["http_delayed_step_s"] > 0 and len(run["http_delayed_steps_s"]) >= 1
        assert run["wire_bytes_per_step"] >= run["analytic_bytes_per_step"]
    assert [r["sites"] for r in doc["scaling"]["sites"]] == [2, 4]
    assert len(doc["scaling"]["roi"]) == 2
    assert sorted(doc["peak_rss_bytes"]) == sorted(
        ["aggregator", "site-t1", "site-t1ce", "site-t2", "site-flair"])
    assert all(v and v > 0 for v in doc["peak_rss_bytes"].values())
    assert doc["phantom"]["seconds_per_case"] > 0 and doc["whitebox_inversion"]["seconds"] > 0
    machine = doc["machine"]
    assert machine["cores"] >= 1 and machine["versions"]["torch"]
    assert "P1 wire efficiency" in result.output and "delayed schedule cut0_2d" in result.output


def test_bench_rejects_bad_options():
    result = CliRunner().invoke(app, ["bench", "--dims", "4"])
    assert result.exit_code != 0 and "--dims" in result.output
    result = CliRunner().invoke(app, ["bench", "--device", "tpu"])
    assert result.exit_code != 0 and "cpu or cuda" in result.output
