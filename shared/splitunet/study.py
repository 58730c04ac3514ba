"""The privacy–utility study: train each defense configuration over REST, audit its recorded traffic, pick one.

A :class:`StudyConfig` is what differs from the undefended job: the sites' ``SITE_DEFENSES`` (the sites are
restarted with them: a site chooses its own protection), the job's gradient defenses, the cut level and skips,
secure-sum fusion. For each configuration :func:`run_config` trains the job through the aggregator, reads its
validation Dice, then asks the central audit service (a real process) for the parties' findings on the last
recorded training step: each site replays the image attacks on its own record against its own originals, the
aggregator the label attack with its own labels, the audit service assembles them; and returns one row of
``report.json["study"]``. A secure-sum run is audited in lab mode instead (the demo's operator holds every
party): a site's own record holds only its masked tensor, while whoever holds the transcript decodes the *sum*, so
the audit runs the joint inversion of the decoded sum with every site's encoder (the worst case: the sum's holder
with the encoders' weights), scored per modality.

The rule for "best" (:func:`pick_best`): among the configurations that trained and were audited, those whose
*strongest* image attack does not beat the prior image qualify; an attack beats the prior when the 95 % Student-t
interval of its ΔSSIM = SSIM(reconstruction) - SSIM(prior) (paired over the audited samples and modalities of
one site) lies entirely above 0. The strongest attack of a row is its image finding with the highest interval
lower bound (ties: the highest mean), over every site and image attack (white-box, UnSplit, learned, and on
secure-sum runs the joint inversion of the decoded sum), and whose model is usable (WT Dice at least
:data:`MIN_USABLE_WT_DICE`). Of the qualifying configurations the best WT Dice wins.
Label leakage is not part of the rule (it protects another party's data, the aggregator's labels, against another
adversary, a curious site); the choice states whether the label attack beats its baseline on the chosen one.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

StatusCallback = Callable[[str, dict[str, Any]], None]
#: Image attacks (scored by SSIM/RDLV) and the label attack, as the audit names them.
IMAGE_ATTACKS = ("whitebox", "unsplit", "learned", "secure_sum_joint")
ALL_ATTACKS = (*IMAGE_ATTACKS, "label_leakage")


class StudyLevel(StrEnum):
    """``--study``: no sweep, the short sweep (``--quick``'s default) or the full one (the default)."""

    NONE = "none"
    QUICK = "quick"
    FULL = "full"


@dataclass(frozen=True)
class StudyConfig:
    """One configuration of the study (see the module docstring); ``name`` is unique and file-name safe."""

    name: str
    site_defenses: tuple[dict[str, Any], ...] = ()
    gradient_defenses: tuple[dict[str, Any], ...] = ()
    cut_level: int = 0
    skips: str = "all"
    secure_sum: bool = False

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[a-z0-9][a-z0-9_.-]*", self.name):
            raise ValueError(f"study configuration name {self.name!r}: use lower-case letters, digits, _ . -")
        if self.cut_level < 0:
            raise ValueError(f"cut_level must be >= 0, got {self.cut_level}")

    @property
    def site_defenses_json(self) -> str | None:
        return json.dumps(list(self.site_defenses)) if self.site_defenses else None

    @property
    def fusion(self) -> str:
        return "sum" if self.secure_sum else "concat"

    def defenses(self) -> dict[str, Any]:
        return {"sites": list(self.site_defenses), "gradients": list(self.gradient_defenses)}

    def job(self, plan: dict[str, Any]) -> dict[str, Any]:
        """The job plan with this configuration applied (a copy)."""
        job = json.loads(json.dumps(plan))
        job["model"] |= {"cut_level": self.cut_level, "skips": self.skips}
        return apply_job_defenses(job, self.gradient_defenses, secure_sum=self.secure_sum)


def apply_job_defenses(plan: dict[str, Any], gradient_defenses: Any, *, secure_sum: bool) -> dict[str, Any]:
    """Set a job plan's gradient defenses and secure-sum fusion (``fusion=sum`` needs fp32 activations: the masked
    fixed-point values must travel exactly, :mod:`splitunet.secure_sum`); returns ``plan``, changed in place."""
    if gradient_defenses:
        plan["gradient_defenses"] = list(gradient_defenses)
    if secure_sum:
        plan["model"]["fusion"] = "sum"
        plan["wire"]["activations"] = "fp32"
        plan["secure_sum"] = {}
    return plan


NONE = StudyConfig("none")
SECURE_SUM = StudyConfig("secure-sum", secure_sum=True)
#: The full study's DP noise multipliers (clip C = 20).
DP_MULTIPLIERS = (0.01, 0.5)
_NOPEEK = {"name": "nopeek", "alpha": 1.0, "patch": 4, "points": 128}
#: Most training releases of one patient in a study configuration (its steps: at most one release per step).
STUDY_RELEASES = 100
#: Label DP at epsilon 8 against all four sites pooling their gradients (q = 1, replace-one), the noise calibrated
#: for STUDY_RELEASES releases to each site; clip 1e-3 is below every per-patient gradient norm (all clipped):
#: under Adam only the signal-to-noise ratio z matters (splitunet.defenses.label_dp).
LABEL_DP = StudyConfig("label-dp-e8", gradient_defenses=(
    {"name": "label_dp", "epsilon": 8.0, "clip": 1e-3, "releases": STUDY_RELEASES, "sites": 4},))
#: The site's encoder trained with DP-SGD at cut 2 without skips (32 x 16 x 16 features per sample), plus DP on
#: what is sent; z = 28 (activations) and 100 (encoder updates) keep the four sites composed at epsilon <= 7.5
#: (q = 1, replace-one) even if a patient were in every one of STUDY_RELEASES batches (measured figure in the row).
ENCODER_DPSGD = StudyConfig("dpsgd-cut2-e8", site_defenses=(
    {"name": "dpsgd", "clip": 1.0, "noise_multiplier": 100.0},
    {"name": "dp", "clip": 20.0, "noise_multiplier": 28.0}), cut_level=2, skips="none")


def study_configs(level: StudyLevel | str) -> list[StudyConfig]:
    """The configurations of a study level (``none``: only the undefended run, which the demo trains anyway)."""
    level = StudyLevel(level)
    if level is StudyLevel.NONE:
        return [NONE]
    if level is StudyLevel.QUICK:
        # two trainings and two audits: what fits --quick's 5 minutes on 2 cores; secure sum is the defense that
        # measured best-attack RDLV <= 0 at no Dice cost, so even the short study has a configuration to pick
        return [NONE, SECURE_SUM]
    return [
        NONE,
        *(StudyConfig(f"noise-{s}", ({"name": "gaussian", "sigma0": s},)) for s in (0.1, 0.5, 2.0)),
        # DP on activations: the noise per entry is z*C while a clipped sample's entries have RMS C/sqrt(d)
        # (d = 32768 at cut 0 here), so z = 0.01 trains (at an epsilon that guarantees nothing) and z = 0.5
        # (alone: subsampled epsilon ~ 100, against the aggregator ~ 477 per site at 44 releases, measured) drowns the
        # features: both ends of the trade-off; a site's ledger is cumulative, so the later DP configuration's
        # epsilon includes the earlier one's spend
        *(StudyConfig(f"dp-z{z}", ({"name": "dp", "clip": 20.0, "noise_multiplier": z},)) for z in DP_MULTIPLIERS),
        StudyConfig("nopeek", (_NOPEEK,)),
        StudyConfig("cut2-noskips", cut_level=2, skips="none"),
        SECURE_SUM,
        StudyConfig("int4", ({"name": "quantize", "mode": "int4"},)),
        LABEL_DP,
        ENCODER_DPSGD,
    ]


def audit_budgets(level: StudyLevel | str) -> dict[str, Any]:
    """The audit spec's budgets by level (the quick study's attacks are short)."""
    if StudyLevel(level) is StudyLevel.FULL:
        return {"whitebox_iterations": 1000, "unsplit_main_iters": 4, "unsplit_inner_iters": 20,
                "learned_steps": 100, "public_cases": 8}
    # the white-box attack keeps a full budget even here: a weak strongest attack is a broken audit
    return {"whitebox_iterations": 1000, "unsplit_main_iters": 2, "unsplit_inner_iters": 10,
            "learned_steps": 60, "public_cases": 4}


#: Samples per site and step the image attacks reconstruct (ΔSSIM's interval is over them and the site's modalities).
AUDIT_SAMPLES = 8


def follow_job(client: Any, job_id: str, on_status: Callable[[dict[str, Any]], None] | None = None,
               poll_s: float = 0.5) -> dict[str, Any]:
    """Poll ``GET /v1/jobs/{id}`` until the job ends; its last status. ``RuntimeError`` unless it succeeded."""
    while True:
        status = client.get_json(f"/v1/jobs/{job_id}")
        if on_status is not None:
            on_status(status)
        if status["state"] in ("succeeded", "failed", "stopped"):
            break
        time.sleep(poll_s)
    if status["state"] != "succeeded":
        error = status.get("error") or {}
        raise RuntimeError(f"job {job_id} ended {status['state']}: {error.get('message', 'no message')}")
    return status


def run_audit(client: Any, run_id: str, sites: list[str], budgets: dict[str, Any], out_dir: Path,
              figures_dir: Path, on_progress: Callable[[float, str], None] | None = None,
              timeout_s: float = 1800.0) -> dict[str, Any]:
    """Audit ``run_id`` through the audit service (the parties' findings, every attack) and wait for it:
    :func:`start_audit` then :func:`finish_audit`."""
    audit_id = start_audit(client, run_id, sites, budgets)
    return finish_audit(client, audit_id, run_id, out_dir, figures_dir, on_progress, timeout_s)


def start_audit(client: Any, run_id: str, sites: list[str], budgets: dict[str, Any], *,
                lab: bool = False) -> str:
    """Ask the central audit service to audit ``run_id`` with every attack; its audit id. Federated (default):
    each site's own audit of its record and the aggregator's label audit, assembled. ``lab``: every attack in the
    audit service, on the lab cohort with the sites' snapshots (a secure-sum run: the joint inversion of the
    decoded sum needs every encoder). The service runs its audits one at a time in the background, so the caller
    can train the next model meanwhile."""
    body = {"run_id": run_id, "mode": "lab" if lab else "federated", "sites": sites,
            "spec": {"attacks": list(ALL_ATTACKS), "max_samples": AUDIT_SAMPLES, "budgets": budgets}}
    return client.post_json("/v1/audits", body)["audit_id"]


def finish_audit(client: Any, audit_id: str, run_id: str, out_dir: Path, figures_dir: Path,
                 on_progress: Callable[[float, str], None] | None = None,
                 timeout_s: float = 1800.0) -> dict[str, Any]:
    """Wait for audit ``audit_id`` of ``run_id``; keep its HTML report and the reconstruction grids it drew
    (``out_dir/<run_id>.html``, ``figures_dir/recon-<run_id>-<site>.png``).

    Returns ``{"result": AuditResult as JSON, "grids": {site: png path}, "report": html path, "seconds": the
    audit's own running time (None from an audit service that does not report it)}``."""
    deadline = time.monotonic() + timeout_s
    while (status := client.get_json(f"/v1/audits/{audit_id}"))["state"] in ("pending", "running"):
        if on_progress is not None:
            on_progress(float(status.get("progress") or 0.0), status.get("message") or "")
        if time.monotonic() > deadline:
            raise TimeoutError(f"audit {audit_id} of run {run_id} did not finish in {timeout_s:.0f} s")
        time.sleep(0.5)
    if status["state"] != "succeeded":
        raise RuntimeError(f"audit of {run_id} failed: {(status.get('error') or {}).get('message')}")
    page = client.request("GET", f"/v1/audits/{audit_id}/report", accept="text/html").text
    out_dir.mkdir(parents=True, exist_ok=True)
    report = out_dir / f"{run_id}.html"
    report.write_text(page, encoding="utf-8")
    grids = {}
    figures_dir.mkdir(parents=True, exist_ok=True)
    for site, data in re.findall(r"<h2>Site ([^,<]+), step \d+</h2><img alt='grid' src='data:image/png;base64,"
                                 r"([A-Za-z0-9+/=]+)'>", page):
        path = figures_dir / f"recon-{run_id}-{site}.png"
        path.write_bytes(base64.b64decode(data))
        grids[site] = str(path)
    return {"result": status["result"], "grids": grids, "report": str(report), "seconds": status.get("seconds")}


def find_epsilon(defenses: Any) -> float | None:
    """The largest ``epsilon`` key any defense reported in a job status's ``defenses`` (None without DP): the
    subsampled, add/remove figure, which does not hold against the aggregator (rows use
    :func:`splitunet.defenses.epsilon.job_epsilons`)."""
    found: list[float] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "epsilon" and isinstance(v, int | float):
                    found.append(float(v))
                else:
                    walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(defenses)
    return max(found) if found else None


@dataclass
class StudyRow:
    """One configuration's results (``report.json["study"][i]`` is :meth:`as_json`)."""

    config: StudyConfig
    dice: dict[str, Any] | None = None
    hd95: dict[str, Any] | None = None
    leakage: list[dict[str, Any]] = field(default_factory=list)
    label_leakage: dict[str, Any] = field(default_factory=dict)
    dcor: dict[str, float] = field(default_factory=dict)
    bytes_per_step: float | None = None
    epsilon: float | None = None
    privacy: list[dict[str, Any]] = field(default_factory=list)  # splitunet.defenses.epsilon.job_epsilons
    train_s: float | None = None
    audit_s: float | None = None
    losses: list[float] = field(default_factory=list)
    grids: dict[str, str] = field(default_factory=dict)
    audit_report: str | None = None
    error: str | None = None

    def best_attack(self) -> dict[str, Any] | None:
        """The strongest image attack finding over every site: the highest ΔSSIM interval lower bound (ties: the
        highest mean ΔSSIM); see the module docstring."""
        scored = [f for f in self.leakage if f.get("delta_ssim") is not None]
        return max(scored, key=lambda f: (_low(f), f["delta_ssim"])) if scored else None

    def as_json(self) -> dict[str, Any]:
        best = self.best_attack()
        c = self.config
        return {
            "name": c.name, "defenses": c.defenses(), "cut_level": c.cut_level, "skips": c.skips,
            "fusion": c.fusion, "secure_sum": c.secure_sum, "dice": self.dice, "hd95_mm": self.hd95,
            "leakage": self.leakage, "label_leakage": self.label_leakage, "dcor": self.dcor,
            "best_attack": best, "bytes_per_step": self.bytes_per_step, "epsilon": self.epsilon,
            **epsilon_columns(self.privacy), "privacy": self.privacy,
            "train_s": self.train_s, "audit_s": self.audit_s, "losses": self.losses, "grids": self.grids,
            "audit_report": self.audit_report, "error": self.error,
        }


def row_from_runs(config: StudyConfig, status: dict[str, Any], train_s: float) -> StudyRow:
    """The training half of a row from the job's final status."""
    from splitunet.defenses.epsilon import job_epsilons

    validation = status.get("validation") or {}
    steps = max(int(status.get("step") or 0), 1)
    privacy = job_epsilons(status.get("defenses"))
    figures = [p["epsilon"] for p in privacy if p.get("epsilon") is not None]
    return StudyRow(config=config, dice=validation.get("dice"), hd95=validation.get("hd95"),
                    bytes_per_step=(int(status.get("bytes_sent", 0)) + int(status.get("bytes_received", 0))) / steps,
                    epsilon=max(figures) if figures else None, privacy=privacy, train_s=train_s,
                    losses=list(status.get("losses") or []))


def epsilon_columns(privacy: list[dict[str, Any]]) -> dict[str, Any]:
    """The study table's privacy columns of a row: the adversary's epsilon (``epsilon``, the row's), the party it
    holds against, its adjacency and scope, every site composed, and the old subsampled figure (labelled)."""
    if not privacy:
        return {"epsilon_adversary": None, "epsilon_adjacency": None, "epsilon_scope": None,
                "epsilon_all_sites": None, "epsilon_subsampled": None}
    top = max(privacy, key=lambda p: p.get("epsilon") or 0.0)
    return {"epsilon_adversary": top["adversary"], "epsilon_adjacency": top["adjacency"],
            "epsilon_scope": top["scope"], "epsilon_all_sites": top.get("epsilon_all_sites"),
            "epsilon_subsampled": top.get("epsilon_subsampled")}


def add_audit(row: StudyRow, audit: dict[str, Any], modalities: dict[str, list[str]], audit_s: float) -> None:
    """The audit half of a row: per site and attack SSIM/PSNR/RDLV, the label attack's Dice/AUC, dCor."""
    result = audit["result"]
    labels = []
    for f in result["findings"]:
        if f["attack"] == "label_leakage":
            if f.get("dice") is not None:
                labels.append(f)
            continue
        row.leakage.append({"site": f["site"], "modality": ",".join(modalities.get(f["site"], [f["site"]])),
                            "attack": f["attack"], "step": f["step"], "ssim": f.get("ssim"), "psnr": f.get("psnr"),
                            "rdlv": f.get("rdlv"), "prior_ssim": f.get("prior_ssim"),
                            "delta_ssim": f.get("delta_ssim"), "delta_ssim_low": f.get("delta_ssim_low"),
                            "delta_ssim_high": f.get("delta_ssim_high"), "n_samples": f.get("n_samples"),
                            "reid_top1": f.get("reid_top1")})
    if labels:
        # the strongest: the site whose gradients gave the best Dice (each site attacks what it received)
        top = max(labels, key=lambda f: f["dice"])
        row.label_leakage = {k: top.get(k) for k in ("dice", "auc", "baseline_empty_dice", "baseline_blob_dice",
                                                     "delta_dice", "delta_dice_low", "delta_dice_high",
                                                     "n_samples")}
        row.label_leakage |= {"site": top["site"], "method": top.get("label_method"),
                              "steps": top.get("label_steps"),
                              "mean_dice_over_sites": sum(f["dice"] for f in labels) / len(labels)}
    row.dcor = dict(result.get("dcor") or {})
    row.grids = dict(audit["grids"])
    row.audit_report = audit["report"]
    row.audit_s = audit_s


def _low(finding: dict[str, Any]) -> float:
    """ΔSSIM's 95 % interval lower bound (the mean where one pair gave no interval)."""
    low = finding.get("delta_ssim_low")
    return float(finding["delta_ssim"] if low is None else low)


def beats_prior(finding: dict[str, Any]) -> bool:
    """Whether an image finding beats the prior: its ΔSSIM interval lies above 0 (lower bound > 0)."""
    return _low(finding) > 0


def describe_attack(f: dict[str, Any]) -> str:
    """``"whitebox on t1: ΔSSIM +0.412 [+0.30, +0.52], SSIM 0.71 vs prior 0.30"``."""
    low, high = f.get("delta_ssim_low"), f.get("delta_ssim_high")
    ci = "" if low is None or high is None else f" [{low:+.3f}, {high:+.3f}]"
    return (f"{f['attack']} on {f['site']}: ΔSSIM {f['delta_ssim']:+.3f}{ci}, SSIM {f.get('ssim') or 0:.3f} vs prior "
            f"{f.get('prior_ssim') or 0:.3f}")


def _labels(row: StudyRow) -> str:
    ll = row.label_leakage
    if not ll or ll.get("dice") is None:
        return "label attack not measured"
    low = ll.get("delta_dice_low")
    verdict = "beats" if low is not None and low > 0 else "does not beat"
    return (f"its labels: the label attack ({ll.get('method')}) reaches Dice {ll['dice']:.3f}, AUC "
            f"{ll.get('auc') or 0:.3f}, and {verdict} the public blob (Dice {ll.get('baseline_blob_dice') or 0:.3f})")


#: A configuration whose model segments worse than this (WT Dice) is not a usable choice, whatever it protects: a
#: model that does not segment protects trivially (the study's DP-SGD row at ε 8 reached WT 0.015-0.051).
MIN_USABLE_WT_DICE = 0.5


def pick_best(rows: list[StudyRow]) -> dict[str, Any]:
    """The best WT Dice among the usable configurations (WT Dice >= :data:`MIN_USABLE_WT_DICE`) whose strongest
    image attack does not beat the prior (its ΔSSIM 95 % interval not above 0; the module docstring states the
    rule), or say that none qualifies and why (naming the protected but unusable ones)."""
    audited = [r for r in rows if r.error is None and r.dice and r.best_attack() is not None]
    protected = [r for r in audited if not beats_prior(r.best_attack())]  # type: ignore[arg-type]
    ok = [r for r in protected if r.dice["WT"] >= MIN_USABLE_WT_DICE]  # type: ignore[index]
    if not ok:
        strongest = "; ".join(f"{r.config.name}: {describe_attack(r.best_attack())}" for r in audited)  # type: ignore[arg-type]
        unusable = "; ".join(f"{r.config.name} (WT {r.dice['WT']:.3f})" for r in protected)  # type: ignore[index]
        return {"name": None, "why": "no configuration qualifies: on every usable audited one the strongest image "
                                     "attack beats the prior (ΔSSIM 95 % interval above 0): "
                                     f"{strongest or 'none audited'}"
                                     + (f". Protected but unusable (WT Dice below {MIN_USABLE_WT_DICE}): {unusable}"
                                        if unusable else "")}
    best = max(ok, key=lambda r: r.dice["WT"])  # type: ignore[index]
    none = next((r for r in rows if r.config.name == NONE.name and r.dice), None)
    cost = "" if none is None else f"; WT Dice cost vs no defense {best.dice['WT'] - none.dice['WT']:+.3f}"  # type: ignore[index]
    return {"name": best.config.name,
            "why": f"best WT Dice ({best.dice['WT']:.3f}) among the {len(ok)} configuration(s) whose strongest image "  # type: ignore[index]
                   f"attack does not beat the prior (ΔSSIM 95 % interval not above 0): strongest "
                   f"{describe_attack(best.best_attack())}{cost}; {_labels(best)}"}
