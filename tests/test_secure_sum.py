"""Secure-sum fusion: masked tensors sum to the plain sum, one masked tensor says nothing, keys must match."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from splitunet.errors import ConfigurationError, ProtocolError
from splitunet.secure_sum import (
    SecureSumOptions,
    SecureSumPeers,
    SiteMasker,
    SumUnmasker,
    establish,
    request_nonce,
)

SITES = ["t1", "t1ce", "t2", "flair"]


def masked_federation(options: SecureSumOptions = SecureSumOptions()) -> dict[str, SiteMasker]:
    maskers = {s: SiteMasker(s, "run") for s in SITES}
    peers = SecureSumPeers(keys={s: m.public_key for s, m in maskers.items()}, order=SITES, options=options)
    for m in maskers.values():
        m.establish(peers)
    return maskers


def site_features(seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return {s: {"level0": torch.randn(4, 16, 64, 64, generator=g) * (i + 1),
                "level1": torch.rand(4, 32, 32, 32, generator=g)} for i, s in enumerate(SITES)}


def test_the_unmasked_sum_equals_the_plain_sum_and_each_site_gets_the_same_gradient() -> None:
    maskers, feats = masked_federation(), site_features()
    nonce = request_nonce("run", '{"step": 1}')
    masked = {s: maskers[s].mask(feats[s], nonce) for s in SITES}
    unmasked = SumUnmasker(SecureSumOptions(), SITES)(masked)
    for name in ("level0", "level1"):
        plain = sum(feats[s][name] for s in SITES)
        fused = sum(unmasked[s][name] for s in SITES)
        assert ((fused - plain).norm() / plain.norm()).item() <= 1e-4
        assert masked["t1"][name].dtype == torch.float32
        assert torch.equal(masked["t1"][name], torch.round(masked["t1"][name]))  # integers, exact in fp32
        assert masked["t1"][name].max() < 2**24 and masked["t1"][name].min() >= 0


def test_one_masked_tensor_is_uncorrelated_with_the_sites_features() -> None:
    maskers, feats = masked_federation(), site_features()
    masked = maskers["t2"].mask(feats["t2"], request_nonce("run", "a"))
    for name in ("level0", "level1"):
        r = np.corrcoef(masked[name].flatten().double().numpy(), feats["t2"][name].flatten().double().numpy())[0, 1]
        assert abs(r) < 0.01, (name, r)


def test_masks_differ_per_forward_and_agree_across_sites() -> None:
    maskers, feats = masked_federation(), site_features()
    a = maskers["t1"].mask(feats["t1"], request_nonce("run", "a"))["level0"]
    b = maskers["t1"].mask(feats["t1"], request_nonce("run", "b"))["level0"]
    assert (a != b).float().mean() > 0.99
    # masks cancel only when every site used the same nonce
    masked = {s: maskers[s].mask(feats[s], request_nonce("run", "a" if s != "t2" else "b")) for s in SITES}
    wrong = SumUnmasker(SecureSumOptions(), SITES)(masked)["t1"]["level0"]
    assert (wrong - sum(feats[s]["level0"] for s in SITES)).abs().mean() > 1.0


def test_values_beyond_the_range_are_clipped_and_counted() -> None:
    maskers = masked_federation(SecureSumOptions(clip_range=1.0))
    feats = {s: {"level0": torch.full((1, 1, 4, 4), 3.0)} for s in SITES}
    masked = {s: maskers[s].mask(feats[s], b"n") for s in SITES}
    fused = SumUnmasker(SecureSumOptions(clip_range=1.0), SITES)(masked)["t1"]["level0"]
    assert torch.allclose(fused, torch.full_like(fused, 4.0), atol=1e-4)
    assert maskers["t1"].stats()["clip_rate"] == 1.0


def test_a_missing_site_or_a_substituted_key_is_refused() -> None:
    maskers, feats = masked_federation(), site_features()
    masked = {s: maskers[s].mask(feats[s], b"n") for s in SITES[:3]}
    with pytest.raises(ConfigurationError, match="masks of a missing site do not cancel"):
        SumUnmasker(SecureSumOptions(), SITES)(masked)
    fresh = SiteMasker("t1", "run")
    keys = {s: m.public_key for s, m in maskers.items()}  # t1's key here is not fresh's
    with pytest.raises(ConfigurationError, match="not this site's key"):
        fresh.establish(SecureSumPeers(keys=keys, order=SITES))
    with pytest.raises(ProtocolError, match="not set up"):
        SiteMasker("t1", "run").mask(feats["t1"], b"n")


def test_the_relay_checks_every_site_used_the_same_keys() -> None:
    maskers = {s: SiteMasker(s, "run") for s in SITES}

    class Client:
        def __init__(self, masker: SiteMasker) -> None:
            self.masker = masker

    clients = {s: Client(m) for s, m in maskers.items()}
    with ThreadPoolExecutor(2) as pool:
        unmasker = establish(
            clients, "run", SecureSumOptions(), pool,
            get_json=lambda c, path: c.masker.offer().model_dump(),
            post_json=lambda c, path, body: c.masker.establish(SecureSumPeers.model_validate(body)).model_dump(),
        )
    assert unmasker.order == SITES
    feats = site_features(1)
    masked = {s: maskers[s].mask(feats[s], b"x") for s in SITES}
    plain = sum(feats[s]["level1"] for s in SITES)
    assert ((unmasker(masked)["t1"]["level1"] - plain).norm() / plain.norm()).item() <= 1e-4


# ---------------------------------------------------------------------------------------------- a malicious relay
def signed_federation(sites=SITES):
    """Maskers with identity keys, and every site's policy pinning every site's public key."""
    from splitunet.signing import IdentityKey

    identities = {s: IdentityKey.generate() for s in sites}
    maskers = {s: SiteMasker(s, "run", identities[s]) for s in sites}
    pinned = {s: k.public_key for s, k in identities.items()}
    return maskers, identities, pinned


def relayed(maskers, order=None) -> SecureSumPeers:
    offers = {s: m.offer() for s, m in maskers.items()}
    order = order or list(maskers)
    return SecureSumPeers(keys={s: offers[s].public_key for s in order}, order=order,
                          signatures={s: offers[s].signature for s in order})


def test_signed_offers_from_pinned_peers_are_accepted_and_sum() -> None:
    from splitunet.secure_sum import PeerPolicy

    maskers, _, pinned = signed_federation()
    peers = relayed(maskers)
    for m in maskers.values():
        m.establish(peers, PeerPolicy(pinned, SITES))
    feats = site_features(2)
    masked = {s: maskers[s].mask(feats[s], b"x") for s in SITES}
    plain = sum(feats[s]["level0"] for s in SITES)
    assert ((SumUnmasker(SecureSumOptions(), SITES)(masked)["t1"]["level0"] - plain).norm() / plain.norm()) <= 1e-4


def test_a_relay_that_substitutes_keys_is_refused_and_could_unmask_a_site_otherwise() -> None:
    """The attack: the relay hands t1 its own X25519 keys in place of t1's peers', so it knows every seed of t1's
    mask and unmasks t1 alone. Unsigned (the old protocol) it works; signed and pinned, t1 refuses."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    from splitunet.errors import PolicyError
    from splitunet.secure_sum import PeerPolicy

    maskers, _, pinned = signed_federation()
    peers = relayed(maskers)
    relay_keys = {s: X25519PrivateKey.generate() for s in SITES if s != "t1"}
    forged = peers.model_copy(update={"keys": {**peers.keys, **{s: k.public_key().public_bytes_raw().hex()
                                                                   for s, k in relay_keys.items()}}})
    with pytest.raises(PolicyError, match="not signed by its pinned identity key") as refused:
        maskers["t1"].establish(forged, PeerPolicy(pinned, SITES))
    assert refused.value.detail["rule"] == "secure_sum_signature" and refused.value.detail["site"] == "t1ce"
    # what the refusal prevents: without the check, the relay recovers t1's features from its masked tensor alone
    victim = SiteMasker("t1", "run")
    victim.establish(forged.model_copy(update={"keys": {**forged.keys, "t1": victim.public_key}}))
    feats = site_features(3)["t1"]
    masked = victim.mask(feats, b"n")
    impostors = {}
    for s, key in relay_keys.items():  # the relay plays every peer with the keys it substituted
        impostor = SiteMasker(s, "run")
        impostor._private = key
        impostor.public_key = key.public_key().public_bytes_raw().hex()
        impostors[s] = impostor
    keys = {"t1": victim.public_key, **{s: m.public_key for s, m in impostors.items()}}
    for m in impostors.values():
        m.establish(SecureSumPeers(keys=keys, order=SITES))
    zeros = {s: m.mask({k: torch.zeros_like(v) for k, v in feats.items()}, b"n") for s, m in impostors.items()}
    recovered = SumUnmasker(SecureSumOptions(), SITES)({"t1": masked, **zeros})["t1"]["level0"]
    assert ((recovered - feats["level0"]).abs().max()) < 1e-3  # t1's features, unmasked alone


def test_a_sybil_peer_is_refused() -> None:
    """Two real sites and a peer the relay made up (its own identity key): the sybil is not pinned."""
    from splitunet.errors import PolicyError
    from splitunet.secure_sum import PeerPolicy
    from splitunet.signing import IdentityKey

    maskers, _, pinned = signed_federation(["t1", "t1ce"])
    maskers["sybil"] = SiteMasker("sybil", "run", IdentityKey.generate())
    run_sites = ["t1", "t1ce", "sybil"]  # the relay also set the run up with its sybil
    with pytest.raises(PolicyError, match="no identity key pinned") as refused:
        maskers["t1"].establish(relayed(maskers), PeerPolicy(pinned, run_sites))
    assert refused.value.detail == {"rule": "secure_sum_unpinned", "site": "sybil"}


@pytest.mark.parametrize("order, run_sites, rule", [
    (["t1", "t1ce"], ["t1", "t1ce"], "secure_sum_min_sites"),  # a two-site sum gives the other site away
    (["t1", "t1ce", "t2"], SITES, "secure_sum_peers"),  # flair left out of the relayed set
])
def test_a_short_or_partial_peer_set_is_refused(order, run_sites, rule) -> None:
    from splitunet.errors import PolicyError
    from splitunet.secure_sum import PeerPolicy

    maskers, _, pinned = signed_federation()
    with pytest.raises(PolicyError) as refused:
        maskers["t1"].establish(relayed({s: maskers[s] for s in order}), PeerPolicy(pinned, run_sites))
    assert refused.value.detail["rule"] == rule, refused.value.detail
