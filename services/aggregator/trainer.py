"""One training job at the aggregator: align, set up the sites, train, validate, checkpoint.

Each step (see :mod:`splitunet.protocol` for the exchange itself)::

    plan samples (case, crop, flips) from the labels      -> the same voxels at every party
    POST forward to every site, concurrently              -> activation bundles (decoded and checked)
    fuse, decode, loss, backward, optimizer step          -> AggregatorStep.step
    POST backward to every site, concurrently             -> the sites step their encoders

The job runs in a background thread; :meth:`TrainingJob.status` is safe to call from request threads.

Every party checkpoints step 0 before training and then every ``checkpoint_interval`` steps; a step counts as
checkpointed once all parties wrote it (recorded in the job store). A site that fails mid-job sends the job to
``waiting_for_site``, then ``resuming`` (every party rolled back to that step), then on (see
:mod:`services.aggregator.recovery`); a job built with ``resume_from`` (an aggregator restart, or
``POST /v1/jobs/{id}/resume``) starts with that roll-back.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from services.aggregator.attendance import SiteAttendance
from services.aggregator.evaluation import SplitPredictor, answered
from services.aggregator.labels import LabelStore
from services.aggregator.pipeline import StepExchange
from services.aggregator.privacy_gate import JobPause, PrivacyGate
from services.aggregator.recovery import RecoveryPolicy, recoverable, unreachable, wait_for_sites
from services.aggregator.site_client import Received, SiteClient
from services.aggregator.store import JobStore
from splitunet.checkpoint import apply_checkpoint, check_disk_budget, read_checkpoint, save_checkpoint
from splitunet.config import SiteSpec, SplitUNetConfig
from splitunet.data.grid import CaseGrid, brain_slices, combine_grids
from splitunet.data.sampling import Sample, extract, plan_patches, plan_slices
from splitunet.defenses import build_gradient_chain
from splitunet.errors import (
    CaseNotFoundError,
    ConfigurationError,
    ConflictError,
    DataError,
    PeerError,
    ProtocolError,
    SplitUNetError,
)
from splitunet.federation import FederationSpec, JobState, JobStatus
from splitunet.filters import FilterChain
from splitunet.losses import make_loss
from splitunet.metrics import RegionMetrics
from splitunet.networks.factory import make_optimizer, make_server_decoder
from splitunet.protocol import AggregatorStep, check_present, expected_site_shapes
from splitunet.recorder import Flow, NullRecorder, Recorder
from splitunet.schemas import Phase, RunSetup, SamplingPlan, StepSchedule
from splitunet.secure_sum import establish as establish_secure_sum
from splitunet.service.errors import internal_error_body
from splitunet.transcript import run_description
from splitunet.wire import WireDtype

logger = logging.getLogger(__name__)

#: Per-step losses kept in the job status.
MAX_LOSS_HISTORY = 100_000

#: Per-step wall-clock breakdowns kept in the job status (``JobStatus.step_times``).
MAX_STEP_TIMES = 1000

#: ``(clients, label case ids) -> aligned case ids``: the private set intersection with every site.
Aligner = Callable[[Mapping[str, SiteClient], Sequence[str]], list[str]]


class JobStopped(Exception):
    """Raised inside the job thread when a stop was requested."""


class TrainingJob:
    """A federation run driven by the aggregator.

    Args:
        job_id: the job (and run) id.
        spec: the federation spec.
        labels: the aggregator's segmentations.
        clients: one client per site, in fusion order (``spec.sites`` order).
        aligner: the alignment protocol (PSI).
        device: torch device of the decoder.
        state_dir: where this job's checkpoints go (``state_dir/<job_id>``).
        recorder: receives every bundle that crosses the boundary.
        gradient_filters: outbound gradient defenses (none by default).
        checkpoint_budget_bytes: most bytes of checkpoints under the parent of ``state_dir`` (``None``: no limit).
        store: the job store (durable status and complete checkpoints); none in tests that need none.
        policy: how long to wait for an unreachable site, and how often to roll back.
        resume_from: steps every party checkpointed: the job resumes from the latest of them instead of starting.
        previous: the job's last recorded status (losses, validations) when resuming.
    """

    def __init__(
        self,
        job_id: str,
        spec: FederationSpec,
        *,
        labels: LabelStore,
        clients: Mapping[str, SiteClient],
        aligner: Aligner,
        device: torch.device,
        state_dir: Path,
        recorder: Recorder | None = None,
        gradient_filters: FilterChain | None = None,
        max_workers: int = 0,
        checkpoint_budget_bytes: int | None = None,
        store: JobStore | None = None,
        policy: RecoveryPolicy | None = None,
        resume_from: Sequence[int] | None = None,
        previous: JobStatus | None = None,
        privacy_gate: PrivacyGate | None = None,
    ) -> None:
        self.job_id = job_id
        self.spec = spec
        self.labels = labels
        self.clients = dict(clients)
        self.aligner = aligner
        self.device = device
        self.state_dir = Path(state_dir) / job_id
        self.checkpoint_budget_bytes = checkpoint_budget_bytes
        self.recorder = recorder or NullRecorder()
        self.gradient_filters = gradient_filters  # built from spec.gradient_defenses in prepare() when None
        self.privacy_gate, self.pause = privacy_gate, JobPause()
        self.pool = ThreadPoolExecutor(max_workers=max_workers or len(self.clients), thread_name_prefix=f"job-{job_id}")
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._status = JobStatus(job_id=job_id, state=JobState.PENDING, steps=spec.steps)
        self._losses: list[float] = []
        self._step_times: deque[dict[str, float]] = deque(maxlen=MAX_STEP_TIMES)
        self._rng = np.random.default_rng(spec.seed)
        self.config: SplitUNetConfig | None = None
        self.aggregator: AggregatorStep | None = None
        self.train_cases: list[str] = []
        self.val_cases: list[str] = []
        self.unlabeled_cases: list[str] = []
        self.grids: dict[str, CaseGrid] = {}
        self._grids_lock = threading.Lock()  # the job thread plans while /v1/infer may ask for a grid
        self.store = store
        self.policy = policy or RecoveryPolicy()
        self._resume = resume_from is not None
        self._complete: list[int] = sorted(resume_from or [])
        self._persist = True
        self._setup: RunSetup | None = None
        self.attendance = SiteAttendance(list(self.clients), rate=spec.site_dropout, seed=spec.seed,
                                         policy=spec.missing_site_policy, probe_s=self.policy.backoff_s)
        if previous is not None:
            reset = {"state": JobState.PENDING, "error": None} if self._resume else {}
            self._status = previous.model_copy(update={**reset, "losses": []})
            self._losses = list(previous.losses)

    # ------------------------------------------------------------------ status
    def status(self) -> JobStatus:
        with self._lock:
            return self._status.model_copy(deep=True, update={"losses": list(self._losses),
                                                               "step_times": list(self._step_times)})

    def _update(self, **changes) -> None:
        with self._lock:
            self._status = self._status.model_copy(update=changes)
            persist = "state" in changes and self.store is not None and self._persist
        if persist:
            self.store.save_status(self.status())

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            if self._status.state in (JobState.PENDING, JobState.ALIGNING, JobState.RUNNING,
                                      JobState.WAITING_FOR_SITE, JobState.RESUMING):
                self._status = self._status.model_copy(update={"state": JobState.STOPPING})

    def interrupt(self) -> None:
        """Stop for a service shutdown: the store keeps the job as it was, so the next start resumes it."""
        self._persist = False
        self.stop()

    def _check_stop(self) -> None:
        if self._stop.is_set():
            raise JobStopped

    @property
    def finished(self) -> bool:
        return self.status().state in (JobState.SUCCEEDED, JobState.FAILED, JobState.STOPPED)

    # ------------------------------------------------------------------ the job
    def run(self) -> None:
        """The job thread's body: never raises; the outcome is in :meth:`status`."""
        started = time.perf_counter()
        try:
            if self._resume and self._complete:
                start = self._recover()
            else:
                self._update(state=JobState.ALIGNING)
                self.prepare()
                self.checkpoint(0)  # the common step every roll-back can reach
                start = 0
            self._update(state=JobState.RUNNING)
            self.train(start)
            self._update(state=JobState.SUCCEEDED)
        except JobStopped:
            logger.info("job %s stopped at step %d", self.job_id, self.status().step)
            self._update(state=JobState.STOPPED)
        except SplitUNetError as exc:
            logger.error("job %s failed: %s", self.job_id, exc.message)
            self._update(state=JobState.FAILED, error=exc.to_body())
        except Exception as exc:  # noqa: BLE001 - the job thread must report, not die silently
            # the detail (exception text, perhaps paths or a peer's words) goes to the log, never to the status
            logger.exception("job %s failed", self.job_id)
            self._update(state=JobState.FAILED, error=internal_error_body(exc))
        finally:
            timing = dict(self.status().timing)
            timing["total_s"] = time.perf_counter() - started
            self._update(timing=timing)

    def release_site_runs(self) -> None:
        """Tell every site that this job's run ended, so a site that is full may make room for a new run (best
        effort: a site that does not answer frees the run once it is idle for ``SITE_RUN_IDLE_S``)."""
        if self._setup is None:
            return  # no run was set up at the sites
        for name, client in self.clients.items():
            try:
                client.release_run(self.job_id)
            except PeerError as exc:
                logger.warning("job %s: site %s did not release the run: %s", self.job_id, name, exc.message)

    def close(self) -> None:
        """Release the job's threads, site clients and recorder (the model stays usable until then)."""
        self.pool.shutdown(wait=True, cancel_futures=True)
        for client in self.clients.values():
            client.close()
        self.recorder.close()

    def drop_resources(self) -> None:
        """After :meth:`close`: drop the references to what the job no longer needs (its decoder and optimizer
        state, site clients, thread pool, grids, recorder, privacy gate), so a released job keeps only its status."""
        self.aggregator = None
        self.clients = {}
        self.grids = {}
        self.recorder = NullRecorder()
        self.privacy_gate = None
        self._setup = None

    def prepare(self) -> None:
        """Query the sites, align the cases privately, split train/validation and set up every party."""
        t0 = time.perf_counter()
        infos = dict(zip(self.clients, self.pool.map(lambda c: c.info(), self.clients.values())))
        sites = tuple(SiteSpec(name=name, modalities=tuple(infos[name].modalities)) for name in self.clients)
        for name, info in infos.items():
            if info.site != name:
                raise ConfigurationError(f"the spec calls a site {name!r} but the service says it is {info.site!r}")
        self.config = self.spec.model.build(sites).model_copy(update={"absent_embedding": self.spec.trains_for_absence})
        wanted = sorted(set(self.labels.cases) | set(self.spec.infer_cases))
        aligned = sorted(self.aligner(self.clients, wanted))
        self._check_stop()
        self.unlabeled_cases = [c for c in aligned if c not in self.labels.cases]
        self.train_cases, self.val_cases = self._split([c for c in aligned if c in self.labels.cases])
        self._update(aligned_cases=len(aligned), train_cases=len(self.train_cases), val_cases=len(self.val_cases),
                     val_case_ids=list(self.val_cases), unlabeled_cases=len(self.unlabeled_cases))
        logger.info("job %s: %d aligned cases, %d train, %d validation",
                    self.job_id, len(aligned), len(self.train_cases), len(self.val_cases))

        decoder = make_server_decoder(self.config, self.spec.seed).to(self.device)
        opt = self.spec.server_optimizer
        optimizer = make_optimizer(decoder.parameters(), lr=opt.lr, weight_decay=opt.weight_decay)
        sampling = SamplingPlan(batch_size=self.spec.batch_size, population=len(self.train_cases))
        if self.gradient_filters is None:
            rate = sampling.sample_rate(self.spec.batch_size)
            self.gradient_filters = build_gradient_chain(self.spec.gradient_defenses, sample_rate=rate,
                                                         state_dir=self.state_dir)
        self.aggregator = AggregatorStep(decoder, make_loss(self.spec.loss), optimizer, self.gradient_filters)
        setup = self._setup = RunSetup(
            run_id=self.job_id, model=self.config,
            optimizer=self.spec.site_optimizer.model_copy(update={"total_steps": self.spec.steps}),
            wire=self.spec.wire, sampling=sampling, step_schedule=self.spec.step_schedule,
        )
        list(self.pool.map(lambda c: c.setup_run(setup), self.clients.values()))
        if self.spec.secure_sum is not None:
            self.aggregator.inbound = establish_secure_sum(self.clients, self.job_id, self.spec.secure_sum, self.pool)
        self.recorder.start(run_id=self.job_id, meta=run_description(self.spec, self.config))
        self._timing("prepare_s", time.perf_counter() - t0)

    def _split(self, aligned: list[str]) -> tuple[list[str], list[str]]:
        if not aligned:
            raise DataError("no case is shared by the aggregator and every site; nothing to train on")
        if isinstance(self.spec.val_cases, list):
            missing = sorted(set(self.spec.val_cases) - set(aligned))
            if missing:
                raise DataError(f"validation cases {missing[:5]} are not aligned across all parties")
            val = sorted(self.spec.val_cases)
        else:
            n = self.spec.val_cases
            if n >= len(aligned):
                raise DataError(
                    f"val_cases={n} leaves no training case among {len(aligned)} aligned cases; lower val_cases"
                )
            val = sorted(np.random.default_rng(self.spec.seed).choice(aligned, size=n, replace=False).tolist())
        train = [c for c in aligned if c not in set(val)]
        if not train:
            raise DataError("every aligned case is a validation case; leave some for training")
        return train, val

    # ------------------------------------------------------------------ training
    def train(self, start_step: int = 0) -> None:
        """Train steps ``start_step + 1 .. spec.steps``; a recoverable site failure rolls every party back to the
        latest complete checkpoint and training goes on from there."""
        while True:
            try:
                self._train_from(start_step)
                return
            except PeerError as exc:
                refusal = self._leakage_refusal(exc)
                if refusal is None:
                    start_step = self._recover(exc)  # every party is back at a checkpointed step: replay from there
                    continue
                self._pause(refusal)  # a site's own leakage gate stopped releasing: wait for an operator
                start_step = self._recover()

    def _train_from(self, start_step: int) -> None:
        assert self.config is not None and self.aggregator is not None
        spec = self.spec
        samples_done, t_train, t0 = 0, 0.0, time.perf_counter()
        exchange = StepExchange(self, self.pool, delayed=spec.step_schedule == StepSchedule.DELAYED)
        for step in range(start_step + 1, spec.steps + 1):
            self._check_stop()
            ts = time.perf_counter()
            self.attendance.readmit(self.clients, self._setup, self.job_id, step, self.pool)  # continue: back
            loss, phases = exchange.run(step, drains=self._drains_at(step))
            t_train += time.perf_counter() - ts
            samples_done += spec.batch_size
            elapsed = time.perf_counter() - t0
            with self._lock:
                self._losses.append(loss)
                self._step_times.append({"step": step, "total": time.perf_counter() - ts, **phases})
                if len(self._losses) > MAX_LOSS_HISTORY:
                    del self._losses[: len(self._losses) - MAX_LOSS_HISTORY]
            self._update(
                step=step, loss=loss, steps_per_second=(step - start_step) / elapsed,
                samples_per_second=samples_done / elapsed, **self.attendance.status_fields(
                    step, fusion=self.config.fusion.value, absent_embedding=self.config.absent_embedding),
            )
            last = step == spec.steps
            if (spec.val_interval and step % spec.val_interval == 0) or last:
                self.validate(step)
            if (spec.checkpoint_interval and step % spec.checkpoint_interval == 0) or last:
                self.checkpoint(step)
            if self.privacy_gate is not None and self.privacy_gate.due(step):
                self._gate(step)
        self._timing("train_s", t_train)

    def _drains_at(self, step: int) -> bool:
        """Whether ``step`` validates, checkpoints, runs the privacy gate or ends: no forward may be in flight
        after it (the delayed schedule, :mod:`services.aggregator.pipeline`)."""
        spec = self.spec
        return (step == spec.steps or bool(spec.val_interval and step % spec.val_interval == 0)
                or bool(spec.checkpoint_interval and step % spec.checkpoint_interval == 0)
                or (self.privacy_gate is not None and self.privacy_gate.due(step)))

    def case_grids(self, case_ids: Sequence[str], sites: Sequence[str] | None = None) -> dict[str, CaseGrid]:
        """The sites' agreed grid and brain extent of each case (:mod:`splitunet.data.grid`), asked once per case
        (of ``sites``, default all; with a subset, those of them that answer)."""
        with self._grids_lock:
            missing = sorted({c for c in case_ids if c not in self.grids})
            if missing:
                futures = {n: self.pool.submit(self.clients[n].grids, missing) for n in sites or self.clients}
                reports = {n: r.grids for n, r in answered(futures, tolerate=sites is not None)[0].items()}
                for case_id in missing:
                    self.grids[case_id] = combine_grids(
                        case_id, {name: report[case_id] for name, report in reports.items() if case_id in report}
                    )
            return {c: self.grids[c] for c in case_ids}

    # ------------------------------------------------------------------ recovery
    def _recover(self, cause: PeerError | None = None) -> int:
        """Wait until every site answers, set the run up again and roll every party back to the latest step all
        of them checkpointed; return that step. ``cause=None``: resuming a job after a restart.

        Raises ``cause`` when it is not recoverable or the job has rolled back ``policy.max_recoveries`` times.
        """
        while True:
            attempt = self.status().recoveries + 1
            if cause is not None:
                if not recoverable(cause) or attempt > self.policy.max_recoveries:
                    raise cause
                logger.warning("job %s: %s; rolling back (recovery %d)", self.job_id, cause.message, attempt)
            self._update(recoveries=attempt)
            if not wait_for_sites(self.clients, self.policy, stop=self._stop, on_waiting=self._waiting):
                raise JobStopped
            self._update(state=JobState.RESUMING, waiting_for=[])
            self.attendance.rejoin_all()  # every site answers and is rolled back with the others
            try:
                if self.aggregator is None:
                    self.prepare()
                else:
                    list(self.pool.map(lambda c: c.setup_run(self._setup), self.clients.values()))
                    if self.spec.secure_sum is not None:
                        # a restarted site lost its key pair with its memory: agree the pairwise keys again (the
                        # others keep theirs and re-derive the seeds from the relayed set)
                        self.aggregator.inbound = establish_secure_sum(self.clients, self.job_id,
                                                                       self.spec.secure_sum, self.pool)
                step = self._roll_back()
            except PeerError as exc:
                cause = exc
                continue
            self._update(state=JobState.RUNNING, resumed_from_step=step)
            logger.info("job %s resumed from step %d", self.job_id, step)
            return step

    def _waiting(self, sites: list[str]) -> None:
        self._update(state=JobState.WAITING_FOR_SITE, waiting_for=sites)

    def _roll_back(self) -> int:
        """Restore the latest complete checkpoint every party can load; report and skip corrupt ones."""
        for step in sorted(self._complete, reverse=True):
            try:
                self.restore(step)
                return step
            except (DataError, ConflictError) as exc:  # the aggregator's own file is corrupt
                reason = exc.message
            except PeerError as exc:
                if unreachable(exc):
                    raise
                reason = exc.message  # a site's file is missing or corrupt
            logger.error("job %s: checkpoint of step %d unusable: %s", self.job_id, step, reason)
            self._update(checkpoint_errors=[*self.status().checkpoint_errors, f"step {step}: {reason}"])
            self._complete.remove(step)
        raise DataError(f"job {self.job_id}: no checkpointed step that every party can restore",
                        detail={"errors": self.status().checkpoint_errors})

    def _leakage_refusal(self, exc: PeerError) -> dict | None:
        """A site's refusal by its own leakage gate (403 ``policy_violation``), with the decision it shows in its
        ``GET /v1/info`` (the refusal's body is never echoed); ``None`` for any other failure."""
        detail = exc.detail if isinstance(exc.detail, dict) else {}
        if detail.get("status") != 403 or detail.get("code") != "policy_violation":
            return None
        name = str(detail.get("peer", "")).removeprefix("site ")
        if name not in self.clients:
            return None
        try:
            gate = self.clients[name].info().leakage_gate or {}
        except PeerError:
            return None
        stopped = (gate.get("stopped") or {}).get(self.job_id)
        if not isinstance(stopped, dict):
            return None
        message = (f"site {name} stopped releasing: its own {stopped.get('attack')} attack on step "
                   f"{stopped.get('step')} reached {stopped.get('figure')} {stopped.get('value')} > "
                   f"{stopped.get('threshold')}")
        return {**stopped, "passed": False, "site": name, "party": f"site:{name}", "message": message}

    def _pause(self, decision: dict) -> None:
        """Pause with ``decision`` in the status until resumed (or stopped)."""
        self._update(privacy_gate=decision, state=JobState.PAUSED_BY_PRIVACY_GATE)
        logger.warning("job %s paused: %s", self.job_id, decision["message"])
        self.pause.wait(self._stop, on_stop=self._check_stop)
        self._update(state=JobState.RUNNING)
        logger.info("job %s resumed after a pause of the privacy gate", self.job_id)

    def _gate(self, step: int) -> None:
        """Run the privacy gate audit of ``step``; on failure pause until resumed (or stopped)."""
        assert self.privacy_gate is not None
        decision = self.privacy_gate.check(step)
        self._update(privacy_gate=decision)
        if not decision["passed"]:
            self._pause(decision)

    def plan(self, step: int) -> list[Sample]:
        """The samples of one step: random training cases, foreground-weighted crops or slices (only slices inside
        the brain, as the sites report it), random flips."""
        spec = self.spec
        cases = self._rng.choice(self.train_cases, size=spec.batch_size, replace=True)
        grids = self.case_grids([str(c) for c in cases]) if len(spec.roi) == 2 else {}
        samples: list[Sample] = []
        for case_id in cases:
            regions = self.labels.regions(str(case_id))
            shape = regions.shape[1:]
            foreground = regions[1] if spec.fg_ratio > 0 else None  # whole tumour
            if len(spec.roi) == 3:
                samples += plan_patches(str(case_id), shape, spec.roi, 1, self._rng, foreground=foreground,
                                        fg_ratio=spec.fg_ratio, flip_prob=spec.flip_prob)
            else:
                samples += plan_slices(str(case_id), shape, spec.roi, 1, self._rng, foreground=foreground,
                                       fg_ratio=spec.fg_ratio, flip_prob=spec.flip_prob, resize=spec.resize_slices,
                                       allowed_slices=brain_slices(grids[str(case_id)].brain_z))
        return samples

    def _labels_for(self, samples: Sequence[Sample]) -> torch.Tensor:
        arrays = [extract(self.labels.regions(s.case_id), s, interpolation="nearest") for s in samples]
        return torch.from_numpy(np.stack(arrays).astype(np.float32)).to(self.device)

    def shapes_for(self, batch: int) -> dict[str, tuple[int, ...]]:
        assert self.config is not None
        return expected_site_shapes(self.config, batch, self.spec.roi)

    def _record_received(self, name: str, step: int, item: Received, phase: Phase) -> None:
        self.recorder.record(run_id=self.job_id, step=step, site=name, flow=Flow.RECEIVED, phase=phase.value,
                             data=item.data, sha256=item.bundle.sha256)

    # ------------------------------------------------------------------ validation, inference
    def predictor(self, sites: Sequence[str] | None = None, *, tolerate_missing: bool = False) -> SplitPredictor:
        """Whole-case prediction through ``sites`` (default all); see :mod:`services.aggregator.evaluation`."""
        assert self.aggregator is not None and self.config is not None
        sites = None if sites is None else check_present(self.config, sites)  # 422 for a site the model lacks
        return SplitPredictor(
            self.clients, self.aggregator, run_id=self.job_id, roi=self.spec.roi, batch_size=self.spec.batch_size,
            shapes_for=self.shapes_for, dtype=WireDtype(self.spec.wire.activations.value), pool=self.pool,
            resize_slices=self.spec.resize_slices, overlap=self.spec.sw_overlap,
            on_received=lambda name, step, item: self._record_received(name, step, item, Phase.EVAL),
            on_plan=lambda step, samples: self.recorder.plan(run_id=self.job_id, step=step, phase=Phase.EVAL.value,
                                                             samples=samples),
            sites=sites, tolerate_missing=tolerate_missing,
        )

    def validate(self, step: int, sites: Sequence[str] | None = None, *, record: bool = True) -> dict:
        """Dice and HD95 (mm) per region and per validation case, whole cases through the sites (``sites``, default
        the online ones), and their mean and median (:mod:`splitunet.metrics`, BraTS convention); ``sites_used``
        names the sites that answered. ``record``: keep it in the job status (the training loop's validations)."""
        t0 = time.perf_counter()
        cases = self.val_cases[: self.spec.max_val_cases] if self.spec.max_val_cases else self.val_cases
        metrics = RegionMetrics(hd95=True)
        tolerate = sites is not None or self.spec.trains_for_absence
        predictor = self.predictor(sites or self.attendance.online(), tolerate_missing=tolerate)
        grids = self.case_grids(list(cases), predictor.sites if tolerate else None)
        for case_id in cases:
            if record:  # the job's own validation stops with the job; one asked for by a request does not
                self._check_stop()
            regions = self.labels.regions(case_id)
            probs = predictor.predict_case(case_id, regions.shape[1:], step=step, brain_z=grids[case_id].brain_z)
            metrics.add_case(case_id, probs, regions, self.labels.spacing(case_id), logits=False)
        result = {**metrics.aggregate(), "sites_used": predictor.sites_used}
        self._refresh_site_defenses(predictor.sites_used)
        if not record:
            return result
        history = [*self.status().validations, {"step": step, "dice": result["dice"]}]
        self._update(validation=result, validation_step=step, validations=history)
        self._timing("validation_s", self.status().timing.get("validation_s", 0.0) + time.perf_counter() - t0)
        logger.info("job %s step %d validation Dice %s", self.job_id, step, result["dice"])
        return result

    def _refresh_site_defenses(self, sites: Sequence[str]) -> None:
        """Take the defense statistics of the sites an evaluation used: its releases count in their DP ledgers, and
        the backward acks that otherwise carry the statistics come only with training steps. A site left out (or
        that did not answer) released nothing and keeps its last figures."""
        stats = {name: self.clients[name].info().defense_stats for name in sites}
        if any(stats.values()):
            defenses = dict(self.status().defenses or {})
            known = dict(defenses.get("sites") or {})
            self._update(defenses={**defenses, "sites": known | {name: s or [] for name, s in stats.items()}})

    def predict_case(self, case_id: str, sites: Sequence[str] | None = None,
                     used: list[str] | None = None) -> tuple[np.ndarray, CaseGrid]:
        """Region probabilities ``(3, X, Y, Z)`` of an aligned case, labelled or not, on the grid the sites report
        for it (their headers must agree), and that grid. Through ``sites`` (default all) less any that does not
        answer in time (while one does); ``used``, if given, receives the names of the sites used."""
        if self.aggregator is None:
            raise ConfigurationError("the job has no trained model yet")
        if case_id not in self.train_cases and case_id not in self.val_cases and case_id not in self.unlabeled_cases:
            raise CaseNotFoundError(
                f"case {case_id!r} is not aligned in job {self.job_id}; post a job with it in infer_cases "
                "(cases without labels) to segment it",
                detail={"case_id": case_id},
            )
        predictor = self.predictor(sites, tolerate_missing=True)
        grid = self.case_grids([case_id], predictor.sites)[case_id]
        shape = grid.geometry().ras_shape
        probs = predictor.predict_case(case_id, shape, step=self.status().step, brain_z=grid.brain_z)
        if used is not None:
            used[:] = predictor.sites_used
        return probs.cpu().numpy(), grid

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_path(self, step: int) -> Path:
        return self.state_dir / f"aggregator-step-{step:08d}.safetensors"

    def checkpoint(self, step: int) -> None:
        """Checkpoint the decoder + optimizer + job state, and every site's encoder at the same step (the step
        every party holds); once all have written it, the step is recorded as complete."""
        assert self.aggregator is not None
        if step != self.status().step:
            raise ProtocolError(f"the aggregator holds step {self.status().step}, not {step}")
        if self.checkpoint_budget_bytes is not None:
            parameters = sum(p.numel() for p in self.aggregator.decoder.parameters())
            check_disk_budget(self.state_dir.parent, parameters, self.checkpoint_budget_bytes,
                              setting="AGG_CHECKPOINT_BUDGET_BYTES")
        with self.aggregator.lock:
            digest = save_checkpoint(
                self.checkpoint_path(step), self.aggregator.decoder, self.aggregator.optimizer,
                {"job_id": self.job_id, "step": step, "spec": self.spec.model_dump(mode="json"),
                 "train_cases": self.train_cases, "val_cases": self.val_cases,
                 "rng": self._rng.bit_generator.state},
            )
        clients = {n: self.clients[n] for n in self.attendance.online()}  # continue: not the sites that are down
        infos = list(self.pool.map(lambda c: c.checkpoint(self.job_id, step), clients.values()))
        self.attendance.checkpointed(list(clients), step)
        complete = len(clients) == len(self.clients)  # a roll-back of every party needs every party's file
        if complete:
            self._complete.append(step)
        self.recorder.checkpoint(run_id=self.job_id, step=step)
        self._update(checkpoint_step=step)
        if self.store is not None and self._persist and complete:
            digests = {"aggregator": digest} | {name: info.sha256 for name, info in zip(self.clients, infos)}
            self.store.record_checkpoint(self.job_id, step, digests, self.status())

    def restore(self, step: int) -> None:
        """Load the decoder, optimizer and sampler state of ``step`` (verified before loading) and ask every site
        to restore its encoder at the same step."""
        assert self.aggregator is not None
        with self.aggregator.lock:
            checkpoint = read_checkpoint(self.checkpoint_path(step), module=self.aggregator.decoder)
            if checkpoint.step != step or checkpoint.meta.get("job_id") != self.job_id:
                raise ConflictError(f"{checkpoint.path.name} is not job {self.job_id}'s checkpoint of step {step}")
            apply_checkpoint(checkpoint, self.aggregator.decoder, self.aggregator.optimizer)
        meta = checkpoint.meta
        self._rng.bit_generator.state = meta["rng"]
        self.train_cases, self.val_cases = list(meta["train_cases"]), list(meta["val_cases"])
        list(self.pool.map(lambda c: c.restore(self.job_id, step), self.clients.values()))
        with self._lock:
            del self._losses[step:]
        validations = [v for v in self.status().validations if v["step"] <= step]
        self._update(step=step, checkpoint_step=step, validations=validations)

    def _timing(self, key: str, seconds: float) -> None:
        timing = dict(self.status().timing)
        timing[key] = seconds
        self._update(timing=timing)
