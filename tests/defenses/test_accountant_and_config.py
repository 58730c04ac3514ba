"""The DP accountant (Opacus figures), the epsilon budget, and the defense configuration errors."""

from __future__ import annotations

import json

import pytest
import torch
from opacus.accountants import PRVAccountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from opacus.accountants.rdp import RDPAccountant
from pydantic import ValidationError

from splitunet.defenses import build_site_defenses, parse_site_defenses
from splitunet.defenses.config import AccountantKind, BudgetBasis, DPConfig
from splitunet.defenses.dp import DPGaussian
from splitunet.errors import PolicyError
from splitunet.filters import Direction, FilterContext


def release(dp: DPGaussian, step: int, q: float | None = 0.05, groups=("a", "b")) -> None:
    phase = "train" if q is not None else "eval"
    context = FilterContext("run", step, "t1", Direction.ACTIVATIONS, phase, groups=groups, sample_rate=q)
    dp({"level0": torch.randn(len(groups), 2, 8, 8)}, context)


@pytest.mark.parametrize("kind", [AccountantKind.RDP, AccountantKind.PRV])
def test_epsilon_is_the_accountant_figure_and_grows_with_steps(kind: AccountantKind) -> None:
    q, z, delta = 0.05, 1.1, 1e-5
    dp = DPGaussian(DPConfig(clip=1.0, noise_multiplier=z, delta=delta, accountant=kind, seed=0))
    previous = 0.0
    for steps in range(1, 31):
        release(dp, steps, q)
        if steps in (1, 10, 30):
            got = dp.stats()["epsilon"]
            if kind == AccountantKind.RDP:  # Opacus's RDP analysis directly, not through its accountant class
                alphas = RDPAccountant.DEFAULT_ALPHAS
                want, _ = get_privacy_spent(orders=alphas, rdp=compute_rdp(q=q, noise_multiplier=z, steps=steps,
                                                                          orders=alphas), delta=delta)
            else:
                accountant = PRVAccountant()
                for _ in range(steps):
                    accountant.step(noise_multiplier=z, sample_rate=q)
                want = accountant.get_epsilon(delta=delta)
            assert got == pytest.approx(float(want), rel=1e-6), steps
            assert got > previous
            previous = got
    assert dp.stats()["steps"] == 30


def test_worst_patient_epsilon_counts_each_patients_releases_without_amplification() -> None:
    dp = DPGaussian(DPConfig(clip=1.0, noise_multiplier=2.0, seed=0))
    release(dp, 1, 0.05, groups=("a", "b"))
    release(dp, 2, 0.05, groups=("a", "a"))  # one release of patient a (both samples clipped jointly)
    release(dp, 3, None, groups=("a", "c"))  # evaluation: counted per patient, not in the subsampled figure
    accountant = RDPAccountant()
    accountant.history = [(2.0, 1.0, 3)]
    assert dp.stats()["epsilon_worst_patient"] == pytest.approx(accountant.get_epsilon(1e-5))
    assert dp.stats()["steps"] == 2


@pytest.mark.parametrize("basis", list(BudgetBasis))
def test_the_budget_refuses_the_release_that_would_exceed_it(basis: BudgetBasis) -> None:
    probe = DPGaussian(DPConfig(clip=1.0, noise_multiplier=1.0, seed=0))
    eps = []
    for step in range(1, 5):
        release(probe, step)
        key = {BudgetBasis.SUBSAMPLED: "epsilon", BudgetBasis.WORST_PATIENT: "epsilon_worst_patient",
               BudgetBasis.AGGREGATOR: "epsilon_aggregator"}[basis]
        eps.append(probe.stats()[key])
    budget = (eps[2] + eps[3]) / 2
    dp = DPGaussian(DPConfig(clip=1.0, noise_multiplier=1.0, epsilon_budget=budget, budget_basis=basis, seed=0))
    for step in range(1, 4):
        release(dp, step)
    with pytest.raises(PolicyError) as refused:
        release(dp, 4)
    assert refused.value.status_code == 403
    assert refused.value.detail["rule"] == "epsilon_budget"
    assert refused.value.detail["would_be"] == pytest.approx(eps[3], rel=1e-6)
    assert dp.stats()["steps"] == 3  # the refused release was not recorded
    with pytest.raises(PolicyError):  # and stays refused
        release(dp, 5)


def test_the_ledger_survives_a_restart(tmp_path) -> None:
    config = [{"name": "dp", "clip": 1.0, "noise_multiplier": 1.0}]
    first = build_site_defenses(parse_site_defenses(config), state_dir=tmp_path)
    for step in range(1, 4):
        release(first.chain.filters[0], step)
    again = build_site_defenses(parse_site_defenses(config), state_dir=tmp_path)
    assert again.stats()[0]["epsilon"] == pytest.approx(first.stats()[0]["epsilon"])
    assert again.stats()[0]["steps"] == 3


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ([{"name": "gausian", "sigma0": 0.1}], "expected tags: 'gaussian', 'laplace', 'dp'"),
        ([{"name": "dp", "clip": 0, "noise_multiplier": 1}], "0.dp.clip"),
        ([{"name": "topk", "keep": 1.5}], "0.topk.keep"),
        ([{"name": "quantize", "mode": "int3"}], "'fp16', 'int8' or 'int4'"),
        ([{"name": "nopeek", "alpha": 1, "patch": 6}], "power of two"),
        ([{"name": "gaussian", "sigma0": 0.1, "extra": 1}], "0.gaussian.extra"),
        ("[{bad json", "not valid JSON"),
        ("/no/such/file.yaml", "neither a JSON list nor an existing YAML/JSON file"),
    ],
)
def test_bad_configurations_name_the_field_and_the_allowed_values(value, message: str) -> None:
    with pytest.raises((ValidationError, ValueError)) as error:
        parse_site_defenses(value if isinstance(value, str) else json.dumps(value))
    assert message in str(error.value)


def test_a_yaml_file_configures_the_defenses_in_order(tmp_path) -> None:
    path = tmp_path / "defenses.yaml"
    path.write_text("defenses:\n  - name: gaussian\n    sigma0: 0.1\n  - name: topk\n    keep: 0.25\n"
                    "  - name: nopeek\n    alpha: 0.5\n")
    built = build_site_defenses(parse_site_defenses(str(path)))
    assert built.chain.describe() == ["gaussian", "topk"]
    assert [t.name for t in built.loss_terms] == ["nopeek"]
    assert [d["name"] for d in built.describe()] == ["gaussian", "topk", "nopeek"]


def test_a_site_with_a_bad_defense_does_not_start(tmp_path) -> None:
    from services.client_site.settings import SiteSettings

    with pytest.raises(ValidationError) as error:
        SiteSettings(site_id="t1", modalities="t1", data_dir=tmp_path, auth_disabled=True,
                     defenses='[{"name": "dp", "clip": 1}]')
    assert "defenses.0.dp.noise_multiplier" in str(error.value)
