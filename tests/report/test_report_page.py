"""The demo's report page from a generated report dict: figures, the Pareto front, the paper's checks, and the
page in headless Chromium (no console error, every image decoded with a non-zero natural size, a screenshot)."""

from __future__ import annotations

import base64
import io

import numpy as np
from report_browser import check_page

from splitunet.report.figures import pareto_front
from splitunet.report.page import write_report
from splitunet.report.summary import paper_checks

REG = ("TC", "WT", "ET")


def _dice(wt: float) -> dict:
    d = {"TC": wt - 0.05, "WT": wt, "ET": wt - 0.1}
    return d | {"mean": sum(d.values()) / 3}


def _grid_png(path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 2))
    ax.imshow(np.random.default_rng(0).normal(size=(16, 16)), cmap="gray")
    fig.savefig(path, format="png")
    plt.close(fig)
    return str(path)


def _row(name: str, wt: float, ssim: float, rdlv: float, cut: int = 0, grids=None, secure_sum: bool = False) -> dict:
    attacks = ("secure_sum_joint",) if secure_sum else ("whitebox", "unsplit")
    leak = [{"site": s, "modality": s, "attack": a, "ssim": ssim - 0.1 * i, "psnr": 20.0, "rdlv": rdlv - 0.1 * i,
             "prior_ssim": 0.5, "delta_ssim": ssim - 0.1 * i - 0.5, "delta_ssim_low": ssim - 0.1 * i - 0.55,
             "delta_ssim_high": ssim - 0.1 * i - 0.45, "n_samples": 8, "reid_top1": 0.5, "step": 10}
            for s in ("t1", "flair") for i, a in enumerate(attacks)]
    best = max(leak, key=lambda f: f["delta_ssim_low"])
    return {"name": name, "defenses": {"sites": [], "gradients": []}, "cut_level": cut, "skips": "all",
            "fusion": "sum" if secure_sum else "concat", "secure_sum": secure_sum, "dice": _dice(wt),
            "hd95_mm": {r: 5.0 for r in REG}, "leakage": leak,
            "label_leakage": {"dice": 0.6, "auc": 0.95, "method": "norm/otsu", "site": "t1", "baseline_blob_dice": 0.2},
            "best_attack": best, "bytes_per_step": 2**20 * (3 - cut),
            "epsilon": None, "train_s": 12.0, "losses": list(np.linspace(1, 0.2, 30)), "grids": grids or {},
            "error": None}


def _report(tmp_path) -> dict:
    grid = _grid_png(tmp_path / "grid.png")
    study = [_row("none", 0.90, 0.92, 0.6, grids={"t1": grid}), _row("noise-2.0", 0.70, 0.45, -0.2),
             _row("cut2-noskips", 0.85, 0.6, 0.1, cut=2), _row("worse", 0.60, 0.7, 0.3),
             _row("secure-sum", 0.88, 0.8, 0.6, secure_sum=True)]
    report = {
        "dice": {"split": _dice(0.90), "centralized": _dice(0.91),
                 "single_modality": {m: _dice(0.6 + 0.05 * i) for i, m in enumerate(("t1", "t1ce", "t2", "flair"))}},
        "hd95_mm": {"split": {r: 4.0 for r in REG}, "centralized": {r: 3.0 for r in REG},
                    "single_modality": {m: {r: 9.0 for r in REG} for m in ("t1", "t1ce", "t2", "flair")}},
        "study": study, "best": {"name": "noise-2.0", "why": "test"},
        "curves": {"Split-U-Net": list(np.linspace(1, 0.1, 40)), "centralized": list(np.linspace(1, 0.1, 40))},
        "timing": {"total_s": 100.0, "split_step_s": 0.3}, "settings": {"job": {"steps": 40}},
        "machine": {"cores": 2}, "data": "phantom", "mode": "quick",
    }
    report["checks"] = paper_checks(report)
    return report


def test_pareto_front_keeps_only_undominated_points():
    points = [(0.9, 0.9), (0.45, 0.7), (0.6, 0.85), (0.7, 0.6), (0.45, 0.65)]
    assert pareto_front(points) == [1, 2, 0]


def test_paper_checks_state_what_holds_and_what_does_not(tmp_path):
    checks = {c["claim"]: c for c in _report(tmp_path)["checks"]}
    assert checks["Split-U-Net within 0.03 WT Dice of centralized"]["holds"] is True
    assert checks["every single modality below Split-U-Net on mean Dice"]["holds"] is True
    undefended = checks["undefended leakage high (white-box brain SSIM >= 0.8 at cut 0)"]
    assert undefended["holds"] is True and "0.920" in undefended["measured"]
    labels = checks["undefended labels leak to a curious site (best label attack AUC >= 0.9 at cut 0)"]
    assert labels["holds"] is True and "AUC 0.950" in labels["measured"] and "norm/otsu" in labels["measured"]
    hidden = [c for claim, c in checks.items() if claim.startswith("secure-sum fusion hides the images")]
    assert len(hidden) == 1 and hidden[0]["holds"] is False and "ΔSSIM +0.300" in hidden[0]["measured"]
    assert any(claim.startswith("at least one configuration whose strongest image attack does not beat the prior")
               for claim in checks)
    report = _report(tmp_path)
    report["dice"]["centralized"] = _dice(0.95)
    report["dice"]["single_modality"]["flair"] = _dice(0.93)
    checks = {c["claim"]: c for c in paper_checks(report)}
    assert checks["Split-U-Net within 0.03 WT Dice of centralized"]["holds"] is False
    assert checks["every single modality below Split-U-Net on mean Dice"]["holds"] is False
    upper = "centralized U-Net (the upper bound) at least as good as Split-U-Net on WT Dice"
    assert checks[upper]["holds"] is True
    report["dice"]["centralized"] = _dice(0.70)  # as measured by the quick demo: the narrower model trails
    checks = {c["claim"]: c for c in paper_checks(report)}
    assert checks[upper]["holds"] is False and "4x the feature channels" in checks[upper]["measured"]


def test_report_page_renders_in_headless_chromium(tmp_path):
    report = _report(tmp_path)
    page = write_report(report, tmp_path / "run")
    for name in ("dice", "privacy_utility", "bytes_per_step", "training_curves"):
        assert (tmp_path / "run" / "figures" / f"{name}.png").stat().st_size > 1000
    text = page.read_text()
    assert "<script" not in text and "http://" not in text and "https://" not in text  # self-contained
    assert "covers every DP release" in text  # a reader learns that ε is each site's cumulative ledger
    check = check_page(page, tmp_path / "run" / "report-screenshot.png")
    assert check.console_errors == []
    # 4 figures and the one reconstruction grid, each decoded with a real size
    assert len(check.images) == 5 and check.broken_images == [], check.images
    assert (tmp_path / "run" / "report-screenshot.png").stat().st_size > 10_000


def test_browser_check_sees_a_broken_image_and_a_console_error(tmp_path):
    good = base64.b64encode(_png_bytes()).decode()
    page = tmp_path / "bad.html"
    page.write_text("<!doctype html><html><body><img alt='ok' src='data:image/png;base64," + good + "'>"
                    "<img alt='bad' src='data:image/png;base64,AAAA'><script>console.error('boom')</script>"
                    "</body></html>")
    check = check_page(page, tmp_path / "bad.png")
    assert [i["alt"] for i in check.broken_images] == ["bad"]
    assert any("boom" in e for e in check.console_errors), check.console_errors


def _png_bytes() -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1, 1))
    ax.plot([0, 1])
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
