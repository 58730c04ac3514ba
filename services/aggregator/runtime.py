"""The aggregator's runtime: its labels and the job manager, built at startup (the app's lifespan)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from services.aggregator.alignment import psi_align
from services.aggregator.jobs import JobManager
from services.aggregator.labels import LabelStore
from services.aggregator.privacy_gate import audit_hooks
from services.aggregator.settings import AggregatorSettings
from services.aggregator.site_client import SiteClient
from services.aggregator.trainer import Aligner
from splitunet import __version__
from splitunet.federation import AggregatorInfo, FederationSpec, SitePeer
from splitunet.service.client import tls_context
from splitunet.service.device import resolve_device

logger = logging.getLogger(__name__)


class AggregatorRuntime:
    """Labels + jobs. ``transport_factory(peer)`` lets tests route site calls in process."""

    def __init__(
        self,
        settings: AggregatorSettings,
        *,
        aligner: Aligner = psi_align,
        transport_factory: Callable[[SitePeer], object] | None = None,
    ) -> None:
        self.settings = settings
        self.registry = settings.registry()
        self.device = resolve_device(settings.device)
        self.labels = LabelStore(settings)
        self._transport_factory = transport_factory
        verify: object = True
        if settings.site_ca_file or settings.site_client_cert_file:
            verify = tls_context(
                ca_file=settings.site_ca_file,
                cert_file=settings.site_client_cert_file,
                key_file=settings.site_client_key_file,
            )
        self._verify = verify
        self.jobs = JobManager(
            settings, self.labels, aligner=aligner, client_factory=self._client, device=self.device,
            **audit_hooks(settings),
        )
        logger.info("aggregator: %d labelled cases on %s", len(self.labels.cases), self.device)

    def _client(self, name: str, spec: FederationSpec) -> SiteClient:
        """The client of registry site ``name`` (403 if the registry has no such site)."""
        (peer,) = self.registry.resolve([name])
        return SiteClient(
            peer,
            timeout_s=spec.timeout_s,
            max_bundle_bytes=self.settings.max_bundle_bytes,
            verify=self._verify,
            transport=self._transport_factory(peer) if self._transport_factory else None,
        )

    def ready(self) -> bool:
        return bool(self.labels.cases)

    def info(self) -> AggregatorInfo:
        return AggregatorInfo(
            version=__version__,
            device=str(self.device),
            labelled_cases=len(self.labels.cases),
            skipped_cases=self.labels.skipped,
        )


@contextmanager
def aggregator_runtime(settings: AggregatorSettings, **kwargs) -> Iterator[AggregatorRuntime]:
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    runtime = AggregatorRuntime(settings, **kwargs)
    try:
        yield runtime
    finally:
        runtime.jobs.close()
