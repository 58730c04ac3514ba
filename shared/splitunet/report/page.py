"""The demo's ``report.html``: one self-contained page (every image a PNG data URI, no script, no link out).

Sections: the paper's checks (what holds, what does not), the Dice/HD95 table, the study table with the chosen
configuration, the privacy–utility plot, the leakage table (site × configuration × attack), reconstruction grids
per configuration, bytes per step, training curves, the settings and the machine.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

from splitunet.report.quality import quality_table

REGIONS = ("TC", "WT", "ET", "mean")
STYLE = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.2em}td,th{border:1px solid #bbb;padding:3px 7px;text-align:right}
th{background:#eee}td:first-child,th:first-child{text-align:left}.ok{color:#17732b}.no{color:#b3261e}
tr.best{background:#fff6cc}img{max-width:100%}pre{background:#f6f6f6;padding:0.6em;overflow:auto;font-size:12px}
"""


def _img(path: str | Path, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f"<img alt='{html.escape(alt)}' src='data:image/png;base64,{data}'>"


def _num(v: Any, fmt: str = ".3f") -> str:
    return "–" if v is None else format(v, fmt)


def _delta(f: dict[str, Any]) -> str:
    """``+0.412 [+0.30, +0.52]``: ΔSSIM and its 95 % interval (``–`` when not measured)."""
    if f.get("delta_ssim") is None:
        return "–"
    low, high = f.get("delta_ssim_low"), f.get("delta_ssim_high")
    return f"{f['delta_ssim']:+.3f}" + ("" if low is None or high is None else f" [{low:+.3f}, {high:+.3f}]")


def _study_table(report: dict[str, Any]) -> str:
    best = (report.get("best") or {}).get("name")
    head = ("<tr><th>configuration</th><th>cut</th><th>skips</th><th>fusion</th><th>Dice WT</th><th>Dice mean</th>"
            "<th>strongest image attack</th><th>its SSIM</th><th>prior SSIM</th><th>ΔSSIM [95 % CI]</th>"
            "<th>its RDLV</th><th>label attack (method)</th><th>label leak Dice</th><th>label AUC</th>"
            "<th>blob Dice</th>"
            "<th>ε</th><th>ε against</th><th>adjacency</th><th>ε subsampled (honest aggregator)</th>"
            "<th>MiB/step</th><th>train s</th></tr>")
    body = []
    for r in report.get("study") or []:
        b = r.get("best_attack") or {}
        dice = r.get("dice") or {}
        ll = r.get("label_leakage") or {}
        attack = f"{b.get('attack')} on {b.get('site')}" if b else (r.get("error") or "–")
        body.append(
            f"<tr class='{'best' if r['name'] == best else ''}'><td>{html.escape(r['name'])}</td>"
            f"<td>{r['cut_level']}</td><td>{html.escape(str(r['skips']))}</td><td>{html.escape(r['fusion'])}</td>"
            f"<td>{_num(dice.get('WT'))}</td><td>{_num(dice.get('mean'))}</td><td>{html.escape(attack)}</td>"
            f"<td>{_num(b.get('ssim'))}</td><td>{_num(b.get('prior_ssim'))}</td><td>{_delta(b)}</td>"
            f"<td>{_num(b.get('rdlv'), '+.3f')}</td>"
            f"<td>{html.escape(str(ll.get('method') or '–'))}</td><td>{_num(ll.get('dice'))}</td>"
            f"<td>{_num(ll.get('auc'))}</td><td>{_num(ll.get('baseline_blob_dice'))}</td>"
            f"<td>{_num(r.get('epsilon'), '.2f')}</td>"
            f"<td>{html.escape(str(r.get('epsilon_adversary') or '–'))}</td>"
            f"<td>{html.escape(str(r.get('epsilon_adjacency') or '–'))}</td>"
            f"<td>{_num(r.get('epsilon_subsampled'), '.2f')}</td>"
            f"<td>{_num(None if r.get('bytes_per_step') is None else r['bytes_per_step'] / 2**20, '.2f')}</td>"
            f"<td>{_num(r.get('train_s'), '.0f')}</td></tr>")
    return "<table>" + head + "".join(body) + "</table>"


def _leakage_table(report: dict[str, Any]) -> str:
    head = ("<tr><th>configuration</th><th>site (modality)</th><th>attack</th><th>brain SSIM</th><th>prior SSIM</th>"
            "<th>ΔSSIM [95 % CI]</th><th>n</th><th>RDLV</th><th>PSNR (dB)</th><th>re-id top-1</th></tr>")
    body = []
    for r in report.get("study") or []:
        for f in r.get("leakage") or []:
            low = f.get("delta_ssim_low", f.get("delta_ssim"))
            cls = "no" if low is not None and low > 0 else "ok"
            body.append(
                f"<tr><td>{html.escape(r['name'])}</td><td>{html.escape(f['site'])} ({html.escape(f['modality'])})"
                f"</td><td>{html.escape(f['attack'])}</td><td>{_num(f.get('ssim'))}</td>"
                f"<td>{_num(f.get('prior_ssim'))}</td><td class='{cls}'>{_delta(f)}</td>"
                f"<td>{_num(f.get('n_samples'), 'd')}</td><td>{_num(f.get('rdlv'), '+.3f')}</td>"
                f"<td>{_num(f.get('psnr'), '.1f')}</td><td>{_num(f.get('reid_top1'), '.2f')}</td></tr>")
    if not body:
        return "<p>No audit ran (<code>--study none</code>?).</p>"
    return "<table>" + head + "".join(body) + "</table>"


def _checks(report: dict[str, Any]) -> str:
    items = []
    for c in report.get("checks") or []:
        mark = "<span class='ok'>holds</span>" if c["holds"] else (
            "<span class='no'>does not hold</span>" if c["holds"] is False else "not measured")
        items.append(f"<li>{html.escape(c['claim'])}: {mark} — {html.escape(c['measured'])}</li>")
    return "<ul>" + "".join(items) + "</ul>"


def render_report(report: dict[str, Any], figures: dict[str, Path]) -> str:
    """The page for ``report`` (``report.json``'s dict) with the PNGs in ``figures`` (name -> path) and the
    reconstruction grids the study rows name."""
    e = html.escape
    best = report.get("best") or {}
    timing = report.get("timing") or {}
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'><title>Split-U-Net demo report</title>"
        f"<style>{STYLE}</style></head><body>",
        "<h1>Split-U-Net: utility, leakage and the price of privacy</h1>",
        f"<p>Data: {e(str(report.get('data')))}; mode {e(str(report.get('mode')))}; total wall time "
        f"{_num(timing.get('total_s'), '.0f')} s; one Split-U-Net step over REST "
        f"{_num(timing.get('split_step_s'), '.2f')} s."
        "</p>",
        "<h2>What the numbers say</h2>", _checks(report),
        "<h2>Segmentation on held-out cases</h2>",
        "<p>Every model trained with the same steps, batch, crop, loss and optimiser, evaluated per case over whole "
        "volumes with the same sliding-window inference.</p>", quality_table(report),
    ]
    if "dice" in figures:
        parts.append(_img(figures["dice"], "Dice per region"))
    parts += ["<h2>Privacy–utility study</h2>",
              f"<p><b>Chosen configuration: {e(str(best.get('name')))}</b> — {e(str(best.get('why', '')))}</p>",
              _study_table(report),
              "<p>ε (Opacus RDP, at the DP defense's δ) is against the party in “ε against”: for image DP the "
              "aggregator, who plans the batches (q = 1, no amplification), over the most released patient's "
              "training and evaluation releases at one site, replace-one adjacency (sensitivity 2C); for label DP "
              "one site. Scope: <b>per release, given a fixed encoder</b> (the encoder is trained on raw data) "
              "unless the row trains it with DP-SGD; label DP: per release, given the decoder. The subsampled "
              "figure holds only against an honest aggregator that does not know the batches. A site's ledger "
              "covers every DP release of its patients across runs: a DP configuration's ε includes the spend of "
              "the DP configurations trained before it. See docs/differential-privacy.md.</p>"]
    if "privacy_utility" in figures:
        parts.append(_img(figures["privacy_utility"], "privacy-utility plot"))
    parts += ["<h2>Leakage per site, configuration and attack</h2>",
              "<p>Brain SSIM of each attack's reconstruction of the recorded training batch: both images rescaled to "
              "[0, 1] by the original's brain range, the SSIM map averaged over the brain. ΔSSIM = SSIM(reconstruction)"
              " − SSIM(prior), the prior being the mean image of a public phantom cohort disjoint from the federation, "
              "paired over the n audited (sample, modality) pairs, with its 95 % Student-t interval; red: the "
              "interval lies above 0 (the attack beats the prior). RDLV = ΔSSIM / SSIM(prior), unstable where the "
              "prior's SSIM is small. On secure-sum runs the attack is the joint inversion of the decoded sum "
              "(secure_sum_joint).</p>", _leakage_table(report),
              "<h2>Reconstruction grids</h2>"]
    for r in report.get("study") or []:
        for site, png in sorted((r.get("grids") or {}).items()):
            if Path(png).is_file():
                parts.append(f"<h3>{e(r['name'])}: site {e(site)}</h3>"
                             + _img(png, f"reconstructions {r['name']} {site}"))
    for key, title in (("bytes", "Bytes per step per cut"), ("curves", "Training curves")):
        if key in figures:
            parts += [f"<h2>{title}</h2>", _img(figures[key], title)]
    parts += ["<h2>Settings</h2><pre>" + e(json.dumps(report.get("settings"), indent=2)) + "</pre>",
              "<h2>Machine</h2><pre>" + e(json.dumps(report.get("machine"), indent=2)) + "</pre>",
              "</body></html>"]
    return "\n".join(parts)


def write_report(report: dict[str, Any], workdir: Path) -> Path:
    """Write ``workdir/figures/*.png`` and ``workdir/report.html``; the page's path."""
    from splitunet.report.figures import write_figures

    figures = write_figures(report, workdir / "figures")
    path = workdir / "report.html"
    path.write_text(render_report(report, figures), encoding="utf-8")
    return path
