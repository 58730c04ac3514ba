"""The documentation: the site builds in strict mode (a broken link or anchor fails it), its API reference is the
services' own OpenAPI schemas, and the README stays a short front door whose links resolve."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _build(config: Path, site: Path) -> subprocess.CompletedProcess:
    """``mkdocs build --strict`` (never ``-q``: it hides the warnings that strict mode counts)."""
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1", PYTHONPATH=os.pathsep.join(sys.path))
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config),
                           "--site-dir", str(site)], capture_output=True, text=True, timeout=600, env=env,
                          cwd=config.parent)


def _hook():
    spec = importlib.util.spec_from_file_location("openapi_hook", ROOT / "docs" / "hooks" / "openapi.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    result = _build(ROOT / "mkdocs.yml", out)
    assert result.returncode == 0, result.stdout + result.stderr
    return out


def test_strict_build_and_the_generated_api_reference(site: Path) -> None:
    for page in ("index.html", "getting-started/index.html", "concepts/index.html", "operator/jobs/index.html",
                 "security/index.html", "threat-model/index.html", "results/demo/index.html",
                 "reference/client/index.html"):
        assert (site / page).is_file(), page
    # the client's docstrings are rendered (mkdocstrings), not just named
    client = (site / "reference/client/index.html").read_text()
    assert "splitunet.client.federation.Federation" in client and "from_profile" in client
    # the API reference is each app's own schema, rendered: every path of it is on its page
    for service, (document, scopes) in _hook().openapi_documents().items():
        assert json.loads((site / f"reference/api/{service}.openapi.json").read_text()) == document
        page = (site / f"reference/api/{service}/index.html").read_text()
        for path in document["paths"]:
            assert path in page, (service, path)
        assert scopes[("POST", "/v1/jobs")] == "operator" if service == "aggregator" else True
    # offline: no script, stylesheet or font is fetched from another host
    for html in site.rglob("*.html"):
        assert not re.search(r"<(script|link)[^>]+(src|href)=\"https?://", html.read_text()), html
    site_page = (site / "reference/api/site/index.html").read_text()
    assert "scope <code>audit</code>" in site_page and "scope <code>aggregator</code>" in site_page


def test_a_broken_link_fails_the_strict_build(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    for linked in ("shared", "k8s"):
        (tmp_path / linked).symlink_to(ROOT / linked)
    with (tmp_path / "docs" / "concepts.md").open("a") as f:
        f.write("\nSee [the limits](no-such-page.md) and [jobs](operator/jobs.md#no-such-section).\n")
    result = _build(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert result.returncode != 0
    assert "no-such-page.md" in result.stderr and "no-such-section" in result.stderr, result.stderr


def test_the_readme_is_a_front_door() -> None:
    readme = (ROOT / "README.md").read_text()
    lines = readme.splitlines()
    assert len(lines) <= 150, len(lines)
    head = "\n".join(lines[:10])
    assert "make demo" in head and "make test" in head
    assert "docs/demo-privacy-utility.png" in readme
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme):
        if not target.startswith(("http://", "https://")):
            assert (ROOT / target).is_file(), f"README links {target}, which does not exist"
