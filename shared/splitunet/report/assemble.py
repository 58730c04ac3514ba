"""``report.json`` from the demo's parts: the split job's status, the baselines, the study rows, the choice.

Stable keys (the issue's, plus the earlier demo's): ``dice``/``hd95_mm`` (``split``, ``centralized``,
``centralized_matched``, ``single_modality``), ``parameters`` (trainable parameters of each of those models),
``features`` (the baselines' widths), ``hd95`` (= ``hd95_mm``, the older name), ``dice_median``, ``hd95_median``,
``per_case``, ``postprocessed`` (added by the demo: :mod:`splitunet.report.quality`),
``study``, ``best``, ``checks``, ``curves``, ``timing`` (``total_s``, ``split_step_s``), ``machine``,
``settings``, ``throughput``, ``traffic_bytes``, ``cases``, ``final_loss``, ``defenses``, ``data``, ``mode``,
``job``, ``sites``, ``inference``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from splitunet.report.summary import machine, paper_checks


def assemble_report(options: Any, status: dict[str, Any], spec: dict[str, Any], baselines: dict[str, Any],
                    rows: list[Any], best: dict[str, Any], timing: dict[str, float], inference: Path,
                    sites: list[str]) -> dict[str, Any]:
    """The report's dict (see the module docstring); ``baselines``: name -> :class:`BaselineResult`."""
    from splitunet.demo import PHANTOM_SHAPE

    validation = status.get("validation") or {}
    from splitunet.baseline_training import split_config
    from splitunet.networks.baselines import parameter_count

    centrals = ("centralized", "centralized_matched")
    single = {m: b.validation["dice"] for m, b in baselines.items() if m not in centrals}
    single_hd = {m: b.validation["hd95"] for m, b in baselines.items() if m not in centrals}
    central, matched = baselines.get("centralized"), baselines.get("centralized_matched")
    sps = status.get("steps_per_second")
    hd95 = {"split": validation.get("hd95"), "centralized": central.validation["hd95"] if central else None,
            "centralized_matched": matched.validation["hd95"] if matched else None, "single_modality": single_hd}
    curves = {"Split-U-Net": list(status.get("losses") or [])}
    curves |= {(n.replace("_", " ") if n in centrals else f"only {n}"): b.losses for n, b in baselines.items()}
    curves |= {f"study {r.config.name}": r.losses for r in rows if r.config.name != "none" and r.losses}
    report: dict[str, Any] = {
        "dice": {"split": validation.get("dice"), "centralized": central.validation["dice"] if central else None,
                 "centralized_matched": matched.validation["dice"] if matched else None,
                 "single_modality": single},
        "parameters": {"split": parameter_count(split_config(spec)),
                       **{n: b.parameters for n, b in baselines.items() if n in centrals},
                       "single_modality": {m: b.parameters for m, b in baselines.items() if m not in centrals}},
        "features": {n: list(b.features) for n, b in baselines.items()},
        "hd95_mm": hd95,
        "hd95": hd95,
        "dice_median": {"split": validation.get("dice_median"),
                        "centralized": central.validation["dice_median"] if central else None,
                        "centralized_matched": matched.validation["dice_median"] if matched else None},
        "hd95_median": {"split": validation.get("hd95_median"),
                        **{n: b.validation.get("hd95_median") for n, b in baselines.items() if n in centrals}},
        "per_case": validation.get("per_case") or [],
        "baseline_per_case": {n: b.validation.get("per_case") for n, b in baselines.items()},
        "validation_step": status.get("validation_step"),
        "validation_history": status.get("validations"),
        "study": [r.as_json() for r in rows],
        "best": best,
        "curves": curves,
        "timing": timing | {"split_step_s": (1.0 / sps) if sps else None,
                            "baselines_train_s": {n: b.seconds for n, b in baselines.items()},
                            "baselines_eval_s": {n: b.eval_s for n, b in baselines.items()},
                            "baselines_data_s": next((b.data_s for b in baselines.values()), None)},
        "throughput": {"steps_per_second": sps, "samples_per_second": status.get("samples_per_second")},
        "traffic_bytes": {"aggregator_received": status.get("bytes_received"),
                          "aggregator_sent": status.get("bytes_sent")},
        "cases": {"aligned": status.get("aligned_cases"), "train": status.get("train_cases"),
                  "validation": status.get("val_cases")},
        "final_loss": status.get("loss"),
        "defenses": status.get("defenses"),
        "data": str(options.data) if options.data is not None else f"phantom {PHANTOM_SHAPE}",
        "mode": options.preset.value if options.preset else ("quick" if options.quick else "default"),
        "job": {k: v for k, v in spec.items() if k != "sites"},
        "sites": list(sites),
        "inference": str(inference),
        "settings": {"job": {k: v for k, v in spec.items() if k != "sites"}, "study": str(options.study),
                     "device": options.device, "seed": options.seed, "site_defenses": options.site_defenses,
                     "baselines": options.baselines,
                     "study_configurations": [r.as_json()["defenses"] | {"name": r.config.name} for r in rows]},
        "machine": machine(),
    }
    report["checks"] = paper_checks(report)
    return report
