"""The epsilons of a job, read from its status's defense statistics, each with what it bounds and against whom.

A job status carries ``defenses = {"gradients": [aggregator's stats], "sites": {site: [site's stats]}}`` (the
statistics of :mod:`splitunet.defenses.dp`, :mod:`~splitunet.defenses.dpsgd` and
:mod:`~splitunet.defenses.label_dp`). :func:`job_epsilons` turns them into one entry per thing protected:

- **images** (site DP, with or without DP-SGD): against the aggregator, who plans the batches (``q = 1``) and
  sees every release, evaluation included; replace-one adjacency (sensitivity ``2C``). ``epsilon`` is the largest
  site's (one modality's); ``epsilon_all_sites`` composes every site's releases of a patient in one accountant (the
  patient's whole record), each site's worst patient taken as the same patient (an upper bound; every site sees
  the same batches, so it is the same patient). Without DP-SGD the scope is *per release, given a fixed
  encoder*: the encoder is trained on raw data and is not covered. ``epsilon_subsampled`` is the old figure,
  labelled for what it is: subsampled, add/remove, which holds only against an honest aggregator that does not
  know the batches.
- **labels** (label DP or DP on the aggregator's gradients): against a site (it is told the batches: ``q = 1``),
  replace-one; ``epsilon_all_sites`` when every site pools its gradients. Scope: per release, given the decoder
  (trained on the raw labels, not covered).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from splitunet.defenses.accountant import per_patient_epsilon
from splitunet.defenses.config import AccountantKind, Adjacency

IMAGE_ADVERSARY = "aggregator (plans the batches: q = 1; training and evaluation releases)"
LABEL_ADVERSARY = "site (receives the gradients, knows the batches: q = 1)"
REPLACE_ONE = "replace-one (sensitivity 2C)"
SUBSAMPLED = "subsampled, add/remove, honest aggregator"
SCOPE_FIXED_ENCODER = "per release, given a fixed encoder (the encoder, trained on raw data, is not covered)"
SCOPE_DPSGD = "per release and per encoder update (DP-SGD): the encoder is covered"
SCOPE_FIXED_DECODER = "per release, given the decoder (trained on the raw labels, not covered)"


def _entries(stats: Any, name: str) -> list[Mapping[str, Any]]:
    return [s for s in stats or [] if isinstance(s, Mapping) and s.get("name") == name]


def _image_epsilons(sites: Mapping[str, Any]) -> dict[str, Any] | None:
    per_site, mechanisms, subsampled, deltas, dpsgd = [], [], [], [], False
    for stats in sites.values():
        dps, sgds = _entries(stats, "dp"), _entries(stats, "dpsgd")
        if not dps:
            continue
        figures = [float(s["epsilon_aggregator"]) for s in (*dps, *sgds) if "epsilon_aggregator" in s]
        if figures:
            per_site.append(max(figures))
        subsampled += [float(s["epsilon"]) for s in dps if "epsilon" in s]
        deltas += [float(s["delta"]) for s in (*dps, *sgds) if "delta" in s]
        worst = sgds or dps  # DP-SGD's worst patient already composes the site's releases and updates
        mechanisms += [(float(z), int(n)) for s in worst for z, n in s.get("worst_patient_releases") or []]
        dpsgd = dpsgd or bool(sgds)
    if not per_site:
        return None
    delta = min(deltas) if deltas else 1e-5
    return {"protects": "images", "adversary": IMAGE_ADVERSARY, "adjacency": REPLACE_ONE,
            "scope": SCOPE_DPSGD if dpsgd else SCOPE_FIXED_ENCODER, "delta": delta, "epsilon": max(per_site),
            "epsilon_all_sites": per_patient_epsilon(AccountantKind.RDP, mechanisms, delta, Adjacency.REPLACE_ONE)
            if mechanisms else None,
            "epsilon_subsampled": max(subsampled) if subsampled else None, "subsampled_is": SUBSAMPLED}


def _label_epsilons(gradients: Any) -> dict[str, Any] | None:
    label = _entries(gradients, "label_dp")
    dps = [s for s in _entries(gradients, "dp") if "epsilon_aggregator" in s]
    if label:
        s = label[0]
        return {"protects": "labels", "adversary": LABEL_ADVERSARY, "adjacency": REPLACE_ONE,
                "scope": SCOPE_FIXED_DECODER, "delta": s.get("delta"), "epsilon": s.get("epsilon_site"),
                "epsilon_all_sites": s.get("epsilon_sites_colluding"), "epsilon_target": s.get("epsilon_target"),
                "epsilon_subsampled": None, "subsampled_is": None}
    if dps:  # the dp filter on the gradients: one ledger over every site's releases (counted per call)
        s = dps[0]
        return {"protects": "labels", "adversary": LABEL_ADVERSARY, "adjacency": REPLACE_ONE,
                "scope": SCOPE_FIXED_DECODER, "delta": s.get("delta"), "epsilon": None,
                "epsilon_all_sites": s.get("epsilon_aggregator"), "epsilon_subsampled": s.get("epsilon"),
                "subsampled_is": SUBSAMPLED}
    return None


def job_epsilons(defenses: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """One entry per protected kind of data (``images``, ``labels``) with its epsilon, adversary, adjacency and
    scope (see the module docstring); empty without DP."""
    defenses = defenses or {}
    found = [_image_epsilons(defenses.get("sites") or {}), _label_epsilons(defenses.get("gradients"))]
    return [f for f in found if f is not None]
