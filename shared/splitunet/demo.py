"""The main job: a whole federation on this machine, trained through the REST API, compared and audited.

Steps: make (or reuse) a phantom cohort, or take a real BraTS folder; partition it into one folder per site
(only its modalities) and one for the aggregator (only segmentations), holding out validation cases (the audit's
public auxiliary cohort is generated apart, from another seed: :mod:`splitunet.auditing.cohorts`); start 4 site
services, the aggregator and the audit service as real uvicorn processes on 127.0.0.1; train the Split-U-Net
through the aggregator; segment one held-out case; train the baselines in process with the same budget
(:mod:`splitunet.baseline_training`); run the privacy–utility study (:mod:`splitunet.study`), each configuration
trained over REST and audited by the audit service; write ``WORKDIR/report.json``, ``WORKDIR/report.html`` and
``WORKDIR/figures/*.png`` (:mod:`splitunet.report`); stop every process (also on error and Ctrl-C).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

from splitunet.config import MODALITIES
from splitunet.study import StudyLevel, apply_job_defenses

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
        study: the privacy–utility sweep (``none``, ``quick``, ``full``; default ``quick`` with ``quick``, else
            ``full``, in 2D; ``none`` in 3D and with a preset: a 3D study does not fit the 3D demos' budgets).
        baselines: train the centralized and single-modality baselines (default: in 2D; five in-process 3D U-Nets
            at the demo's budget would take longer than the 3D demo itself).
        study_only: train and audit only these configurations of the study level (names from
            :func:`splitunet.study.study_configs`; the undefended main run still gives the ``none`` row when the
            study trains with the main plan): a subset of the full study on a busy machine.
        device: ``cpu``, ``cuda`` or ``auto`` for every service and the baselines.
        seeds: runs of the headline comparison (Split-U-Net vs the centralized U-Nets), each with its own seed
            and held-out cases (:mod:`splitunet.seeds`); the report gives mean ± sd and judges the claims on them.
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
    study: StudyLevel | None = None
    baselines: bool | None = None
    device: str = "cpu"
    study_only: tuple[str, ...] | None = None
    seeds: int = 1

    def __post_init__(self) -> None:
        if self.seeds < 1:
            raise ValueError(f"seeds must be >= 1 (the headline comparison's runs), got {self.seeds}")
        if self.baselines is None:
            object.__setattr__(self, "baselines", self.dims == 2 and self.preset is None)
        default = StudyLevel.NONE if self.preset is not None or self.dims == 3 else (
            StudyLevel.QUICK if self.quick else StudyLevel.FULL)
        level = self.study if self.study is not None else default
        try:
            object.__setattr__(self, "study", StudyLevel(level))
        except ValueError:
            raise ValueError(f"study must be one of {[v.value for v in StudyLevel]}, got {level!r}") from None
        if self.device not in ("cpu", "cuda", "auto") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be cpu, cuda, cuda:N or auto, got {self.device!r}")
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
        if self.study_only is not None:
            from splitunet.study import study_configs

            names = [c.name for c in study_configs(self.study)]
            unknown = sorted(set(self.study_only) - set(names))
            if unknown or not self.study_only:
                raise ValueError(f"study_only must name configurations of the {self.study.value} study {names}; "
                                 f"unknown: {unknown or 'none given'}")
            object.__setattr__(self, "study_only", tuple(self.study_only))


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
            "steps": 200 if quick else 300,
            "val_interval": 100 if quick else 150,
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
    # cosine decay after a short warm-up: measured on the phantom, 2D at 5e-3 reached in 400 steps about what a
    # constant 2e-3 reached in 600 (WT 0.970 vs 0.979); 3D runs take fewer steps in the same time
    lr = 4e-3 if options.dims == 3 else 5e-3
    schedule = {"schedule": "cosine", "warmup_steps": 10}
    plan |= {
        "seed": options.seed,
        "fg_ratio": 0.8 if options.dims == 3 else 0.6,
        "flip_prob": 0.5,
        "loss": "dice_ce",
        "site_optimizer": {"lr": lr, "weight_decay": 1e-5, **schedule},
        "server_optimizer": {"lr": lr, "weight_decay": 1e-5, **schedule},
        "wire": {"activations": "fp16", "gradients": "fp32", "compress": False},
    }
    return apply_job_defenses(plan, options.gradient_defenses, secure_sum=options.secure_sum)


def study_plan(options: DemoOptions, plan: dict[str, Any]) -> dict[str, Any]:
    """The job plan of every study configuration: the main plan with ``--quick`` (the undefended row is then the
    main run itself); otherwise the quick model (2D, widths 8-64) for :data:`STUDY_STEPS` steps, so that ten
    trainings and their audits fit the demo's budget."""
    if options.quick or options.preset is not None:
        return plan
    splan = training_plan(replace(options, quick=True, steps=STUDY_STEPS, site_defenses=None, gradient_defenses=[],
                                  secure_sum=False))
    # a short run at a constant rate is far from converged (WT 0.72 at step 100, 0.82 at 120, TC 0.22 -> 0.62), so
    # the configurations' Dice would differ by training noise; 1e-2 with cosine decay over these 100 steps measured
    # WT 0.91, TC 0.97 for the undefended configuration (the make demo run of docs/results/demo.md)
    for optimizer in ("site_optimizer", "server_optimizer"):
        splan[optimizer] |= {"lr": STUDY_LR}
    return splan


#: Training steps of each configuration of the full study (a multiple of the transcript's and the sites'
#: snapshot interval, 10, so the last step is recorded and its encoder weights kept for the white-box attack).
STUDY_STEPS = 100
#: Learning rate of each configuration of the full study (cosine decay, see :func:`study_plan`).
STUDY_LR = 1e-2
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


def baseline_threads(device: str, *, concurrent: bool) -> int | None:
    """Torch threads for the in-process baselines: on CPU, the cores less one when the services work at the same
    time (each service computes with one thread; more threads than cores make torch's threads wait on each other,
    measured 6x slower evaluation with 2 threads beside 2 busy processes on 2 cores), at least one; None (keep) on
    a GPU."""
    if device not in ("cpu", "auto"):
        return None
    return max(1, usable_cores() - (1 if concurrent else 0))


def usable_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@dataclass
class DemoResult:
    report: dict[str, Any]
    report_path: Path
    pids: list[int]
    html_path: Path | None = None


#: ``on_task(task, completed, total, info)``: the progress of a phase (``total`` None: unknown).
TaskCallback = Callable[[str, float, float | None, str], None]


def _follow(client: Any, job_id: str, task: str, on_task: TaskCallback | None, log: Any) -> dict[str, Any]:
    from splitunet.study import follow_job

    def show(status: dict[str, Any]) -> None:
        if on_task is not None:
            loss = status.get("loss")
            dice = (status.get("validation") or {}).get("dice") or {}
            info = status["state"] + ("" if loss is None else f"  loss {loss:.3f}")
            if dice.get("WT") is not None:
                info += f"  val WT {dice['WT']:.2f}"
            on_task(task, status["step"], status["steps"], info)

    try:
        return follow_job(client, job_id, show)
    except RuntimeError as exc:
        raise RuntimeError(f"{exc}\naggregator log:\n{log.log_tail()}") from None


def _run_study(configs: list[Any], federation: Any, options: DemoOptions, sites: list[str], spec: dict[str, Any],
               splan: dict[str, Any], client: Any, aggregator: Any, phase: Callable[[str], None],
               on_task: TaskCallback | None, submit_audit: Callable[[Any, str], None]) -> list[Any]:
    """Train each study configuration over REST and queue its audit; the rows in the study's order.
    Configurations that keep the sites' defenses train back to back; the sites restart (same state folders) for
    the others. Audits run at the audit service meanwhile: a site keeps its runs' encoder snapshots on disk across
    a restart, and the audit rides over the restart (:data:`splitunet.auditing.sources.SITE_RETRIES`)."""
    from splitunet.study import row_from_runs

    current = options.site_defenses
    done: dict[str, Any] = {}
    for config in sorted(configs, key=lambda c: c.site_defenses_json != current):
        if config.site_defenses_json != current:
            for m in sites:
                federation.reconfigure_site(m, defenses=config.site_defenses_json)
            federation.wait_ready(timeout_s=180)
            current = config.site_defenses_json
        phase(f"study {config.name}")
        run_id = f"study-{config.name.replace('.', '_')}"
        t0 = time.perf_counter()
        try:
            job = client.post_json("/v1/jobs", {**spec, **config.job(splan), "run_id": run_id})
            status = _follow(client, job["job_id"], f"study {config.name}", on_task, aggregator)
        except RuntimeError as exc:
            logger.error("study configuration %s failed: %s", config.name, exc)
            done[config.name] = row_from_runs(config, {}, time.perf_counter() - t0)
            done[config.name].error = str(exc).splitlines()[0]
            continue
        done[config.name] = row_from_runs(config, status, time.perf_counter() - t0)
        submit_audit(done[config.name], run_id)
    return [done[c.name] for c in configs]


def site_grids(state_root: Path, run_id: str, sites: Sequence[str], figures_dir: Path) -> dict[str, str]:
    """Lab mode: the reconstruction grid each site's own audit drew of ``run_id`` (in its state folder,
    ``SITE_AUDIT_GRIDS``), copied to ``figures_dir/recon-<run_id>-<site>.png``; ``{site: path}``."""
    out = {}
    for site in sites:
        drawn = sorted((state_root / f"site-{site}" / "audit-grids" / run_id).glob("*.png"))
        if drawn:
            figures_dir.mkdir(parents=True, exist_ok=True)
            path = figures_dir / f"recon-{run_id}-{site}.png"
            shutil.copyfile(drawn[-1], path)
            out[site] = str(path)
    return out


def run_demo(
    options: DemoOptions,
    *,
    on_task: TaskCallback | None = None,
    on_phase: Callable[[str], None] | None = None,
    on_case: Callable[[str], None] | None = None,
) -> DemoResult:
    """Run the main job; see the module docstring. Callbacks report progress to the CLI."""
    from splitunet.baseline_training import BackgroundBaselines
    from splitunet.data.layout import discover_cases
    from splitunet.data.partition import partition_cohort
    from splitunet.launcher import LocalFederation, thread_budget
    from splitunet.report.assemble import assemble_report
    from splitunet.report.page import write_report
    from splitunet.report.quality import postprocessed_report
    from splitunet.scoring import infer_to_files, postprocessed_figures
    from splitunet.seeds import first_run, merge_checks, more_seeds, spread
    from splitunet.service.client import PeerClient, PeerTimeouts
    from splitunet.study import (
        NONE,
        add_audit,
        audit_budgets,
        finish_audit,
        pick_best,
        row_from_runs,
        start_audit,
        study_configs,
    )

    phase = on_phase or (lambda _: None)
    t_start = time.perf_counter()
    workdir = Path(options.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    timing: dict[str, float] = {}

    phase("data")
    t0 = time.perf_counter()
    source = Path(options.data) if options.data is not None else phantom_cohort(options, on_case)
    n_cases = len(discover_cases(source))
    n_val = max(1, min(VAL_CASES, n_cases // 3))
    partition = partition_cohort(source, workdir / "partition", val_fraction=n_val / n_cases, seed=options.seed)
    timing["data_s"] = time.perf_counter() - t0

    plan = training_plan(options)
    splan = study_plan(options, plan)
    # the undefended main run is the study's "none" row when the study trains with the main plan
    reuse_main = splan == plan and not (options.site_defenses or options.gradient_defenses or options.secure_sum)
    configs = [] if options.study is StudyLevel.NONE else [
        c for c in study_configs(options.study) if not (c is NONE and reuse_main)
        and (options.study_only is None or c.name in options.study_only)]
    budgets = audit_budgets(options.study)
    modalities = {m: [m] for m in MODALITIES}
    phase("start")
    t0 = time.perf_counter()
    # a demo starts afresh: services would otherwise resume a job an interrupted demo left in their state folders
    shutil.rmtree(workdir / "state", ignore_errors=True)
    shutil.rmtree(workdir / "transcripts", ignore_errors=True)
    rows = []
    baselines: dict[str, Any] = {}
    seed_runs: list[Any] = []
    # the baselines train beside the services with one thread of their own (on CPU): the services share the rest
    reserved = 1 if options.baselines and baseline_threads(options.device, concurrent=True) is not None else 0
    site_threads, aggregator_threads = thread_budget(len(MODALITIES), max(1, usable_cores() - reserved))
    with LocalFederation(workdir, torch_threads=site_threads) as federation:
        sites = []
        for m in MODALITIES:  # each site its own token; the aggregator's registry (AGG_SITES) lists them
            # lab: each site's own audit draws its reconstructions into its state folder, where the demo's
            # operator (who holds every party here) picks them up for the report
            federation.start_site(m, [m], partition.site_dir(m), defenses=options.site_defenses,
                                  device=options.device, env={"SITE_AUDIT_GRIDS": "true"})
            sites.append(m)
        aggregator = federation.start_aggregator(partition.aggregator_dir, device=options.device,
                                                 torch_threads=aggregator_threads)
        # the central audit assembles the parties' findings: each site audits its own record, the aggregator's
        # label audit reads the aggregator's labels. Lab settings too, for secure-sum runs only: a site's record
        # holds its masked tensor, the sum's holder decodes the sum, and the joint inversion of that sum needs
        # every site's encoder (the demo's operator holds every party; docs/results-privacy.md)
        snapshots = {m: str(federation.workdir / "state" / f"site-{m}") for m in sites}
        audit = federation.start_audit(labels_dir=partition.aggregator_dir, lab_images_dir=source,
                                       env={"AUDIT_LAB_SNAPSHOTS": json.dumps(snapshots)})
        federation.wait_ready(timeout_s=180)
        timing["startup_s"] = time.perf_counter() - t0

        spec = {"sites": sites, "val_cases": list(partition.validation) or n_val, **plan}
        timeouts = PeerTimeouts(connect=5, read=600, write=60, pool=10)
        client = PeerClient(aggregator.url, name="aggregator", token=federation.operator_token, timeouts=timeouts)
        auditor = PeerClient(audit.url, name="audit", token=federation.operator_token, timeouts=timeouts)
        # the baselines train in a thread of this process from the start, beside the services' training and audits
        # (one torch thread: the other core serves the services); they validate on the cases the aggregator does
        background = None
        if options.baselines:
            held_out = list(partition.validation)
            background = BackgroundBaselines(
                source, [c for c in partition.case_ids if c not in set(held_out)], held_out, plan,
                device="cpu" if options.device == "auto" else options.device,
                threads=baseline_threads(options.device, concurrent=True),
                on_step=None if on_task is None else (lambda n, s, total, loss: on_task(
                    f"baseline {n}", s, total, f"loss {loss:.3f}")))
        with client, auditor, background or nullcontext():
            phase("train")
            t0 = time.perf_counter()
            job_id = client.post_json("/v1/jobs", {**spec, "run_id": "split"})["job_id"]
            status = _follow(client, job_id, "Split-U-Net", on_task, aggregator)
            main_train_s = time.perf_counter() - t0
            phase("infer")
            t0 = time.perf_counter()
            # every held-out case, so that the post-processing can be chosen on them (splitunet.postprocess)
            val_ids = status.get("val_case_ids") or list(partition.case_ids)[:1]
            predicted = infer_to_files(client, job_id, val_ids, workdir / "inference")
            out = predicted[val_ids[0]]
            timing["inference_s"] = time.perf_counter() - t0
            postprocessed = postprocessed_figures(predicted, source)

            # audits queue at the audit service (one at a time, in the background) while the demo trains the
            # next models; they are collected at the end
            pending: list[tuple[Any, str, str, float]] = []  # (row, run id, audit id, submitted at)

            def submit_audit(row, run_id: str) -> None:
                try:
                    audit_id = start_audit(auditor, run_id, sites, budgets, lab=row.config.secure_sum)
                    pending.append((row, run_id, audit_id, time.perf_counter()))
                except (RuntimeError, OSError) as exc:
                    logger.error("audit of %s could not start: %s", run_id, exc)
                    row.error = f"audit failed: {exc}"

            def collect_audits() -> None:
                if pending:
                    phase("audit")
                for row, run_id, audit_id, submitted in pending:
                    progress = None if on_task is None else (
                        lambda f, msg, name=row.config.name: on_task(f"audit {name}", f, 1.0, msg))
                    try:
                        found = finish_audit(auditor, audit_id, run_id, workdir / "audits", workdir / "figures",
                                             progress)
                        found["grids"] |= site_grids(workdir / "state", run_id, sites, workdir / "figures")
                        add_audit(row, found, modalities, found["seconds"] or time.perf_counter() - submitted)
                    except (RuntimeError, TimeoutError, OSError) as exc:
                        logger.error("audit of %s failed: %s", run_id, exc)
                        row.error = f"audit failed: {exc}"
                pending.clear()

            if reuse_main and options.study is not StudyLevel.NONE:
                rows.append(row_from_runs(NONE, status, main_train_s))
                submit_audit(rows[-1], "split")

            rows += _run_study(configs, federation, options, sites, spec, splan, client, aggregator, phase,
                               on_task, submit_audit)
            collect_audits()
            if background is not None:
                phase("baselines")
                baselines = background.result()
                timing["baselines_s"] = background.seconds or 0.0
                # every REST figure above (split_step_s, train_s) was measured with the baselines training beside it
                timing["baselines_concurrent"] = True
            if options.seeds > 1:  # the headline comparison again with other seeds and held-out cases
                t0 = time.perf_counter()
                seed_runs = more_seeds(
                    first_run(options.seed, partition.validation, status, baselines), options.seeds,
                    post_job=lambda changes: _follow(client, client.post_json("/v1/jobs", {**spec, **changes})[
                        "job_id"], f"seed {changes['seed']}", on_task, aggregator),
                    source=source, case_ids=partition.case_ids, plan=plan, on_seed=lambda s: phase(f"seed {s}"),
                    device="cpu" if options.device == "auto" else options.device,
                    threads=baseline_threads(options.device, concurrent=True))
                timing["seeds_s"] = time.perf_counter() - t0
        pids = federation.pids()

    timing.update({f"job_{k}": v for k, v in status.get("timing", {}).items()})
    phase("report")
    best = pick_best(rows) if rows else {"name": None, "why": "no study ran (--study none)"}
    timing["total_s"] = time.perf_counter() - t_start
    report = assemble_report(options, status, spec, baselines, rows, best, timing, out, sites)
    report["postprocessed"] = postprocessed_report(postprocessed, baselines)
    if seed_runs:
        report["seeds"] = spread(seed_runs)
        report["checks"] = merge_checks(report["checks"], report["seeds"])
    report_path = workdir / "report.json"
    report_path.write_text(json.dumps(report, indent=2))
    html_path = write_report(report, workdir)
    return DemoResult(report=report, report_path=report_path, pids=pids, html_path=html_path)
