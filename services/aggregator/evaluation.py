"""Whole-case prediction through the sites' encoders: validation and inference.

The aggregator has no image, so it cannot cut windows out of one. It runs MONAI's
``sliding_window_inference`` over a placeholder tensor of the case's shape with ``with_coord=True``: each window's
coordinates become :class:`~splitunet.data.sampling.Sample` s that the sites cut from their own images, encode
and send; the aggregator decodes the fused tensors and MONAI blends the windows (Gaussian weighting).

- 3D: windows of ``roi`` over the ``(X, Y, Z)`` volume.
- 2D: every axial slice is one item of a batch ``(Z, 1, X, Y)``; windows of ``roi`` in-plane, batched across
  slices.
- 2D with ``resize_slices``: whole slices resized to ``roi`` by the sites, logits resized back to ``(X, Y)``
  (bilinear) before the sigmoid.

**A subset of sites.** ``sites`` names the sites to segment with (default: all); with ``tolerate_missing`` a site
whose call fails as unreachable (down, or no answer within its read timeout after the client's bounded retries) is
left out from then on, as long as another site answered, and the decoder fuses the others (absent sites:
:mod:`splitunet.networks.fusion`). :attr:`SplitPredictor.sites_used` names the sites of the last prediction.

Outside the brain's axial extent that the sites report (``brain_z`` of the case's grid) the probability is 0, as
in :func:`splitunet.inference.predict_volume`; in 2D those slices are not requested at all.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import TypeVar

import torch
from monai.inferers import sliding_window_inference

from services.aggregator.recovery import unreachable
from services.aggregator.site_client import Received, SiteClient
from splitunet.data.sampling import Sample
from splitunet.errors import PeerError
from splitunet.inference import DEFAULT_OVERLAP, axial_range, outside_brain
from splitunet.protocol import AggregatorStep
from splitunet.schemas import Phase
from splitunet.wire import WireDtype

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Called with (site name, step, received bundle) for every activation bundle received (the recorder seam).
OnReceived = Callable[[str, int, Received], None]
#: Called with (step, samples) before the sites are asked for a batch (the recorder's planned samples).
OnPlan = Callable[[int, list[Sample]], None]


class SplitPredictor:
    """Predicts region probabilities of whole cases through the sites.

    Args:
        clients: one :class:`SiteClient` per site.
        aggregator: the decoder side (its ``predict``).
        run_id: the run whose encoders the sites use.
        roi: window size (2 or 3 ints).
        batch_size: windows per request.
        shapes_for: ``batch -> {tensor name: shape}`` the sites must send.
        dtype: activation wire dtype.
        pool: the thread pool used to call the sites concurrently.
        overlap: window overlap fraction (default 0.5, MONAI's BraTS setting).
        sites: the sites to predict with, a subset of ``clients`` (default: all).
        tolerate_missing: go on without a site that stops answering (see the module docstring).
    """

    def __init__(
        self,
        clients: Mapping[str, SiteClient],
        aggregator: AggregatorStep,
        *,
        run_id: str,
        roi: Sequence[int],
        batch_size: int,
        shapes_for: Callable[[int], dict[str, tuple[int, ...]]],
        dtype: WireDtype,
        pool: ThreadPoolExecutor,
        overlap: float = DEFAULT_OVERLAP,
        resize_slices: bool = False,
        on_received: OnReceived | None = None,
        on_plan: OnPlan | None = None,
        sites: Sequence[str] | None = None,
        tolerate_missing: bool = False,
    ) -> None:
        self.clients = clients
        self.aggregator = aggregator
        self.run_id = run_id
        self.roi = tuple(int(r) for r in roi)
        self.batch_size = batch_size
        self.shapes_for = shapes_for
        self.dtype = dtype
        self.pool = pool
        self.overlap = overlap
        self.resize_slices = resize_slices
        self.on_received = on_received
        self.on_plan = on_plan
        self.calls = 0
        self.sites = [n for n in clients if sites is None or n in set(sites)]
        self.tolerate_missing = tolerate_missing
        #: sites left out because they stopped answering: name -> the error's message
        self.missing: dict[str, str] = {}

    def predict_case(self, case_id: str, shape: Sequence[int], *, step: int,
                     brain_z: tuple[int, int] | None = None) -> torch.Tensor:
        """Sigmoid probabilities ``(3, X, Y, Z)`` float32 of a case whose RAS volume shape is ``shape``; 0 outside
        the axial slices ``brain_z`` = ``(first, last)`` (``None``: every slice)."""
        shape = tuple(int(s) for s in shape)
        first, stop = axial_range(brain_z, shape[2])
        if len(self.roi) == 2 and stop <= first:
            return torch.zeros(3, *shape)
        if self.resize_slices:
            return self._predict_resized(case_id, shape, (first, stop), step=step)
        if len(self.roi) == 3:
            placeholder = torch.zeros(1, 1, *shape)
        else:
            placeholder = torch.zeros(stop - first, 1, shape[0], shape[1])  # the brain's slices only
        pads = [max(r - s, 0) // 2 for r, s in zip(self.roi, placeholder.shape[2:])]

        def predictor(window: torch.Tensor, coords: list) -> torch.Tensor:
            samples = [self._sample(case_id, shape, c, pads, z_offset=first) for c in coords]
            return self._predict_samples(samples, step=step)

        logits = sliding_window_inference(
            placeholder,
            roi_size=self.roi,
            sw_batch_size=self.batch_size,
            predictor=predictor,
            overlap=self.overlap,
            mode="gaussian",
            with_coord=True,
        )
        probs = torch.sigmoid(logits.float())
        if len(self.roi) == 3:
            return outside_brain(probs[0], brain_z, 0.0)
        out = torch.zeros(3, *shape)
        out[..., first:stop] = probs.permute(1, 2, 3, 0)  # (Z, 3, X, Y) -> (3, X, Y, Z)
        return out

    def _predict_resized(self, case_id: str, shape: tuple[int, ...], slices: tuple[int, int], *,
                         step: int) -> torch.Tensor:
        """2D whole slices ``[first, stop)`` resized to ``roi``: ``(3, X, Y, Z)`` probabilities on the original
        grid (0 on the other slices)."""
        out = torch.zeros(3, *shape)
        first, stop = slices
        for z0 in range(first, stop, self.batch_size):
            samples = [
                Sample(case_id=case_id, start=(0, 0), size=shape[:2], axial_index=z, volume_shape=shape,
                       resize=self.roi)
                for z in range(z0, min(z0 + self.batch_size, stop))
            ]
            logits = self._predict_samples(samples, step=step).float()
            logits = torch.nn.functional.interpolate(logits, size=shape[:2], mode="bilinear", align_corners=False)
            out[:, :, :, z0 : z0 + len(samples)] = torch.sigmoid(logits).permute(1, 2, 3, 0)
        return out

    def _sample(self, case_id: str, shape: tuple[int, ...], coords: list, pads: list[int], *,
                z_offset: int = 0) -> Sample:
        spatial = coords[2:]
        start = tuple(int(s.start) - p for s, p in zip(spatial, pads))
        if len(self.roi) == 3:
            return Sample(case_id=case_id, start=start, size=self.roi, volume_shape=shape)
        return Sample(case_id=case_id, start=start, size=self.roi, axial_index=z_offset + int(coords[0].start),
                      volume_shape=shape)

    def _predict_samples(self, samples: list[Sample], *, step: int) -> torch.Tensor:
        shapes = self.shapes_for(len(samples))
        if self.on_plan is not None:
            self.on_plan(step, samples)
        futures = {name: self.pool.submit(self.clients[name].fetch_activations, self.run_id, step, samples,
                                          phase=Phase.EVAL) for name in self.sites}
        # decoded in this thread, not the pool's (see services.aggregator.pipeline, "Threads")
        received = {name: self.clients[name].decode_activations(data, run_id=self.run_id, step=step,
                                                                shapes=shapes, dtype=self.dtype)
                    for name, data in self._replies(futures).items()}
        if self.on_received is not None:
            for name, item in received.items():
                self.on_received(name, step, item)
        self.calls += 1
        # on the CPU: MONAI blends windows on the placeholder's device
        return self.aggregator.predict({name: r.bundle.tensors for name, r in received.items()},
                                       sites=list(received)).cpu()

    @property
    def sites_used(self) -> list[str]:
        """The sites the predictions were made with (those asked, less those that stopped answering)."""
        return list(self.sites)

    def _replies(self, futures: Mapping[str, Future[bytes]]) -> dict[str, bytes]:
        """Each site's bytes; with ``tolerate_missing`` a site that is unreachable is dropped (for good) while
        another one answered; otherwise the first failure is raised."""
        replies, failed = answered(futures, tolerate=self.tolerate_missing)
        for name, message in failed.items():
            logger.warning("run %s: site %s does not answer (%s); predicting without it", self.run_id, name, message)
            self.missing[name] = message
            self.sites.remove(name)
        return replies


def answered(futures: Mapping[str, Future[T]], *, tolerate: bool) -> tuple[dict[str, T], dict[str, str]]:
    """The results of one call per site, and ``{site: error message}`` of the sites left out. Without ``tolerate``
    the first failure is raised; with it, the sites whose call failed as unreachable are left out, unless none
    answered or another failure occurred (raised)."""
    if not tolerate:
        return {name: f.result() for name, f in futures.items()}, {}
    wait(list(futures.values()))
    failed = {name: f.exception() for name, f in futures.items() if f.exception() is not None}
    for exc in failed.values():
        if not isinstance(exc, PeerError) or not unreachable(exc) or len(failed) == len(futures):
            raise exc
    messages = {name: exc.message for name, exc in failed.items() if isinstance(exc, PeerError)}
    return {name: f.result() for name, f in futures.items() if name not in failed}, messages
