"""Private set intersection (PSI) of patient IDs between the aggregator and one site.

Diffie-Hellman PSI with commutative blinding in a prime-order group (Huberman, Franklin and Hogg 1999; the
protocol behind Google's "private join and compute" and OpenMined's PSI that NVFlare uses):

- group: NIST P-256 (prime order ``n``, cofactor 1). Scalar multiplication and point validation are done by the
  maintained ``cryptography`` library (OpenSSL): a point is loaded with
  ``EllipticCurvePublicKey.from_encoded_point`` (rejects anything not on the curve) and multiplied with
  ``ECDH.exchange`` (which returns the x-coordinate of ``[k]P``, fixed 32 bytes);
- hash to group: RFC 9380 ``hash_to_curve`` with the suite ``P256_XMD:SHA-256_SSWU_RO_`` (random-oracle
  variant: ``expand_message_xmd`` with SHA-256, two field elements, simplified SWU, point addition) under this
  protocol's own domain separation tag; checked against the RFC's test vectors;
- secret scalars: ``secrets.randbelow(n - 1) + 1``, fresh per session and party;
- wire elements: x-coordinates only, 64 lowercase hex characters (32 bytes big-endian). ``x([k]P)`` does not
  depend on the sign of ``P``'s y, so x-only blinding still commutes: ``x([b](±[a]P)) = x([ab]P)``.

Why not classic DH in the RFC 3526 2048-bit MODP group: on this project's CPUs one pure-Python 2048-bit
``pow`` takes ~35 ms (four per ID: about five minutes for 2 000 IDs), and ``cryptography``'s finite-field DH,
which would be fast, is deprecated for removal. P-256 in OpenSSL takes ~0.1 ms per blinding.

Protocol, client ``A`` (the aggregator, IDs ``a``) with server ``B`` (a site, IDs ``b``), secrets ``α, β``:

1. A -> B, :class:`PsiRequest`: ``x([α]H(a))`` for each of A's IDs, in a random order.
2. B -> A, :class:`PsiResponse`: ``reblinded``, each received element times ``β``, in the received order;
   ``server_elements``: ``x([β]H(b))`` for each of B's IDs, in a random order.
3. A multiplies each server element by ``α`` and compares ``x([αβ]H(b))`` with the reblinded ``x([βα]H(a))``;
   A knows its own shuffle, so it maps equal values back to its IDs.

What each party learns (both honest-but-curious): A learns ``a ∩ b`` and ``|b|``; B learns ``|a|``. Neither
learns anything about the other's IDs outside the intersection (under DDH in P-256 with ``H`` a random
oracle): the messages hold only blinded points, never a raw ID or an unkeyed hash of one. Not covered: a
malicious client may put guessed IDs in its set (inherent to any PSI; :attr:`PsiServer.max_elements` bounds
how many), set sizes are revealed, and the peer is not authenticated here (the REST layer's auth does that).
A :class:`PsiServer` answers a single request, so its ``β`` is never reused across sessions.

Several sites: the aggregator runs one session with each site in turn (:func:`align_in_process` does it in one
process). It learns the intersection with each site, ``a ∩ s_k``, and the aligned cohort is their intersection
``a ∩ s_1 ∩ ... ∩ s_K``; it then tells each site the aligned list (a subset of that site's own IDs). A site
learns ``|a|`` from the PSI and the aligned list, nothing about the other sites' IDs beyond it.

Errors: malformed messages (bad element encoding or length, an element not on the curve, duplicates, too many
elements, wrong version or suite) raise :class:`~splitunet.errors.WireFormatError` (too many:
:class:`~splitunet.errors.BundleTooLargeError`); calls out of order or for another session raise
:class:`~splitunet.errors.ProtocolError`; bad local arguments raise ``ValueError``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Annotated, Any, Literal, TypeVar

from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from splitunet.errors import BundleTooLargeError, ProtocolError, WireFormatError

logger = logging.getLogger(__name__)

PROTOCOL_VERSION = "splitunet-psi/1"
SUITE = "P256_XMD:SHA-256_SSWU_RO_"
#: Domain separation tag of this protocol's hash-to-curve (RFC 9380 section 3.1).
DST = b"SPLITUNET-PSI-V01-CS01-with-P256_XMD:SHA-256_SSWU_RO_"
#: Hex characters of one wire element (a 32-byte x-coordinate).
ELEMENT_HEX_CHARS = 64
#: Default and absolute bounds on the number of IDs / elements in one message.
DEFAULT_MAX_ELEMENTS = 100_000
HARD_MAX_ELEMENTS = 10_000_000
#: Longest patient ID accepted, in UTF-8 bytes.
MAX_ID_BYTES = 256

# NIST P-256 (SEC 2 secp256r1): y^2 = x^3 + A x + B over GF(P), group order N; Z is RFC 9380's SSWU constant.
_P = 2**256 - 2**224 + 2**192 + 2**96 - 1
_A = _P - 3
_B = 0x5AC635D8AA3A93E7B3EBBD55769886BC651D06B0CC53B0F63BCE3C3E27D2604B
_N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
_Z = _P - 10
_MINUS_B_OVER_A = (_P - _B) * pow(_A, -1, _P) % _P
_HASH_TO_FIELD_BYTES = 48  # L = ceil((ceil(log2(P)) + 128) / 8)

Element = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
Session = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{32}$")]


class PsiRequest(BaseModel):
    """Client -> server: the client's blinded IDs, shuffled."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Literal["splitunet-psi/1"] = PROTOCOL_VERSION
    suite: Literal["P256_XMD:SHA-256_SSWU_RO_"] = SUITE
    session: Session
    elements: list[Element] = Field(max_length=HARD_MAX_ELEMENTS)


class PsiResponse(BaseModel):
    """Server -> client: the client's elements blinded again (same order) and the server's blinded IDs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Literal["splitunet-psi/1"] = PROTOCOL_VERSION
    suite: Literal["P256_XMD:SHA-256_SSWU_RO_"] = SUITE
    session: Session
    reblinded: list[Element] = Field(max_length=HARD_MAX_ELEMENTS)
    server_elements: list[Element] = Field(max_length=HARD_MAX_ELEMENTS)


_M = TypeVar("_M", bound=BaseModel)


def parse_message(model: type[_M], raw: bytes | str | Mapping[str, Any]) -> _M:
    """Parse a PSI message from JSON text/bytes or a mapping; :class:`WireFormatError` if it is malformed."""
    try:
        if isinstance(raw, bytes | str):
            return model.model_validate_json(raw)
        return model.model_validate(raw)
    except ValidationError as exc:
        errors = json.loads(exc.json(include_url=False, include_input=False))
        raise WireFormatError(f"malformed {model.__name__}: {exc.error_count()} error(s)", detail=errors) from None


# ------------------------------------------------------------------------------------- RFC 9380 hash to curve


def expand_message_xmd(msg: bytes, dst: bytes, len_in_bytes: int) -> bytes:
    """RFC 9380 section 5.3.1 ``expand_message_xmd`` with SHA-256."""
    b_len, r_len = 32, 64
    ell = -(-len_in_bytes // b_len)
    if ell > 255 or len_in_bytes > 65535 or len(dst) > 255:
        raise ValueError("expand_message_xmd: len_in_bytes or dst too long")
    dst_prime = dst + bytes([len(dst)])
    b0 = hashlib.sha256(bytes(r_len) + msg + len_in_bytes.to_bytes(2, "big") + b"\x00" + dst_prime).digest()
    blocks = [hashlib.sha256(b0 + b"\x01" + dst_prime).digest()]
    for i in range(2, ell + 1):
        mixed = bytes(x ^ y for x, y in zip(b0, blocks[-1], strict=True))
        blocks.append(hashlib.sha256(mixed + bytes([i]) + dst_prime).digest())
    return b"".join(blocks)[:len_in_bytes]


def hash_to_field(msg: bytes, count: int, dst: bytes = DST) -> list[int]:
    """RFC 9380 section 5.2 ``hash_to_field`` into GF(P) of P-256."""
    uniform = expand_message_xmd(msg, dst, count * _HASH_TO_FIELD_BYTES)
    step = _HASH_TO_FIELD_BYTES
    return [int.from_bytes(uniform[i * step : (i + 1) * step], "big") % _P for i in range(count)]


def _curve_y(x: int) -> int | None:
    """The even ``y`` with ``(x, y)`` on P-256, or None if ``x^3 + A x + B`` is not a square (OpenSSL's point
    decompression: a square root mod P, ~5x faster than ``pow`` in Python)."""
    try:
        point = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b"\x02" + x.to_bytes(32, "big"))
    except ValueError:
        return None
    return point.public_numbers().y


def map_to_curve_sswu(u: int) -> tuple[int, int]:
    """RFC 9380 section 6.6.2 simplified SWU map for P-256 (affine ``(x, y)``)."""
    u2 = u * u % _P
    tv1 = (_Z * _Z % _P * u2 % _P * u2 + _Z * u2) % _P
    x = _B * pow(_Z * _A % _P, -1, _P) % _P if tv1 == 0 else _MINUS_B_OVER_A * (1 + pow(tv1, -1, _P)) % _P
    y = _curve_y(x)
    if y is None:  # g(x1) is not a square, so g(x2) is, with x2 = Z u^2 x1
        x = _Z * u2 % _P * x % _P
        y = _curve_y(x)
        if y is None:  # pragma: no cover - impossible for P-256's Z
            raise ArithmeticError("simplified SWU: neither g(x1) nor g(x2) is a square")
    if (u & 1) != (y & 1):
        y = _P - y
    return x, y


def _add(p: tuple[int, int], q: tuple[int, int]) -> tuple[int, int]:
    """Affine point addition on P-256 (the identity cannot occur for hash outputs except with negligible odds)."""
    (x1, y1), (x2, y2) = p, q
    if x1 == x2:
        if (y1 + y2) % _P == 0:
            raise ValueError("hash_to_curve hit the identity")  # probability ~2^-256
        lam = (3 * x1 * x1 + _A) * pow(2 * y1, -1, _P) % _P
    else:
        lam = (y2 - y1) * pow(x2 - x1, -1, _P) % _P
    x3 = (lam * lam - x1 - x2) % _P
    return x3, (lam * (x1 - x3) - y1) % _P


def hash_to_curve(msg: bytes, dst: bytes = DST) -> tuple[int, int]:
    """RFC 9380 ``hash_to_curve`` for ``P256_XMD:SHA-256_SSWU_RO_`` (cofactor 1: no clearing needed)."""
    u0, u1 = hash_to_field(msg, 2, dst)
    return _add(map_to_curve_sswu(u0), map_to_curve_sswu(u1))


# ------------------------------------------------------------------------------------------ blinding, parsing


class _Blinder:
    """One party's secret scalar ``k`` in ``[1, n - 1]`` and multiplication by it, in OpenSSL."""

    def __init__(self) -> None:
        self._curve = ec.SECP256R1()
        self._key = ec.derive_private_key(secrets.randbelow(_N - 1) + 1, self._curve)

    def _times_k(self, point: ec.EllipticCurvePublicKey) -> str:
        return self._key.exchange(ec.ECDH(), point).hex()

    def blind_id(self, patient_id: str) -> str:
        """``x([k]H(id))`` as wire hex."""
        x, y = hash_to_curve(patient_id.encode("utf-8"))
        point = ec.EllipticCurvePublicKey.from_encoded_point(
            self._curve, b"\x04" + x.to_bytes(32, "big") + y.to_bytes(32, "big")
        )
        return self._times_k(point)

    def blind_element(self, element: str, what: str) -> str:
        """``x([k]P)`` for a wire element ``x(P)`` whose format was checked; :class:`WireFormatError` naming
        ``what`` if it is not the x-coordinate of a curve point."""
        try:
            point = ec.EllipticCurvePublicKey.from_encoded_point(self._curve, b"\x02" + bytes.fromhex(element))
        except ValueError:
            raise WireFormatError(f"{what}: not the x-coordinate of a P-256 point") from None
        return self._times_k(point)


def _check_elements(elements: Sequence[str], what: str, max_elements: int) -> None:
    """Wire checks of a list of elements: count, fixed-length lowercase hex, below p, no duplicates. (Whether an
    element is on the curve is checked when it is blinded.)"""
    if len(elements) > max_elements:
        raise BundleTooLargeError(
            f"{what}: {len(elements)} elements, more than the limit of {max_elements}",
            detail={"count": len(elements), "limit": max_elements},
        )
    for i, element in enumerate(elements):
        if not isinstance(element, str) or len(element) != ELEMENT_HEX_CHARS:
            raise WireFormatError(f"{what}[{i}]: not a string of {ELEMENT_HEX_CHARS} hex characters")
        try:
            x = int(element, 16)
        except ValueError:
            raise WireFormatError(f"{what}[{i}]: not lowercase hex") from None
        if element != f"{x:064x}":
            raise WireFormatError(f"{what}[{i}]: not lowercase hex")
        if x >= _P:
            raise WireFormatError(f"{what}[{i}]: coordinate out of range (>= p)")
    if len(set(elements)) != len(elements):
        raise WireFormatError(f"{what}: duplicate elements")


def _check_header(message: PsiRequest | PsiResponse, what: str) -> None:
    if message.version != PROTOCOL_VERSION or message.suite != SUITE:
        raise WireFormatError(
            f"{what}: unsupported version/suite {message.version!r}/{message.suite!r}; "
            f"expected {PROTOCOL_VERSION!r}/{SUITE!r}"
        )


def _check_ids(ids: Iterable[str], max_elements: int) -> list[str]:
    """Validate local IDs (strings of 1..MAX_ID_BYTES UTF-8 bytes); return them unique and sorted."""
    if isinstance(ids, str | bytes):
        raise ValueError("ids must be an iterable of ID strings, not a single string")
    unique = set()
    for patient_id in ids:
        if not isinstance(patient_id, str) or not 0 < len(patient_id.encode("utf-8")) <= MAX_ID_BYTES:
            raise ValueError(f"ids must be non-empty strings of at most {MAX_ID_BYTES} UTF-8 bytes, got {patient_id!r}")
        unique.add(patient_id)
    if len(unique) > max_elements:
        raise ValueError(f"ids: {len(unique)} unique IDs, more than max_elements={max_elements}")
    return sorted(unique)


def _check_max(max_elements: int) -> int:
    if (
        isinstance(max_elements, bool)
        or not isinstance(max_elements, int)
        or not 1 <= max_elements <= HARD_MAX_ELEMENTS
    ):
        raise ValueError(f"max_elements must be an integer in [1, {HARD_MAX_ELEMENTS}], got {max_elements!r}")
    return max_elements


# ------------------------------------------------------------------------------------------------ the parties


class PsiClient:
    """The aggregator's side of one session with one site: :meth:`request`, then :meth:`intersect`.

    Args:
        ids: the aggregator's patient IDs (duplicates are ignored; compared exactly, case-sensitive).
        max_elements: the most elements accepted from the server (and the most local IDs).
    """

    def __init__(self, ids: Iterable[str], *, max_elements: int = DEFAULT_MAX_ELEMENTS) -> None:
        self.max_elements = _check_max(max_elements)
        self._ids = _check_ids(ids, max_elements)
        self._blinder = _Blinder()
        self.session = secrets.token_hex(16)
        self._order: list[int] | None = None
        self._result: list[str] | None = None

    def request(self) -> PsiRequest:
        """Step 1: the blinded, shuffled IDs. Called once."""
        if self._order is not None:
            raise ProtocolError("PsiClient.request() was already called for this session")
        order = list(range(len(self._ids)))
        secrets.SystemRandom().shuffle(order)
        elements = [self._blinder.blind_id(self._ids[i]) for i in order]
        self._order = order
        return PsiRequest(session=self.session, elements=elements)

    def intersect(self, response: PsiResponse) -> list[str]:
        """Step 3: the IDs shared with the server, sorted. Called once, after :meth:`request`."""
        if self._order is None:
            raise ProtocolError("PsiClient.intersect() called before request()")
        if self._result is not None:
            raise ProtocolError("PsiClient.intersect() was already called for this session")
        _check_header(response, "PsiResponse")
        if response.session != self.session:
            raise ProtocolError(f"PsiResponse is for session {response.session}, not {self.session}")
        if len(response.reblinded) != len(self._order):
            raise WireFormatError(
                f"PsiResponse.reblinded has {len(response.reblinded)} elements, the request had {len(self._order)}"
            )
        _check_elements(response.reblinded, "PsiResponse.reblinded", HARD_MAX_ELEMENTS)
        _check_elements(response.server_elements, "PsiResponse.server_elements", self.max_elements)
        theirs = {
            self._blinder.blind_element(e, f"PsiResponse.server_elements[{i}]")
            for i, e in enumerate(response.server_elements)
        }
        self._result = sorted(self._ids[i] for i, e in zip(self._order, response.reblinded, strict=True) if e in theirs)
        logger.info(
            "PSI session %s: %d local IDs, %d remote, %d shared",
            self.session,
            len(self._ids),
            len(response.server_elements),
            len(self._result),
        )
        return list(self._result)


class PsiServer:
    """A site's side of one session: :meth:`respond` to one :class:`PsiRequest`.

    Args:
        ids: the site's patient IDs (duplicates are ignored).
        max_elements: the most elements accepted from the client (and the most local IDs).
    """

    def __init__(self, ids: Iterable[str], *, max_elements: int = DEFAULT_MAX_ELEMENTS) -> None:
        self.max_elements = _check_max(max_elements)
        self._ids = _check_ids(ids, max_elements)
        self._blinder = _Blinder()
        self._answered = False

    def respond(self, request: PsiRequest) -> PsiResponse:
        """Step 2: blind the client's elements again, in order, and add this site's blinded IDs, shuffled."""
        if self._answered:
            raise ProtocolError("this PsiServer already answered a request; use a new one per session")
        _check_header(request, "PsiRequest")
        _check_elements(request.elements, "PsiRequest.elements", self.max_elements)
        self._answered = True
        reblinded = [
            self._blinder.blind_element(e, f"PsiRequest.elements[{i}]") for i, e in enumerate(request.elements)
        ]
        own = [self._blinder.blind_id(i) for i in self._ids]
        secrets.SystemRandom().shuffle(own)
        logger.info("PSI session %s: answered %d elements with %d own", request.session, len(reblinded), len(own))
        return PsiResponse(session=request.session, reblinded=reblinded, server_elements=own)


def intersect_in_process(
    a_ids: Iterable[str], b_ids: Iterable[str], *, max_elements: int = DEFAULT_MAX_ELEMENTS
) -> list[str]:
    """Run one PSI session in this process, messages through their JSON form; return ``a ∩ b`` sorted."""
    client = PsiClient(a_ids, max_elements=max_elements)
    server = PsiServer(b_ids, max_elements=max_elements)
    request = parse_message(PsiRequest, client.request().model_dump_json())
    response = parse_message(PsiResponse, server.respond(request).model_dump_json())
    return client.intersect(response)


@dataclass(frozen=True)
class Alignment:
    """Result of aligning the aggregator with every site.

    Attributes:
        per_site: site name -> IDs the aggregator shares with that site (what the aggregator learns), sorted.
        aligned: IDs present at the aggregator and every site, sorted: the training cohort.
    """

    per_site: Mapping[str, tuple[str, ...]]
    aligned: tuple[str, ...]


def align_in_process(
    aggregator_ids: Iterable[str],
    site_ids: Mapping[str, Iterable[str]],
    *,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> Alignment:
    """One PSI session between the aggregator and each site in turn; the aligned cohort is the intersection."""
    if not site_ids:
        raise ValueError("site_ids must name at least one site")
    mine = _check_ids(aggregator_ids, max_elements)
    per_site = {
        name: tuple(intersect_in_process(mine, ids, max_elements=max_elements)) for name, ids in site_ids.items()
    }
    aligned = set(mine)
    for shared in per_site.values():
        aligned &= set(shared)
    return Alignment(per_site=MappingProxyType(per_site), aligned=tuple(sorted(aligned)))
