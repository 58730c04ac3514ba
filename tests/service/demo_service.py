"""A tiny demo service built with the kit (settings, runtime, router), shared by the kit's tests and fixtures.

A named module rather than ``conftest``: tests import from it, and ``from conftest import ...`` picks whichever
folder's conftest was imported first when pytest is given several test folders.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, Field
from pydantic_settings import SettingsConfigDict

from splitunet.errors import ProtocolError
from splitunet.service.deps import BundleBody, BundleResponse, MetricsDep, runtime_dep
from splitunet.service.settings import ServiceSettings
from splitunet.wire import WireDtype, decode_bundle, encode_bundle

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
