"""The demo passes defenses through: its job plan with gradient defenses and secure sum is a valid spec."""

from __future__ import annotations

from splitunet.demo import DemoOptions, training_plan
from splitunet.federation import FederationSpec


def test_the_demo_plan_with_defenses_is_a_valid_federation_spec(tmp_path) -> None:
    options = DemoOptions(workdir=tmp_path, quick=True, gradient_defenses=[{"name": "smooth", "sigma": 1.0}],
                          secure_sum=True, site_defenses='[{"name": "gaussian", "sigma0": 0.1}]')
    plan = training_plan(options)
    sites = ["t1", "t2"]  # registry names (AGG_SITES)
    spec = FederationSpec.model_validate({"sites": sites, **plan})
    assert spec.secure_sum is not None and spec.model.fusion.value == "sum"
    assert [d.name for d in spec.gradient_defenses] == ["smooth"]
