"""Secure sum against a malicious relay, over HTTP at a site: the aggregator relays the key offers, the site checks
them against the identity keys it pins (``SITE_PEER_KEYS``) and refuses substituted keys, sybils and short sets.
The relay's side and the unmasking attack the check prevents are in ``tests/test_secure_sum.py``; a site that
drops out mid-run (roll back, re-key, same weights) in ``test_aggregator_fault_tolerance.py``.
"""

from __future__ import annotations

import pytest
from federation_testkit import SITE_HEADERS, model_config

from services.client_site.app import create_app as create_site_app
from splitunet.signing import IdentityKey, load_pinned_keys

RUN = "masked"


def _offers(identities) -> dict[str, dict]:
    """Honest offers of the other sites (signed by their own identity keys, as their services would)."""
    from splitunet.secure_sum import SiteMasker

    return {m: SiteMasker(m, RUN, IdentityKey.load(identities[m])).offer().model_dump()
            for m in ("t1ce", "t2", "flair")}


def _setup(site) -> dict:
    config = model_config(fusion="sum")
    assert site.post("/v1/runs", json={"run_id": RUN, "model": config.model_dump(mode="json")},
                     headers=SITE_HEADERS).status_code == 200
    offer = site.get(f"/v1/runs/{RUN}/secure-sum", headers=SITE_HEADERS)
    assert offer.status_code == 200, offer.text
    assert offer.json()["signature"] is not None
    return offer.json()


def _peers(own: dict, others: dict[str, dict], order=None) -> dict:
    offers = {"t1": own, **others}
    order = order or list(offers)
    return {"keys": {m: offers[m]["public_key"] for m in order}, "order": order,
            "signatures": {m: offers[m]["signature"] for m in order if offers[m].get("signature")}}


def test_signed_pinned_offers_are_accepted(site, identities) -> None:
    own = _setup(site)
    ack = site.post(f"/v1/runs/{RUN}/secure-sum", json=_peers(own, _offers(identities)), headers=SITE_HEADERS)
    assert ack.status_code == 200, ack.text
    assert ack.json()["peers"] == 3
    assert site.get("/v1/info", headers=SITE_HEADERS).json()["identity_key"] == IdentityKey.load(
        identities["t1"]).public_key == load_pinned_keys(identities["peers"])["t1"]


@pytest.mark.parametrize("cheat, rule", [
    ("substitute", "secure_sum_signature"), ("unsigned", "secure_sum_signature"), ("drop", "secure_sum_peers"),
])
def test_the_site_refuses_what_a_relay_changed(site, identities, cheat, rule) -> None:
    own = _setup(site)
    others = _offers(identities)
    if cheat == "substitute":  # the relay's own key in t2's place (it could then strip t1's mask)
        from splitunet.secure_sum import SiteMasker

        others["t2"] |= {"public_key": SiteMasker("t2", RUN).public_key}
    elif cheat == "unsigned":
        others["flair"]["signature"] = None
    else:
        del others["flair"]
    response = site.post(f"/v1/runs/{RUN}/secure-sum", json=_peers(own, others), headers=SITE_HEADERS)
    assert response.status_code == 403, response.text
    assert response.json()["code"] == "policy_violation" and response.json()["detail"]["rule"] == rule


def test_a_site_without_pinned_peers_refuses_secure_sum(start_app, site_settings, identities) -> None:
    site = start_app(create_site_app(site_settings("t1", peer_keys=None)))
    own = _setup(site)
    response = site.post(f"/v1/runs/{RUN}/secure-sum", json=_peers(own, _offers(identities)), headers=SITE_HEADERS)
    assert response.status_code == 403 and response.json()["detail"]["rule"] == "secure_sum_unpinned", response.text


def test_a_three_site_minimum_refuses_a_two_site_run(start_app, site_settings, identities) -> None:
    from splitunet.config import SiteSpec, SplitUNetConfig

    site = start_app(create_site_app(site_settings("t1")))
    sites = (SiteSpec(name="t1", modalities=("t1",)), SiteSpec(name="t1ce", modalities=("t1ce",)))
    config = SplitUNetConfig(spatial_dims=2, features=(4, 8, 16), fusion="sum", sites=sites)
    assert site.post("/v1/runs", json={"run_id": RUN, "model": config.model_dump(mode="json")},
                     headers=SITE_HEADERS).status_code == 200
    own = site.get(f"/v1/runs/{RUN}/secure-sum", headers=SITE_HEADERS).json()
    others = {"t1ce": _offers(identities)["t1ce"]}
    response = site.post(f"/v1/runs/{RUN}/secure-sum", json=_peers(own, others), headers=SITE_HEADERS)
    assert response.status_code == 403 and response.json()["detail"]["rule"] == "secure_sum_min_sites", response.text
