"""Fixtures of the kit's tests: the demo service of :mod:`demo_service` as an app, tokens, a bundle."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from demo_service import TOKEN, TOKEN_2, DemoRuntime, DemoSettings, demo_router
from fastapi import FastAPI

from splitunet.service.app import create_service_app
from splitunet.wire import BundleKind, BundleMeta, WireDtype, encode_bundle


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
