"""The acceptance test with real processes: 4 site services and the aggregator under uvicorn on 127.0.0.1.

Over HTTP with fp32 wire and a fixed seed, 5 training steps give the same losses (<= 1e-5) and the same final
weights as the in-process step protocol. The reference learns what the job trained on from its status alone
(``val_case_ids`` and the seed) and reads every party's weights from its checkpoint file.
"""

from __future__ import annotations

import httpx
import torch
from federation_testkit import (
    SITES,
    Cohort,
    checkpoint_weights,
    derive_plans,
    max_weight_difference,
    replay_in_process,
    run_job,
    site_specs,
    write_registry,
)

from services.aggregator.labels import LabelStore
from services.aggregator.settings import AggregatorSettings
from splitunet.federation import FederationSpec
from splitunet.launcher import LocalFederation

STEPS = 5


def test_uvicorn_federation_equals_in_process_protocol(cohort: Cohort, tmp_path):
    with LocalFederation(tmp_path / "fed", torch_threads=1) as federation:
        for name in SITES:  # SITE_SEED: the sites' encoders are reproducible for the comparison
            federation.start_site(name, [name], cohort.site_dirs[name], seed=7)
        aggregator = federation.start_aggregator(cohort.labels_dir)
        federation.wait_ready(timeout_s=180)
        spec_doc = {
            "run_id": "uvicorn-equivalence",
            "sites": list(SITES),
            "model": {"spatial_dims": 2, "features": [4, 8, 16], "cut_level": 1, "fusion": "concat"},
            "roi": [16, 16],
            "batch_size": 2,
            "steps": STEPS,
            "val_cases": 1,
            "seed": 7,
            "fg_ratio": 0.5,
            "flip_prob": 0.5,
            "site_optimizer": {"lr": 1e-3, "weight_decay": 1e-5},
            "server_optimizer": {"lr": 1e-3, "weight_decay": 1e-5},
            "wire": {"activations": "fp32", "gradients": "fp32"},
        }
        headers = federation.operator_headers()
        with httpx.Client(base_url=aggregator.url, timeout=60) as client:
            status = run_job(client, spec_doc, timeout_s=300, headers=headers)
    assert status["state"] == "succeeded", status
    assert len(status["losses"]) == STEPS

    spec = FederationSpec.model_validate(spec_doc)
    registry = write_registry(tmp_path / "registry")
    labels = LabelStore(AggregatorSettings(data_dir=cohort.labels_dir, sites=registry, auth_disabled=True))
    train_cases = sorted(set(cohort.case_ids) - set(status["val_case_ids"]))
    plans = derive_plans(spec, labels, train_cases, STEPS, cohort)
    config = spec.model.build(site_specs(spec))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the services ran with one thread each: same kernels, same reduction order
    try:
        losses, reference = replay_in_process(spec, config, plans, cohort, labels)
    finally:
        torch.set_num_threads(threads)

    assert max(abs(a - b) for a, b in zip(status["losses"], losses, strict=True)) <= 1e-5, (status["losses"], losses)
    state = tmp_path / "fed" / "state"
    run = spec_doc["run_id"]
    decoder = checkpoint_weights(state / "aggregator" / run / f"aggregator-step-{STEPS:08d}.safetensors")
    assert max_weight_difference(decoder, reference.model.decoder.state_dict()) <= 1e-6
    for name in SITES:
        encoder = checkpoint_weights(state / f"site-{name}" / run / f"site-{name}-step-{STEPS:08d}.safetensors")
        assert max_weight_difference(encoder, reference.model.encoders[name].state_dict()) <= 1e-6, name
