"""The aggregator's job manager: one training job at a time, run in a background thread.

One job at a time is a deliberate limit: the aggregator's decoder, its GPU/CPU and the sites' encoders serve one
federation run; a second ``POST /v1/jobs`` while one runs gets 409. Finished jobs stay listed (status and
metrics); only the most recent finished job keeps its model, threads and site clients (for ``/v1/infer``): when a
job finishes, every older one releases them and drops its references to them (decoder, clients, pool, grids,
recorder), so what a finished job keeps is its status.

Jobs are recorded in ``state_dir/jobs.sqlite`` (:mod:`services.aggregator.store`): at start-up the manager lists
the recorded jobs again and resumes each unfinished one from the latest step every party checkpointed;
``POST /v1/jobs/{id}/resume`` does the same for a failed or stopped job.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from services.aggregator.labels import LabelStore
from services.aggregator.privacy_gate import PrivacyGate
from services.aggregator.recovery import RecoveryPolicy
from services.aggregator.settings import AggregatorSettings
from services.aggregator.site_client import SiteClient
from services.aggregator.store import JobStore, spec_document
from services.aggregator.trainer import Aligner, TrainingJob
from splitunet.config import SiteSpec
from splitunet.data.loader import regions_to_labels, save_segmentation, write_segmentation
from splitunet.errors import ConflictError, NotFoundError, SplitUNetError
from splitunet.federation import FederationSpec, InferRequest, JobCreated, JobState, JobStatus, ValidateRequest
from splitunet.memory import aggregator_step_bytes, check_bound
from splitunet.recorder import Recorder

logger = logging.getLogger(__name__)

FINAL_STATES = (JobState.SUCCEEDED, JobState.FAILED, JobState.STOPPED)


class JobManager:
    """Creates, lists, stops jobs and runs inference with a job's model.

    Args:
        settings: the aggregator's settings.
        labels: its segmentations.
        aligner: the alignment protocol (PSI) used by every job.
        client_factory: builds the :class:`SiteClient` of one peer (tests inject in-process transports).
        recorder_factory: builds the recorder of a job (default: none).
        gate_factory: builds the privacy gate of a job (default: none).
        device: torch device of the decoder.
    """

    def __init__(
        self,
        settings: AggregatorSettings,
        labels: LabelStore,
        *,
        aligner: Aligner,
        client_factory: Callable[..., SiteClient],
        recorder_factory: Callable[[str], Recorder] | None = None,
        gate_factory: Callable[[str, FederationSpec], PrivacyGate | None] | None = None,
        device: torch.device,
    ) -> None:
        self.settings = settings
        self.labels = labels
        self.aligner = aligner
        self.client_factory = client_factory
        self.recorder_factory = recorder_factory
        self.gate_factory = gate_factory
        self.device = device
        self._jobs: dict[str, TrainingJob] = {}
        self._threads: dict[str, threading.Thread] = {}
        self._released: set[str] = set()
        self._lock = threading.Lock()
        self.policy = RecoveryPolicy(site_wait_s=settings.site_wait_s, backoff_s=min(0.5, settings.site_retry_max_s),
                                     backoff_max_s=settings.site_retry_max_s, max_recoveries=settings.max_recoveries)
        self.store = JobStore(settings.state_dir)
        for stored in self.store.jobs():
            try:
                spec = FederationSpec.model_validate(stored.spec)
                if stored.status.state in FINAL_STATES or stored.status.state == JobState.PAUSED_BY_PRIVACY_GATE:
                    # a job the privacy gate paused stays paused across a restart: only an operator's
                    # POST /v1/jobs/{id}/resume continues it (from its latest complete checkpoint)
                    self._jobs[stored.job_id] = self._job(stored.job_id, spec, previous=stored.status)
                else:
                    logger.info("job %s was %s when the aggregator stopped; resuming it", stored.job_id,
                                stored.status.state.value)
                    self._start(self._job(stored.job_id, spec, resume_from=stored.checkpoint_steps,
                                          previous=stored.status))
            except (SplitUNetError, ValueError) as exc:  # e.g. a site since removed from the registry
                logger.error("recorded job %s cannot be reloaded: %s", stored.job_id, exc)
        self.release_finished()  # reloaded finished jobs have no model: they keep only their status

    def create(self, spec: FederationSpec) -> JobCreated:
        """Start a job in the background; 409 while another one runs, 413 when its step would pass the memory
        bound (``AGG_MAX_STEP_BYTES``; checked before anything is built)."""
        self.check_memory(spec)
        with self._lock:
            running = [j for j in self._jobs.values() if not j.finished]
            if running:
                raise ConflictError(
                    f"job {running[0].job_id} is still running; one job at a time per aggregator "
                    "(stop it with POST /v1/jobs/{id}/stop)",
                    detail={"running": running[0].job_id},
                )
            job_id = spec.run_id or f"job-{uuid.uuid4().hex[:12]}"
            if job_id in self._jobs:
                raise ConflictError(f"a job {job_id!r} already exists; choose another run_id")
            job = self._job(job_id, spec)
            self.store.create(job_id, spec_document(spec), job.status())
            self._start(job)
            logger.info("job %s started: %d sites, %d steps", job_id, len(spec.sites), spec.steps)
            return JobCreated(job_id=job_id, state=job.status().state)

    def check_memory(self, spec: FederationSpec) -> None:
        """Refuse a spec whose training step (``batch_size`` samples of ``roi``) or decoder would allocate more
        than ``AGG_MAX_STEP_BYTES`` (:mod:`splitunet.memory`); the sites' modalities do not change the figure."""
        placeholder = tuple(SiteSpec(name=f"s{i}", modalities=("t1",)) for i in range(len(spec.sites)))
        config = spec.model.build(placeholder)
        voxels = spec.batch_size * int(np.prod(spec.roi))
        check_bound(aggregator_step_bytes(config, voxels), self.settings.max_step_bytes,
                    setting="AGG_MAX_STEP_BYTES", voxels=voxels,
                    what=f"a step of {spec.batch_size} samples of {list(spec.roi)} with features "
                         f"{list(spec.model.features)}")

    def _job(self, job_id: str, spec: FederationSpec, **resume) -> TrainingJob:
        clients: dict[str, SiteClient] = {}
        try:
            for name in spec.sites:  # registry names only: the factory resolves URL and credential
                clients[name] = self.client_factory(name, spec)
        except Exception:
            for client in clients.values():
                client.close()
            raise
        return TrainingJob(
            job_id, spec, labels=self.labels, clients=clients, aligner=self.aligner, device=self.device,
            state_dir=self.settings.state_dir,
            recorder=self.recorder_factory(job_id) if self.recorder_factory else None,
            max_workers=self.settings.concurrency, checkpoint_budget_bytes=self.settings.checkpoint_budget_bytes,
            store=self.store, policy=self.policy,
            privacy_gate=self.gate_factory(job_id, spec) if self.gate_factory else None, **resume,
        )

    def _start(self, job: TrainingJob) -> None:
        thread = threading.Thread(target=self._run, args=(job,), name=f"job-{job.job_id}", daemon=True)
        self._jobs[job.job_id] = job
        self._threads[job.job_id] = thread
        self._released.discard(job.job_id)
        thread.start()

    def _run(self, job: TrainingJob) -> None:
        """A job thread: run the job, then release every older finished job (this one serves inference)."""
        try:
            job.run()
        finally:
            self.release_finished(keep=job.job_id)

    def release_finished(self, keep: str | None = None) -> list[str]:
        """Release the threads, site clients and model of every finished job but ``keep``; return their ids."""
        with self._lock:
            done = [j for jid, j in self._jobs.items() if jid != keep and jid not in self._released and j.finished]
            self._released.update(j.job_id for j in done)
            for job in done:
                self._threads.pop(job.job_id, None)
        for job in done:
            job.release_site_runs()
            job.close()
            job.drop_resources()  # the decoder, its optimizer state, site clients, pool; status and metrics stay
            logger.info("job %s: released its threads, site clients and model", job.job_id)
        return [j.job_id for j in done]

    def resume(self, job_id: str) -> JobStatus:
        """``POST /v1/jobs/{id}/resume``: a job paused by the privacy gate continues where it paused
        (:meth:`_continue_paused`); a failed or stopped one restarts from the latest step every party checkpointed
        (:meth:`_restart`)."""
        job = self.get(job_id)
        with self._lock:
            thread = self._threads.get(job_id)
        if job.status().state == JobState.PAUSED_BY_PRIVACY_GATE and thread is not None and thread.is_alive():
            return self._continue_paused(job)
        return self._restart(job_id)

    def _continue_paused(self, job: TrainingJob) -> JobStatus:
        """Let a job paused by the privacy gate continue (e.g. after its sites strengthened their defenses)."""
        job.pause.resume()
        logger.info("job %s: continued after the privacy gate by request", job.job_id)
        return job.status()

    def _restart(self, job_id: str) -> JobStatus:
        """Restart a failed or stopped job from the latest step every party checkpointed (a fault outlasted the
        job's patience, or an operator stopped it), or a job the privacy gate paused before the aggregator
        restarted; 409 while it or another job runs, or once it succeeded."""
        job = self.get(job_id)
        with self._lock:
            idle_paused = job.status().state == JobState.PAUSED_BY_PRIVACY_GATE and not (
                (thread := self._threads.get(job_id)) is not None and thread.is_alive())
            running = [j for j in self._jobs.values() if not j.finished and not (j is job and idle_paused)]
            if running:
                raise ConflictError(
                    f"job {running[0].job_id} is {running[0].status().state.value}; only a failed or stopped job "
                    "can be resumed", detail={"running": running[0].job_id},
                )
            if job.status().state == JobState.SUCCEEDED:
                raise ConflictError(f"job {job_id} has succeeded; there is nothing to resume")
            steps = self.store.checkpoint_steps(job_id)
            if not steps:
                raise ConflictError(f"job {job_id} has no step that every party checkpointed; start a new job")
            old = self._jobs[job_id]
            self._start(self._job(job_id, job.spec, resume_from=steps, previous=job.status()))
        old.close()
        logger.info("job %s resumed by request from step %d", job_id, steps[-1])
        return self._jobs[job_id].status()

    def get(self, job_id: str) -> TrainingJob:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise NotFoundError(f"no job {job_id!r}; GET /v1/jobs lists the jobs")
        return job

    def status(self, job_id: str) -> JobStatus:
        return self.get(job_id).status()

    def list(self) -> list[JobStatus]:
        with self._lock:
            jobs = list(self._jobs.values())
        return [j.status() for j in jobs]

    def stop(self, job_id: str) -> JobStatus:
        job = self.get(job_id)
        job.stop()
        return job.status()

    def infer(self, request: InferRequest) -> tuple[bytes, str, list[str]]:
        """Segment an aligned case with a job's model; return NIfTI (.nii.gz) bytes, a file name and the sites used
        (``request.sites`` or all, less any that did not answer in time).

        The segmentation is in BraTS labels (0/1/2 and 4, or 3 for BraTS 2023 data) on the case's original grid
        and affine. A case without a label file (aligned through the job's ``infer_cases``) gets the grid, the
        qform/sform codes and the layout the sites report for it.
        """
        job = self.get(request.job_id) if request.job_id else self._latest()
        if job.job_id in self._released:
            raise ConflictError(
                f"job {job.job_id!r} finished before the latest one and released its model; only the most recent "
                "finished job serves inference (run the job again, or restore its checkpoint in a new job)"
            )
        used: list[str] = []
        probs, grid = job.predict_case(request.case_id, request.sites, used=used)
        out = Path(self.settings.state_dir) / job.job_id / "inference" / f"{request.case_id}_pred.nii.gz"
        case = self.labels.cases.get(request.case_id)
        if case is not None:
            label_map = regions_to_labels(probs, case.et_label)
            save_segmentation(label_map, case, out)
        else:
            label_map = regions_to_labels(probs, grid.layout.et_label)
            write_segmentation(label_map, grid.geometry(), out, qform_code=grid.qform_code,
                               sform_code=grid.sform_code, source=f"the sites' grid of {request.case_id}")
        tumour = int(np.count_nonzero(label_map))
        logger.info("job %s: inferred %s with sites %s (%d tumour voxels)", job.job_id, request.case_id, used, tumour)
        return out.read_bytes(), out.name, used

    def validate(self, job_id: str, request: ValidateRequest) -> dict:
        """Validate a job's model on its validation cases through ``request.sites`` (default all); not recorded in
        the job's status. The result names the sites used."""
        job = self.get(job_id)
        if job.aggregator is None:
            raise ConflictError(f"job {job_id!r} has no model yet; validate once it is training")
        return job.validate(job.status().step, request.sites or list(job.clients), record=False)

    def _latest(self) -> TrainingJob:
        with self._lock:
            jobs = [j for j in self._jobs.values() if j.aggregator is not None]
        if not jobs:
            raise NotFoundError("no job has a model yet; train one with POST /v1/jobs")
        return jobs[-1]

    def close(self) -> None:
        """Stop running jobs and wait briefly for their threads (service shutdown)."""
        with self._lock:
            jobs, threads = list(self._jobs.values()), list(self._threads.values())
        for job in jobs:
            job.interrupt()  # unfinished jobs stay recorded as they were: the next start resumes them
        for thread in threads:
            thread.join(timeout=30)
        for job in jobs:
            if job.job_id not in self._released:
                job.close()
        self.store.close()
