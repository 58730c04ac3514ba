"""The gate: scopes declared on routers, checked before the body is read; 411/413; docs; revocation; logs."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest
from demo_service import TOKEN, DemoSettings, demo_router
from fastapi import APIRouter, FastAPI
from fastapi.testclient import TestClient

from splitunet.service.app import create_service_app
from splitunet.service.gate import body_limit
from splitunet.service.scopes import Scope, requires_scope

AUDIT_TOKEN = "audit-token-cccccccccccccccc"


def audit_router() -> APIRouter:
    """How another engineer declares "this router needs scope audit": one dependency."""
    router = APIRouter(prefix="/v1/audit", dependencies=[requires_scope(Scope.AUDIT)])

    @router.post("/score")
    def score(body: dict[str, Any]) -> dict[str, Any]:
        return {"n": len(body)}

    @router.post("/big", dependencies=[body_limit(lambda s: 10)])
    def big(body: dict[str, Any]) -> dict[str, Any]:
        return {}

    return router


def make(tmp_path: Path, **settings: Any) -> FastAPI:
    settings.setdefault("auth_token", TOKEN)
    settings.setdefault("scope_tokens", {"audit": AUDIT_TOKEN})
    return create_service_app(title="demo", version="1", settings=DemoSettings(**settings),
                              routers=[demo_router(), audit_router()])


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def asgi_call(app: FastAPI, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, bool]:
    """Call the app at the ASGI level; return the status and whether the app ever asked for the body."""
    asked = []
    sent: list[dict] = []

    async def receive() -> dict:
        asked.append(True)
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
        "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": ("127.0.0.1", 1), "server": ("testserver", 80),
    }
    asyncio.run(app(scope, receive, send))
    return sent[0]["status"], bool(asked)


@pytest.mark.parametrize(
    ("headers", "status", "kind"),
    [
        pytest.param({}, 401, "unauthenticated", id="no-token"),
        pytest.param(bearer("forged-token-0000000000"), 401, "unauthenticated", id="unknown-token"),
        pytest.param({"Authorization": "Basic eDp5"}, 401, "unauthenticated", id="basic"),
        pytest.param(bearer(AUDIT_TOKEN), 403, "wrong_scope", id="audit-token-on-main-api"),
    ],
)
def test_refused_before_the_body_is_read(tmp_path, headers, status, kind, security) -> None:
    app = make(tmp_path)
    got, read = asgi_call(app, "POST", "/v1/echo", {**headers, "content-length": "11"}, b'{"value":1}')
    security.refused(kind, got, expected=status)
    assert not read, "the body was read before the caller was authenticated"


def test_scoped_router_takes_only_its_scope(tmp_path, security) -> None:
    with TestClient(make(tmp_path)) as client:
        ok = client.post("/v1/audit/score", json={"a": 1}, headers=bearer(AUDIT_TOKEN))
        main_token = client.post("/v1/audit/score", json={"a": 1}, headers=bearer(TOKEN))
        main_ok = client.get("/v1/items/1", headers=bearer(TOKEN))
    assert ok.status_code == 200 and main_ok.status_code == 200
    security.refused("wrong_scope", main_token.status_code, expected=403)
    assert main_token.json()["code"] == "insufficient_scope"
    assert TOKEN not in main_token.text and AUDIT_TOKEN not in main_token.text


def test_length_required_and_limits_before_reading(tmp_path, security) -> None:
    app = make(tmp_path)
    status, read = asgi_call(app, "POST", "/v1/echo", bearer(TOKEN), b'{"value":1}')
    security.refused("no_content_length", status, expected=411)
    assert not read
    big = str(2**20 + 1)
    status, read = asgi_call(app, "POST", "/v1/echo", {**bearer(TOKEN), "content-length": big}, b"")
    security.refused("oversized_json", status, expected=413)
    assert not read
    status, read = asgi_call(app, "POST", "/v1/audit/big", {**bearer(AUDIT_TOKEN), "content-length": "11"}, b"")
    security.refused("oversized_for_route", status, expected=413)
    assert not read


def test_docs_need_a_credential_unless_enabled(tmp_path, security) -> None:
    with TestClient(make(tmp_path)) as client:
        for path in ("/docs", "/openapi.json", "/redoc", "/no/such/path"):
            security.refused("unauthenticated", client.get(path).status_code, expected=401)
        assert client.get("/openapi.json", headers=bearer(TOKEN)).status_code == 200
        assert client.get("/healthz").status_code == 200
    with TestClient(make(tmp_path, public_docs=True)) as client:
        assert client.get("/openapi.json").status_code == 200 and client.get("/docs").status_code == 200


@pytest.mark.parametrize("how", ["emptied", "deleted"])
def test_token_file_emptied_or_deleted_revokes(tmp_path, how, security) -> None:
    secret = tmp_path / "token"
    secret.write_text("file-token-1111111111\n")
    app = make(tmp_path, auth_token=None, auth_token_file=secret)
    with TestClient(app) as client:
        before = client.get("/v1/items/1", headers=bearer("file-token-1111111111"))
        if how == "emptied":
            secret.write_text("")
        else:
            secret.unlink()
        after = client.get("/v1/items/1", headers=bearer("file-token-1111111111"))
    assert before.status_code == 200
    security.refused("revoked_token", after.status_code, expected=401)


def test_one_token_cannot_serve_two_scopes(tmp_path) -> None:
    with pytest.raises(ValueError, match="two scopes"):
        DemoSettings(auth_token=TOKEN, scope_tokens={"audit": TOKEN})


def test_missing_scope_token_file_is_a_start_up_error(tmp_path) -> None:
    with pytest.raises(ValueError, match="no such file"):
        DemoSettings(auth_token=TOKEN, scope_token_files={"audit": tmp_path / "nope"})


def test_paths_are_logged_escaped(tmp_path, caplog, security) -> None:
    with TestClient(make(tmp_path)) as client, caplog.at_level(logging.INFO, logger="splitunet.service.access"):
        r = client.get("/v1/x%0AFORGED 200 OK%1b[31m", headers=bearer(TOKEN))
    security.refused("forged_log_line", r.status_code, expected=404)
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "splitunet.service.access"]
    assert lines and all("\n" not in line and "\x1b" not in line for line in lines)
    assert any("\\nFORGED" in line for line in lines)
