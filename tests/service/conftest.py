"""A tiny demo service built with the kit, used by the kit's tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from fastapi import APIRouter, FastAPI
from pydantic import BaseModel, Field
from pydantic_settings import SettingsConfigDict

from splitunet.errors import ProtocolError
from splitunet.service.app import create_service_app
from splitunet.service.deps import BundleBody, BundleResponse, MetricsDep, runtime_dep
from splitunet.service.settings import ServiceSettings
from splitunet.wire import BundleKind, BundleMeta, WireDtype, decode_bundle, encode_bundle

TOKEN = "token-aaaaaaaaaaaaaaaa"
TOKEN_2 = "token-bbbbbbbbbbbbbbbb"


class DemoSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="DEMO_")
    greeting: str = "hello"


class DemoRuntime:
    """What a real service keeps on app.state.runtime (model, optimizer, clients...)."""

    def __init__(self) -> None:
        self.ready = False
        self.closed = False
        self.calls = 0


DemoRuntimeDep = runtime_dep(DemoRuntime)


class EchoIn(BaseModel):
    value: int = Field(ge=0)


def demo_router() -> APIRouter:
    router = APIRouter(prefix="/v1")

    @router.post("/echo")
    def echo(body: EchoIn, runtime: DemoRuntimeDep) -> dict[str, Any]:
        runtime.calls += 1
        return {"value": body.value}

    @router.get("/items/{item_id}")
    def item(item_id: int) -> dict[str, int]:
        return {"item_id": item_id}

    @router.post("/backward")
    def backward() -> None:
        raise ProtocolError("backward for step 3 without its forward", detail={"step": 3})

    @router.get("/boom")
    def boom() -> None:
        raise RuntimeError("secret internal detail /etc/shadow")

    @router.post("/double")
    def double(body: BundleBody, runtime: DemoRuntimeDep, metrics: MetricsDep) -> BundleResponse:
        runtime.calls += 1
        bundle = decode_bundle(body, max_bytes=2**20)
        metrics.counter("tensor_bytes_in", "tensor bytes received").inc(len(body))
        doubled = {k: 2 * v for k, v in bundle.tensors.items()}
        return BundleResponse(encode_bundle(doubled, meta=bundle.meta, dtype=WireDtype.FP32, max_bytes=2**20))

    return router


@pytest.fixture
def make_app() -> Callable[..., tuple[FastAPI, list[DemoRuntime]]]:
    """``make_app(**settings) -> (app, runtimes)``; ``runtimes`` receives the runtime once the app starts."""

    def factory(*, readiness: Any = "default", **settings: Any) -> tuple[FastAPI, list[DemoRuntime]]:
        settings.setdefault("auth_token", TOKEN)
        runtimes: list[DemoRuntime] = []

        @contextmanager
        def build_runtime(_: DemoSettings) -> Iterator[DemoRuntime]:
            runtime = DemoRuntime()
            runtimes.append(runtime)
            try:
                yield runtime
            finally:
                runtime.closed = True

        app = create_service_app(
            title="demo",
            version="1.2.3",
            settings=DemoSettings(**settings),
            runtime_factory=build_runtime,
            routers=[demo_router()],
            readiness=(lambda rt: (rt.ready, "model not loaded")) if readiness == "default" else readiness,
        )
        return app, runtimes

    return factory


@pytest.fixture
def tokens() -> tuple[str, str]:
    """The demo app's accepted token and a second, valid-looking one."""
    return TOKEN, TOKEN_2


@pytest.fixture
def headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def bundle_bytes() -> bytes:
    meta = BundleMeta(run_id="r", step=1, site="t1", kind=BundleKind.GRADIENTS)
    return encode_bundle({"x": torch.arange(6.0).reshape(2, 3)}, meta=meta, dtype=WireDtype.FP32, max_bytes=2**20)
