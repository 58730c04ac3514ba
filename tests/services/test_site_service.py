"""The site service in process: run setup, the forward/backward step over the wire, errors, checkpoints, metrics."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from federation_testkit import SITE_HEADERS, SITE_SEED, SITES, Cohort, align_site, model_config, site_headers
from safetensors.torch import save as safetensors_save

from services.client_site.app import create_app as create_site_app
from splitunet.networks.factory import make_site_encoder
from splitunet.protocol import expected_site_shapes
from splitunet.schemas import RunSetup, WireOptions
from splitunet.wire import (
    CONTENT_TYPE,
    FORMAT_VERSION,
    BundleExpectation,
    BundleKind,
    BundleMeta,
    WireDtype,
    decode_bundle,
    encode_bundle,
    pack_frame,
)

RUN = "run-1"
ROI = (16, 16)
MAX = 2**26
#: Cut at the bottleneck with every skip sent: the site sends level0, level1 and level2.
MODEL = model_config(cut_level=2)


# ---------------------------------------------------------------------------------------------- helpers
def setup_body(run_id: str = RUN, **kwargs: Any) -> dict[str, Any]:
    kwargs.setdefault("model", MODEL)
    return RunSetup(run_id=run_id, **kwargs).model_dump(mode="json")


def setup(client: TestClient, body: dict[str, Any]) -> httpx.Response:
    """Align the site on all its cases through PSI (as the aggregator does), then set up a run."""
    assert align_site(client, client.app.state.runtime.case_ids()).status_code == 200
    return client.post("/v1/runs", json=body, headers=SITE_HEADERS)


def samples(cohort: Cohort, n: int = 2, *, size: tuple[int, ...] = ROI, **extra: Any) -> list[dict[str, Any]]:
    """``n`` 2D samples (axial slices 6, 7, ...) of the first cases, cropped to ``size`` in-plane."""
    return [
        {"case_id": cohort.case_ids[i % len(cohort.case_ids)], "start": [4, 2], "size": list(size),
         "axial_index": 6 + i, "flip_axes": [1] if i % 2 else [], "volume_shape": list(cohort.shape)} | extra
        for i in range(n)
    ]


def forward(client: TestClient, cohort: Cohort, step: int, *, run_id: str = RUN, phase: str = "train",
            n: int = 2, body: dict[str, Any] | None = None) -> httpx.Response:
    body = body if body is not None else {"step": step, "phase": phase, "samples": samples(cohort, n)}
    return client.post(f"/v1/runs/{run_id}/forward", json=body, headers=SITE_HEADERS)


def backward(client: TestClient, step: int, data: bytes, *, run_id: str = RUN,
             content_type: str = CONTENT_TYPE) -> httpx.Response:
    headers = SITE_HEADERS | {"Content-Type": content_type}
    return client.post(f"/v1/runs/{run_id}/backward", params={"step": step}, content=data, headers=headers)


def shapes(batch: int = 2) -> dict[str, tuple[int, ...]]:
    return expected_site_shapes(MODEL, batch, ROI)


def gradients(step: int, *, scale: float = 1e-2, seed: int = 0, site: str = "t1", run_id: str = RUN,
              tensor_shapes: dict[str, tuple[int, ...]] | None = None, dtype: WireDtype = WireDtype.FP32) -> bytes:
    """A gradient bundle for the ``t1`` site's activations of a 2-sample forward."""
    g = torch.Generator().manual_seed(seed)
    tensors = {k: scale * torch.randn(s, generator=g) for k, s in (tensor_shapes or shapes()).items()}
    meta = BundleMeta(run_id=run_id, step=step, site=site, kind=BundleKind.GRADIENTS)
    return encode_bundle(tensors, meta=meta, dtype=dtype, max_bytes=MAX)


def raw_bundle(tensors: dict[str, torch.Tensor], *, step: int, run_id: str = RUN, site: str = "t1") -> bytes:
    """A well-framed fp32 gradient bundle built without the encoder's checks (e.g. holding NaN)."""
    metadata = {"format": FORMAT_VERSION, "run_id": run_id, "step": str(step), "site": site, "kind": "gradients",
                "names": json.dumps(list(tensors)), "dtype": "fp32"}
    return pack_frame(safetensors_save(tensors, metadata=metadata), compressed=False)


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """The response is the typed error body ``{code, message, detail}`` with this status and code."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"code", "message", "detail"}, body
    assert body["code"] == code, body
    assert isinstance(body["message"], str) and body["message"], body
    return body


def encoder_state(client: TestClient, run_id: str = RUN) -> dict[str, torch.Tensor]:
    encoder = client.app.state.runtime.encoder(run_id)
    return {k: v.detach().clone() for k, v in encoder.state_dict().items()}


@pytest.fixture
def run(site: TestClient) -> TestClient:
    """The t1 site, aligned on the whole cohort through PSI, with run ``run-1`` set up (tiny 2D model, default
    wire: fp16 activations, fp32 gradients)."""
    assert align_site(site, site.app.state.runtime.case_ids()).status_code == 200
    response = site.post("/v1/runs", json=setup_body(), headers=SITE_HEADERS)
    assert response.status_code == 200, response.text
    return site


def train_step(client: TestClient, cohort: Cohort, step: int, *, seed: int = 0) -> None:
    assert forward(client, cohort, step).status_code == 200
    response = backward(client, step, gradients(step, seed=seed))
    assert response.status_code == 200, response.text
    assert response.json() == {"run_id": RUN, "step": step, "applied": True}


# ---------------------------------------------------------------------------------------------- info, setup
def test_info_names_the_site_and_never_a_case(site: TestClient, cohort: Cohort) -> None:
    response = site.get("/v1/info", headers=SITE_HEADERS)
    assert response.status_code == 200
    info = response.json()
    assert info["site"] == "t1" and info["modalities"] == ["t1"]
    assert info["runs"] == {} and info["defenses"] == []
    for case_id in cohort.case_ids:
        assert case_id not in response.text
    assert site.get("/readyz").status_code == 200


def test_setup_run_is_idempotent_and_conflicts_on_another_setup(site: TestClient) -> None:
    first = site.post("/v1/runs", json=setup_body(), headers=SITE_HEADERS)
    again = site.post("/v1/runs", json=setup_body(), headers=SITE_HEADERS)
    assert first.status_code == again.status_code == 200
    assert first.json() == again.json()
    assert first.json()["site"] == "t1" and first.json()["parameters"] > 0
    assert len(site.app.state.runtime.encoder(RUN).state_dict()) > 0
    info = site.get("/v1/info", headers=SITE_HEADERS).json()
    assert info["runs"][RUN]["fingerprint"] == first.json()["fingerprint"]

    other = site.post("/v1/runs", json=setup_body(optimizer={"lr": 5e-4}), headers=SITE_HEADERS)
    assert_error(other, 409, "conflict")


def test_setup_with_a_model_without_this_site_or_its_modalities_is_422(site: TestClient) -> None:
    from splitunet.config import SiteSpec, SplitUNetConfig

    no_t1 = SplitUNetConfig(spatial_dims=2, features=(4, 8, 16),
                            sites=(SiteSpec(name="a", modalities=("t1",)), SiteSpec(name="b", modalities=("t2",))))
    body = assert_error(site.post("/v1/runs", json=setup_body(model=no_t1), headers=SITE_HEADERS),
                        422, "bad_configuration")
    assert "'t1'" in body["message"]

    wrong = SplitUNetConfig(spatial_dims=2, features=(4, 8, 16),
                            sites=(SiteSpec(name="t1", modalities=("t2",)), SiteSpec(name="b", modalities=("t1",))))
    body = assert_error(site.post("/v1/runs", json=setup_body(model=wrong), headers=SITE_HEADERS),
                        422, "bad_configuration")
    assert "modalities" in body["message"]
    assert site.get("/v1/info", headers=SITE_HEADERS).json()["runs"] == {}


def test_a_pinned_model_refuses_other_runs(start_app, site_settings) -> None:
    pinned = MODEL
    client = start_app(create_site_app(site_settings("t1", model=pinned)))
    assert client.get("/v1/info", headers=SITE_HEADERS).json()["model_policy"] is not None
    assert client.post("/v1/runs", json=setup_body(model=pinned), headers=SITE_HEADERS).status_code == 200
    other = client.post("/v1/runs", json=setup_body("run-2", model=model_config(features=(8, 16, 32))),
                        headers=SITE_HEADERS)
    assert_error(other, 409, "conflict")


# ---------------------------------------------------------------------------------------------- the step
@pytest.mark.parametrize("wire", [WireOptions(), WireOptions(activations="fp32", compress=True)])
def test_forward_returns_the_activation_bundle(site: TestClient, cohort: Cohort, wire: WireOptions) -> None:
    assert setup(site, setup_body(wire=wire)).status_code == 200
    response = forward(site, cohort, 3, n=3)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == CONTENT_TYPE
    dtype = WireDtype(wire.activations.value)
    expect = BundleExpectation(shapes=shapes(3), dtype=dtype, run_id=RUN, step=3, site="t1",
                               kind=BundleKind.ACTIVATIONS)
    bundle = decode_bundle(response.content, expect=expect, max_bytes=MAX, as_float32=False)
    assert list(bundle.tensors) == ["level0", "level1", "level2"]
    assert all(t.dtype == dtype.torch_dtype() for t in bundle.tensors.values())
    assert all(t.abs().sum() > 0 for t in bundle.tensors.values())

    # an eval forward of the same samples gives the same activations and leaves the pending step alone
    evaluated = decode_bundle(forward(site, cohort, 3, n=3, phase="eval").content, max_bytes=MAX, as_float32=False)
    for name, tensor in bundle.tensors.items():
        torch.testing.assert_close(evaluated.tensors[name], tensor, rtol=1e-3, atol=1e-3)
    assert backward(site, 3, gradients(3, tensor_shapes=shapes(3))).status_code == 200


def test_backward_steps_the_encoder_and_a_retry_is_acknowledged(run: TestClient, cohort: Cohort) -> None:
    before = encoder_state(run)
    train_step(run, cohort, 1)
    after = encoder_state(run)
    assert any(not torch.equal(before[k], after[k]) for k in before)

    retry = backward(run, 1, gradients(1))
    assert retry.status_code == 200 and retry.json() == {"run_id": RUN, "step": 1, "applied": False}
    assert all(torch.equal(after[k], v) for k, v in encoder_state(run).items())
    assert run.get("/v1/info", headers=SITE_HEADERS).json()["runs"][RUN]["step"] == 1


def test_the_step_runs_on_the_sites_one_compute_thread(run: TestClient, cohort: Cohort, monkeypatch) -> None:
    """Forwards and backwards reach the encoder on one thread whichever worker thread took the request (one OpenMP
    team per process; see splitunet.service.compute)."""
    import threading

    threads: list[str] = []
    step = run.app.state.runtime._run(RUN).step
    for name in ("forward", "backward"):
        method = getattr(step, name)

        def traced(*args: Any, _method: Any = method, **kwargs: Any) -> Any:
            threads.append(threading.current_thread().name)
            return _method(*args, **kwargs)

        monkeypatch.setattr(step, name, traced)
    for i in (1, 2):
        train_step(run, cohort, i)
    assert len(threads) == 4 and len(set(threads)) == 1 and threads[0].startswith("site-t1-torch")


# ---------------------------------------------------------------------------------------------- refusals
def test_backward_before_forward_is_409(run: TestClient) -> None:
    body = assert_error(backward(run, 1, gradients(1)), 409, "out_of_order")
    assert "forward" in body["message"]


def test_backward_for_another_step_is_409_and_keeps_the_pending_step(run: TestClient, cohort: Cohort) -> None:
    assert forward(run, cohort, 1).status_code == 200
    body = assert_error(backward(run, 2, gradients(2)), 409, "out_of_order")
    assert body["detail"]["pending_step"] == 1
    assert backward(run, 1, gradients(1)).status_code == 200


def test_a_backward_of_an_older_step_after_the_next_forward_is_409(run: TestClient, cohort: Cohort) -> None:
    train_step(run, cohort, 1)
    assert forward(run, cohort, 2).status_code == 200
    assert_error(backward(run, 1, gradients(1)), 409, "out_of_order")
    assert backward(run, 2, gradients(2)).status_code == 200


def test_unknown_run_is_404(site: TestClient, cohort: Cohort) -> None:
    assert_error(forward(site, cohort, 1, run_id="nope"), 404, "not_found")
    assert_error(backward(site, 1, gradients(1, run_id="nope"), run_id="nope"), 404, "not_found")
    assert_error(site.post("/v1/runs/nope/checkpoint", json={"step": 1}, headers=SITE_HEADERS), 404, "not_found")


@pytest.mark.parametrize(
    ("make", "code"),
    [
        pytest.param(lambda: gradients(1, tensor_shapes={"level0": (2, 4, 16, 16), "levelX": (2, 8, 8, 8),
                                                         "level2": (2, 16, 4, 4)}), "bad_bundle", id="names"),
        pytest.param(lambda: gradients(1, tensor_shapes={"level0": (2, 4, 16, 16), "level1": (2, 8, 8, 8)}),
                     "bad_bundle", id="missing-tensor"),
        pytest.param(lambda: gradients(1, tensor_shapes={"level0": (2, 4, 16, 16), "level1": (2, 8, 8, 4),
                                                         "level2": (2, 16, 4, 4)}), "bad_bundle", id="shape"),
        pytest.param(lambda: gradients(1, tensor_shapes=shapes(3)), "bad_bundle", id="batch"),
        pytest.param(lambda: raw_bundle({k: torch.full(s, float("nan")) for k, s in shapes().items()}, step=1),
                     "bad_bundle", id="nan"),
        pytest.param(lambda: raw_bundle({k: torch.full(s, float("inf")) for k, s in shapes().items()}, step=1),
                     "bad_bundle", id="inf"),
        pytest.param(lambda: gradients(1)[:-100], "bad_bundle", id="truncated"),
        pytest.param(lambda: gradients(1)[:20], "bad_bundle", id="truncated-header"),
        pytest.param(lambda: b"", "bad_bundle", id="empty"),
        pytest.param(lambda: b"\x00" * 4096, "bad_bundle", id="garbage"),
        pytest.param(lambda: gradients(1, dtype=WireDtype.FP16), "bad_bundle", id="dtype"),
        pytest.param(lambda: gradients(1, site="t2"), "bad_bundle", id="other-site"),
        pytest.param(lambda: gradients(1, run_id="run-2"), "bad_bundle", id="other-run"),
        pytest.param(lambda: gradients(2), "bad_bundle", id="step-in-meta"),
    ],
)
def test_malformed_gradients_are_400_and_the_step_can_still_complete(
    run: TestClient, cohort: Cohort, make, code: str
) -> None:
    assert forward(run, cohort, 1).status_code == 200
    before = encoder_state(run)
    assert_error(backward(run, 1, make()), 400, code)
    assert all(torch.equal(before[k], v) for k, v in encoder_state(run).items())
    assert backward(run, 1, gradients(1)).status_code == 200


def test_wrong_content_type_is_415(run: TestClient, cohort: Cohort) -> None:
    assert forward(run, cohort, 1).status_code == 200
    assert_error(backward(run, 1, gradients(1), content_type="application/octet-stream"), 415,
                 "unsupported_media_type")
    assert_error(run.post(f"/v1/runs/{RUN}/backward", params={"step": 1}, json={"level0": [1.0]},
                          headers=SITE_HEADERS), 415, "unsupported_media_type")


def test_oversize_bodies_are_413(start_app, site_settings, cohort: Cohort) -> None:
    # the request limit (kit middleware) is checked before the body is read
    client = start_app(create_site_app(site_settings("t1", max_request_bytes=4096)))
    assert setup(client, setup_body()).status_code == 200
    assert forward(client, cohort, 1).status_code == 200
    body = assert_error(backward(client, 1, gradients(1)), 413, "request_too_large")
    assert body["detail"]["max_bytes"] == 4096


def test_a_gradient_bundle_over_the_wire_limit_is_413(start_app, site_settings, cohort: Cohort) -> None:
    # fp16 activations fit, fp32 gradients (twice the bytes) do not
    numel = sum(torch.Size(s).numel() for s in shapes().values())
    client = start_app(create_site_app(site_settings("t1", max_bundle_bytes=3 * numel + 1024)))
    assert setup(client, setup_body()).status_code == 200
    assert forward(client, cohort, 1).status_code == 200
    assert_error(backward(client, 1, gradients(1)), 413, "request_too_large")  # the gate, before reading
    # an activation bundle over the limit is refused too, as a typed error rather than a crash
    assert_error(forward(client, cohort, 2, n=4), 413, "bundle_too_large")


def test_forward_of_an_unknown_case_is_the_uniform_not_aligned(run: TestClient, cohort: Cohort) -> None:
    body = {"step": 1, "samples": samples(cohort, 1, case_id="BraTS2021_99999")}
    error = assert_error(forward(run, cohort, 1, body=body), 409, "not_aligned")
    assert "BraTS2021_99999" not in error["message"]


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"step": 1, "samples": []}, id="no-samples"),
        pytest.param({"step": -1, "samples": "S"}, id="negative-step"),
        pytest.param({"step": 10**18, "samples": "S"}, id="step-beyond-the-wire-limit"),
        pytest.param({"step": 1, "phase": "test", "samples": "S"}, id="bad-phase"),
        pytest.param({"step": 1, "samples": "S", "extra": 1}, id="extra-field"),
        pytest.param({"step": 1, "samples": [{"case_id": "x", "start": [0, 0], "size": [0, 16], "axial_index": 1}]},
                     id="zero-size"),
        pytest.param({"step": 1, "samples": [{"case_id": "x", "start": [0, 0, 0], "size": [16, 16],
                                              "axial_index": 1}]}, id="start-size-mismatch"),
        pytest.param({"step": 1, "samples": [{"case_id": "x", "start": [0, 0], "size": [16, 16], "axial_index": 1,
                                              "flip_axes": [2]}]}, id="bad-flip"),
        pytest.param({"step": 1, "samples": "MIXED"}, id="mixed-2d-3d"),
    ],
)
def test_invalid_forward_requests_are_422(run: TestClient, cohort: Cohort, body: dict[str, Any]) -> None:
    if body["samples"] == "S":
        body = body | {"samples": samples(cohort, 1)}
    elif body["samples"] == "MIXED":
        three_d = {"case_id": cohort.case_ids[0], "start": [0, 0, 0], "size": [16, 16, 16]}
        body = body | {"samples": [*samples(cohort, 1), three_d]}
    assert_error(forward(run, cohort, 1, body=body), 422, "invalid_request")


@pytest.mark.parametrize(
    ("sample", "code"),
    [
        pytest.param({"start": [0, 0, 0], "size": [16, 16, 16], "axial_index": None}, "bad_configuration",
                     id="3d-sample-for-a-2d-model"),
        pytest.param({"size": [6, 6]}, "bad_configuration", id="size-not-a-multiple"),
        pytest.param({"size": [4, 4]}, "bad_configuration", id="size-too-small"),
        pytest.param({"volume_shape": [30, 30, 16]}, "bad_data", id="planned-on-another-grid"),
        pytest.param({"axial_index": 40, "volume_shape": None}, "bad_data", id="slice-outside"),
    ],
)
def test_samples_the_model_cannot_take_are_422(run: TestClient, cohort: Cohort, sample: dict, code: str) -> None:
    body = {"step": 1, "samples": [samples(cohort, 1)[0] | sample]}
    assert_error(forward(run, cohort, 1, body=body), 422, code)


def test_a_forward_larger_than_the_voxel_limit_is_refused(start_app, site_settings, cohort: Cohort) -> None:
    small = start_app(create_site_app(site_settings("t1", max_batch_voxels=16 * 16 * 3)))
    assert setup(small, setup_body()).status_code == 200
    assert forward(small, cohort, 1, n=3).status_code == 200
    body = assert_error(forward(small, cohort, 2, n=4), 422, "bad_configuration")
    assert "SITE_MAX_BATCH_VOXELS" in body["message"] and body["detail"]["voxels"] == 16 * 16 * 4


def test_the_backward_step_parameter_is_validated(run: TestClient, cohort: Cohort) -> None:
    assert forward(run, cohort, 1).status_code == 200
    headers = SITE_HEADERS | {"Content-Type": CONTENT_TYPE}
    missing = run.post(f"/v1/runs/{RUN}/backward", content=gradients(1), headers=headers)
    assert_error(missing, 422, "invalid_request")
    assert_error(backward(run, -1, gradients(1)), 422, "invalid_request")
    assert_error(backward(run, 10**18, gradients(1)), 422, "invalid_request")
    assert_error(backward(run, 1, gradients(1), run_id="bad run!"), 422, "invalid_request")


def test_every_route_needs_the_token(run: TestClient, cohort: Cohort) -> None:
    calls = [
        ("GET", "/v1/info", {}),
        ("POST", "/v1/runs", {"json": setup_body()}),
        ("POST", f"/v1/runs/{RUN}/forward", {"json": {"step": 1, "samples": samples(cohort, 1)}}),
        ("POST", f"/v1/runs/{RUN}/backward?step=1", {"content": gradients(1),
                                                     "headers": {"Content-Type": CONTENT_TYPE}}),
        ("POST", f"/v1/runs/{RUN}/checkpoint", {"json": {"step": 1}}),
        ("POST", f"/v1/runs/{RUN}/restore", {"json": {"step": 1}}),
    ]
    for method, path, kwargs in calls:
        assert_error(run.request(method, path, **kwargs), 401, "unauthorized")
        wrong = kwargs | {"headers": kwargs.get("headers", {}) | {"Authorization": "Bearer wrong-token-123456"}}
        assert_error(run.request(method, path, **wrong), 401, "unauthorized")
    assert run.app.state.runtime.encoder(RUN) is not None
    assert run.get("/healthz").status_code == 200 and run.get("/metrics").status_code == 200


# ---------------------------------------------------------------------------------------------- checkpoints
def test_checkpoint_then_restore_gives_back_encoder_and_optimizer(run: TestClient, cohort: Cohort) -> None:
    train_step(run, cohort, 1)
    saved = run.post(f"/v1/runs/{RUN}/checkpoint", json={"step": 1}, headers=SITE_HEADERS)
    assert saved.status_code == 200, saved.text
    assert saved.json()["step"] == 1 and len(saved.json()["sha256"]) == 64
    at_1 = encoder_state(run)

    train_step(run, cohort, 2, seed=2)
    at_2 = encoder_state(run)
    assert any(not torch.equal(at_1[k], at_2[k]) for k in at_1)

    restored = run.post(f"/v1/runs/{RUN}/restore", json={"step": 1}, headers=SITE_HEADERS)
    assert restored.status_code == 200, restored.text
    assert restored.json()["sha256"] == saved.json()["sha256"]
    assert all(torch.equal(at_1[k], v) for k, v in encoder_state(run).items())
    assert run.get("/v1/info", headers=SITE_HEADERS).json()["runs"][RUN]["step"] == 1

    # the optimizer came back too: replaying step 2 lands on the same weights
    train_step(run, cohort, 2, seed=2)
    assert all(torch.equal(at_2[k], v) for k, v in encoder_state(run).items())

    assert_error(run.post(f"/v1/runs/{RUN}/restore", json={"step": 9}, headers=SITE_HEADERS), 404, "not_found")
    too_far = run.post(f"/v1/runs/{RUN}/checkpoint", json={"step": 10**18}, headers=SITE_HEADERS)
    assert_error(too_far, 422, "invalid_request")


def test_restore_after_a_restart_of_the_site(start_app, site_settings, cohort: Cohort) -> None:
    settings = site_settings("t1")
    first = start_app(create_site_app(settings))
    assert align_site(first, cohort.case_ids).status_code == 200
    assert first.post("/v1/runs", json=setup_body(), headers=SITE_HEADERS).status_code == 200
    train_step(first, cohort, 1)
    assert first.post(f"/v1/runs/{RUN}/checkpoint", json={"step": 1}, headers=SITE_HEADERS).status_code == 200
    trained = encoder_state(first)

    second = start_app(create_site_app(settings))  # a new process: the run is back from the store ...
    info = second.get("/v1/info", headers=SITE_HEADERS).json()["runs"][RUN]
    assert info["restore_required"] is True and info["checkpoint_step"] == 1
    # ... but refuses to train on weights it does not hold until a step is restored
    body = assert_error(forward(second, cohort, 2), 409, "out_of_order")
    assert body["detail"] == {"restore_required": True, "checkpoint_step": 1}
    assert second.post("/v1/runs", json=setup_body(), headers=SITE_HEADERS).status_code == 200  # idempotent
    assert second.post(f"/v1/runs/{RUN}/restore", json={"step": 1}, headers=SITE_HEADERS).status_code == 200
    assert all(torch.equal(trained[k], v) for k, v in encoder_state(second).items())
    retry = backward(second, 1, gradients(1))  # a retried backward of the restored step is acknowledged
    assert retry.status_code == 200 and retry.json()["applied"] is False


# ---------------------------------------------------------------------------------------------- metrics
def test_metrics_show_tensor_bytes_and_step_latency(run: TestClient, cohort: Cohort) -> None:
    sent = forward(run, cohort, 1)
    received = gradients(1)
    assert backward(run, 1, received).status_code == 200
    metrics = run.app.state.metrics
    assert metrics.value("splitunet_site_tensor_bytes_total", {"direction": "out"}) == len(sent.content)
    assert metrics.value("splitunet_site_tensor_bytes_total", {"direction": "in"}) == len(received)
    for phase in ("train", "backward"):
        assert metrics.value("splitunet_site_step_seconds_count", {"phase": phase}) == 1
        assert metrics.value("splitunet_site_step_seconds_sum", {"phase": phase}) > 0
    text = run.get("/metrics").text
    assert f'splitunet_site_tensor_bytes_total{{direction="out"}} {float(len(sent.content))}' in text
    assert 'splitunet_site_step_seconds_count{phase="train"} 1.0' in text
    assert 'route="/v1/runs/{run_id}/forward"' in text



def test_sites_set_up_concurrently_in_one_process_get_their_seeded_weights(start_app, site_settings) -> None:
    # torch's default generator is process-wide: concurrent seeded constructions must not interleave
    clients = {name: start_app(create_site_app(site_settings(name))) for name in SITES}
    for attempt in range(8):
        run_id, body = f"run-{attempt}", setup_body(f"run-{attempt}")
        with ThreadPoolExecutor(len(clients)) as pool:
            answers = list(pool.map(lambda n, b=body: clients[n].post("/v1/runs", json=b, headers=site_headers(n)),
                                    clients))
        assert all(a.status_code == 200 for a in answers)
        for name, client in clients.items():
            want = make_site_encoder(MODEL, name, SITE_SEED).state_dict()
            got = client.app.state.runtime.encoder(run_id).state_dict()
            assert all(torch.equal(got[k], want[k]) for k in want), f"{name}, attempt {attempt}"


def test_a_bad_case_stops_start_up_or_is_skipped(brats, tmp_path, site_settings) -> None:
    from splitunet.errors import DataError

    root = tmp_path / "t1-data"
    brats.write_cohort(root, 3, modalities=("t1",), seg=False)
    broken = next((root / brats.case_id_for(1, "brats2021")).glob("*_t1.nii.gz"))
    broken.write_bytes(b"not a NIfTI file")  # unreadable: reported when the service starts, not mid-training
    with pytest.raises(DataError, match=brats.case_id_for(1, "brats2021")):
        with TestClient(create_site_app(site_settings("t1", data_dir=root))):
            pass
    with TestClient(create_site_app(site_settings("t1", data_dir=root, on_bad_case="skip"))) as client:
        runtime = client.app.state.runtime
        assert runtime.case_ids() == [brats.case_id_for(0, "brats2021"), brats.case_id_for(2, "brats2021")]
        assert runtime.skipped_cases == 1
