"""The audit's HTML report: a findings table, reconstruction grids and SSIM-over-steps curves (matplotlib PNGs
embedded as data URIs). Grids show images only in lab mode (or where a site opted in); otherwise the report
draws the prior and the attacks' outputs are withheld.
"""

from __future__ import annotations

import base64
import html
import io
from collections import defaultdict

import numpy as np

from splitunet.auditing.runner import AuditArtifacts, AuditResult


def _png_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    return buf.getvalue()


def _png(fig) -> str:
    return "data:image/png;base64," + base64.b64encode(_png_bytes(fig)).decode()


def grid_figure(arrays: dict[str, np.ndarray], title: str) -> str:
    """:func:`grid_png` as a data URI."""
    return "data:image/png;base64," + base64.b64encode(grid_png(arrays, title)).decode()


def grid_png(arrays: dict[str, np.ndarray], title: str) -> bytes:
    """Rows: samples; columns: original | prior | each attack (first modality, middle slice in 3D); PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = [k for k in ("original", "prior") if k in arrays] + [
        k for k in arrays if k not in ("original", "prior")]
    rows = next(iter(arrays.values())).shape[0]
    fig, axes = plt.subplots(rows, len(columns), figsize=(2.2 * len(columns), 2.2 * rows), squeeze=False)
    for c, name in enumerate(columns):
        for r in range(rows):
            img = arrays[name][r, 0]
            if img.ndim == 3:
                img = img[..., img.shape[-1] // 2]
            ax = axes[r][c]
            ax.imshow(np.rot90(img), cmap="gray", vmin=-2.5, vmax=2.5)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=9)
    fig.suptitle(title, fontsize=10)
    out = _png_bytes(fig)
    plt.close(fig)
    return out


def curve_figure(result: AuditResult) -> str | None:
    """Brain SSIM of each image attack over the audited steps, one line per site and attack."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[tuple[str, str], list[tuple[int, float]]] = defaultdict(list)
    for f in result.findings:
        if f.ssim is not None:
            series[(f.site, f.attack.value)].append((f.step, f.ssim))
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    for (site, attack), points in sorted(series.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"{site} {attack}")
    ax.set_xlabel("step")
    ax.set_ylabel("brain SSIM")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    out = _png(fig)
    plt.close(fig)
    return out


def parties_html(parties: list[dict]) -> str:
    """Who produced which findings (a federated audit assembles the parties' own audits)."""
    e = html.escape
    rows = "".join(
        f"<tr><td>{e(str(p.get('party')))}</td><td>{e(str(p.get('records', '')))}</td>"
        f"<td>{e(str(p.get('findings', '')))}</td><td>{e(str(p.get('skipped', '')))}</td></tr>" for p in parties)
    return ("<h2>Parties</h2><p>Each site audited its own record on its own premises (only these figures left "
            "it); the aggregator audited the label leakage of the gradients it sent, with its own labels.</p>"
            "<table border='1' cellspacing='0' cellpadding='3'><tr><th>party</th><th>records</th><th>findings</th>"
            f"<th>note</th></tr>{rows}</table>")


def render_html(result: AuditResult, artifacts: AuditArtifacts | None, *, show_images: bool = True,
                parties: list[dict] | None = None) -> str:
    e = html.escape
    cols = ["site", "step", "attack", "ssim", "prior_ssim", "delta_ssim", "delta_ssim_low", "delta_ssim_high",
            "n_samples", "rdlv", "psnr", "nmse", "semantic", "prior_semantic", "reid_top1", "dice", "auc",
            "label_method", "label_steps", "baseline_empty_dice", "baseline_blob_dice", "delta_dice",
            "delta_dice_low", "delta_dice_high", "seconds"]

    def cell(v) -> str:
        return "" if v is None else (f"{v:.3f}" if isinstance(v, float) else e(str(v)))

    rows = "".join("<tr>" + "".join(f"<td>{cell(getattr(f, c))}</td>" for c in cols) + "</tr>"
                   for f in result.findings)
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>Audit of {e(result.run_id)}</title></head><body>",
        f"<h1>Leakage audit of run {e(result.run_id)}</h1>",
        f"<p>{result.records} transcript records verified. Privacy gate: <b>{e(result.gate.message())}</b></p>",
        "<p>Brain SSIM: both images rescaled to [0, 1] by the original's brain range, the SSIM map averaged over "
        "the brain. delta_ssim = SSIM(reconstruction) − SSIM(prior) over n_samples (sample, modality) pairs, "
        "[delta_ssim_low, delta_ssim_high] its 95 % Student-t interval; the label attack (once per site, over "
        "label_steps recorded steps, its best method label_method) with delta_dice = its Dice − the public blob's."
        "</p>",
        "<table border='1' cellspacing='0' cellpadding='3'><tr>" + "".join(f"<th>{c}</th>" for c in cols) + "</tr>"
        + rows + "</table>",
    ]
    if parties:
        parts.append(parties_html(parties))
    if result.segmenters:
        parts.append("<p>semantic = Dice of a frozen whole-tumour segmenter's masks on the reconstruction vs on the "
                     "original (prior_semantic: on the prior); the segmenters, trained on the public phantom "
                     "cohort: " + ", ".join(
                         f"{e(s.modality)} {s.spatial_dims}D {'x'.join(map(str, s.size))} ({s.steps} steps, "
                         f"held-out Dice {cell(s.validation_dice)})" for s in result.segmenters) + "</p>")
    if result.dcor:
        parts.append("<p>dCor(input, features): " + ", ".join(f"{e(k)} {v:.3f}" for k, v in result.dcor.items())
                     + "</p>")
    curve = curve_figure(result)
    if curve:
        parts.append(f"<h2>SSIM over steps</h2><img alt='ssim over steps' src='{curve}'>")
    if artifacts is not None and show_images:
        for (site, step), arrays in sorted(artifacts.grids.items()):
            if "original" not in arrays:
                continue  # federated mode: the originals stay at the site
            parts.append(f"<h2>Site {e(site)}, step {step}</h2><img alt='grid' src='"
                         f"{grid_figure(arrays, f'site {site} step {step}')}'>")
    parts.append("</body></html>")
    return "\n".join(parts)
