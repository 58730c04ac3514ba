"""Private set intersection: RFC 9380 vectors, exact intersections, what the messages reveal, malformed input."""

from __future__ import annotations

import base64
import hashlib
import json
import time

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from splitunet import psi
from splitunet.errors import BundleTooLargeError, ProtocolError, WireFormatError

P256_DST = b"QUUX-V01-CS02-with-P256_XMD:SHA-256_SSWU_RO_"
XMD_DST = b"QUUX-V01-CS02-with-expander-SHA256-128"


def _on_curve(point: tuple[int, int]) -> bool:
    x, y = point
    return (y * y - (x * x * x + psi._A * x + psi._B)) % psi._P == 0


def _not_on_curve_x() -> str:
    x = 1
    while psi._curve_y(x) is not None:
        x += 1
    return f"{x:064x}"


def _ids(prefix: str, start: int, stop: int) -> list[str]:
    return [f"{prefix}{i:05d}" for i in range(start, stop)]


# ------------------------------------------------------------------------------------------- hash to curve


@pytest.mark.parametrize(
    "msg, length, expected",
    [
        (b"", 0x20, "68a985b87eb6b46952128911f2a4412bbc302a9d759667f87f7a21d803f07235"),
        (b"abc", 0x20, "d8ccab23b5985ccea865c6c97b6e5b8350e794e603b4b97902f53a8a0d605615"),
    ],
)
def test_expand_message_xmd_matches_rfc9380(msg: bytes, length: int, expected: str) -> None:
    assert psi.expand_message_xmd(msg, XMD_DST, length).hex() == expected


@pytest.mark.parametrize(
    "msg, px, py, u0, u1",
    [
        (
            b"",
            "2c15230b26dbc6fc9a37051158c95b79656e17a1a920b11394ca91c44247d3e4",
            "8a7a74985cc5c776cdfe4b1f19884970453912e9d31528c060be9ab5c43e8415",
            "ad5342c66a6dd0ff080df1da0ea1c04b96e0330dd89406465eeba11582515009",
            "8c0f1d43204bd6f6ea70ae8013070a1518b43873bcd850aafa0a9e220e2eea5a",
        ),
        (
            b"abc",
            "0bb8b87485551aa43ed54f009230450b492fead5f1cc91658775dac4a3388a0f",
            "5c41b3d0731a27a7b14bc0bf0ccded2d8751f83493404c84a88e71ffd424212e",
            "afe47f2ea2b10465cc26ac403194dfb68b7f5ee865cda61e9f3e07a537220af1",
            "379a27833b0bfe6f7bdca08e1e83c760bf9a338ab335542704edcd69ce9e46e0",
        ),
    ],
)
def test_hash_to_curve_matches_rfc9380_p256_vectors(msg: bytes, px: str, py: str, u0: str, u1: str) -> None:
    assert [f"{u:064x}" for u in psi.hash_to_field(msg, 2, P256_DST)] == [u0, u1]
    x, y = psi.hash_to_curve(msg, P256_DST)
    assert (f"{x:064x}", f"{y:064x}") == (px, py)


def test_curve_constants_and_sswu_exceptional_case() -> None:
    generator = ec.derive_private_key(1, ec.SECP256R1()).public_key().public_numbers()
    assert _on_curve((generator.x, generator.y))
    point = psi.map_to_curve_sswu(0)  # u = 0 takes the tv1 == 0 branch
    assert _on_curve(point)
    assert _on_curve(psi.hash_to_curve(b"BraTS2021_00000"))
    assert psi.hash_to_curve(b"BraTS2021_00000") != psi.hash_to_curve(b"BraTS2021_00001")
    assert psi.hash_to_curve(b"x") != psi.hash_to_curve(b"x", b"another-DST")


# ---------------------------------------------------------------------------------------------- intersection


def test_intersection_of_thousands_of_ids_is_exact(record_property: pytest.RecordProperty) -> None:
    a = _ids("BraTS2021_", 0, 2000)
    b = _ids("BraTS2021_", 1200, 3200) + ["site-only-1", "BraTS2021_00007 "]  # near-misses stay out
    start = time.perf_counter()
    shared = psi.intersect_in_process(a, b)
    elapsed = time.perf_counter() - start
    record_property("psi_2000x2002_seconds", round(elapsed, 3))
    assert shared == sorted(set(a) & set(b))
    assert len(shared) == 800


@pytest.mark.parametrize(
    "a, b, expected",
    [
        (["p1", "p2"], ["p3"], []),
        (["p1", "p2", "p2"], ["p2", "p1", "p1"], ["p1", "p2"]),  # duplicates are ignored
        ([], ["p1"], []),
        (["p1"], [], []),
        (["Ünïcødé-07", "P1"], ["p1", "Ünïcødé-07"], ["Ünïcødé-07"]),  # exact, case-sensitive
    ],
)
def test_small_intersections(a: list[str], b: list[str], expected: list[str]) -> None:
    assert psi.intersect_in_process(a, b) == expected


def test_multi_site_alignment_is_the_intersection_over_sites() -> None:
    aggregator = _ids("c", 0, 60)
    sites = {"t1": _ids("c", 10, 80), "t2": _ids("c", 0, 50), "flair": _ids("c", 20, 70) + ["only-flair"]}
    alignment = psi.align_in_process(aggregator, sites)
    for name, ids in sites.items():
        assert alignment.per_site[name] == tuple(sorted(set(aggregator) & set(ids)))
    assert alignment.aligned == tuple(_ids("c", 20, 50))
    with pytest.raises(ValueError, match="site"):
        psi.align_in_process(aggregator, {})


def test_messages_reveal_no_raw_id_nor_plain_hash() -> None:
    a = _ids("BraTS2021_", 0, 40)
    b = _ids("BraTS2021_", 20, 60)
    client, server = psi.PsiClient(a), psi.PsiServer(b)
    request = client.request()
    response = server.respond(request)
    wire = request.model_dump_json() + response.model_dump_json()
    assert client.intersect(response) == _ids("BraTS2021_", 20, 40)
    for patient_id in set(a) | set(b):
        raw = patient_id.encode()
        forbidden = [patient_id, raw.hex()]
        for algorithm in ("sha256", "sha512", "md5", "sha1"):
            digest = hashlib.new(algorithm, raw).digest()
            forbidden += [digest.hex(), digest.hex()[:32], base64.b64encode(digest).decode()]
        x, _ = psi.hash_to_curve(raw)  # the unblinded group element
        forbidden.append(f"{x:064x}")
        for text in forbidden:
            assert text not in wire, (patient_id, text)
    assert len(request.elements) == 40 and len(response.server_elements) == 40


def test_blinding_is_fresh_per_session() -> None:
    first = set(psi.PsiClient(["p1", "p2"]).request().elements)
    second = set(psi.PsiClient(["p1", "p2"]).request().elements)
    assert not first & second


# --------------------------------------------------------------------------------------- malformed messages


def _request(elements: list[str]) -> psi.PsiRequest:
    """A request built without pydantic validation, as a buggy or hostile peer could send past the model."""
    return psi.PsiRequest.model_construct(
        version=psi.PROTOCOL_VERSION, suite=psi.SUITE, session="0" * 32, elements=elements
    )


def _valid_elements(n: int) -> list[str]:
    return psi.PsiClient([f"id{i}" for i in range(n)]).request().elements


@pytest.mark.parametrize(
    "bad, match",
    [
        ("ab" * 31, "64 hex"),  # too short
        ("ab" * 33, "64 hex"),  # too long
        ("AB" * 32, "lowercase hex"),
        ("zz" * 32, "lowercase hex"),
        ("_" + "a" * 63, "lowercase hex"),
        ("ff" * 32, "out of range"),
        ("NOT_ON_CURVE", "not the x-coordinate"),
    ],
)
def test_server_rejects_malformed_elements(bad: str, match: str) -> None:
    if bad == "NOT_ON_CURVE":
        bad = _not_on_curve_x()
    elements = _valid_elements(3)
    elements.insert(1, bad)
    with pytest.raises(WireFormatError, match=match):
        psi.PsiServer(["id1"]).respond(_request(elements))


def test_server_rejects_duplicates_and_too_many_elements() -> None:
    elements = _valid_elements(4)
    with pytest.raises(WireFormatError, match="duplicate"):
        psi.PsiServer(["id1"]).respond(_request([*elements, elements[0]]))
    with pytest.raises(BundleTooLargeError, match="limit of 3"):
        psi.PsiServer(["id1"], max_elements=3).respond(_request(elements))


@pytest.mark.parametrize(
    "change, match",
    [
        ({"elements": ["ab" * 31]}, "elements"),
        ({"elements": ["AB" * 32]}, "elements"),
        ({"session": "not-hex"}, "session"),
        ({"version": "splitunet-psi/0"}, "version"),
        ({"suite": "P384_XMD:SHA-384_SSWU_RO_"}, "suite"),
        ({"extra": 1}, "extra"),
    ],
)
def test_parse_message_turns_validation_errors_into_wire_format_errors(change: dict, match: str) -> None:
    good = json.loads(psi.PsiClient(["p1"]).request().model_dump_json())
    with pytest.raises(WireFormatError) as info:
        psi.parse_message(psi.PsiRequest, json.dumps({**good, **change}))
    assert match in json.dumps(info.value.detail)
    with pytest.raises(WireFormatError):
        psi.parse_message(psi.PsiResponse, b"{not json")


def test_client_rejects_bad_responses() -> None:
    client = psi.PsiClient(["p1", "p2"])
    request = client.request()
    good = psi.PsiServer(["p2"]).respond(request)

    wrong_session = good.model_copy(update={"session": "1" * 32})
    with pytest.raises(ProtocolError, match="session"):
        client.intersect(wrong_session)
    with pytest.raises(WireFormatError, match="reblinded has 1"):
        client.intersect(good.model_copy(update={"reblinded": good.reblinded[:1]}))
    with pytest.raises(WireFormatError, match="not the x-coordinate"):
        client.intersect(good.model_copy(update={"server_elements": [_not_on_curve_x()]}))
    small = psi.PsiClient(["p1"], max_elements=1)
    too_many = psi.PsiServer(["p1", "p2"]).respond(small.request())
    with pytest.raises(BundleTooLargeError, match="limit of 1"):
        small.intersect(too_many)
    assert client.intersect(good) == ["p2"]  # the failed attempts did not consume the session


def test_calls_out_of_order_are_protocol_errors() -> None:
    client = psi.PsiClient(["p1"])
    server = psi.PsiServer(["p1"])
    with pytest.raises(ProtocolError, match="before request"):
        client.intersect(psi.PsiResponse(session=client.session, reblinded=[], server_elements=[]))
    request = client.request()
    with pytest.raises(ProtocolError, match="already"):
        client.request()
    response = server.respond(request)
    with pytest.raises(ProtocolError, match="already answered"):
        server.respond(request)
    assert client.intersect(response) == ["p1"]
    with pytest.raises(ProtocolError, match="already"):
        client.intersect(response)


@pytest.mark.parametrize(
    "ids, kwargs, match",
    [
        ("p1", {}, "iterable"),
        (["p1", ""], {}, "non-empty"),
        (["p1", 7], {}, "non-empty"),
        (["x" * 257], {}, "256"),
        (["p1", "p2"], {"max_elements": 1}, "max_elements"),
        (["p1"], {"max_elements": 0}, "max_elements"),
        (["p1"], {"max_elements": True}, "max_elements"),
    ],
)
def test_bad_local_arguments_raise_value_error(ids: object, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        psi.PsiClient(ids, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=match):
        psi.PsiServer(ids, **kwargs)  # type: ignore[arg-type]
