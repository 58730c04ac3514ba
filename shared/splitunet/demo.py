"""The main job: a whole federation on this machine, trained through the REST API.

Steps: make (or reuse) a phantom cohort, or take a real BraTS folder; partition it into one folder per site
(only its modalities) and one for the aggregator (only segmentations); start 4 site services and the aggregator
as real uvicorn processes on 127.0.0.1; post a job; follow it; segment one held-out case; write
``WORKDIR/report.json``; stop every process (also on error and Ctrl-C).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from splitunet.config import MODALITIES

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoOptions:
    """What ``splitunet demo`` runs.

    Args:
        workdir: output folder (report, logs, partition, checkpoints).
        quick: the short run (<= 4 minutes on 2 cores).
        data: a real BraTS folder (2021 or 2023 layout) instead of the phantom.
        dims: 2 (axial slices) or 3 (patches).
        cases: phantom cases (default by mode).
        steps: training steps (default by mode and dims).
        cache_dir: where generated phantom cohorts are kept between runs.
        preset: ``brats``: the documented real-BraTS job (:data:`BRATS_PRESET`, 3D, needs ``data``).
        site_defenses: every site's ``SITE_DEFENSES`` (JSON list or YAML path; see :mod:`splitunet.defenses`).
        gradient_defenses: the job's gradient defenses (a list of defense configurations).
        secure_sum: secure-sum fusion (switches the model to ``fusion=sum`` and fp32 activations).
    """

    workdir: Path
    quick: bool = False
    data: Path | None = None
    dims: int = 2
    cases: int | None = None
    steps: int | None = None
    seed: int = 0
    cache_dir: Path = field(default_factory=lambda: default_cache_dir())
    preset: Preset | None = None
    site_defenses: str | None = None
    gradient_defenses: list[dict[str, Any]] = field(default_factory=list)
    secure_sum: bool = False

    def __post_init__(self) -> None:
        if self.preset is not None:
            object.__setattr__(self, "preset", Preset(self.preset))
            if self.data is None:
                raise ValueError("--preset brats trains on real BraTS: give the folder with --data DIR")
            if self.dims != 3:
                raise ValueError("--preset brats is a 3D job; use --dims 3 (the default with the preset)")
        if self.dims not in (2, 3):
            raise ValueError(f"dims must be 2 or 3, got {self.dims}")
        if self.data is not None and not Path(self.data).is_dir():
            raise ValueError(f"--data {self.data} is not a folder; give a BraTS folder with one sub-folder per case")
        if self.cases is not None and self.cases < 3:
            raise ValueError(f"cases must be >= 3 (training and validation), got {self.cases}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "splitunet"


#: Phantom volume shape used by the demo (1.0 x 1.0 x 1.0 mm voxels would need 240x240x155; this is ~2.5 mm).
PHANTOM_SHAPE = (96, 96, 64)


class Preset(StrEnum):
    BRATS = "brats"


#: The real-BraTS job (``splitunet demo --preset brats --data DIR`` posts it; ``docs/brats-job.json`` is the same
#: job for ``POST /v1/jobs``): what to run with a GPU and BraTS 2021 (1251 cases, 240x240x155 at 1 mm).
BRATS_PRESET: dict[str, Any] = {
    "model": {"spatial_dims": 3, "features": [16, 32, 64, 128, 256], "cut_level": 0},
    "roi": [128, 128, 128],
    "batch_size": 2,
    "steps": 25_000,
    "val_interval": 1_000,
    "max_val_cases": 50,
    "fg_ratio": 0.5,
    "flip_prob": 0.5,
    "loss": "dice_ce",
    "sw_overlap": 0.5,
    "site_optimizer": {"lr": 1e-3, "weight_decay": 1e-5, "schedule": "cosine", "warmup_steps": 500},
    "server_optimizer": {"lr": 1e-3, "weight_decay": 1e-5, "schedule": "cosine", "warmup_steps": 500},
    "wire": {"activations": "fp16", "gradients": "fp32", "compress": False},
    "checkpoint_interval": 1_000,
    "timeout_s": 600.0,
}


def training_plan(options: DemoOptions) -> dict[str, Any]:
    """The job spec fields (without sites) for the demo's mode."""
    if options.preset is Preset.BRATS:
        plan = json.loads(json.dumps(BRATS_PRESET)) | {"seed": options.seed}
        if options.steps is not None:
            plan["steps"] = options.steps
            plan["val_interval"] = min(plan["val_interval"], options.steps)
        return plan
    real = options.data is not None
    quick = options.quick
    if options.dims == 2:
        plan = {
            "model": {"spatial_dims": 2, "features": [8, 16, 32, 64] if quick else [16, 32, 64, 128], "cut_level": 0},
            "roi": [192, 192] if real else ([64, 64] if quick else [96, 96]),
            "batch_size": 8,
            "steps": 200 if quick else 600,
            "val_interval": 100 if quick else 200,
        }
    else:
        plan = {
            "model": {"spatial_dims": 3, "features": [8, 16, 32, 64], "cut_level": 0},
            "roi": [96, 96, 96] if real else [48, 48, 48],
            "batch_size": 2,
            "steps": THREE_D_STEPS[quick],
            "val_interval": 0 if quick else 250,
        }
    if options.steps is not None:
        plan["steps"] = options.steps
        plan["val_interval"] = min(plan["val_interval"], options.steps)
    lr = 4e-3 if options.dims == 3 else 2e-3  # 3D runs take fewer steps in the same time
    schedule = {"schedule": "cosine", "warmup_steps": 10} if options.dims == 3 else {}
    plan |= {
        "seed": options.seed,
        "fg_ratio": 0.8 if options.dims == 3 else 0.6,
        "flip_prob": 0.5,
        "loss": "dice_ce",
        "site_optimizer": {"lr": lr, "weight_decay": 1e-5, **schedule},
        "server_optimizer": {"lr": lr, "weight_decay": 1e-5, **schedule},
        "wire": {"activations": "fp16", "gradients": "fp32", "compress": False},
    }
    if options.gradient_defenses:
        plan["gradient_defenses"] = list(options.gradient_defenses)
    if options.secure_sum:
        plan["model"]["fusion"] = "sum"
        plan["wire"]["activations"] = "fp32"
        plan["secure_sum"] = {}
    return plan


#: 3D steps by ``quick``: what fits 5 (quick) and 15 minutes on 2 CPU cores with 48^3 patches.
THREE_D_STEPS = {True: 200, False: 600}
#: Held-out cases of the demo (phantom cases: 12 quick, 24 default).
VAL_CASES = 4


def generator_fingerprint(paths: Sequence[Path] | None = None) -> str:
    """SHA-256 over the phantom generator's source files (default: the modules that build a phantom case), so a
    cached cohort is regenerated when the generator changes."""
    if paths is None:
        from splitunet.data import mni, phantom, phantom_model

        paths = [Path(m.__file__) for m in (phantom, phantom_model, mni)]  # type: ignore[arg-type]
    digest = hashlib.sha256()
    for path in paths:
        digest.update(Path(path).name.encode() + b"\0" + Path(path).read_bytes())
    return digest.hexdigest()


def phantom_cohort(options: DemoOptions, on_case: Callable[[str], None] | None = None) -> Path:
    """Generate the demo's phantom cohort once and reuse it (keyed by cases, shape, seed and the generator's
    source, :func:`phantom_cache_key`)."""
    from splitunet.data.phantom import write_cohort

    key = phantom_cache_key(options)
    cases = phantom_cases(options)
    root = options.cache_dir / f"phantom-{key}"
    done = root / ".complete"
    if done.is_file():
        return root / "cohort"
    write_cohort(root / "cohort", cases, seed=options.seed, shape=PHANTOM_SHAPE, on_case=on_case)
    done.write_text(json.dumps({"cases": cases, "shape": PHANTOM_SHAPE, "seed": options.seed}))
    return root / "cohort"


def phantom_cases(options: DemoOptions) -> int:
    return options.cases or (12 if options.quick else 24)


def phantom_cache_key(options: DemoOptions, fingerprint: str | None = None) -> str:
    """The cache key of the demo's cohort: cases, shape, seed and the generator's source."""
    doc = [phantom_cases(options), PHANTOM_SHAPE, options.seed, fingerprint or generator_fingerprint()]
    return hashlib.sha256(json.dumps(doc).encode()).hexdigest()[:12]


@dataclass
class DemoResult:
    report: dict[str, Any]
    report_path: Path
    pids: list[int]


def run_demo(
    options: DemoOptions,
    *,
    on_status: Callable[[dict[str, Any]], None] | None = None,
    on_phase: Callable[[str], None] | None = None,
    on_case: Callable[[str], None] | None = None,
) -> DemoResult:
    """Run the main job; see the module docstring. Callbacks report progress to the CLI."""
    from splitunet.data.partition import partition_cohort
    from splitunet.launcher import LocalFederation, thread_budget
    from splitunet.service.client import PeerClient, PeerTimeouts

    phase = on_phase or (lambda _: None)
    t_start = time.perf_counter()
    workdir = Path(options.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    timing: dict[str, float] = {}

    phase("data")
    t0 = time.perf_counter()
    source = Path(options.data) if options.data is not None else phantom_cohort(options, on_case)
    from splitunet.data.layout import discover_cases

    n_cases = len(discover_cases(source))
    n_val = max(1, min(VAL_CASES, n_cases // 3))
    partition = partition_cohort(source, workdir / "partition", val_fraction=n_val / n_cases, seed=options.seed)
    timing["data_s"] = time.perf_counter() - t0

    plan = training_plan(options)
    phase("start")
    t0 = time.perf_counter()
    # a demo starts afresh: services would otherwise resume a job an interrupted demo left in their state folders
    shutil.rmtree(workdir / "state", ignore_errors=True)
    site_threads, aggregator_threads = thread_budget(len(MODALITIES))
    with LocalFederation(workdir, torch_threads=site_threads) as federation:
        sites = []
        for m in MODALITIES:  # each site its own token; the aggregator's registry (AGG_SITES) lists them
            federation.start_site(m, [m], partition.site_dir(m), defenses=options.site_defenses)
            sites.append(m)
        aggregator = federation.start_aggregator(partition.aggregator_dir, torch_threads=aggregator_threads)
        federation.wait_ready(timeout_s=180)
        timing["startup_s"] = time.perf_counter() - t0

        spec = {"sites": sites, "val_cases": list(partition.validation) or n_val, **plan}
        client = PeerClient(aggregator.url, name="aggregator", token=federation.operator_token,
                            timeouts=PeerTimeouts(connect=5, read=600, write=60, pool=10))
        with client:
            phase("train")
            job = client.post_json("/v1/jobs", spec)
            job_id = job["job_id"]
            while True:
                status = client.get_json(f"/v1/jobs/{job_id}")
                if on_status is not None:
                    on_status(status)
                if status["state"] in ("succeeded", "failed", "stopped"):
                    break
                time.sleep(0.5)
            if status["state"] != "succeeded":
                error = status.get("error") or {}
                raise RuntimeError(
                    f"the training job ended {status['state']}: {error.get('message', 'no message')}\n"
                    f"aggregator log:\n{aggregator.log_tail()}"
                )
            phase("infer")
            t0 = time.perf_counter()
            val_case = (status.get("val_case_ids") or list(partition.case_ids))[0]
            response = client.request("POST", "/v1/infer", json={"case_id": val_case, "job_id": job_id},
                                      accept="application/gzip")
            out = workdir / "inference" / f"{val_case}_pred.nii.gz"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(response.content)
            timing["inference_s"] = time.perf_counter() - t0
        pids = federation.pids()

    timing.update({f"job_{k}": v for k, v in status.get("timing", {}).items()})
    timing["total_s"] = time.perf_counter() - t_start
    validation = status.get("validation") or {}
    report = {
        "dice": {"split": validation.get("dice")},
        "hd95": {"split": validation.get("hd95")},
        "dice_median": {"split": validation.get("dice_median")},
        "hd95_median": {"split": validation.get("hd95_median")},
        "per_case": validation.get("per_case") or [],
        "validation_step": status.get("validation_step"),
        "validation_history": status.get("validations"),
        "timing": timing,
        "throughput": {"steps_per_second": status.get("steps_per_second"),
                       "samples_per_second": status.get("samples_per_second")},
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
        "inference": str(out),
    }
    report_path = workdir / "report.json"
    report_path.write_text(json.dumps(report, indent=2))
    return DemoResult(report=report, report_path=report_path, pids=pids)
