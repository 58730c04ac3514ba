"""The aggregator's client for one site service: typed calls over one :class:`PeerClient`."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from splitunet.data.sampling import Sample
from splitunet.errors import PeerError, WireFormatError
from splitunet.federation import SitePeer
from splitunet.psi import PsiRequest, PsiResponse, parse_message
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
)
from splitunet.service.client import PeerClient, PeerTimeouts
from splitunet.wire import (
    CONTENT_TYPE,
    Bundle,
    BundleExpectation,
    BundleKind,
    BundleMeta,
    WireDtype,
    decode_bundle,
    encode_bundle,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Received:
    """An activation bundle as decoded, and the bytes it arrived as."""

    bundle: Bundle
    data: bytes


class SiteClient:
    """Calls one site's ``/v1`` API.

    Args:
        peer: the site's name, URL and token.
        timeout_s: read timeout of one call (a 3D forward on CPU can take a while).
        max_bundle_bytes: bundle size limit in both directions.
        verify: TLS verification (``True``, ``False`` or an ``ssl.SSLContext`` with CA and client certificate).
        transport: an httpx transport (tests pass an in-process one).
    """

    def __init__(
        self,
        peer: SitePeer,
        *,
        timeout_s: float = 120.0,
        max_bundle_bytes: int,
        verify=True,
        transport=None,
    ) -> None:
        self.name = peer.name
        self.max_bundle_bytes = max_bundle_bytes
        self.peer = PeerClient(
            peer.url,
            name=f"site {peer.name}",
            token=peer.bearer(),
            timeouts=PeerTimeouts(connect=10.0, read=timeout_s, write=timeout_s, pool=timeout_s),
            retries=2,
            verify=verify,
            max_response_bytes=max_bundle_bytes,
            transport=transport,
        )

    def close(self) -> None:
        self.peer.close()

    def info(self) -> SiteInfo:
        return SiteInfo.model_validate(self.peer.get_json("/v1/info"))

    def psi(self, request: PsiRequest) -> PsiResponse:
        """One PSI round trip (blinded elements only; see :mod:`splitunet.psi`)."""
        return parse_message(PsiResponse, self.peer.post_json("/v1/psi", request.model_dump(mode="json")))

    def set_alignment(self, case_ids: Sequence[str], session: str) -> AlignmentAck:
        """Tell the site the aligned cohort, bound to the PSI ``session`` just run with it."""
        body = AlignedCases(case_ids=list(case_ids), session=session).model_dump(mode="json")
        return AlignmentAck.model_validate(self.peer.post_json("/v1/alignment", body, idempotent=True))

    def grids(self, case_ids: Sequence[str]) -> CaseGrids:
        """Header grid and brain extent of aligned cases (:mod:`splitunet.data.grid`)."""
        body = GridRequest(case_ids=list(case_ids)).model_dump(mode="json")
        return CaseGrids.model_validate(self.peer.post_json("/v1/grids", body, idempotent=True))

    def setup_run(self, setup: RunSetup) -> RunInfo:
        return RunInfo.model_validate(self.peer.post_json("/v1/runs", setup.model_dump(mode="json"), idempotent=True))

    def release_run(self, run_id: str) -> RunInfo:
        """Tell the site a run's job ended (it may then make room for a new run)."""
        return RunInfo.model_validate(self.peer.post_json(f"/v1/runs/{run_id}/release", {}, idempotent=True))

    def fetch_activations(self, run_id: str, step: int, samples: Sequence[Sample], *, phase: Phase) -> bytes:
        """The site's forward call, without decoding: the bundle's bytes as received (no torch work, so a job may call
        it from its thread pool; :meth:`decode_activations` runs in the job's own thread, see
        :mod:`services.aggregator.pipeline`, "Threads")."""
        request = ForwardRequest(step=step, phase=phase, samples=list(samples))
        response = self.peer.request(
            "POST",
            f"/v1/runs/{run_id}/forward",
            json=request.model_dump(mode="json"),
            accept=CONTENT_TYPE,
            idempotent=phase == Phase.EVAL,
        )
        return response.content

    def decode_activations(
        self, data: bytes, *, run_id: str, step: int, shapes: Mapping[str, tuple[int, ...]], dtype: WireDtype
    ) -> Received:
        """Decode the bytes of :meth:`fetch_activations` against the expected names, shapes and metadata."""
        expect = BundleExpectation(
            shapes=shapes, dtype=dtype, run_id=run_id, step=step, site=self.name, kind=BundleKind.ACTIVATIONS
        )
        try:
            bundle = decode_bundle(data, expect=expect, max_bytes=self.max_bundle_bytes)
        except WireFormatError as exc:
            # The decoder's message quotes the bundle: logged, never echoed into job status.
            logger.warning("site %s sent a bad activation bundle: %s", self.name, exc.message[:300])
            raise PeerError(f"site {self.name} sent a bad activation bundle ({exc.code})",
                            detail={"code": exc.code}) from exc
        return Received(bundle=bundle, data=data)

    def encode_gradients(
        self, run_id: str, step: int, gradients: Mapping[str, torch.Tensor], *, dtype: WireDtype, compress: bool
    ) -> bytes:
        meta = BundleMeta(run_id=run_id, step=step, site=self.name, kind=BundleKind.GRADIENTS)
        return encode_bundle(gradients, meta=meta, dtype=dtype, compress=compress, max_bytes=self.max_bundle_bytes)

    def backward(self, run_id: str, step: int, data: bytes) -> BackwardAck:
        """Send encoded gradients; a retried backward is acknowledged idempotently by the site."""
        reply = self.peer.post_bundle(f"/v1/runs/{run_id}/backward", data, params={"step": step}, idempotent=True)
        return BackwardAck.model_validate(reply)

    def checkpoint(self, run_id: str, step: int) -> CheckpointInfo:
        reply = self.peer.post_json(f"/v1/runs/{run_id}/checkpoint", {"step": step}, idempotent=True)
        return CheckpointInfo.model_validate(reply)

    def restore(self, run_id: str, step: int) -> CheckpointInfo:
        reply = self.peer.post_json(f"/v1/runs/{run_id}/restore", {"step": step}, idempotent=True)
        return CheckpointInfo.model_validate(reply)
