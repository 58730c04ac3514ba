"""``splitunet serve``: a missing file named in any setting is a clear start-up error that never prints a token."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from splitunet.cli import app

SECRET = "do-not-print-this-token-0123456789"


@pytest.mark.parametrize(
    ("service", "env", "words"),
    [
        pytest.param("site", {"SITE_DATA_DIR": "{tmp}/nope"}, "data_dir", id="site-data-dir"),
        pytest.param("site", {"SITE_AUTH_TOKEN_FILE": "{tmp}/nope"}, "auth_token_file", id="site-token-file"),
        pytest.param("site", {"SITE_TLS_CERT_FILE": "{tmp}/nope", "SITE_TLS_KEY_FILE": "{tmp}/nope"},
                     "tls_cert_file", id="site-tls-file"),
        pytest.param("site", {"SITE_SCOPE_TOKEN_FILES__AUDIT": "{tmp}/nope"}, "scope_token_files",
                     id="site-audit-token-file"),
        pytest.param("aggregator", {"AGG_SITES": "{tmp}/nope.json"}, "AGG_SITES", id="agg-registry"),
        pytest.param("aggregator", {"AGG_SITE_CA_FILE": "{tmp}/nope.pem"}, "site_ca_file", id="agg-ca-file"),
    ],
)
def test_missing_files_are_start_up_errors(tmp_path: Path, monkeypatch, service, env, words, security) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (tmp_path / "sites.json").write_text('{"sites": [{"name": "t1", "url": "https://x", "token_file": "t"}]}')
    (tmp_path / "t").write_text("site-token-000000000000\n")
    base = {
        "SITE_SITE_ID": "t1", "SITE_MODALITIES": "t1", "SITE_DATA_DIR": str(data), "SITE_AUTH_TOKEN": SECRET,
        "AGG_DATA_DIR": str(data), "AGG_SITES": str(tmp_path / "sites.json"), "AGG_AUTH_TOKEN": SECRET,
    }
    for key, value in (base | {k: v.format(tmp=tmp_path) for k, v in env.items()}).items():
        monkeypatch.setenv(key, value)
    result = CliRunner().invoke(app, ["serve", service])
    assert result.exit_code == 2, result.output  # a clear configuration error, not a crash
    security.blocked("missing_setting_file")
    assert words in result.output, result.output
    assert SECRET not in result.output and "Traceback" not in result.output
