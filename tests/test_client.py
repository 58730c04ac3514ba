"""``splitunet.client`` without a network: typed errors carrying the service's body, which calls are retried,
the spec checked against the service's own schema before sending, profiles and the environment, exit codes."""

from __future__ import annotations

import json
import ssl
from pathlib import Path

import httpx
import pytest

from splitunet.cli.connection import ExitCode, exit_code_of
from splitunet.client import Federation, ServiceUnreachableError, resolve_profile
from splitunet.client.profiles import load_profile
from splitunet.errors import AuthError, ConfigurationError, ConflictError, NotFoundError, PolicyError, SplitUNetError

SPEC = {"sites": ["t1", "flair"], "model": {"spatial_dims": 2, "features": [4, 8, 16]}, "roi": [16, 16]}
STATUS = {"job_id": "j1", "state": "running", "step": 3, "steps": 10}


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text("# the operator token\noperator-token-0123456789\n")
    return path


def _federation(token_file: Path, handler, calls: list[httpx.Request]) -> Federation:
    def record(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return handler(request)

    return Federation("http://agg.test", token_file=token_file, audit_url="http://audit.test",
                      transport=httpx.MockTransport(record), audit_transport=httpx.MockTransport(record))


def _error(status: int, code: str, message: str = "m", detail=None) -> httpx.Response:
    return httpx.Response(status, json={"code": code, "message": message, "detail": detail})


@pytest.mark.parametrize(("status", "code", "cls", "exit_code"), [
    (404, "not_found", NotFoundError, ExitCode.USAGE),
    (422, "invalid_request", ConfigurationError, ExitCode.USAGE),
    (409, "conflict", ConflictError, ExitCode.USAGE),
    (403, "policy_violation", PolicyError, ExitCode.USAGE),
    (401, "unauthorized", AuthError, ExitCode.UNREACHABLE),
    (403, "insufficient_scope", AuthError, ExitCode.UNREACHABLE),
    (418, "teapot_of_a_newer_service", ConfigurationError, ExitCode.USAGE),
    (500, "internal", SplitUNetError, ExitCode.FAILED),
])
def test_errors_are_typed_and_carry_the_services_body(token_file, status, code, cls, exit_code):
    calls: list[httpx.Request] = []
    detail = {"rule": "max_width", "limit": 64}
    with _federation(token_file, lambda r: _error(status, code, f"the service says {code}", detail), calls) as fed:
        with pytest.raises(cls) as caught:
            fed.jobs.get("j1").status()
    error = caught.value
    assert (error.code, error.message, error.detail, error.status_code) == (
        code, f"the service says {code}", detail, status)
    assert exit_code_of(error) == exit_code
    assert calls[0].headers["authorization"] == "Bearer operator-token-0123456789"


def test_reads_are_retried_and_a_submit_is_not(token_file):
    calls: list[httpx.Request] = []
    answers = iter([_error(503, "not_ready"), httpx.Response(200, json=STATUS)])
    with _federation(token_file, lambda r: next(answers), calls) as fed:
        fed._jobs_client._sleep = lambda s: None
        assert fed.jobs.get("j1").status().step == 3
        assert len(calls) == 2
        calls.clear()
        with pytest.raises(SplitUNetError) as caught:
            _federation(token_file, lambda r: _error(503, "not_ready"), calls).jobs.submit(SPEC)
        assert caught.value.status_code == 503 and len(calls) == 1  # a POST /v1/jobs may have arrived: not resent


def test_inference_is_retried_and_written(token_file, tmp_path):
    calls: list[httpx.Request] = []
    answers = iter([_error(502, "peer_failed"), httpx.Response(200, content=b"\x1f\x8bNIfTI")])
    with _federation(token_file, lambda r: next(answers), calls) as fed:
        fed._jobs_client._sleep = lambda s: None
        out = fed.jobs.get("j1").infer("case-1", tmp_path / "o" / "seg.nii.gz")
    assert out.read_bytes() == b"\x1f\x8bNIfTI" and len(calls) == 2
    assert json.loads(calls[-1].content) == {"case_id": "case-1", "job_id": "j1"}


def test_a_spec_the_service_schema_refuses_is_never_sent(token_file):
    calls: list[httpx.Request] = []
    with _federation(token_file, lambda r: httpx.Response(202, json={"job_id": "x", "state": "pending"}),
                     calls) as fed:
        with pytest.raises(ConfigurationError, match="roi"):
            fed.jobs.submit({**SPEC, "roi": [16, 16, 16]})
        with pytest.raises(ConfigurationError, match="sites"):
            fed.jobs.submit({**SPEC, "sites": [{"url": "http://evil"}]})
        with pytest.raises(ConfigurationError, match="budgets"):
            fed.audits.start("run-1", sites=["t1"], spec={"budgets": {"whitebox_iterations": 0}})
        assert calls == []
        job = fed.jobs.submit(SPEC)
    assert job.job_id == "x" and json.loads(calls[0].content) == SPEC  # only the fields the user set


def test_an_unreachable_service_is_one_typed_error(token_file):
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    calls: list[httpx.Request] = []
    with _federation(token_file, refuse, calls) as fed:
        fed._jobs_client._sleep = lambda s: None
        with pytest.raises(ServiceUnreachableError, match="unreachable") as caught:
            fed.jobs.submit(SPEC)  # never sent: a refused connection is retried even for a POST
    assert len(calls) == 3 and caught.value.detail["attempts"] == 3
    assert exit_code_of(caught.value) == ExitCode.UNREACHABLE


def test_connection_options_are_checked(tmp_path, token_file):
    with pytest.raises(ConfigurationError, match="url"):
        Federation()
    with pytest.raises(ConfigurationError, match="cannot read secret file"):
        Federation("http://agg.test", token_file=tmp_path / "missing")
    with pytest.raises(ConfigurationError, match="client_key"):
        Federation("https://agg.test", token_file=token_file, client_cert=token_file)
    with pytest.raises(ConfigurationError, match="ca_file"):
        Federation("https://agg.test", token_file=token_file, ca_file=tmp_path / "nope.pem")
    with pytest.raises(ConfigurationError, match="audit_url"):
        _ = Federation("http://agg.test", token_file=token_file).audits


def test_mutual_tls_options_build_the_services_own_context(tmp_path, token_file):
    from splitunet.client.http import tls_verify
    from splitunet.service.pki import ThrowawayCA

    ca = ThrowawayCA(tmp_path / "pki")
    files = ca.client("operator")
    context = tls_verify(ca.cert_file, files.cert, files.key)
    assert isinstance(context, ssl.SSLContext) and context.verify_mode == ssl.CERT_REQUIRED
    assert tls_verify() is True


def test_profiles_environment_and_options_in_that_order(tmp_path, token_file):
    profiles = tmp_path / "profiles.toml"
    profiles.write_text('default = "a"\n'
                        '[profiles.a]\nurl = "https://a.test"\naudit_url = "https://audit-a.test"\ntimeout_s = 5\n'
                        f'token_file = "{token_file}"\n'
                        '[profiles.b]\nurl = "https://b.test"\nca_file = "pki/ca.pem"\n')
    env = {"SPLITUNET_PROFILES": str(profiles)}
    assert resolve_profile(environ=env).url == "https://a.test"
    assert resolve_profile(environ=env | {"SPLITUNET_PROFILE": "b"}).url == "https://b.test"
    assert resolve_profile(profile="b", environ=env).audit_url is None
    assert resolve_profile(profile="b", environ=env).ca_file == tmp_path / "pki" / "ca.pem"  # beside the file
    settled = resolve_profile({"url": "https://cli.test", "ca_file": None},
                              environ=env | {"SPLITUNET_URL": "https://env.test", "SPLITUNET_TIMEOUT_S": "7"})
    assert (settled.url, settled.audit_url, settled.timeout_s, settled.token_file) == (
        "https://cli.test", "https://audit-a.test", 7.0, token_file)
    assert resolve_profile(environ=env | {"SPLITUNET_URL": "https://env.test"}).url == "https://env.test"
    with pytest.raises(ConfigurationError, match="no profile 'c'.*a, b"):
        resolve_profile(profile="c", environ=env)
    with pytest.raises(ConfigurationError, match="url"):
        resolve_profile({"url": "ftp://x"}, environ=env)
    assert load_profile(path=tmp_path / "absent.toml").url is None
    profiles.write_text("[profiles.a]\nurl = ")
    with pytest.raises(ConfigurationError, match="cannot read the profile file"):
        resolve_profile(environ=env)


def test_the_live_view_shows_progress_eta_validation_and_the_gate():
    from rich.console import Console

    from splitunet.cli.views import eta_seconds, job_view
    from splitunet.federation import JobState, JobStatus

    status = JobStatus.model_validate({
        "job_id": "j1", "state": "paused_by_privacy_gate", "step": 40, "steps": 100, "loss": 0.5,
        "steps_per_second": 2.0, "samples_per_second": 16.0, "validation_step": 40,
        "validation": {"dice": {"TC": 0.8, "WT": 0.9, "ET": 0.7, "mean": 0.8}, "hd95": {"WT": 4.2}},
        "privacy_gate": {"passed": False, "site": "t1", "attack": "whitebox", "figure": "ssim", "value": 0.9,
                         "threshold": 0.5, "step": 40}})
    assert eta_seconds(status) == 30.0
    assert eta_seconds(status.model_copy(update={"state": JobState.SUCCEEDED})) is None
    console = Console(record=True, width=120)
    console.print(job_view(status))
    text = console.export_text()
    for shown in ("40 / 100", "0.5000", "2.00 steps/s, 16.0 samples/s", "0:30", "step 40: Dice TC 0.800 WT 0.900",
                  "HD95 WT 4.2 mm", "site t1: whitebox ssim 0.9 > 0.5 at step 40"):
        assert shown in text, (shown, text)
