"""`splitunet plan --json` figures equal the sizes of the tensors an actual forward produces."""

from __future__ import annotations

import json

import torch
from typer.testing import CliRunner

from splitunet.cli import app
from splitunet.config import SplitUNetConfig, parse_sites
from splitunet.networks import ServerDecoder, SiteEncoder


def test_plan_json_matches_actual_forward():
    runner = CliRunner()
    args = ["plan", "--json", "--dims", "2", "--roi", "32,64", "-b", "3", "--features", "4,8,16",
            "--sites", "a=t1,t1ce b=t2 c=flair"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    plans = doc["plans"]
    # every cut level, with all/none (+ all-but-full-resolution at cut >= 2)
    assert [(p["cut_level"], p["skips"]) for p in plans] == [
        (0, "all"), (1, "all"), (1, "none"), (2, "all"), (2, "none"), (2, "1")
    ]
    sites = parse_sites("a=t1,t1ce b=t2 c=flair")
    for p in plans:
        skips = p["skips"] if p["skips"] in ("all", "none") else tuple(int(v) for v in p["skips"].split(","))
        config = SplitUNetConfig(
            spatial_dims=2, features=(4, 8, 16), sites=sites, cut_level=p["cut_level"], skips=skips
        )
        for site in sites:
            encoder = SiteEncoder(config, site)
            out = encoder(torch.zeros(3, site.in_channels, 32, 64))
            assert {k: list(v.shape) for k, v in out.items()} == p["sent_tensors"]
            fp32 = sum(v.numel() * v.element_size() for v in out.values())
            fp16 = sum(v.half().numel() * v.half().element_size() for v in out.values())
            assert p["forward_bytes_per_site"] == {"fp32": fp32, "fp16": fp16}
            assert p["backward_bytes_per_site"] == {"fp32": fp32, "fp16": fp16}
            assert p["params_per_site"][site.name] == sum(q.numel() for q in encoder.parameters())
        assert p["total_bytes_per_step"]["fp16"] == 2 * 3 * p["forward_bytes_per_site"]["fp16"]
        assert p["params_server"] == sum(q.numel() for q in ServerDecoder(config).parameters())


def test_plan_table_and_bad_roi():
    runner = CliRunner()
    ok = runner.invoke(app, ["plan", "--dims", "2", "--roi", "64,64", "--features", "8,16,32"])
    assert ok.exit_code == 0 and "cut plan" in ok.output
    bad = runner.invoke(app, ["plan", "--dims", "2", "--roi", "60,64"])
    assert bad.exit_code != 0 and "multiples of 16" in bad.output


def test_cli_help_lists_subcommands():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0 and "plan" in result.output
