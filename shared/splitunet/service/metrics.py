"""Prometheus metrics of one service app, on the app's own registry.

Each app gets a :class:`ServiceMetrics` with its own ``CollectorRegistry`` (never the process-global default
one), so several apps in one process (tests, the demo) do not collide. The kit records, per route template
(``/v1/jobs/{job_id}``, never the raw path, to bound label cardinality; unmatched paths share one label)::

    splitunet_http_requests_total{route, method, status}
    splitunet_http_request_bytes_total{route, method}        request body bytes read
    splitunet_http_response_bytes_total{route, method}       response body bytes sent
    splitunet_http_request_duration_seconds{route, method}   histogram
    splitunet_http_requests_in_flight                        gauge
    splitunet_service_info{service, version}                 always 1

A service adds its own metrics (step latency, tensor bytes in/out...) with :meth:`ServiceMetrics.counter`,
:meth:`~ServiceMetrics.histogram` and :meth:`~ServiceMetrics.gauge`, which create a metric once and return the
same object on later calls. ``GET /metrics`` (unauthenticated) serves the text exposition format.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

#: Latency buckets in seconds, up to 2 minutes (a 3D split step on CPU can take tens of seconds).
LATENCY_BUCKETS: tuple[float, ...] = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
)
UNMATCHED_ROUTE = "<unmatched>"


class ServiceMetrics:
    """The metrics of one app.

    Args:
        service: service name, e.g. ``"site"`` (a label of ``splitunet_service_info``).
        version: service version.
        namespace: metric name prefix.
    """

    def __init__(self, service: str, version: str = "", *, namespace: str = "splitunet") -> None:
        if not service:
            raise ValueError("service must be a non-empty name, e.g. 'site'")
        self.namespace = namespace
        self.registry = CollectorRegistry(auto_describe=True)
        self._custom: dict[str, Any] = {}
        self.requests = Counter(
            "http_requests",
            "HTTP requests handled",
            ["route", "method", "status"],
            namespace=namespace,
            registry=self.registry,
        )
        self.request_bytes = Counter(
            "http_request_bytes",
            "HTTP request body bytes read",
            ["route", "method"],
            namespace=namespace,
            registry=self.registry,
        )
        self.response_bytes = Counter(
            "http_response_bytes",
            "HTTP response body bytes sent",
            ["route", "method"],
            namespace=namespace,
            registry=self.registry,
        )
        self.latency = Histogram(
            "http_request_duration_seconds",
            "HTTP request latency (s)",
            ["route", "method"],
            namespace=namespace,
            registry=self.registry,
            buckets=LATENCY_BUCKETS,
        )
        self.in_flight = Gauge(
            "http_requests_in_flight", "HTTP requests being handled", namespace=namespace, registry=self.registry
        )
        info = Gauge(
            "service_info",
            "Service name and version",
            ["service", "version"],
            namespace=namespace,
            registry=self.registry,
        )
        info.labels(service=service, version=version).set(1)

    def observe_request(
        self, *, route: str, method: str, status: int, request_bytes: int, response_bytes: int, seconds: float
    ) -> None:
        """Record one finished HTTP request (called by the kit's middleware)."""
        self.requests.labels(route=route, method=method, status=str(status)).inc()
        self.request_bytes.labels(route=route, method=method).inc(request_bytes)
        self.response_bytes.labels(route=route, method=method).inc(response_bytes)
        self.latency.labels(route=route, method=method).observe(seconds)

    def _get_or_create(self, kind: type, name: str, documentation: str, labelnames: Sequence[str], **kw: Any):
        existing = self._custom.get(name)
        if existing is not None:
            if not isinstance(existing, kind) or tuple(existing._labelnames) != tuple(labelnames):
                raise ValueError(f"metric {name!r} already exists as a different {type(existing).__name__}")
            return existing
        metric = kind(name, documentation, list(labelnames), namespace=self.namespace, registry=self.registry, **kw)
        self._custom[name] = metric
        return metric

    def counter(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> Counter:
        """A counter ``<namespace>_<name>_total`` on this app's registry (created on first call)."""
        return self._get_or_create(Counter, name, documentation, labelnames)

    def gauge(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> Gauge:
        return self._get_or_create(Gauge, name, documentation, labelnames)

    def histogram(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        buckets: Sequence[float] = LATENCY_BUCKETS,
    ) -> Histogram:
        return self._get_or_create(Histogram, name, documentation, labelnames, buckets=tuple(buckets))

    def render(self) -> tuple[bytes, str]:
        """The text exposition of this registry and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def value(self, name: str, labels: dict[str, str] | None = None) -> float | None:
        """A sample's current value by full name (e.g. ``splitunet_http_requests_total``); for tests."""
        return self.registry.get_sample_value(name, labels or {})


def metrics_router() -> APIRouter:
    """``GET /metrics`` serving ``app.state.metrics``; excluded from the OpenAPI schema."""
    router = APIRouter()

    @router.get("/metrics", include_in_schema=False)
    def metrics(request: Request) -> Response:
        payload, content_type = request.app.state.metrics.render()
        return Response(payload, media_type=content_type)

    return router
