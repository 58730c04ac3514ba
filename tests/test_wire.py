"""Tests of the tensor-bundle wire format: round trips, precision, and every rejection path."""

from __future__ import annotations

import ast
import json
import pickle
import struct
import warnings
from pathlib import Path

import pytest
import torch
import zstandard
from safetensors.torch import save

import splitunet.wire as wire
from splitunet.errors import BundleTooLargeError, WireFormatError
from splitunet.wire import (
    CONTENT_TYPE,
    HEADER_SIZE,
    Bundle,
    BundleExpectation,
    BundleKind,
    BundleMeta,
    WireDtype,
    decode_bundle,
    encode_bundle,
    frame_sha256,
    pack_frame,
    unpack_frame,
)

MAX = 8 * 2**20
META = BundleMeta(run_id="run-1", step=7, site="t1ce", kind=BundleKind.ACTIVATIONS)


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # Deliberately not in sorted order: the sender's order must survive the trip.
    return {
        "level_2": torch.randn(2, 8, 4, 4, generator=g) * 3,
        "level_0": torch.randn(2, 4, 16, 16, generator=g),
        "level_1": torch.randn(2, 6, 8, 8, generator=g) * 0.01,
    }


def _metadata(**overrides: str) -> dict[str, str]:
    md = {
        "format": "splitunet-wire/1",
        "run_id": "run-1",
        "step": "7",
        "site": "t1ce",
        "kind": "activations",
        "names": json.dumps(["a"]),
        "dtype": "fp32",
    }
    md.update(overrides)
    return md


def _crafted(tensors: dict[str, torch.Tensor] | None = None, *, compressed: bool = False, **md: str) -> bytes:
    """A frame around a hand-made safetensors payload (bypasses the encoder's own checks)."""
    tensors = {"a": torch.ones(2, 3)} if tensors is None else tensors
    payload = save(tensors, metadata=_metadata(**md))
    if compressed:
        payload = zstandard.ZstdCompressor().compress(payload)
    return pack_frame(payload, compressed=compressed)


def test_content_type_and_header_size() -> None:
    assert CONTENT_TYPE == "application/vnd.splitunet.bundle"
    assert HEADER_SIZE == 48


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("dtype", list(WireDtype))
def test_round_trip(dtype: WireDtype, compress: bool) -> None:
    src = _tensors()
    data = encode_bundle(src, meta=META, dtype=dtype, compress=compress, max_bytes=MAX)
    assert data[:4] == b"SUNB" and data[5] == (1 if compress else 0)
    bundle = decode_bundle(data, max_bytes=MAX)
    assert isinstance(bundle, Bundle)
    assert bundle.meta == META and bundle.dtype == dtype and bundle.wire_bytes == len(data)
    assert bundle.sha256 == frame_sha256(data) and len(bundle.sha256) == 64
    assert list(bundle.tensors) == ["level_2", "level_0", "level_1"]
    for name, ref in src.items():
        got = bundle.tensors[name]
        assert got.dtype == torch.float32 and got.shape == ref.shape
        if dtype is WireDtype.FP32:
            assert torch.equal(got, ref)
        elif dtype is WireDtype.FP16:
            # round-to-nearest: relative error <= 2**-11 for normal numbers, tiny absolute error below them
            assert ((got - ref).abs() <= ref.abs() * 2**-11 + 2**-24).all()
            assert not torch.equal(got, ref)
        else:
            assert ((got - ref).abs() <= ref.abs() * 2**-8 + 1e-30).all()


@pytest.mark.parametrize("dtype", list(WireDtype))
def test_decode_in_wire_dtype(dtype: WireDtype) -> None:
    data = encode_bundle(_tensors(), meta=META, dtype=dtype, max_bytes=MAX)
    bundle = decode_bundle(data, max_bytes=MAX, as_float32=False)
    assert all(t.dtype == dtype.torch_dtype() for t in bundle.tensors.values())


def test_decoded_tensors_are_writable_and_independent() -> None:
    data = encode_bundle(_tensors(), meta=META, dtype=WireDtype.FP32, max_bytes=MAX)
    original = bytes(data)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. torch's "non-writable buffer" warning
        first = decode_bundle(data, max_bytes=MAX)
        first.tensors["level_0"].add_(1.0)
    second = decode_bundle(data, max_bytes=MAX)
    assert data == original
    assert torch.equal(second.tensors["level_0"] + 1.0, first.tensors["level_0"])


def test_extra_annotations_round_trip() -> None:
    meta = BundleMeta(run_id="r", step=0, site="s", kind="gradients", extra={"defense": "gaussian:0.1"})
    bundle = decode_bundle(encode_bundle(_tensors(), meta=meta, max_bytes=MAX), max_bytes=MAX)
    assert bundle.meta.kind is BundleKind.GRADIENTS and bundle.meta.extra == {"defense": "gaussian:0.1"}


@pytest.mark.parametrize("compress", [False, True])
def test_encoding_is_deterministic(compress: bool) -> None:
    meta = BundleMeta(run_id="r", step=1, site="s", kind="activations", extra={"b": "2", "a": "1", "c": "3"})
    first = encode_bundle(_tensors(), meta=meta, compress=compress, max_bytes=MAX)
    assert all(encode_bundle(_tensors(), meta=meta, compress=compress, max_bytes=MAX) == first for _ in range(5))


def test_compression_shrinks_redundant_data() -> None:
    zeros = {"a": torch.zeros(4, 16, 32, 32)}
    plain = encode_bundle(zeros, meta=META, dtype=WireDtype.FP32, max_bytes=MAX)
    packed = encode_bundle(zeros, meta=META, dtype=WireDtype.FP32, compress=True, max_bytes=MAX)
    assert len(packed) < len(plain) / 20
    assert torch.equal(decode_bundle(packed, max_bytes=MAX).tensors["a"], zeros["a"])


def test_expectation_accepts_matching_bundle() -> None:
    data = encode_bundle(_tensors(), meta=META, max_bytes=MAX)
    expect = BundleExpectation(
        shapes={"level_0": (2, 4, None, None), "level_1": (2, 6, 8, 8), "level_2": (None, 8, 4, 4)},
        batch_size=2,
        ndim=4,
        dtype=WireDtype.FP16,
        run_id="run-1",
        step=7,
        site="t1ce",
        kind=BundleKind.ACTIVATIONS,
    )
    assert set(decode_bundle(data, expect=expect, max_bytes=MAX).tensors) == {"level_0", "level_1", "level_2"}


# --- rejections --------------------------------------------------------------------------------------------


@pytest.fixture
def good() -> bytes:
    return encode_bundle(_tensors(), meta=META, max_bytes=MAX)


def test_rejects_bad_magic(good: bytes) -> None:
    with pytest.raises(WireFormatError, match="magic"):
        decode_bundle(b"XXXX" + good[4:], max_bytes=MAX)


def test_rejects_wrong_frame_version_and_flags(good: bytes) -> None:
    with pytest.raises(WireFormatError, match="frame version 2, expected 1"):
        decode_bundle(good[:4] + b"\x02" + good[5:], max_bytes=MAX)
    with pytest.raises(WireFormatError, match="flags 0x04"):
        decode_bundle(good[:5] + b"\x04" + good[6:], max_bytes=MAX)


@pytest.mark.parametrize("cut", [0, 10, HEADER_SIZE - 1, HEADER_SIZE, HEADER_SIZE + 100, -1])
def test_rejects_truncated(good: bytes, cut: int) -> None:
    with pytest.raises(WireFormatError, match="truncated"):
        decode_bundle(good[:cut], max_bytes=MAX)


def test_rejects_trailing_bytes(good: bytes) -> None:
    with pytest.raises(WireFormatError, match="trailing bytes"):
        decode_bundle(good + b"\0", max_bytes=MAX)


@pytest.mark.parametrize("where", [HEADER_SIZE + 3, HEADER_SIZE + 200, -1, 20])
def test_flipped_byte_fails_checksum(good: bytes, where: int) -> None:
    data = bytearray(good)
    data[where] ^= 0x01
    with pytest.raises(WireFormatError, match="checksum"):
        decode_bundle(bytes(data), max_bytes=MAX)


def test_flipped_compressed_flag_fails_checksum(good: bytes) -> None:
    with pytest.raises(WireFormatError, match="checksum"):
        decode_bundle(good[:5] + b"\x01" + good[6:], max_bytes=MAX)


@pytest.mark.parametrize(
    ("expect", "message"),
    [
        (BundleExpectation(names={"level_0", "level_1"}), r"unexpected \['level_2'\]"),
        (BundleExpectation(names={"level_0", "level_1", "level_2", "level_3"}), r"missing \['level_3'\]"),
        (
            BundleExpectation(shapes={"level_0": (2, 4, 16, 8), "level_1": (2, 6, 8, 8), "level_2": (2, 8, 4, 4)}),
            r"'level_0' has shape \[2, 4, 16, 16\], expected \[2, 4, 16, 8\]",
        ),
        (BundleExpectation(batch_size=3), "expected batch size 3"),
        (BundleExpectation(ndim=5), "expected 5 dims"),
        (BundleExpectation(dtype=WireDtype.FP32), "dtype is fp16, expected fp32"),
        (BundleExpectation(step=8), "step is '7', expected '8'"),
        (BundleExpectation(run_id="run-2"), "run_id is 'run-1', expected 'run-2'"),
        (BundleExpectation(site="flair"), "site is 't1ce', expected 'flair'"),
        (BundleExpectation(kind=BundleKind.GRADIENTS), "kind is 'activations', expected 'gradients'"),
    ],
)
def test_rejects_unexpected_content(good: bytes, expect: BundleExpectation, message: str) -> None:
    with pytest.raises(WireFormatError, match=message):
        decode_bundle(good, expect=expect, max_bytes=MAX)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_rejects_non_finite(bad: float) -> None:
    t = torch.ones(2, 3)
    t[1, 2] = bad
    with pytest.raises(WireFormatError, match="'a' has 1 NaN/Inf"):
        decode_bundle(_crafted({"a": t}), max_bytes=MAX)


def test_encoder_refuses_non_finite_and_fp16_overflow() -> None:
    with pytest.raises(WireFormatError, match="non-finite"):
        encode_bundle({"a": torch.tensor([float("nan")])}, meta=META, max_bytes=MAX)
    with pytest.raises(WireFormatError, match="overflow"):
        encode_bundle({"a": torch.tensor([1e6])}, meta=META, dtype=WireDtype.FP16, max_bytes=MAX)
    encode_bundle({"a": torch.tensor([1e6])}, meta=META, dtype=WireDtype.BF16, max_bytes=MAX)


def test_rejects_oversize_before_decompression(good: bytes) -> None:
    with pytest.raises(BundleTooLargeError, match=f"{len(good)} bytes exceeds the limit of 1000"):
        decode_bundle(good, max_bytes=1000)


def test_encoder_refuses_oversize() -> None:
    with pytest.raises(BundleTooLargeError):
        encode_bundle(_tensors(), meta=META, max_bytes=1000)


@pytest.mark.parametrize("content_size", [True, False])
def test_rejects_zip_bomb(content_size: bool) -> None:
    # 32 MiB of zeros in a few kB; with and without the declared content size in the zstd frame header.
    bomb = zstandard.ZstdCompressor(write_content_size=content_size).compress(bytes(32 * 2**20))
    data = pack_frame(bomb, compressed=True)
    assert len(data) < 100_000
    with pytest.raises(BundleTooLargeError, match="decompressed bundle exceeds the limit of 1048576"):
        decode_bundle(data, max_bytes=2**20)


def test_streaming_cap_stops_early(monkeypatch: pytest.MonkeyPatch) -> None:
    bomb = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(32 * 2**20))
    read_sizes: list[int] = []
    real = zstandard.ZstdDecompressor.stream_reader

    def spy(self, source, **kw):  # type: ignore[no-untyped-def]
        reader = real(self, source, **kw)

        class Spy:
            def __enter__(self):  # type: ignore[no-untyped-def]
                reader.__enter__()
                return self

            def __exit__(self, *exc):  # type: ignore[no-untyped-def]
                return reader.__exit__(*exc)

            def read(self, n: int) -> bytes:
                chunk = reader.read(n)
                read_sizes.append(len(chunk))
                return chunk

        return Spy()

    monkeypatch.setattr(zstandard.ZstdDecompressor, "stream_reader", spy)
    with pytest.raises(BundleTooLargeError):
        unpack_frame(pack_frame(bomb, compressed=True), max_bytes=2**20)
    assert sum(read_sizes) == 2**20 + 1


def test_compressed_payload_round_trip_through_unpack() -> None:
    payload = save({"a": torch.ones(3)}, metadata=_metadata())
    framed = pack_frame(zstandard.ZstdCompressor().compress(payload), compressed=True)
    assert unpack_frame(framed, max_bytes=MAX) == payload


def test_rejects_compressed_flag_on_non_zstd_payload() -> None:
    payload = save({"a": torch.ones(3)}, metadata=_metadata())
    with pytest.raises(WireFormatError, match="not zstd"):
        decode_bundle(pack_frame(payload, compressed=True), max_bytes=MAX)


def test_rejects_declared_dtype_mismatch() -> None:
    with pytest.raises(WireFormatError, match="'a' has dtype 'F32', expected F16 as declared"):
        decode_bundle(_crafted(dtype="fp16"), max_bytes=MAX)


def test_rejects_dtype_outside_whitelist() -> None:
    data = _crafted({"a": torch.ones(2, dtype=torch.float64)}, dtype="fp64")
    allowed = r"dtype 'fp64' is not allowed; allowed: \['fp32', 'fp16', 'bf16'\]"
    with pytest.raises(WireFormatError, match=allowed):
        decode_bundle(data, max_bytes=MAX)
    data = _crafted({"a": torch.ones(2, dtype=torch.int64)})
    with pytest.raises(WireFormatError, match="'a' has dtype 'I64', expected F32"):
        decode_bundle(data, max_bytes=MAX)


def test_rejects_wrong_format_version() -> None:
    with pytest.raises(WireFormatError, match="unsupported bundle format 'splitunet-wire/2'"):
        decode_bundle(_crafted(format="splitunet-wire/2"), max_bytes=MAX)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"names": json.dumps(["a", "b"])}, "differ from metadata names"),
        ({"names": json.dumps(["a", "a"])}, "repeats a name"),
        ({"names": "a"}, "'names' must be a non-empty JSON list"),
        ({"step": "-1"}, "not a non-negative integer"),
        ({"kind": "weights"}, "kind must be one of"),
        ({"site": ""}, "site must be a non-empty"),
        ({"extra_key": "1"}, r"unknown bundle metadata keys \['extra_key'\]"),
    ],
)
def test_rejects_inconsistent_metadata(overrides: dict[str, str], message: str) -> None:
    with pytest.raises(WireFormatError, match=message):
        decode_bundle(_crafted(**overrides), max_bytes=MAX)


def test_rejects_missing_metadata() -> None:
    payload = save({"a": torch.ones(2)}, metadata={"format": "splitunet-wire/1"})
    missing = r"lacks \['dtype', 'kind', 'names', 'run_id', 'site', 'step'\]"
    with pytest.raises(WireFormatError, match=missing):
        decode_bundle(pack_frame(payload, compressed=False), max_bytes=MAX)
    payload = save({"a": torch.ones(2)})
    with pytest.raises(WireFormatError, match="metadata missing"):
        decode_bundle(pack_frame(payload, compressed=False), max_bytes=MAX)


@pytest.mark.parametrize(
    "payload",
    [b"", b"hello", b"not a safetensors buffer, just text", struct.pack("<Q", 4) + b"[1] ", pickle.dumps(1)],
)
def test_rejects_non_safetensors_payload(payload: bytes) -> None:
    with pytest.raises(WireFormatError, match="not a safetensors buffer"):
        decode_bundle(pack_frame(payload, compressed=False), max_bytes=MAX)


def test_rejects_corrupt_tensor_offsets() -> None:
    payload = save({"a": torch.ones(2, 3)}, metadata=_metadata())
    with pytest.raises(WireFormatError, match="not a valid safetensors buffer"):
        decode_bundle(pack_frame(payload[:-4], compressed=False), max_bytes=MAX)


def test_rejects_non_bytes() -> None:
    with pytest.raises(WireFormatError, match="must be bytes"):
        decode_bundle("text", max_bytes=MAX)  # type: ignore[arg-type]


# --- argument validation -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        ({}, "at least one tensor"),
        ({"a": torch.ones(2, dtype=torch.int32)}, "floating-point"),
        ({"bad name": torch.ones(2)}, "tensor name 'bad name'"),
        ({"__metadata__": torch.ones(2)}, "tensor name"),
    ],
)
def test_encoder_rejects_bad_arguments(tensors: dict[str, torch.Tensor], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        encode_bundle(tensors, meta=META, max_bytes=MAX)
    with pytest.raises(ValueError, match=r"dtype must be one of \['fp32', 'fp16', 'bf16'\], got 'fp64'"):
        encode_bundle(_tensors(), meta=META, dtype="fp64", max_bytes=MAX)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"step": -1}, "step must be"),
        ({"step": True}, "step must be"),
        ({"run_id": ""}, "run_id must be"),
        ({"site": "x" * 64}, "site must be"),
        ({"kind": "weights"}, r"kind must be one of \['activations', 'gradients'\]"),
        ({"extra": {"Bad Key": "v"}}, "extra keys"),
    ],
)
def test_meta_validation(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"run_id": "r", "step": 0, "site": "s", "kind": "activations", **kwargs}
    with pytest.raises(ValueError, match=message):
        BundleMeta(**args)  # type: ignore[arg-type]


def test_expectation_validation() -> None:
    with pytest.raises(ValueError, match="must agree"):
        BundleExpectation(names={"a"}, shapes={"b": (1,)})
    with pytest.raises(ValueError, match="batch_size"):
        BundleExpectation(batch_size=-1)


# --- no pickle on the decode path --------------------------------------------------------------------------


def test_module_never_imports_or_calls_unsafe_loaders() -> None:
    tree = ast.parse(Path(wire.__file__).read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not imported & {"pickle", "dill", "marshal", "joblib", "cloudpickle", "numpy"}
    calls = {ast.unparse(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
    assert not {c for c in calls if c.endswith(("torch.load", "np.load", "eval", "exec"))}
    assert "allow_pickle" not in Path(wire.__file__).read_text()


def test_decode_does_not_touch_pickle_at_runtime(monkeypatch: pytest.MonkeyPatch, good: bytes) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("unpickling on the decode path")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, boom)
    monkeypatch.setattr(torch, "load", boom)
    assert decode_bundle(good, max_bytes=MAX).meta == META


@pytest.mark.parametrize("dtype", list(WireDtype))
def test_payload_is_standard_safetensors(dtype: WireDtype) -> None:
    """The encoder writes the safetensors buffer itself (no copy); the reference library must read it back."""
    from safetensors.torch import load

    tensors = {**_tensors(3), "empty": torch.zeros(0, 4)}
    frame = encode_bundle(tensors, meta=BundleMeta(run_id="r", step=1, site="t1", kind="activations"),
                          dtype=dtype, max_bytes=MAX)
    loaded = load(unpack_frame(frame, max_bytes=MAX))
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        assert loaded[name].dtype == dtype.torch_dtype()
        torch.testing.assert_close(loaded[name], tensor.to(dtype.torch_dtype()))


@pytest.mark.parametrize(
    "offsets", [[[0, 24], [20, 44]], [[0, 24], [28, 52]], [[0, 20], [20, 44]], [[0, 24], [0, 24]], [[0, 24], [24, 40]]]
)
def test_rejects_overlapping_gapped_or_mismatched_offsets(offsets: list[list[int]]) -> None:
    """Tensors are decoded as views into the received bytes, so their spans are checked as safetensors does."""
    payload = bytearray(save({"a": torch.ones(2, 3), "b": torch.ones(2, 3)}, metadata=_metadata(names='["a", "b"]')))
    (n,) = struct.unpack_from("<Q", payload)
    header = json.loads(payload[8 : 8 + n])
    header["a"]["data_offsets"], header["b"]["data_offsets"] = offsets[0], offsets[1]
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    crafted = struct.pack("<Q", len(text)) + text + bytes(payload[8 + n :])
    with pytest.raises(WireFormatError, match="not a valid safetensors buffer"):
        decode_bundle(pack_frame(crafted, compressed=False), max_bytes=MAX)


def test_decoded_tensors_do_not_share_the_received_buffer() -> None:
    data = bytearray(encode_bundle(_tensors(), meta=BundleMeta(run_id="r", step=1, site="t1", kind="activations"),
                                   dtype=WireDtype.FP32, max_bytes=MAX))
    bundle = decode_bundle(data, max_bytes=MAX, as_float32=False)
    before = {k: v.clone() for k, v in bundle.tensors.items()}
    data[wire.HEADER_SIZE + 200 :] = bytes(len(data) - wire.HEADER_SIZE - 200)
    for name, tensor in bundle.tensors.items():
        torch.testing.assert_close(tensor, before[name])
        tensor.add_(1.0)  # writable
