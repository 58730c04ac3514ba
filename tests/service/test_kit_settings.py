"""ServiceSettings: environment, secret files, auth policy, TLS and uvicorn kwargs."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
from pydantic import BaseModel, ValidationError
from pydantic_settings import SettingsConfigDict

from splitunet.service.settings import ClientAuth, LogLevel, ServiceSettings, read_secret_file


class Nested(BaseModel):
    cut_level: int = 0


class SiteLikeSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="KITTEST_")
    model: Nested = Nested()


def test_environment_with_prefix_and_nested_delimiter(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("from-file-token\n")
    monkeypatch.setenv("KITTEST_PORT", "9123")
    monkeypatch.setenv("KITTEST_LOG_LEVEL", "debug")
    monkeypatch.setenv("KITTEST_AUTH_TOKEN_FILE", str(token_file))
    monkeypatch.setenv("KITTEST_AUTH_TOKENS", "second-token, third-token")
    monkeypatch.setenv("KITTEST_MODEL__CUT_LEVEL", "2")
    monkeypatch.setenv("KITTEST_MAX_REQUEST_BYTES", "1000")
    s = SiteLikeSettings()
    assert s.port == 9123 and s.log_level is LogLevel.DEBUG and s.model.cut_level == 2
    assert s.max_request_bytes == 1000
    assert s.accepted_tokens() == ("second-token", "third-token", "from-file-token")
    assert "from-file-token" not in repr(s)


def test_tokens_as_json_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KITTEST_AUTH_TOKENS", '["a-token", "b-token"]')
    assert SiteLikeSettings().accepted_tokens() == ("a-token", "b-token")


def test_secrets_dir(tmp_path: Path) -> None:
    (tmp_path / "kittest_auth_token").write_text("mounted-token\n")
    assert SiteLikeSettings(_secrets_dir=tmp_path).accepted_tokens() == ("mounted-token",)


def test_no_token_refuses_to_start() -> None:
    with pytest.raises(ValidationError, match="no auth token configured: set KITTEST_AUTH_TOKEN"):
        SiteLikeSettings()
    assert SiteLikeSettings(auth_disabled=True).accepted_tokens() == ()
    with pytest.raises(ValidationError, match="contradicts"):
        SiteLikeSettings(auth_disabled=True, auth_token="x-token")


def test_bad_token_sources(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("# only a comment\n\n")
    with pytest.raises(ValidationError, match="holds no secret"):
        SiteLikeSettings(auth_token_file=empty)
    with pytest.raises(ValidationError, match="auth_token_file: no such file"):
        SiteLikeSettings(auth_token_file=tmp_path / "missing")
    with pytest.raises(ValidationError, match="without spaces"):
        SiteLikeSettings(auth_token="has space")
    assert read_secret_file(_write(tmp_path / "two", "a\n  b  \n#c\n")) == ["a", "b"]


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_port_and_limits_validated() -> None:
    with pytest.raises(ValidationError, match="port"):
        SiteLikeSettings(auth_disabled=True, port=70000)
    with pytest.raises(ValidationError, match="max_request_bytes"):
        SiteLikeSettings(auth_disabled=True, max_request_bytes=0)
    with pytest.raises(ValidationError, match="log_level"):
        SiteLikeSettings(auth_disabled=True, log_level="loud")


def test_uvicorn_kwargs_plain() -> None:
    s = SiteLikeSettings(auth_disabled=True, host="0.0.0.0", port=8001)
    kw = s.uvicorn_kwargs()
    assert kw["host"] == "0.0.0.0" and kw["port"] == 8001 and kw["log_level"] == "info"
    assert not any(k.startswith("ssl_") for k in kw)
    assert kw["log_config"]["loggers"]["splitunet"]["level"] == "INFO"
    assert s.scheme == "http"


def test_uvicorn_kwargs_mutual_tls(tmp_path: Path) -> None:
    files = {name: _write(tmp_path / name, "pem") for name in ("cert.pem", "key.pem", "ca.pem")}
    s = SiteLikeSettings(
        auth_disabled=True,
        tls_cert_file=files["cert.pem"],
        tls_key_file=files["key.pem"],
        tls_ca_file=files["ca.pem"],
        tls_client_auth=ClientAuth.REQUIRED,
    )
    kw = s.uvicorn_kwargs()
    assert kw["ssl_certfile"] == str(files["cert.pem"]) and kw["ssl_keyfile"] == str(files["key.pem"])
    assert kw["ssl_ca_certs"] == str(files["ca.pem"]) and kw["ssl_cert_reqs"] == ssl.CERT_REQUIRED
    assert s.scheme == "https"


def test_tls_settings_validated(tmp_path: Path) -> None:
    cert, key = _write(tmp_path / "c", "pem"), _write(tmp_path / "k", "pem")
    with pytest.raises(ValidationError, match="given together"):
        SiteLikeSettings(auth_disabled=True, tls_cert_file=cert)
    with pytest.raises(ValidationError, match="no such file"):
        SiteLikeSettings(auth_disabled=True, tls_cert_file=cert, tls_key_file=tmp_path / "missing")
    with pytest.raises(ValidationError, match="needs tls_cert_file"):
        SiteLikeSettings(auth_disabled=True, tls_cert_file=cert, tls_key_file=key, tls_client_auth="required")
