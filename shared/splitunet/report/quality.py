"""The report's segmentation-quality part: the models' figures with their parameter counts, raw and post-processed.

``report["postprocessed"]`` (:func:`postprocessed_report`): per model (``split``, ``centralized``,
``centralized_matched``, the modalities), :func:`splitunet.postprocess.cross_validated`'s dict: ``raw`` and
``postprocessed`` figures of the same predictions (the Split-U-Net's from the label files ``POST /v1/infer`` wrote,
the baselines' from their in-process predictions), the ``rules`` chosen on all validation cases and the
``rules_per_case`` (each case processed by the rule chosen on the others). :func:`quality_table` is the HTML table.
"""

from __future__ import annotations

import html
from typing import Any

REGIONS = ("TC", "WT", "ET", "mean")
CENTRALS = ("centralized", "centralized_matched")


def postprocessed_report(split: dict[str, Any] | None, baselines: dict[str, Any]) -> dict[str, Any]:
    """``report["postprocessed"]`` from the split model's figures and the baselines (:class:`BaselineResult`)."""
    out: dict[str, Any] = {"split": split}
    out |= {name: b.postprocessed for name, b in baselines.items() if getattr(b, "postprocessed", None)}
    return out


def _num(v: Any, fmt: str = ".3f") -> str:
    return "–" if v is None else format(v, fmt)


def _rows(report: dict[str, Any]) -> list[tuple[str, str]]:
    dice = report["dice"]
    feats = report.get("features") or {}

    def widths(name: str) -> str:
        return f", widths {'-'.join(map(str, feats[name]))}" if feats.get(name) else ""

    rows = [(f"centralized (4-channel U-Net, equal widths{widths('centralized')})", "centralized")]
    if dice.get("centralized_matched"):
        rows.append((f"centralized, matched capacity{widths('centralized_matched')}", "centralized_matched"))
    rows.append(("Split-U-Net (4 sites, REST)", "split"))
    rows += [(f"single modality: {m}{widths(m)}", m) for m in (dice.get("single_modality") or {})]
    return rows


def _get(section: dict[str, Any] | None, key: str) -> Any:
    section = section or {}
    return section.get(key) if key in ("split", *CENTRALS) else (section.get("single_modality") or {}).get(key)


def quality_table(report: dict[str, Any]) -> str:
    """Per model: parameters, Dice per region, HD95 per region (mm, median in brackets), and the post-processed
    Dice and HD95 (when the report has them)."""
    post = report.get("postprocessed") or {}
    params = report.get("parameters") or {}
    head = ("<tr><th>model</th><th>parameters</th>" + "".join(f"<th>Dice {r}</th>" for r in REGIONS)
            + "".join(f"<th>HD95 {r} (mm)</th>" for r in REGIONS[:3]))
    if post:
        head += "".join(f"<th>post-processed Dice {r}</th>" for r in REGIONS[:3])
        head += "".join(f"<th>post-processed HD95 {r} (mm)</th>" for r in REGIONS[:3])
    body = []
    for label, key in _rows(report):
        d, h = _get(report["dice"], key) or {}, _get(report["hd95_mm"], key) or {}
        med = (report.get("hd95_median") or {}).get(key) or {}
        n = _get(params, key)
        cells = [html.escape(label), "–" if n is None else f"{n:,}"]
        cells += [_num(d.get(r)) for r in REGIONS]
        cells += [_num(h.get(r), ".1f") + (f" ({med[r]:.1f})" if med.get(r) is not None else "") for r in REGIONS[:3]]
        if post:
            p = (post.get(key) or {}).get("postprocessed") or {}
            pd, ph, pm = p.get("dice") or {}, p.get("hd95") or {}, p.get("hd95_median") or {}
            cells += [_num(pd.get(r)) for r in REGIONS[:3]]
            cells += [_num(ph.get(r), ".1f") + (f" ({pm[r]:.1f})" if pm.get(r) is not None else "")
                      for r in REGIONS[:3]]
        body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    note = ""
    if post:
        split = post.get("split") or {}
        rules = split.get("rules") or {}
        note = ("<p>Post-processing (connected components, nnU-Net style): " + html.escape(
            (split.get("method") or "") + ". Rules chosen on all validation cases for the Split-U-Net: "
            + ", ".join(f"{r}: {v}" for r, v in rules.items())) + ". The raw Split-U-Net row is the aggregator's "
            "validation; its post-processed figures come from the label files inference wrote.</p>")
    return "<table>" + head + "</tr>" + "".join(body) + "</table>" + note + seeds_table(report)


def seeds_table(report: dict[str, Any]) -> str:
    """``report["seeds"]`` (``--seeds N``): per model, Dice and HD95 WT mean ± sd and the per-seed values; empty
    without seeds."""
    seeds = report.get("seeds") or {}
    if len(seeds.get("seeds") or []) < 2:
        return ""
    head = ("<tr><th>model</th><th>Dice WT mean ± sd</th><th>Dice WT per seed</th><th>Dice mean ± sd</th>"
            "<th>HD95 WT (mm) mean ± sd</th><th>HD95 WT per seed</th></tr>")
    body = []
    for key in ("split", *CENTRALS):
        figures = seeds.get(key) or {}
        dice, hd = (figures.get("dice") or {}), (figures.get("hd95") or {})
        if not dice:
            continue
        cells = [key.replace("_", " "), f"{dice['WT']['mean']:.3f} ± {dice['WT']['sd']:.3f}",
                 ", ".join(f"{v:.3f}" for v in dice["WT"]["values"]),
                 f"{dice['mean']['mean']:.3f} ± {dice['mean']['sd']:.3f}",
                 f"{hd['WT']['mean']:.1f} ± {hd['WT']['sd']:.1f}" if hd else "–",
                 ", ".join(f"{v:.1f}" for v in hd["WT"]["values"]) if hd else "–"]
        body.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    return (f"<h3>Over {len(seeds['seeds'])} seeds (seeds {', '.join(map(str, seeds['seeds']))}; each with its own "
            "held-out cases)</h3><table>" + head + "".join(body) + "</table>")
