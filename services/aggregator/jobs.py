"""The aggregator's job manager: one training job at a time, run in a background thread.

One job at a time is a deliberate limit: the aggregator's decoder, its GPU/CPU and the sites' encoders serve one
federation run; a second ``POST /v1/jobs`` while one runs gets 409. Finished jobs stay listed (and usable for
inference) until the service restarts.
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
from services.aggregator.settings import AggregatorSettings
from services.aggregator.site_client import SiteClient
from services.aggregator.trainer import Aligner, TrainingJob
from splitunet.data.loader import regions_to_labels, save_segmentation
from splitunet.errors import ConflictError, NotFoundError
from splitunet.federation import FederationSpec, InferRequest, JobCreated, JobStatus
from splitunet.recorder import Recorder

logger = logging.getLogger(__name__)


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
        self._lock = threading.Lock()

    def create(self, spec: FederationSpec) -> JobCreated:
        """Start a job in the background; 409 while another one runs."""
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
            clients = {peer.name: self.client_factory(peer, spec) for peer in spec.sites}
            gate = self.gate_factory(job_id, spec) if self.gate_factory else None
            job = TrainingJob(
                job_id, spec, labels=self.labels, clients=clients, aligner=self.aligner, device=self.device,
                state_dir=self.settings.state_dir,
                recorder=self.recorder_factory(job_id) if self.recorder_factory else None,
                max_workers=self.settings.concurrency, privacy_gate=gate,
            )
            thread = threading.Thread(target=job.run, name=f"job-{job_id}", daemon=True)
            self._jobs[job_id] = job
            self._threads[job_id] = thread
            thread.start()
            logger.info("job %s started: %d sites, %d steps", job_id, len(spec.sites), spec.steps)
            return JobCreated(job_id=job_id, state=job.status().state)

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

    def resume(self, job_id: str) -> JobStatus:
        """Resume a job paused by the privacy gate (409 otherwise)."""
        job = self.get(job_id)
        job.pause.resume()
        return job.status()

    def infer(self, request: InferRequest) -> tuple[bytes, str]:
        """Segment an aligned case with a job's model; return NIfTI (.nii.gz) bytes and a file name.

        The segmentation is in BraTS labels (0/1/2 and 4, or 3 for BraTS 2023 data) on the case's original grid
        and affine.
        """
        job = self.get(request.job_id) if request.job_id else self._latest()
        case = self.labels.case(request.case_id)
        probs = job.predict_case(request.case_id)
        label_map = regions_to_labels(probs, case.et_label)
        out = Path(self.settings.state_dir) / job.job_id / "inference" / f"{request.case_id}_pred.nii.gz"
        save_segmentation(label_map, case, out)
        tumour = int(np.count_nonzero(label_map))
        logger.info("job %s: inferred %s (%d tumour voxels)", job.job_id, request.case_id, tumour)
        return out.read_bytes(), out.name

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
            job.stop()
        for thread in threads:
            thread.join(timeout=30)
        for job in jobs:
            job.close()
