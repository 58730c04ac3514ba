"""Secure-sum fusion: sites mask their tensors with pairwise masks that cancel in the sum.

With ``fusion=sum`` the aggregator only needs ``S = sum_k F_k`` per sent level. Each site sends
``M_k = enc(F_k) + m_k  (mod 2**bits)`` where ``enc`` is fixed point and the masks cancel, ``sum_k m_k = 0``, so
the aggregator learns ``S`` and nothing about one ``F_k`` (each ``M_k`` alone is uniform). The exchange::

    aggregator -> site k:   GET  /v1/runs/{run}/secure-sum        -> SecureSumOffer (k's X25519 public key)
    aggregator -> site k:   POST /v1/runs/{run}/secure-sum        SecureSumPeers (every site's public key,
                                                                   relayed; bits, range) -> SecureSumAck
    site k: seed_kj = HKDF-SHA256(X25519(sk_k, pk_j), info = run | pair)       for every other site j
    forward: m_k = sum_{j != k} sign(k, j) * PRG(seed_kj, nonce, tensor name)   sign = +1 if k < j else -1
             PRG = ChaCha20 keystream; nonce = SHA-256(run | the forward request), the same at every site
    aggregator: S = decode(sum_k M_k mod 2**bits); the decoder fuses S (every site gets the gradient dL/dS)

Fixed point: ``enc(x) = round(clip(x, -R, R) * s)`` with ``s = (2**(bits-1) - K) / (K * R)``, so any sum of K
values fits the signed range and wraps exactly modulo ``2**bits``. ``bits = 24`` keeps every masked value an
integer below ``2**24``, which fp32 (the required activation wire dtype) carries exactly; the resolution is
``1 / s`` (for K = 4, R = 64: 7.6e-6 per site). Values beyond ``+-R`` are clipped (counted in the stats).

Against a malicious relay (the aggregator relays the keys): each site signs its offer
``(run, site, X25519 key)`` with its Ed25519 identity key (:mod:`splitunet.signing`), which its peers pin in their
configuration (``SITE_PEER_KEYS``, like the registry). Before deriving any seed a site checks (:class:`PeerPolicy`)
that the relayed set is exactly the run's sites, has at least the policy's minimum (default 3: with two sites the
sum and one's own features give away the other's), and that every peer's offer is signed by that peer's pinned
key; otherwise it refuses (403 ``policy_violation``, the rule named). A key the relay substituted, a sybil peer
(an unpinned name) and a short peer set are refused. A site that drops out: the job rolls back to its last
checkpoint and the keys are agreed again (:mod:`services.aggregator.trainer`), never a silent downgrade.
The threat model is in ``docs/threat-model.md``.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor

import numpy as np
import torch
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from pydantic import BaseModel, ConfigDict, Field

from splitunet.errors import ConfigurationError, PolicyError, ProtocolError
from splitunet.signing import IdentityKey, verify

logger = logging.getLogger(__name__)

#: Largest fixed-point width: integers below 2**24 are exact in fp32.
MAX_BITS = 24


class SecureSumOptions(BaseModel):
    """Secure-sum parameters of a job (``FederationSpec.secure_sum``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bits: int = Field(default=MAX_BITS, ge=16, le=MAX_BITS, description="fixed-point width k (mod 2**k)")
    clip_range: float = Field(default=64.0, gt=0, le=1e6, description="R: each site's values are clipped to +-R")


class SecureSumOffer(BaseModel):
    """A site's public key for one run, signed with its identity key (see :func:`offer_message`)."""

    site: str
    run_id: str
    public_key: str = Field(pattern=r"^[0-9a-f]{64}$", description="X25519 public key, hex")
    signature: str | None = Field(default=None, pattern=r"^[0-9a-f]{128}$",
                                  description="Ed25519 signature of the offer by the site's identity key, hex")


class SecureSumPeers(BaseModel):
    """The relayed public keys of every site of the run (fusion order) and the fixed-point parameters."""

    model_config = ConfigDict(extra="forbid")

    keys: dict[str, str] = Field(min_length=2, max_length=16)
    order: list[str] = Field(min_length=2, max_length=16)
    options: SecureSumOptions = Field(default_factory=SecureSumOptions)
    signatures: dict[str, str] = Field(default_factory=dict, max_length=16,
                                       description="each site's signature of its offer, relayed unchanged")


class SecureSumAck(BaseModel):
    site: str
    run_id: str
    peers: int
    keys_sha256: str = Field(description="digest of the key set this site used (compare across sites)")


def offer_message(run_id: str, site: str, public_key: str) -> bytes:
    """What a site signs when it offers its X25519 key for a run."""
    return f"splitunet-secure-sum-offer/1|{run_id}|{site}|{public_key}".encode()


class PeerPolicy:
    """What a site checks of a relayed key set before deriving any seed (see the module docstring).

    Args:
        pinned: ``{site: Ed25519 public key hex}`` of the peers this site knows (its configuration).
        run_sites: the sites of the run (its model configuration).
        min_sites: the fewest sites a secure sum may have.
    """

    def __init__(self, pinned: Mapping[str, str], run_sites: Sequence[str], min_sites: int = 3) -> None:
        if min_sites < 2:
            raise ValueError(f"min_sites must be >= 2, got {min_sites}")
        self.pinned, self.run_sites, self.min_sites = dict(pinned), list(run_sites), min_sites

    def check(self, site: str, run_id: str, peers: SecureSumPeers) -> None:
        order = list(peers.order)
        if sorted(order) != sorted(self.run_sites):
            _refuse("secure_sum_peers", f"the relayed peer set {sorted(order)} is not the run's sites "
                    f"{sorted(self.run_sites)}", peers=sorted(order), run_sites=sorted(self.run_sites))
        if len(order) < self.min_sites:
            _refuse("secure_sum_min_sites", f"a secure sum of {len(order)} sites is below this site's minimum "
                    f"{self.min_sites} (with fewer, the sum and one's own features reveal the others')",
                    minimum=self.min_sites, got=len(order))
        for other in order:
            if other == site:
                continue
            pinned = self.pinned.get(other)
            if pinned is None:
                _refuse("secure_sum_unpinned", f"site {other!r} has no identity key pinned at this site "
                        "(SITE_PEER_KEYS): an unknown peer is refused", site=other)
            signature = peers.signatures.get(other)
            if signature is None or not verify(pinned, offer_message(run_id, other, peers.keys[other]), signature):
                _refuse("secure_sum_signature", f"the key offer of site {other!r} is not signed by its pinned "
                        "identity key: the relayed key was substituted or forged", site=other)


def _refuse(rule: str, message: str, **detail: object) -> None:
    raise PolicyError(f"secure sum: {message}", detail={"rule": rule, **detail})


def keys_digest(keys: Mapping[str, str]) -> str:
    return hashlib.sha256("|".join(f"{k}={keys[k]}" for k in sorted(keys)).encode()).hexdigest()


def scale_for(options: SecureSumOptions, sites: int) -> float:
    """Fixed-point scale ``s``: ``sites`` values in ``[-R, R]`` sum inside the signed ``bits`` range."""
    return (2 ** (options.bits - 1) - sites) / (sites * options.clip_range)  # rounding cannot reach 2**(bits-1)


def request_nonce(run_id: str, request_json: str) -> bytes:
    """The per-forward nonce: identical at every site for the same forward request, distinct across requests."""
    return hashlib.sha256(f"splitunet-secure-sum|{run_id}|".encode() + request_json.encode()).digest()


def _prg(seed: bytes, nonce: bytes, name: str, count: int, bits: int) -> np.ndarray:
    """``count`` uniform integers in ``[0, 2**bits)`` from ChaCha20 keyed by ``seed``."""
    iv = b"\0" * 4 + hashlib.sha256(nonce + name.encode()).digest()[:12]  # counter 0, 96-bit nonce
    stream = Cipher(algorithms.ChaCha20(seed, iv), mode=None).encryptor().update(bytes(4 * count))
    return (np.frombuffer(stream, dtype="<u4") & np.uint32(2**bits - 1)).astype(np.int64)


class SiteMasker:
    """A site's side of secure sum for one run: its key pair, the pairwise seeds, and the masking."""

    def __init__(self, site: str, run_id: str, identity: IdentityKey | None = None) -> None:
        self.site = site
        self.run_id = run_id
        self.identity = identity
        self._private = X25519PrivateKey.generate()
        self.public_key = self._private.public_key().public_bytes_raw().hex()
        self._seeds: dict[str, tuple[int, bytes]] = {}  # peer -> (sign, seed)
        self.options: SecureSumOptions | None = None
        self.sites = 0
        self._lock = threading.Lock()
        self.clipped = 0
        self.masked = 0

    @property
    def established(self) -> bool:
        return self.options is not None

    def offer(self) -> SecureSumOffer:
        signature = None if self.identity is None else self.identity.sign(
            offer_message(self.run_id, self.site, self.public_key))
        return SecureSumOffer(site=self.site, run_id=self.run_id, public_key=self.public_key, signature=signature)

    def establish(self, peers: SecureSumPeers, policy: PeerPolicy | None = None) -> SecureSumAck:
        """Derive the pairwise seeds from the relayed public keys (this site's own key must be among them), after
        ``policy`` accepted the peer set and every peer's signature (a service always passes one)."""
        if set(peers.order) != set(peers.keys) or len(set(peers.order)) != len(peers.order):
            raise ConfigurationError("secure sum: 'order' must list exactly the sites of 'keys', once each")
        if policy is not None:
            policy.check(self.site, self.run_id, peers)
        if peers.keys.get(self.site) != self.public_key:
            raise ConfigurationError(
                f"secure sum: the relayed key of site {self.site!r} is not this site's key for run "
                f"{self.run_id!r}; fetch GET /v1/runs/{{run}}/secure-sum again",
                detail={"rule": "own_key_mismatch"},
            )
        seeds = {}
        for other, hex_key in peers.keys.items():
            if other == self.site:
                continue
            try:
                shared = self._private.exchange(X25519PublicKey.from_public_bytes(bytes.fromhex(hex_key)))
            except ValueError as exc:
                raise ConfigurationError(f"secure sum: bad public key for site {other!r}: {exc}") from None
            pair = "|".join(sorted((self.site, other)))
            seed = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                        info=f"splitunet-secure-sum|{self.run_id}|{pair}".encode()).derive(shared)
            sign = 1 if peers.order.index(self.site) < peers.order.index(other) else -1
            seeds[other] = (sign, seed)
        with self._lock:
            self._seeds, self.options, self.sites = seeds, peers.options, len(peers.order)
        logger.info("secure sum for run %s: %d pairwise seeds", self.run_id, len(seeds))
        return SecureSumAck(site=self.site, run_id=self.run_id, peers=len(seeds), keys_sha256=keys_digest(peers.keys))

    def mask(self, tensors: Mapping[str, torch.Tensor], nonce: bytes) -> dict[str, torch.Tensor]:
        """``{name: float32 integers in [0, 2**bits)}``: fixed point of each tensor plus this site's mask."""
        if self.options is None:
            raise ProtocolError("secure sum is not set up for this run; POST /v1/runs/{run}/secure-sum first")
        bits, modulus = self.options.bits, 2**self.options.bits
        scale = scale_for(self.options, self.sites)
        out, clipped, total = {}, 0, 0
        for name, t in tensors.items():
            x = t.detach().float().cpu()
            bound = self.options.clip_range
            clipped += int((x.abs() > bound).sum())
            total += x.numel()
            fixed = torch.round(x.clamp(-bound, bound) * scale).to(torch.int64).flatten().numpy()
            value = fixed % modulus
            for sign, seed in self._seeds.values():
                value = (value + sign * _prg(seed, nonce, name, value.size, bits)) % modulus
            out[name] = torch.from_numpy(value.astype(np.float32)).view(t.shape).to(t.device)
        with self._lock:
            self.clipped += clipped
            self.masked += total
        return out

    def stats(self) -> dict[str, float]:
        with self._lock:
            rate = self.clipped / self.masked if self.masked else 0.0
            return {"masked_entries": float(self.masked), "clip_rate": rate}


class SumUnmasker:
    """The aggregator's inbound hook: masked bundles of all sites in, the decoded sum out.

    Returns ``{first site: S, other sites: 0}`` so that the unchanged ``sum`` fusion yields ``S`` and every site
    receives the same gradient ``dL/dS`` (the gradient of a sum with respect to each addend).
    """

    def __init__(self, options: SecureSumOptions, order: Sequence[str]) -> None:
        self.options = options
        self.order = list(order)
        self.scale = scale_for(options, len(order))

    def __call__(self, site_tensors: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
        if set(site_tensors) != set(self.order):
            raise ConfigurationError(
                f"secure sum needs the tensors of every site {self.order}; got {sorted(site_tensors)} (the masks "
                "of a missing site do not cancel)"
            )
        modulus, half = 2**self.options.bits, 2 ** (self.options.bits - 1)
        first = site_tensors[self.order[0]]
        fused: dict[str, torch.Tensor] = {}
        for name, ref in first.items():
            total = torch.zeros(ref.shape, dtype=torch.int64, device=ref.device)
            for site in self.order:
                total = (total + site_tensors[site][name].to(torch.int64)) % modulus
            signed = torch.where(total >= half, total - modulus, total)
            fused[name] = (signed.double() / self.scale).float()
        return {site: (fused if i == 0 else {k: torch.zeros_like(v) for k, v in fused.items()})
                for i, site in enumerate(self.order)}


def establish(
    clients: Mapping[str, object], run_id: str, options: SecureSumOptions, pool: Executor,
    get_json: Callable[[object, str], dict] | None = None, post_json: Callable[[object, str, dict], dict] | None = None,
) -> SumUnmasker:
    """Run the key relay with every site (``clients`` in fusion order, each with a ``peer`` PeerClient) and
    return the aggregator's unmasking hook. Raises ``ConfigurationError`` if the sites disagree on the keys."""
    get_json = get_json or (lambda c, path: c.peer.get_json(path))
    post_json = post_json or (lambda c, path, body: c.peer.post_json(path, body, idempotent=True))
    path = f"/v1/runs/{run_id}/secure-sum"
    offers = [SecureSumOffer.model_validate(o) for o in pool.map(lambda c: get_json(c, path), clients.values())]
    keys = {name: offer.public_key for name, offer in zip(clients, offers)}
    signatures = {name: offer.signature for name, offer in zip(clients, offers) if offer.signature is not None}
    peers = SecureSumPeers(keys=keys, order=list(clients), options=options, signatures=signatures)
    body = peers.model_dump(mode="json")
    acks = [SecureSumAck.model_validate(a) for a in pool.map(lambda c: post_json(c, path, body), clients.values())]
    digests = {a.keys_sha256 for a in acks}
    if len(digests) != 1 or digests.pop() != keys_digest(keys):
        raise ConfigurationError("secure sum: the sites did not all use the relayed key set")
    logger.info("secure sum set up for run %s with %d sites", run_id, len(clients))
    return SumUnmasker(options, list(clients))
