"""The demo report's figures (matplotlib, Agg): each function draws from ``report.json``'s dict and writes a PNG.

- :func:`dice_figure`: Dice per region, centralized vs Split-U-Net vs each single modality;
- :func:`privacy_utility_figure`: WT Dice against best-attack brain SSIM, one point per study configuration,
  the Pareto front (higher Dice, lower SSIM) marked;
- :func:`bytes_figure`: bytes per training step (both directions) per configuration, coloured by cut level;
- :func:`curves_figure`: training loss per step of the split model, the baselines and the study's runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

REGIONS = ("TC", "WT", "ET", "mean")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=90, bbox_inches="tight")
    _plt().close(fig)
    return path


def dice_figure(report: dict[str, Any], path: Path) -> Path:
    plt = _plt()
    dice = report["dice"]
    series = [("centralized", dice.get("centralized")), ("Split-U-Net", dice.get("split"))]
    series += [(m, d) for m, d in (dice.get("single_modality") or {}).items()]
    series = [(n, d) for n, d in series if d]
    fig, ax = plt.subplots(figsize=(7.5, 3.4))
    width = 0.8 / max(len(series), 1)
    x = np.arange(len(REGIONS))
    for i, (name, d) in enumerate(series):
        ax.bar(x + i * width - 0.4 + width / 2, [d.get(r) or 0.0 for r in REGIONS], width, label=name)
    ax.set_xticks(x, REGIONS)
    ax.set_ylabel("Dice (held-out cases)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, ncol=3)
    return _save(fig, path)


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points not dominated by another (``(leak, utility)``: lower leak and higher utility are
    better), ordered by leak."""
    front = []
    for i, (leak, util) in enumerate(points):
        dominated = any((lk <= leak and ut >= util) and (lk < leak or ut > util) for j, (lk, ut) in enumerate(points)
                        if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def study_points(report: dict[str, Any]) -> list[tuple[str, float, float]]:
    """``(name, best-attack SSIM, WT Dice)`` of every audited configuration with a Dice."""
    out = []
    for row in report.get("study") or []:
        ssims = [f["ssim"] for f in row.get("leakage") or [] if f.get("ssim") is not None]
        if ssims and row.get("dice"):
            out.append((row["name"], max(ssims), row["dice"]["WT"]))
    return out


def privacy_utility_figure(report: dict[str, Any], path: Path) -> Path | None:
    plt = _plt()
    points = study_points(report)
    if not points:
        return None
    front = pareto_front([(s, d) for _, s, d in points])
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    best = (report.get("best") or {}).get("name")
    for i, (name, ssim, wt) in enumerate(points):
        marker = "*" if name == best else "o"
        ax.scatter([ssim], [wt], s=140 if name == best else 40, marker=marker,
                   color="tab:red" if i in front else "tab:blue", zorder=3)
        ax.annotate(name, (ssim, wt), textcoords="offset points", xytext=(5, 4), fontsize=7)
    ax.plot([points[i][1] for i in front], [points[i][2] for i in front], "--", color="tab:red",
            label="Pareto front", zorder=2)
    ax.set_xlabel("best-attack brain SSIM (lower: less leakage)")
    ax.set_ylabel("WT Dice (higher: more useful)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def bytes_figure(report: dict[str, Any], path: Path) -> Path | None:
    plt = _plt()
    rows = [r for r in report.get("study") or [] if r.get("bytes_per_step")]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(7.0, 3.2))
    colors = {0: "tab:blue", 1: "tab:orange", 2: "tab:green", 3: "tab:purple"}
    ax.bar([r["name"] for r in rows], [r["bytes_per_step"] / 2**20 for r in rows],
           color=[colors.get(r["cut_level"], "tab:gray") for r in rows])
    for cut, color in colors.items():
        if any(r["cut_level"] == cut for r in rows):
            ax.bar([], [], color=color, label=f"cut level {cut}")
    ax.set_ylabel("MiB per training step\n(all sites, both directions)")
    ax.tick_params(axis="x", rotation=30, labelsize=7)
    ax.legend(fontsize=7)
    return _save(fig, path)


def curves_figure(report: dict[str, Any], path: Path) -> Path | None:
    plt = _plt()
    curves = report.get("curves") or {}
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(7.0, 3.6))
    for name, losses in curves.items():
        if not losses:
            continue
        y = np.asarray(losses, dtype=float)
        k = max(1, len(y) // 50)  # a moving average keeps the lines readable
        smooth = np.convolve(y, np.ones(k) / k, mode="valid")
        ax.plot(np.arange(1, len(smooth) + 1) + k - 1, smooth, label=name,
                lw=2.0 if name in ("Split-U-Net", "centralized") else 1.0)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (Dice + CE)")
    ax.legend(fontsize=6, ncol=3)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def write_figures(report: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """Every figure that has data, by name (``dice``, ``privacy_utility``, ``bytes``, ``curves``)."""
    made = {
        "dice": dice_figure(report, out_dir / "dice.png"),
        "privacy_utility": privacy_utility_figure(report, out_dir / "privacy_utility.png"),
        "bytes": bytes_figure(report, out_dir / "bytes_per_step.png"),
        "curves": curves_figure(report, out_dir / "training_curves.png"),
    }
    return {k: v for k, v in made.items() if v is not None}
