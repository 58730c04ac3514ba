"""The site's runtime: its cohort, and per run its encoder, optimizer and pending step.

Everything the routes do is one method here. Torch work is called from plain ``def`` routes (FastAPI's thread
pool) and serialised per run by the run's lock (the :class:`~splitunet.protocol.SiteStep` lock).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from services.client_site.audit import SiteAuditor
from services.client_site.settings import SiteSettings
from splitunet import __version__
from splitunet.checkpoint import load_checkpoint, save_checkpoint
from splitunet.data.cache import ArrayCache
from splitunet.data.cohort import scan_cohort
from splitunet.data.layout import BratsCase
from splitunet.data.loader import load_images
from splitunet.data.sampling import extract
from splitunet.errors import (
    CaseNotFoundError,
    ConfigurationError,
    ConflictError,
    NotAlignedError,
    NotFoundError,
    ProtocolError,
)
from splitunet.filters import FilterChain
from splitunet.networks.factory import make_optimizer, make_site_encoder
from splitunet.networks.split_unet import SiteEncoder
from splitunet.protocol import SiteStep
from splitunet.psi import PsiRequest, PsiResponse, PsiServer
from splitunet.schemas import (
    AlignedCases,
    AlignmentAck,
    BackwardAck,
    CheckpointInfo,
    ForwardRequest,
    Phase,
    RunInfo,
    RunSetup,
    SiteInfo,
)
from splitunet.service.device import resolve_device
from splitunet.service.metrics import ServiceMetrics
from splitunet.wire import BundleExpectation, BundleKind, BundleMeta, WireDtype, decode_bundle, encode_bundle

logger = logging.getLogger(__name__)

#: Runs a site keeps at once (oldest dropped first).
MAX_RUNS = 8


@dataclass
class SiteRun:
    """One training run at this site."""

    setup: RunSetup
    step: SiteStep
    fingerprint: str
    parameters: int
    last_forward: tuple[int, dict[str, tuple[int, ...]]] | None = None
    last_applied: int | None = None
    created: float = field(default_factory=time.time)


class SiteRuntime:
    """A site service's state: settings, cohort (its modalities only), array cache and runs.

    Args:
        settings: the site's settings.
        metrics: the service's metrics registry (step latency, tensor bytes in and out).
        filters: outbound activation filters (defenses) applied to every forward; none by default.
    """

    def __init__(
        self, settings: SiteSettings, metrics: ServiceMetrics | None = None, filters: FilterChain | None = None
    ) -> None:
        self.settings = settings
        self.device = resolve_device(settings.device)
        self.filters = filters or FilterChain()
        # file headers checked at start-up: missing files and disagreeing grids are reported (or skipped) now
        scan = scan_cohort(settings.data_dir, modalities=settings.modalities, on_bad_case=settings.on_bad_case)
        self.cases: dict[str, BratsCase] = dict(scan.cases)
        self.skipped_cases = len(scan.skipped)
        self.cache = ArrayCache(max_items=settings.cache_cases)
        self._runs: dict[str, SiteRun] = {}
        self._aligned: frozenset[str] | None = None
        self._lock = threading.Lock()
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
            defenses=self.filters.describe(),
            runs=runs,
            model_policy=None if self.settings.model is None else self.settings.model.model_dump(mode="json"),
        )

    def _run_info(self, run_id: str, run: SiteRun) -> RunInfo:
        return RunInfo(
            run_id=run_id,
            site=self.settings.site_id,
            fingerprint=run.fingerprint,
            parameters=run.parameters,
            step=run.last_applied or 0,
        )

    # ------------------------------------------------------------------ alignment
    def psi(self, request: PsiRequest) -> PsiResponse:
        """Answer one private-set-intersection request with a fresh secret (see :mod:`splitunet.psi`)."""
        return PsiServer(self.case_ids()).respond(request)

    def set_alignment(self, aligned: AlignedCases) -> AlignmentAck:
        """Restrict this site to the aligned cohort; every id must be one of its own cases."""
        unknown = sorted(set(aligned.case_ids) - set(self.cases))
        if unknown:
            raise CaseNotFoundError(
                f"{len(unknown)} aligned case(s) are not at site {self.settings.site_id}; re-run the alignment",
                detail={"unknown": len(unknown)},
            )
        with self._lock:
            self._aligned = frozenset(aligned.case_ids)
        logger.info("site %s: %d aligned cases", self.settings.site_id, len(aligned.case_ids))
        return AlignmentAck(aligned=len(aligned.case_ids))

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
            encoder = make_site_encoder(setup.model, me, setup.seed).to(self.device)
            optimizer = make_optimizer(
                encoder.parameters(), lr=setup.optimizer.lr, weight_decay=setup.optimizer.weight_decay
            )
            run = SiteRun(
                setup=setup,
                step=SiteStep(encoder, optimizer, self.filters),
                fingerprint=encoder.fingerprint(),
                parameters=sum(p.numel() for p in encoder.parameters()),
            )
            if len(self._runs) >= MAX_RUNS:
                oldest = min(self._runs, key=lambda r: self._runs[r].created)
                logger.info("dropping run %s (more than %d runs)", oldest, MAX_RUNS)
                del self._runs[oldest]
            self._runs[setup.run_id] = run
            logger.info("run %s: encoder %s with %d parameters", setup.run_id, run.fingerprint, run.parameters)
            return self._run_info(setup.run_id, run)

    def encoder(self, run_id: str) -> SiteEncoder:
        """The encoder of a run (tests, tooling); use it under ``run.step.lock`` while the run trains."""
        return self._run(run_id).step.encoder

    def _run(self, run_id: str) -> SiteRun:
        with self._lock:
            run = self._runs.get(run_id)
        if run is None:
            raise NotFoundError(f"no run {run_id!r} at site {self.settings.site_id}; POST /v1/runs first")
        return run

    # ------------------------------------------------------------------ the step
    def forward(self, run_id: str, request: ForwardRequest) -> bytes:
        """Encode the requested samples; return the activation bundle (wire bytes)."""
        run = self._run(run_id)
        started = time.perf_counter()
        batch = self._batch(request, run)
        self.audit.on_forward(run_id, run, request.step, request.phase)
        tensors = run.step.forward(
            batch, step=request.step, run_id=run_id, train=request.phase == Phase.TRAIN
        )
        if request.phase == Phase.TRAIN:
            run.last_forward = (request.step, {k: tuple(v.shape) for k, v in tensors.items()})
        data = encode_bundle(
            tensors,
            meta=BundleMeta(run_id=run_id, step=request.step, site=self.settings.site_id, kind=BundleKind.ACTIVATIONS),
            dtype=WireDtype(run.setup.wire.activations.value),
            compress=run.setup.wire.compress,
            max_bytes=self.settings.max_bundle_bytes,
        )
        self._observe(request.phase.value, started, sent=len(data))
        return data

    def backward(self, run_id: str, step: int, body: bytes) -> BackwardAck:
        """Apply the gradients of ``step`` (a gradient bundle) to the encoder.

        A repeated backward of the step just applied is acknowledged with ``applied=False`` (idempotent retry);
        any other backward without its forward is a :class:`ProtocolError` (409).
        """
        run = self._run(run_id)
        started = time.perf_counter()
        pending = run.step.pending_step()
        if pending is None and run.last_applied == step:
            return BackwardAck(run_id=run_id, step=step, applied=False)
        if pending != (run_id, step) or run.last_forward is None or run.last_forward[0] != step:
            raise ProtocolError(
                f"backward for step {step} of run {run_id!r} has no matching forward at site "
                f"{self.settings.site_id} (pending: {None if pending is None else pending[1]}); "
                "call forward for this step first",
                detail={"pending_step": None if pending is None else pending[1], "step": step},
            )
        expect = BundleExpectation(
            shapes=run.last_forward[1],
            dtype=WireDtype(run.setup.wire.gradients.value),
            run_id=run_id,
            step=step,
            site=self.settings.site_id,
            kind=BundleKind.GRADIENTS,
        )
        bundle = decode_bundle(body, expect=expect, max_bytes=self.settings.max_bundle_bytes)
        grads = {k: v.to(self.device) for k, v in bundle.tensors.items()}
        run.step.backward(grads, step=step, run_id=run_id)
        run.last_applied = step
        self._observe("backward", started, received=len(body))
        return BackwardAck(run_id=run_id, step=step, applied=True)

    def _batch(self, request: ForwardRequest, run: SiteRun) -> torch.Tensor:
        """Stack the samples' crops: ``B, C_site, *size`` float32 on the run's device."""
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
        if voxels > self.settings.max_batch_voxels:
            raise ConfigurationError(
                f"the forward asks for {voxels} voxels ({len(request.samples)} samples of {list(first.output_size)}); "
                f"this site accepts at most {self.settings.max_batch_voxels} (SITE_MAX_BATCH_VOXELS): send smaller "
                "batches",
                detail={"voxels": voxels, "limit": self.settings.max_batch_voxels},
            )
        spec = model.site(self.settings.site_id)
        arrays = []
        for sample in request.samples:
            case = self.cases.get(sample.case_id)
            if self._aligned is not None and sample.case_id not in self._aligned:
                raise NotAlignedError(
                    f"case {sample.case_id!r} is not in the aligned cohort of site {self.settings.site_id}",
                    detail={"case_id": sample.case_id},
                )
            if case is None:
                raise CaseNotFoundError(
                    f"site {self.settings.site_id} has no case {sample.case_id!r}", detail={"case_id": sample.case_id}
                )
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
        """Save encoder + optimizer of a run (after the backward of ``step``)."""
        run = self._run(run_id)
        path = self._checkpoint_path(run_id, step)
        with run.step.lock:
            digest = save_checkpoint(
                path, run.step.encoder, run.step.optimizer,
                {"run_id": run_id, "step": step, "site": self.settings.site_id, "fingerprint": run.fingerprint},
            )
        return CheckpointInfo(run_id=run_id, step=step, path=str(path), sha256=digest)

    def restore(self, run_id: str, step: int) -> CheckpointInfo:
        """Load encoder + optimizer of a run from the checkpoint at ``step`` (the run must be set up)."""
        run = self._run(run_id)
        path = self._checkpoint_path(run_id, step)
        if not path.is_file():
            raise NotFoundError(f"site {self.settings.site_id} has no checkpoint of run {run_id!r} at step {step}")
        with run.step.lock:
            meta = load_checkpoint(path, run.step.encoder, run.step.optimizer)
        if meta.get("fingerprint") != run.fingerprint:
            raise ConflictError("the checkpoint was written by an encoder of another architecture")
        run.last_applied, run.last_forward = step, None
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        return CheckpointInfo(run_id=run_id, step=step, path=str(path), sha256=digest)


@contextmanager
def site_runtime(settings: SiteSettings, metrics: ServiceMetrics | None = None) -> Iterator[SiteRuntime]:
    """Build the runtime at startup (the app's lifespan); nothing to release at shutdown but the cache."""
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    runtime = SiteRuntime(settings, metrics)
    try:
        yield runtime
    finally:
        runtime.cache.clear()
