"""The aggregator's training step in two halves, and the schedules that order them.

A step is **launched** (plan the samples, cut the labels, ask every site for its forward, concurrently) and then
**finished** (collect and check the activations, record them, run the decoder step, send every site its gradients,
concurrently). The synchronous schedule finishes each step before it launches the next. The one-step-delayed
schedule (``step_schedule = delayed``, see :mod:`splitunet.delayed` for what the sites compute) launches step
``t + 1`` as soon as step ``t``'s activations are in, so the sites encode ``t + 1`` while the aggregator runs its
decoder and sends ``t``'s gradients::

    sync:     plan F_t  [wait]  decoder_t  B_t | plan F_{t+1}  [wait]  decoder_{t+1}  B_{t+1} | ...
    delayed:  plan F_t  [wait]  plan F_{t+1}  decoder_t  [wait F_{t+1}]  B_t | plan F_{t+2}  decoder_{t+1}  ...

The pipeline is drained (no forward in flight) at every step that validates, checkpoints or runs the privacy
gate, at the last step, and before an error leaves the loop (a roll-back then restores every party). The
transcript sees the same records in the same order under both schedules: a step's plan is recorded when its
activations are collected, after the previous step's gradients.

Under the delayed schedule the gradients of ``t`` leave only once every site answered the forward of ``t + 1``:
each site then computes ``t + 1`` on the weights from before ``t``'s update, whatever the timing, so a run is
reproducible and a roll-back replays it exactly (see :mod:`splitunet.delayed`). The forward usually answers while
the decoder runs, so this wait is short.

**Threads.** The pool's threads only move bytes (the HTTP calls); the job's own thread decodes the activations and
encodes the gradients. Torch work in a pool thread would start an OpenMP team in that thread, and once a process
holds more OpenMP threads than cores, libgomp stops spinning between parallel regions and every region waits for
its workers to wake. Measured on 2 cores with the bench's 2D cut-0 step in process (2 torch threads): 0.26 s per
step in a thread that is the process's only OpenMP team, 0.33 s in one that is not (the decoder step 0.14 vs
0.19 s), which is what the aggregator phase over HTTP lost against the in-process reference before this split.

``step_times`` per step: ``plan`` (sampling and labels of the step launched during it), ``forward`` (waiting for
activations: all of the forward calls when synchronous; when delayed, only what the overlap did not hide, for
this step and the one launched ahead), ``aggregator`` (decoder step) and ``backward`` (gradient sends);
``total`` is the step's wall time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Executor, Future, wait
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from services.aggregator.site_client import Received
from splitunet.data.sampling import Sample
from splitunet.recorder import Flow
from splitunet.schedules import set_lr
from splitunet.schemas import Phase
from splitunet.wire import WireDtype, frame_sha256

if TYPE_CHECKING:
    from services.aggregator.trainer import TrainingJob


@dataclass
class Launched:
    """A step whose forwards were asked for: its samples, labels (``B, 3, *roi``) and the sites' replies."""

    step: int
    samples: list[Sample]
    labels: torch.Tensor
    futures: dict[str, Future[bytes]]
    plan_s: float
    shapes: dict[str, tuple[int, ...]]
    dtype: WireDtype
    started: float = field(default_factory=time.perf_counter)


class StepExchange:
    """Launches and finishes the training steps of one job over HTTP, in the job's schedule.

    Args:
        job: the job (its clients, aggregator step, recorder, status and spec).
        pool: runs the calls to the sites concurrently (the job's pool).
        delayed: the one-step-delayed schedule (see the module docstring); synchronous otherwise.
    """

    def __init__(self, job: TrainingJob, pool: Executor, *, delayed: bool = False) -> None:
        self.job = job
        self.pool = pool
        self.delayed = delayed
        self.next: Launched | None = None  # the step launched ahead (delayed schedule)

    def run(self, step: int, *, drains: bool) -> tuple[float, dict[str, float]]:
        """Train ``step``; return its loss and phases (seconds). ``drains``: no forward may be in flight after
        it (it validates, checkpoints, runs the gate or is the last step)."""
        if not self.delayed:
            return self.finish(self.launch(step))
        current = self.next if self.next is not None and self.next.step == step else None
        if current is None:
            self.close()
        self.next = None
        try:
            fresh = current is None
            if current is None:
                current = self.launch(step)

            def overlap() -> Launched | None:
                if not drains:
                    self.next = self.launch(step + 1)
                return self.next

            loss, phases = self.finish(current, overlap=overlap)
            if fresh:  # the step was planned in this call too, not during the previous one
                phases["plan"] += current.plan_s
            return loss, phases
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Drain: wait for the forwards of a step launched ahead and forget it (an error, a roll-back)."""
        launched, self.next = self.next, None
        drain(launched)

    def launch(self, step: int) -> Launched:
        """Plan ``step``, cut its labels and ask every site for its activations (returns at once)."""
        job = self.job
        t0 = time.perf_counter()
        samples = job.plan(step)
        labels = job._labels_for(samples)
        shapes = job.shapes_for(len(samples))
        dtype = WireDtype(job.spec.wire.activations.value)
        plan_s = time.perf_counter() - t0
        sites = job.attendance.participants(step, full=job._drains_at(step))  # site dropout, offline sites
        futures = {name: self.pool.submit(job.clients[name].fetch_activations, job.job_id, step, samples,
                                          phase=Phase.TRAIN) for name in sites}
        return Launched(step, samples, labels, futures, plan_s, shapes=shapes, dtype=dtype, started=t0)

    def collect(self, launched: Launched) -> dict[str, Received]:
        """Wait for ``launched``'s activations and decode them here, in the job's thread (see the module docstring)."""
        job = self.job
        replies = job.attendance.gather(launched.futures, launched.step)  # continue: without sites that are down
        return {name: job.clients[name].decode_activations(data, run_id=job.job_id, step=launched.step,
                                                            shapes=launched.shapes, dtype=launched.dtype)
                for name, data in replies.items()}

    def finish(self, launched: Launched, overlap: Callable[[], Launched | None] | None = None
               ) -> tuple[float, dict[str, float]]:
        """Collect ``launched``'s activations, call ``overlap`` (the delayed schedule launches the next step
        there), run the decoder step, wait until every site answered the step ``overlap`` launched (so each
        site computes it on the weights from before this step's update), and send the gradients; return the loss
        and the step's phases (seconds)."""
        job, step = self.job, launched.step
        assert job.aggregator is not None
        t1 = time.perf_counter()
        received = self.collect(launched)
        job.recorder.plan(run_id=job.job_id, step=step, phase=Phase.TRAIN.value, samples=launched.samples)
        for name, item in received.items():
            job._record_received(name, step, item, Phase.TRAIN)
        tensors = {name: {k: v.to(job.device) for k, v in r.bundle.tensors.items()} for name, r in received.items()}
        t2 = time.perf_counter()
        forward_s, plan_s, ahead = t2 - t1, launched.plan_s, None
        if overlap is not None:
            ahead = overlap()
            plan_s = time.perf_counter() - t2
            t2 = time.perf_counter()
        set_lr(job.aggregator.optimizer, job.spec.server_optimizer.model_copy(
            update={"total_steps": job.spec.steps}).lr_at(step))
        result = job.aggregator.step(tensors, launched.labels, step=step, run_id=job.job_id,
                                     groups=[s.case_id for s in launched.samples], sites=list(tensors))
        t3 = time.perf_counter()
        if ahead is not None:
            wait(list(ahead.futures.values()))
            forward_s += time.perf_counter() - t3
            t3 = time.perf_counter()
        wire = job.spec.wire
        grad_dtype = WireDtype(wire.gradients.value)
        site_defenses: dict[str, list] = {}

        encoded = {name: client.encode_gradients(job.job_id, step, result.gradients[name], dtype=grad_dtype,
                                                 compress=wire.compress)
                   for name, client in job.clients.items() if name in result.gradients}
        for name, data in encoded.items():
            job.recorder.record(run_id=job.job_id, step=step, site=name, flow=Flow.SENT, phase=Phase.TRAIN.value,
                                data=data, sha256=frame_sha256(data))

        def send(name: str) -> int:
            ack = job.clients[name].backward(job.job_id, step, encoded[name])
            site_defenses[name] = ack.defenses or []
            return len(encoded[name])

        sent = sum(job.attendance.gather({name: self.pool.submit(send, name) for name in encoded}, step).values())
        job.attendance.took_part(list(received))
        t4 = time.perf_counter()
        phases = {"plan": plan_s, "forward": forward_s, "aggregator": t3 - t2, "backward": t4 - t3}
        job._update(defenses={"gradients": job.aggregator.filters.stats(), "sites": site_defenses,
                              "secure_sum": job.spec.secure_sum is not None})
        received_bytes = sum(len(r.data) for r in received.values())
        status = job.status()
        job._update(bytes_sent=status.bytes_sent + sent, bytes_received=status.bytes_received + received_bytes)
        return result.loss, phases


def drain(launched: Launched | None) -> None:
    """Wait for the forwards of a launched step that will not be finished (their results are dropped)."""
    if launched is not None:
        wait(list(launched.futures.values()))
