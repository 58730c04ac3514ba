"""The site's runtime: its cohort, and per run its encoder, optimizer and pending step.

Everything the routes do is one method here. Torch work is called from plain ``def`` routes (FastAPI's thread
pool) and serialised per run by the run's lock (the :class:`~splitunet.protocol.SiteStep` lock).

Runs survive restarts: each run's setup and latest checkpoint are recorded in ``state_dir/runs.sqlite``
(:mod:`services.client_site.store`). A run rebuilt after a restart refuses training until the aggregator restores
a checkpointed step, so no step is ever applied to weights the run does not hold.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from services.client_site.alignment import AlignmentGuard, not_aligned
from services.client_site.audit import SiteAuditor
from services.client_site.policy import EvalBudget
from services.client_site.protection import SiteProtection
from services.client_site.settings import SiteSettings
from services.client_site.store import RunStore
from splitunet import __version__
from splitunet.checkpoint import apply_checkpoint, check_disk_budget, read_checkpoint, save_checkpoint
from splitunet.data.cache import ArrayCache
from splitunet.data.cohort import scan_cohort
from splitunet.data.grid import case_grid
from splitunet.data.layout import BratsCase
from splitunet.data.loader import load_images
from splitunet.data.sampling import extract
from splitunet.delayed import DelayedSiteStep
from splitunet.errors import (
    ConfigurationError,
    ConflictError,
    NotFoundError,
    ProtocolError,
)
from splitunet.filters import FilterChain
from splitunet.memory import check_bound, encoder_weight_bytes, site_forward_bytes
from splitunet.networks.factory import make_optimizer, make_site_encoder
from splitunet.networks.split_unet import SiteEncoder
from splitunet.protocol import SiteStep
from splitunet.psi import PsiRequest, PsiResponse
from splitunet.schedules import set_lr
from splitunet.schemas import (
    AlignedCases,
    AlignmentAck,
    BackwardAck,
    CaseGrids,
    CheckpointInfo,
    ForwardRequest,
    GridRequest,
    Phase,
    RunInfo,
    RunSetup,
    SiteInfo,
    StepSchedule,
)
from splitunet.secure_sum import SecureSumAck, SecureSumOffer, SecureSumPeers
from splitunet.service.compute import ComputeThread
from splitunet.service.device import resolve_device
from splitunet.service.metrics import ServiceMetrics
from splitunet.wire import (
    BundleExpectation,
    BundleKind,
    BundleMeta,
    WireDtype,
    decode_bundle,
    encode_bundle,
    frame_sha256,
)

logger = logging.getLogger(__name__)

#: Runs a site keeps at once (an idle one makes room for a new run; a training one never does).
MAX_RUNS = 8


@dataclass
class SiteRun:
    """One training run at this site."""

    setup: RunSetup
    step: SiteStep
    fingerprint: str
    parameters: int
    last_applied: int | None = None
    created: float = field(default_factory=time.time)
    cohort: frozenset[str] = frozenset()
    active: float = field(default_factory=time.monotonic)
    #: serialises the run's forward/backward/checkpoint/restore bookkeeping, so an overlapping retry waits
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    #: SHA-256 of the gradient bundle of ``last_applied`` (a retry must carry the same bytes)
    applied_digest: str | None = None
    #: rebuilt from the store after a restart: training waits for a restore
    needs_restore: bool = False
    checkpoint_step: int | None = None


class SiteRuntime:
    """A site service's state: settings, cohort (its modalities only), array cache and runs.

    Args:
        settings: the site's settings.
        metrics: the service's metrics registry (step latency, tensor bytes in and out).
        filters: outbound activation filters (defenses) applied to every forward; default: ``settings.defenses``.
    """

    def __init__(
        self, settings: SiteSettings, metrics: ServiceMetrics | None = None, filters: FilterChain | None = None
    ) -> None:
        self.settings = settings
        self.device = resolve_device(settings.device)
        self.protection = SiteProtection(settings, metrics, filters)
        self.filters = self.protection.chain
        # file headers checked at start-up: missing files and disagreeing grids are reported (or skipped) now
        scan = scan_cohort(settings.data_dir, modalities=settings.modalities, on_bad_case=settings.on_bad_case)
        self.cases: dict[str, BratsCase] = dict(scan.cases)
        self.skipped_cases = len(scan.skipped)
        self.cache = ArrayCache(max_items=settings.cache_cases)
        self._runs: dict[str, SiteRun] = {}
        self._aligned: frozenset[str] = frozenset()
        self.alignment = AlignmentGuard(frozenset(self.cases))
        self.eval_budget = EvalBudget(settings.policy)
        self._lock = threading.Lock()
        #: every forward, backward, checkpoint, restore and audit score runs here (one OpenMP team; see
        #: splitunet.service.compute)
        self.compute = ComputeThread(f"site-{settings.site_id}-torch")
        self.store = RunStore(settings.state_dir)
        for stored in self.store.runs()[-MAX_RUNS:]:
            run = self._build_run(stored.setup, cohort=stored.cohort, created=stored.created)
            # a run never checkpointed never trained (the aggregator checkpoints step 0 before the first step)
            run.needs_restore, run.checkpoint_step = stored.checkpoint_step is not None, stored.checkpoint_step
            # not training (that waits for a restore): a new run may take its place when the site is full; otherwise
            # a site restarted with its table full refused every new run for SITE_RUN_IDLE_S (seen in the demo's
            # study, which restarts the sites with each configuration's defenses)
            run.active = float("-inf")
            self._runs[stored.setup.run_id] = run
        self._metrics = metrics
        self.audit = SiteAuditor(self)
        if metrics is not None:
            self._step_seconds = metrics.histogram(
                "site_step_seconds", "Seconds per forward/backward at this site", ["phase"]
            )
            self._tensor_bytes = metrics.counter(
                "site_tensor_bytes_total", "Bytes of tensor bundles sent and received", ["direction"]
            )
        logger.info(
            "site %s: %d cases with %s on %s (%d skipped)",
            settings.site_id, len(self.cases), ",".join(settings.modalities), self.device, self.skipped_cases,
        )

    # ------------------------------------------------------------------ info
    def ready(self) -> bool:
        return bool(self.cases)

    def case_ids(self) -> list[str]:
        """The site's case ids (for the private set intersection only; never sent in clear)."""
        return sorted(self.cases)

    def info(self) -> SiteInfo:
        with self._lock:
            runs = {rid: self._run_info(rid, run) for rid, run in self._runs.items()}
        return SiteInfo(
            site=self.settings.site_id,
            modalities=list(self.settings.modalities),
            version=__version__,
            device=str(self.device),
            defenses=self.protection.describe(),
            defense_stats=self.protection.stats() or None,
            runs=runs,
            model_policy=None if self.settings.model is None else self.settings.model.model_dump(mode="json"),
            policy=self.settings.policy.model_dump(mode="json"),
            leakage_gate=self.audit.gate.describe(),
            identity_key=self.audit.identity.public_key,
        )

    def _run_info(self, run_id: str, run: SiteRun) -> RunInfo:
        return RunInfo(
            run_id=run_id,
            site=self.settings.site_id,
            fingerprint=run.fingerprint,
            parameters=run.parameters,
            step=run.last_applied or 0,
            checkpoint_step=run.checkpoint_step,
            restore_required=run.needs_restore,
        )

    # ------------------------------------------------------------------ alignment
    def psi(self, request: PsiRequest, caller: str = "anonymous") -> PsiResponse:
        """Answer one private-set-intersection request with a fresh secret (see :mod:`splitunet.psi`)."""
        return self.alignment.psi(caller, request)

    def set_alignment(self, aligned: AlignedCases, caller: str = "anonymous") -> AlignmentAck:
        """The cohort of runs set up from now on: the intersection of ``caller``'s own PSI session (see
        :mod:`services.client_site.alignment`); runs already set up keep theirs."""
        cohort = self.alignment.accept(caller, aligned)
        with self._lock:
            self._aligned = cohort
        logger.info("site %s: %d aligned cases", self.settings.site_id, len(cohort))
        return AlignmentAck(aligned=len(cohort))

    def grids(self, request: GridRequest) -> CaseGrids:
        """Header grid and brain extent of aligned cases (:mod:`splitunet.data.grid`); the images get cached."""
        out = {}
        for case_id in request.case_ids:
            out[case_id] = case_grid(self._serving(case_id), self.settings.modalities, cache=self.cache)
        return CaseGrids(grids=out)

    def _serving(self, case_id: str) -> BratsCase:
        """A case this site serves: one of the aligned cohort or of a run's cohort (the same error for an unknown
        case, see :func:`~services.client_site.alignment.not_aligned`: no answer reveals whether an id exists)."""
        case = self.cases.get(case_id)
        with self._lock:  # the current alignment, or the cohort of a run (kept across a restart of the site)
            served = case_id in (self._aligned or ()) or any(case_id in r.cohort for r in self._runs.values())
        if case is None or not served:
            raise not_aligned(case_id)
        return case

    # ------------------------------------------------------------------ runs
    def setup_run(self, setup: RunSetup) -> RunInfo:
        """Build this site's encoder and optimizer for a run (idempotent for an identical setup)."""
        me = self.settings.site_id
        names = [s.name for s in setup.model.sites]
        if me not in names:
            raise ConfigurationError(f"the model has no site named {me!r} (this site); its sites are {names}")
        spec = setup.model.site(me)
        if set(spec.modalities) != set(self.settings.modalities):
            raise ConfigurationError(
                f"the model gives site {me!r} modalities {list(spec.modalities)}, but this site holds "
                f"{list(self.settings.modalities)}"
            )
        self.settings.policy.check_setup(setup.model, setup.optimizer)
        check_bound(encoder_weight_bytes(setup.model, me), self.settings.max_forward_bytes,
                    setting="SITE_MAX_FORWARD_BYTES", what="the run's encoder (weights and optimizer state)")
        if self.protection.encoder_update is not None and setup.step_schedule == StepSchedule.DELAYED:
            raise ConfigurationError(
                f"site {me} trains its encoder with DP-SGD, which needs the synchronous step schedule (the delayed "
                "one runs forwards on parameter copies that the per-sample hooks do not see); run the job with "
                "step_schedule=sync",
                detail={"rule": "dpsgd_needs_sync"},
            )
        if self.settings.model is not None and self.settings.model != setup.model:
            raise ConflictError(
                "this site only accepts its pinned model configuration (SITE_MODEL); the run asks for another",
                detail={"pinned": self.settings.model.model_dump(mode="json")},
            )
        with self._lock:
            existing = self._runs.get(setup.run_id)
            if existing is not None:
                if existing.setup != setup:
                    raise ConflictError(f"run {setup.run_id!r} already exists with a different setup")
                return self._run_info(setup.run_id, existing)
            self._make_room()
            run = self._build_run(setup, cohort=self._aligned)
            self.store.save_run(setup, run.fingerprint, run.created, cohort=run.cohort)
            self._runs[setup.run_id] = run
            self.audit.record_setup(setup)
            logger.info("run %s: encoder %s with %d parameters", setup.run_id, run.fingerprint, run.parameters)
            return self._run_info(setup.run_id, run)

    def _make_room(self) -> None:
        """Under ``self._lock``: drop the longest-idle run if the site is full; 409 if every run is training."""
        if len(self._runs) < MAX_RUNS:
            return
        now = time.monotonic()
        idle = [rid for rid, run in self._runs.items() if now - run.active > self.settings.run_idle_s]
        if not idle:
            raise ConflictError(
                f"site {self.settings.site_id} already holds {MAX_RUNS} runs that are training (a step in the last "
                f"{self.settings.run_idle_s:.0f} s); it never evicts a training run: retry when one is idle",
                detail={"runs": len(self._runs), "run_idle_s": self.settings.run_idle_s},
            )
        oldest = min(idle, key=lambda r: self._runs[r].active)
        logger.info("dropping idle run %s (more than %d runs)", oldest, MAX_RUNS)
        del self._runs[oldest]
        self.eval_budget.forget_run(oldest)
        self.protection.drop_run(oldest)
        self.store.delete_run(oldest)

    def _build_run(self, setup: RunSetup, *, cohort: frozenset[str], created: float | None = None) -> SiteRun:
        # The site's own randomness unless SITE_SEED pins it (tests, studies): never the aggregator's choice.
        # A run rebuilt after a restart gets its weights from the checkpoint it must restore first.
        seed = self.settings.seed if self.settings.seed is not None else secrets.randbelow(2**31)
        encoder = make_site_encoder(setup.model, self.settings.site_id, seed).to(self.device)
        optimizer = make_optimizer(
            encoder.parameters(), lr=setup.optimizer.lr, weight_decay=setup.optimizer.weight_decay
        )
        if self.protection.encoder_update is not None:  # DP-SGD: per-patient clip and noise on every update
            optimizer = self.protection.encoder_update.attach(encoder, optimizer)
        return SiteRun(
            setup=setup,
            step=(DelayedSiteStep if setup.step_schedule == StepSchedule.DELAYED else SiteStep)(
                encoder, optimizer, self.filters, self.protection.loss_terms),
            fingerprint=encoder.fingerprint(),
            parameters=sum(p.numel() for p in encoder.parameters()),
            created=created or time.time(),
            cohort=cohort,
        )

    def _check_restored(self, run_id: str, run: SiteRun) -> None:
        if run.needs_restore:
            raise ProtocolError(
                f"run {run_id!r} was reloaded after a restart of site {self.settings.site_id} and holds no trained "
                f"weights yet; restore a checkpointed step first (POST /v1/runs/{run_id}/restore; latest: "
                f"{run.checkpoint_step})",
                detail={"restore_required": True, "checkpoint_step": run.checkpoint_step},
            )

    def encoder(self, run_id: str) -> SiteEncoder:
        """The encoder of a run (tests, tooling); use it under ``run.step.lock`` while the run trains."""
        return self._run(run_id).step.encoder

    def release_run(self, run_id: str) -> RunInfo:
        """The aggregator is done with a run (its job ended): it becomes idle now, so a new run may take its place
        when the site is full. Nothing is deleted: its encoder, checkpoints and ledger stay until then."""
        with self._lock:
            run = self._runs.get(run_id)
            if run is None:
                raise NotFoundError(f"no run {run_id!r} at site {self.settings.site_id}")
            run.active = float("-inf")
        logger.info("run %s released by the aggregator", run_id)
        return self._run_info(run_id, run)

    def _run(self, run_id: str) -> SiteRun:
        with self._lock:
            run = self._runs.get(run_id)
        if run is None:
            raise NotFoundError(f"no run {run_id!r} at site {self.settings.site_id}; POST /v1/runs first")
        return run

    # ------------------------------------------------------------------ the step
    def forward(self, run_id: str, request: ForwardRequest) -> bytes:
        """Encode the requested samples; return the activation bundle (wire bytes). Runs on the compute thread."""
        return self.compute.call(self._forward, run_id, request)

    def _forward(self, run_id: str, request: ForwardRequest) -> bytes:
        run = self._run(run_id)
        self._check_restored(run_id, run)
        started = time.perf_counter()
        self.settings.policy.check_batch(len(request.samples))
        for sample in request.samples:
            if sample.case_id not in run.cohort:
                raise not_aligned(sample.case_id)
        self._check_size(request, run)
        self.audit.gate.before_forward(run_id, request)  # the site's own leakage gate, before anything leaves
        if request.phase == Phase.EVAL:
            self.eval_budget.charge(run_id, [s.case_id for s in request.samples])
        else:
            run.active = time.monotonic()
        batch = self._batch(request, run)
        self.audit.on_forward(run_id, run, request.step, request.phase)
        protection = {
            "groups": self.protection.patients(request),
            "sample_rate": self.protection.sample_rate(run.setup, request, len(run.cohort or self.cases)),
        }
        if request.phase == Phase.TRAIN:
            with run.lock:
                tensors = run.step.forward(batch, step=request.step, run_id=run_id, train=True, **protection)
        else:
            tensors = run.step.forward(batch, step=request.step, run_id=run_id, train=False, **protection)
        tensors = self.protection.outbound(run_id, request, tensors)
        data = encode_bundle(
            tensors,
            meta=BundleMeta(run_id=run_id, step=request.step, site=self.settings.site_id, kind=BundleKind.ACTIVATIONS),
            dtype=WireDtype(run.setup.wire.activations.value),
            compress=run.setup.wire.compress,
            max_bytes=self.settings.max_bundle_bytes,
        )
        self.audit.record_forward(run_id, request, data)
        self._observe(request.phase.value, started, sent=len(data))
        return data

    def backward(self, run_id: str, step: int, body: bytes) -> BackwardAck:
        """Apply the gradients of ``step`` (a gradient bundle) to the encoder.

        A repeated backward of the step just applied is acknowledged with ``applied=False`` (idempotent retry),
        also when it overlaps the original: the run's lock makes it wait for the original to finish. A retry with
        other gradient bytes is a :class:`ConflictError`; any other backward without its forward is a
        :class:`ProtocolError` (409). Runs on the compute thread.
        """
        return self.compute.call(self._backward_locked, run_id, step, body)

    def _backward_locked(self, run_id: str, step: int, body: bytes) -> BackwardAck:
        run = self._run(run_id)
        with run.lock:
            return self._backward(run_id, run, step, body)

    def _backward(self, run_id: str, run: SiteRun, step: int, body: bytes) -> BackwardAck:
        self._check_restored(run_id, run)
        started = time.perf_counter()
        # the frame's own SHA-256 (header 0..16 + payload), read from its header; decode_bundle verifies it
        digest = frame_sha256(body)
        pending = run.step.pending_step()
        delayed = run.setup.step_schedule == StepSchedule.DELAYED  # the next step's forward may be in flight
        if run.last_applied == step and (pending is None or (delayed and pending[1] > step)):
            if run.applied_digest not in (None, digest):
                raise ConflictError(
                    f"step {step} of run {run_id!r} was already applied with other gradients; a retry must resend "
                    "the same bundle",
                    detail={"step": step},
                )
            return BackwardAck(run_id=run_id, step=step, applied=False)
        shapes = run.step.pending_shapes(run_id, step)
        if shapes is None:
            raise ProtocolError(
                f"backward for step {step} of run {run_id!r} has no matching forward at site "
                f"{self.settings.site_id} (pending: {None if pending is None else pending[1]}); "
                "call forward for this step first",
                detail={"pending_step": None if pending is None else pending[1], "step": step},
            )
        expect = BundleExpectation(
            shapes=shapes,
            dtype=WireDtype(run.setup.wire.gradients.value),
            run_id=run_id,
            step=step,
            site=self.settings.site_id,
            kind=BundleKind.GRADIENTS,
        )
        bundle = decode_bundle(body, expect=expect, max_bytes=self.settings.max_bundle_bytes)
        grads = {k: v.to(self.device) for k, v in bundle.tensors.items()}
        set_lr(run.step.optimizer, run.setup.optimizer.lr_at(step))
        run.step.backward(grads, step=step, run_id=run_id)
        self.audit.record_backward(run_id, step, body)
        run.last_applied, run.applied_digest = step, digest
        run.active = time.monotonic()
        self._observe("backward", started, received=len(body))
        return BackwardAck(run_id=run_id, step=step, applied=True, defenses=self.protection.stats() or None)

    # ------------------------------------------------------------------ secure sum (see splitunet.secure_sum)
    def secure_sum_offer(self, run_id: str) -> SecureSumOffer:
        return self.protection.secure_sum_offer(run_id, self._run(run_id).setup)

    def secure_sum_establish(self, run_id: str, peers: SecureSumPeers) -> SecureSumAck:
        return self.protection.secure_sum_establish(run_id, peers, self._run(run_id).setup)

    def _check_size(self, request: ForwardRequest, run: SiteRun) -> None:
        """Refuse a forward whose geometry does not fit the run's model, or whose size passes
        ``SITE_MAX_FORWARD_BYTES`` (:mod:`splitunet.memory`) or ``SITE_MAX_BATCH_VOXELS``: before any budget is
        charged or image loaded."""
        model = run.setup.model
        first = request.samples[0]  # the request's samples share one geometry (ForwardRequest checks it)
        if first.spatial_dims != model.spatial_dims:
            raise ConfigurationError(
                f"run {run.setup.run_id!r} has a {model.spatial_dims}D model; got {first.spatial_dims}D samples",
                detail={"spatial_dims": model.spatial_dims, "size": list(first.size)},
            )
        try:
            model.check_roi(first.output_size)
        except ValueError as exc:
            raise ConfigurationError(f"samples of size {list(first.output_size)} do not fit the run's model: {exc}",
                                     detail={"size": list(first.output_size)}) from None
        voxels = len(request.samples) * int(np.prod(first.output_size))
        train = request.phase == Phase.TRAIN
        needed = site_forward_bytes(model, voxels, train=train) + encoder_weight_bytes(model, self.settings.site_id)
        check_bound(needed, self.settings.max_forward_bytes, setting="SITE_MAX_FORWARD_BYTES",
                    what=f"a {request.phase.value} forward of {len(request.samples)} samples of "
                         f"{list(first.output_size)}", voxels=voxels)
        if voxels > self.settings.max_batch_voxels:
            raise ConfigurationError(
                f"the forward asks for {voxels} voxels ({len(request.samples)} samples of {list(first.output_size)}); "
                f"this site accepts at most {self.settings.max_batch_voxels} (SITE_MAX_BATCH_VOXELS): send smaller "
                "batches",
                detail={"voxels": voxels, "limit": self.settings.max_batch_voxels},
            )

    def _batch(self, request: ForwardRequest, run: SiteRun) -> torch.Tensor:
        """Stack the samples' crops: ``B, C_site, *size`` float32 on the run's device (after :meth:`_check_size`)."""
        spec = run.setup.model.site(self.settings.site_id)
        arrays = []
        for sample in request.samples:
            case = self.cases.get(sample.case_id)
            if case is None or sample.case_id not in run.cohort:
                raise not_aligned(sample.case_id)
            images = load_images(case, spec.modalities, cache=self.cache)
            arrays.append(extract(images.array, sample))
        return torch.from_numpy(np.stack(arrays)).to(self.device, torch.float32)

    def _observe(self, phase: str, started: float, *, sent: int = 0, received: int = 0) -> None:
        if self._metrics is None:
            return
        self._step_seconds.labels(phase=phase).observe(time.perf_counter() - started)
        if sent:
            self._tensor_bytes.labels(direction="out").inc(sent)
        if received:
            self._tensor_bytes.labels(direction="in").inc(received)

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint_path(self, run_id: str, step: int) -> Path:
        return self.settings.state_dir / run_id / f"site-{self.settings.site_id}-step-{step:08d}.safetensors"

    def checkpoint(self, run_id: str, step: int) -> CheckpointInfo:
        """Save encoder + optimizer of a run after the backward of ``step``: the step the run holds, or 409. Runs on
        the compute thread."""
        return self.compute.call(self._checkpoint, run_id, step)

    def _checkpoint(self, run_id: str, step: int) -> CheckpointInfo:
        run = self._run(run_id)
        path = self._checkpoint_path(run_id, step)
        check_disk_budget(self.settings.state_dir, run.parameters, self.settings.checkpoint_budget_bytes,
                          setting="SITE_CHECKPOINT_BUDGET_BYTES")
        with run.lock:
            self._check_restored(run_id, run)
            held = run.last_applied or 0
            if step != held:
                raise ProtocolError(
                    f"run {run_id!r} at site {self.settings.site_id} holds step {held}, not {step}; checkpoint a step "
                    "after its backward",
                    detail={"held_step": held, "step": step},
                )
            with run.step.lock:
                digest = save_checkpoint(
                    path, run.step.encoder, run.step.optimizer,
                    {"run_id": run_id, "step": step, "site": self.settings.site_id},
                    fingerprint=run.fingerprint,
                )
            self.store.record_checkpoint(run_id, step, path, digest)
            self.audit.record_checkpoint(run_id, step)
            run.checkpoint_step = step
        return CheckpointInfo(run_id=run_id, step=step, path=path.name, sha256=digest)

    def restore(self, run_id: str, step: int) -> CheckpointInfo:
        """Load encoder + optimizer of a run from the checkpoint at ``step``, verified before anything is loaded.

        Raises:
            NotFoundError: no checkpoint of this run at ``step``.
            DataError: the checkpoint is empty, truncated or corrupt (the run is left as it was).
            ConflictError: it was written by another architecture or for another run or step.

        Runs on the compute thread.
        """
        return self.compute.call(self._restore, run_id, step)

    def _restore(self, run_id: str, step: int) -> CheckpointInfo:
        run = self._run(run_id)
        path = self._checkpoint_path(run_id, step)
        if not path.is_file():
            raise NotFoundError(f"site {self.settings.site_id} has no checkpoint of run {run_id!r} at step {step}")
        with run.lock:
            checkpoint = read_checkpoint(path, fingerprint=run.fingerprint, module=run.step.encoder)
            if checkpoint.meta.get("run_id") != run_id or checkpoint.step != step:
                raise ConflictError(
                    f"{path.name} holds run {checkpoint.meta.get('run_id')!r} step {checkpoint.step}, not run "
                    f"{run_id!r} step {step}",
                    detail={"path": path.name},
                )
            with run.step.lock:
                apply_checkpoint(checkpoint, run.step.encoder, run.step.optimizer)
            run.step.discard_pending()
            run.last_applied, run.applied_digest = step, None
            run.needs_restore, run.active = False, time.monotonic()
        logger.info("run %s restored to step %d at site %s", run_id, step, self.settings.site_id)
        return CheckpointInfo(run_id=run_id, step=step, path=path.name, sha256=checkpoint.sha256)


@contextmanager
def site_runtime(settings: SiteSettings, metrics: ServiceMetrics | None = None) -> Iterator[SiteRuntime]:
    """Build the runtime at startup (the app's lifespan); nothing to release at shutdown but the cache."""
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    runtime = SiteRuntime(settings, metrics)
    try:
        yield runtime
    finally:
        runtime.audit.close()
        runtime.compute.close()
        runtime.cache.clear()
        runtime.store.close()
