"""The wire format of every tensor bundle that crosses the network (activations up, gradients down).

A *bundle* is an ordered set of named float tensors plus a little metadata (run, step, site, kind). It
travels as one binary HTTP body of content type :data:`CONTENT_TYPE`. No pickle anywhere: the payload is a
safetensors buffer, parsed by ``safetensors`` from bytes, after the frame and its header have been validated.

Frame layout (all integers little-endian)::

    offset  size  field
    0       4     magic            b"SUNB"
    4       1     frame version    1
    5       1     flags            bit 0: payload is zstd-compressed; all other bits must be 0
    6       2     reserved         must be 0
    8       8     payload length   number of payload bytes that follow the header (as stored)
    16      32    SHA-256          over header bytes 0..16 followed by the payload bytes (as stored)
    48      n     payload          safetensors bytes, or one or more zstd frames of them

The digest covers the stored (possibly compressed) bytes, so integrity is checked before anything is parsed or
decompressed; covering header bytes 0..16 too means a flipped flag or length byte is caught as well.

Safetensors metadata (all ``str -> str``)::

    format   "splitunet-wire/1"
    run_id   the training run / job id
    step     the step number, a decimal integer >= 0
    site     the site whose encoder produced the activations, or that receives the gradients
    kind     "activations" | "gradients"
    names    JSON list of the tensor names, in the sender's order
    dtype    "fp32" | "fp16" | "bf16" (every tensor has this dtype)
    x.<key>  optional free-form annotations (``BundleMeta.extra``), e.g. which defenses were applied

Size limits: ``max_bytes`` bounds the frame *and* the decompressed payload. The frame length is checked before
anything else, the declared zstd content size before decompressing, and the decompressed size while streaming,
so a zip bomb stops after ``max_bytes + 1`` output bytes (:class:`BundleTooLargeError`, HTTP 413).

Errors: a malformed or unexpected bundle raises :class:`~splitunet.errors.WireFormatError` (HTTP 400) whose
message says what was wrong and what was expected; bad *arguments* to the encoder raise ``ValueError``.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import struct
import sys
import warnings
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from splitunet.errors import BundleTooLargeError, WireFormatError

if TYPE_CHECKING:
    import torch

#: HTTP content type of an encoded bundle.
CONTENT_TYPE = "application/vnd.splitunet.bundle"
#: Value of the ``format`` metadata key.
FORMAT_VERSION = "splitunet-wire/1"
MAGIC = b"SUNB"
FRAME_VERSION = 1
FLAG_ZSTD = 0x01
_HEADER = struct.Struct("<4sBBHQ32s")
HEADER_SIZE = _HEADER.size  # 48
#: A reasonable default for ``max_bytes`` (a batch of 3D activations at every level is ~100 MiB in fp16).
DEFAULT_MAX_BYTES = 512 * 2**20

_NAME_RE = re.compile(r"^[A-Za-z0-9_.:/-]{1,200}$")
_EXTRA_KEY_RE = re.compile(r"^[a-z0-9_.-]{1,64}$")
_STEP_RE = re.compile(r"^(0|[1-9][0-9]{0,17})$")
_META_KEYS = frozenset({"format", "run_id", "step", "site", "kind", "names", "dtype"})
_CHUNK = 1 << 20


class WireDtype(StrEnum):
    """Floating-point dtype of every tensor in a bundle on the wire (the whitelist)."""

    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"

    @property
    def safetensors_code(self) -> str:
        return {"fp32": "F32", "fp16": "F16", "bf16": "BF16"}[self.value]

    def torch_dtype(self) -> torch.dtype:
        import torch

        return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[self.value]


class BundleKind(StrEnum):
    ACTIVATIONS = "activations"
    GRADIENTS = "gradients"


def _check_label(name: str, value: Any, max_len: int) -> None:
    if not isinstance(value, str) or not value or len(value) > max_len or not value.isprintable():
        raise ValueError(f"{name} must be a non-empty printable string of <= {max_len} chars, got {value!r}")


@dataclass(frozen=True)
class BundleMeta:
    """Who sent a bundle for which step.

    Args:
        run_id: the training run (job) id.
        step: the step number, ``>= 0``.
        site: the site that produced the activations, or that the gradients are for.
        kind: activations or gradients.
        extra: optional annotations, keys matching ``[a-z0-9_.-]{1,64}``, values printable strings.
    """

    run_id: str
    step: int
    site: str
    kind: BundleKind
    extra: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_label("run_id", self.run_id, 128)
        _check_label("site", self.site, 63)
        if isinstance(self.step, bool) or not isinstance(self.step, int) or not 0 <= self.step < 10**18:
            raise ValueError(f"step must be an integer in [0, 1e18), got {self.step!r}")
        try:
            object.__setattr__(self, "kind", BundleKind(self.kind))
        except ValueError:
            allowed = [k.value for k in BundleKind]
            raise ValueError(f"kind must be one of {allowed}, got {self.kind!r}") from None
        for key, value in self.extra.items():
            if not isinstance(key, str) or not _EXTRA_KEY_RE.match(key):
                raise ValueError(f"extra keys must match {_EXTRA_KEY_RE.pattern}, got {key!r}")
            if not isinstance(value, str) or len(value) > 4096 or not value.isprintable():
                raise ValueError(f"extra[{key!r}] must be a printable string of at most 4096 chars")
        object.__setattr__(self, "extra", dict(self.extra))


@dataclass(frozen=True)
class BundleExpectation:
    """What the receiver expects; every field left ``None`` is not checked.

    Args:
        names: the exact set of tensor names (order-insensitive).
        shapes: exact shape per tensor name; a ``None`` entry is a wildcard dimension. Implies ``names``.
        batch_size: required size of dimension 0 of every tensor.
        ndim: required number of dimensions of every tensor.
        dtype: required wire dtype.
        run_id, step, site, kind: required metadata values.
    """

    names: Collection[str] | None = None
    shapes: Mapping[str, Sequence[int | None]] | None = None
    batch_size: int | None = None
    ndim: int | None = None
    dtype: WireDtype | None = None
    run_id: str | None = None
    step: int | None = None
    site: str | None = None
    kind: BundleKind | None = None

    def __post_init__(self) -> None:
        if self.names is not None:
            object.__setattr__(self, "names", frozenset(self.names))
        if self.shapes is not None:
            shapes = {k: tuple(v) for k, v in self.shapes.items()}
            if self.names is not None and set(shapes) != self.names:
                raise ValueError(f"names {sorted(self.names)} and shapes keys {sorted(shapes)} must agree")
            object.__setattr__(self, "shapes", shapes)
        for name in ("batch_size", "ndim"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"{name} must be a non-negative integer or None, got {value!r}")
        if self.dtype is not None:
            object.__setattr__(self, "dtype", WireDtype(self.dtype))
        if self.kind is not None:
            object.__setattr__(self, "kind", BundleKind(self.kind))

    def expected_names(self) -> frozenset[str] | None:
        if self.shapes is not None:
            return frozenset(self.shapes)
        return self.names  # type: ignore[return-value]


@dataclass(frozen=True)
class Bundle:
    """A decoded bundle.

    ``tensors`` keeps the sender's order; each tensor is a fresh, writable CPU tensor that shares no memory
    with the received bytes, in ``float32`` (the default of :func:`decode_bundle`) or in the wire dtype
    (``as_float32=False``). ``dtype`` is the wire dtype; ``wire_bytes`` the frame size; ``sha256`` the digest
    from the frame header (hex; it covers header bytes 0..16 and the stored payload), e.g. for a transcript.
    """

    meta: BundleMeta
    tensors: dict[str, torch.Tensor]
    dtype: WireDtype
    wire_bytes: int
    sha256: str


def _digest(header16: bytes, payload: bytes | memoryview) -> bytes:
    h = hashlib.sha256(header16)
    h.update(payload)
    return h.digest()


def pack_frame(payload: bytes, *, compressed: bool) -> bytes:
    """Wrap already-encoded payload bytes (safetensors, or zstd of them when ``compressed``) in a frame."""
    return _pack_pieces([payload], compressed=compressed)


def _pack_pieces(pieces: Sequence[bytes | memoryview], *, compressed: bool) -> bytes:
    """A frame around the concatenation of ``pieces``, digested piece by piece and copied once."""
    length = sum(len(p) for p in pieces)
    head16 = _HEADER.pack(MAGIC, FRAME_VERSION, FLAG_ZSTD if compressed else 0, 0, length, b"")[:16]
    h = hashlib.sha256(head16)
    for piece in pieces:
        h.update(piece)
    return b"".join((head16, h.digest(), *pieces))


def unpack_frame(data: bytes, *, max_bytes: int) -> bytes:
    """Check a frame (size, magic, version, flags, length, digest) and return the decompressed payload."""
    return bytes(_unpack(data, max_bytes)[0])


def _unpack(data: bytes, max_bytes: int) -> tuple[bytes | memoryview, bytes]:
    """``(payload, digest)``; the payload is a view into ``data`` (no copy) unless it was decompressed."""
    if len(data) > max_bytes:
        raise BundleTooLargeError(
            f"bundle of {len(data)} bytes exceeds the limit of {max_bytes} bytes",
            detail={"size": len(data), "max_bytes": max_bytes},
        )
    if len(data) < HEADER_SIZE:
        raise WireFormatError(f"truncated bundle: {len(data)} bytes, expected a {HEADER_SIZE}-byte header")
    magic, version, flags, reserved, length, digest = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise WireFormatError(f"not a Split-U-Net bundle: magic {magic!r}, expected {MAGIC!r}")
    if version != FRAME_VERSION:
        raise WireFormatError(f"unsupported bundle frame version {version}, expected {FRAME_VERSION}")
    if flags & ~FLAG_ZSTD or reserved:
        raise WireFormatError(
            f"unknown frame flags 0x{flags:02x} / reserved 0x{reserved:04x}; expected flags 0x00 or 0x01 and reserved 0"
        )
    payload = memoryview(data)[HEADER_SIZE:]
    if len(payload) != length:
        what = "truncated bundle" if len(payload) < length else "trailing bytes after the bundle"
        raise WireFormatError(f"{what}: header declares {length} payload bytes, got {len(payload)}")
    if _digest(data[:16], payload) != digest:
        raise WireFormatError("bundle checksum mismatch: SHA-256 of the payload differs from the header")
    return (_decompress(payload, max_bytes) if flags & FLAG_ZSTD else payload), digest


def _decompress(payload: bytes | memoryview, max_bytes: int) -> bytes:
    import zstandard

    too_large = BundleTooLargeError(
        f"decompressed bundle exceeds the limit of {max_bytes} bytes", detail={"max_bytes": max_bytes}
    )
    try:
        declared = zstandard.frame_content_size(payload)
    except zstandard.ZstdError as exc:
        raise WireFormatError(f"compressed flag set but the payload is not zstd data: {exc}") from None
    if declared > max_bytes:
        raise too_large
    out = bytearray()
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(bytes(payload)), read_across_frames=True)
        with reader:
            while chunk := reader.read(min(_CHUNK, max_bytes + 1 - len(out))):
                out += chunk
                if len(out) > max_bytes:
                    raise too_large
    except zstandard.ZstdError as exc:
        raise WireFormatError(f"corrupt zstd payload: {exc}") from None
    return bytes(out)


def encode_bundle(
    tensors: Mapping[str, torch.Tensor],
    *,
    meta: BundleMeta,
    dtype: WireDtype = WireDtype.FP16,
    compress: bool = False,
    max_bytes: int,
    level: int = 3,
) -> bytes:
    """Encode named float tensors (any layout, e.g. ``B, C, H, W[, D]``) as one framed bundle.

    Tensors are detached, moved to CPU, cast to ``dtype`` and made contiguous; the mapping order is kept.
    ``compress`` zstd-compresses the safetensors payload at ``level`` (1..22; 3 is fast and usually enough).
    The encoding is deterministic: the same tensors and ``meta`` always give the same bytes.
    Raises ``ValueError`` for bad arguments, :class:`WireFormatError` when a value is not finite after the
    cast (e.g. fp16 overflow above 65504), :class:`BundleTooLargeError` when the frame exceeds ``max_bytes``.
    """
    import torch

    try:
        dtype = WireDtype(dtype)
    except ValueError:
        raise ValueError(f"dtype must be one of {[d.value for d in WireDtype]}, got {dtype!r}") from None
    if not isinstance(meta, BundleMeta):
        raise ValueError(f"meta must be a BundleMeta, got {type(meta).__name__}")
    if not tensors:
        raise ValueError("tensors must hold at least one tensor")
    if max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive, got {max_bytes}")
    target = dtype.torch_dtype()
    prepared: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if not isinstance(name, str) or not _NAME_RE.match(name) or name == "__metadata__":
            raise ValueError(f"tensor name {name!r} must match {_NAME_RE.pattern}")
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            raise ValueError(f"tensor {name!r} must be a floating-point torch.Tensor")
        wire = tensor.detach().to(device="cpu", dtype=target).contiguous()
        if not _all_finite(wire):
            if _all_finite(tensor.detach()):
                raise WireFormatError(f"tensor {name!r} overflows {dtype} (|x| > 65504?); send fp32 or bf16")
            raise WireFormatError(f"tensor {name!r} has non-finite values (NaN/Inf); refusing to send it")
        prepared[name] = wire
    metadata = {
        "format": FORMAT_VERSION,
        "run_id": meta.run_id,
        "step": str(meta.step),
        "site": meta.site,
        "kind": str(meta.kind),
        "names": json.dumps(list(prepared)),
        "dtype": str(dtype),
        **{f"x.{k}": v for k, v in meta.extra.items()},
    }
    pieces = _safetensors_pieces(prepared, metadata, dtype)
    size = sum(len(p) for p in pieces)
    if size > max_bytes:
        raise BundleTooLargeError(
            f"encoded bundle of {size} bytes exceeds the limit of {max_bytes} bytes",
            detail={"size": size, "max_bytes": max_bytes},
        )
    if compress:
        import zstandard

        pieces = [zstandard.ZstdCompressor(level=level).compress(b"".join(pieces))]
    frame = _pack_pieces(pieces, compressed=compress)
    if len(frame) > max_bytes:
        raise BundleTooLargeError(f"bundle of {len(frame)} bytes exceeds the limit of {max_bytes} bytes")
    return frame


def _safetensors_pieces(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], dtype: WireDtype
) -> list[bytes | memoryview]:
    """A safetensors buffer as pieces (header, then each tensor's bytes as a view, without copying).

    The header is canonical, so the same tensors and metadata always give the same bytes (hence the same
    digest): ``__metadata__`` first with sorted keys, then the tensors sorted by name (safetensors' own order
    for one dtype) at consecutive offsets, ASCII JSON padded with spaces to 8 bytes. Tensor bytes are
    little-endian, as the format requires; ``safetensors.torch.load`` reads the result (tested).
    """
    if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
        from safetensors.torch import save

        return [save(dict(tensors), metadata=dict(metadata))]
    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))}
    views: list[memoryview] = []
    offset = 0
    for name in sorted(tensors):
        tensor = tensors[name]
        nbytes = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": dtype.safetensors_code, "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
        if nbytes:
            views.append(memoryview(tensor.reshape(-1).view(torch_uint8()).numpy()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode("ascii")
    text += b" " * (-len(text) % 8)
    return [struct.pack("<Q", len(text)), text, *views]


def torch_uint8() -> torch.dtype:
    import torch

    return torch.uint8


def _parse_header(payload: bytes | memoryview) -> tuple[dict[str, str], dict[str, dict[str, Any]], int]:
    """Parse the safetensors JSON header without touching tensor data; also return where the data starts."""
    if len(payload) < 8:
        raise WireFormatError("payload is not a safetensors buffer: shorter than its 8-byte header length")
    (n,) = struct.unpack_from("<Q", payload)
    if n > len(payload) - 8:
        raise WireFormatError(f"payload is not a safetensors buffer: header length {n} exceeds the payload")
    try:
        header = json.loads(bytes(payload[8 : 8 + n]))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WireFormatError(f"payload is not a safetensors buffer: header is not JSON ({exc})") from None
    except RecursionError:
        raise WireFormatError("payload is not a safetensors buffer: header JSON is nested too deeply") from None
    if not isinstance(header, dict):
        raise WireFormatError("payload is not a safetensors buffer: header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise WireFormatError(f"bundle metadata missing or not str->str; expected keys {sorted(_META_KEYS)}")
    if not all(isinstance(v, dict) for v in header.values()):
        raise WireFormatError("payload is not a safetensors buffer: malformed tensor entries")
    return metadata, header, 8 + n


def _parse_meta(md: dict[str, str]) -> tuple[BundleMeta, WireDtype, list[str]]:
    missing = sorted(_META_KEYS - md.keys())
    if missing:
        raise WireFormatError(f"bundle metadata lacks {missing}; expected keys {sorted(_META_KEYS)}")
    unknown = sorted(k for k in md if k not in _META_KEYS and not k.startswith("x."))
    if unknown:
        raise WireFormatError(f"unknown bundle metadata keys {unknown}; allowed {sorted(_META_KEYS)} and x.*")
    if md["format"] != FORMAT_VERSION:
        raise WireFormatError(f"unsupported bundle format {md['format']!r}, expected {FORMAT_VERSION!r}")
    try:
        dtype = WireDtype(md["dtype"])
    except ValueError:
        raise WireFormatError(
            f"bundle dtype {md['dtype']!r} is not allowed; allowed: {[d.value for d in WireDtype]}"
        ) from None
    if not _STEP_RE.match(md["step"]):
        raise WireFormatError(f"bundle step {md['step']!r} is not a non-negative integer")
    try:
        names = json.loads(md["names"])
    except (json.JSONDecodeError, RecursionError):
        names = None
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise WireFormatError(f"bundle metadata 'names' must be a non-empty JSON list of names: {md['names'][:80]!r}")
    if len(set(names)) != len(names):
        raise WireFormatError(f"bundle metadata 'names' repeats a name: {names}")
    try:
        meta = BundleMeta(
            run_id=md["run_id"],
            step=int(md["step"]),
            site=md["site"],
            kind=md["kind"],  # type: ignore[arg-type]
            extra={k[2:]: v for k, v in md.items() if k.startswith("x.")},
        )
    except ValueError as exc:
        raise WireFormatError(f"bad bundle metadata: {exc}") from None
    return meta, dtype, names


def _check_expectation(meta: BundleMeta, dtype: WireDtype, shapes: dict[str, list[int]], ex: BundleExpectation) -> None:
    for key in ("run_id", "step", "site", "kind"):
        want, got = getattr(ex, key), getattr(meta, key)
        if want is not None and want != got:
            raise WireFormatError(f"bundle {key} is {str(got)!r}, expected {str(want)!r}")
    if ex.dtype is not None and dtype != ex.dtype:
        raise WireFormatError(f"bundle dtype is {dtype}, expected {ex.dtype}")
    names = ex.expected_names()
    if names is not None and set(shapes) != names:
        raise WireFormatError(
            f"bundle tensor names {sorted(shapes)} differ from the expected {sorted(names)}: "
            f"missing {sorted(names - shapes.keys())}, unexpected {sorted(shapes.keys() - names)}"
        )
    for name, shape in shapes.items():
        if ex.ndim is not None and len(shape) != ex.ndim:
            raise WireFormatError(f"tensor {name!r} has {len(shape)} dims {shape}, expected {ex.ndim} dims")
        if ex.batch_size is not None and (not shape or shape[0] != ex.batch_size):
            raise WireFormatError(f"tensor {name!r} has shape {shape}, expected batch size {ex.batch_size}")
        if ex.shapes is not None:
            want = ex.shapes[name]
            if len(want) != len(shape) or any(w not in (None, s) for w, s in zip(want, shape, strict=True)):
                shown = [("*" if w is None else w) for w in want]
                raise WireFormatError(f"tensor {name!r} has shape {shape}, expected {shown}")


def decode_bundle(
    data: bytes,
    *,
    expect: BundleExpectation | None = None,
    max_bytes: int,
    as_float32: bool = True,
) -> Bundle:
    """Validate and decode a framed bundle (see the module docstring for every check, in order).

    Returns tensors in the sender's order, float32 unless ``as_float32=False`` (then in the wire dtype).
    Raises :class:`WireFormatError` or :class:`BundleTooLargeError`; never unpickles anything.
    """
    import torch

    if not isinstance(data, bytes | bytearray | memoryview):
        raise WireFormatError(f"bundle must be bytes, got {type(data).__name__}")
    payload, digest = _unpack(data, max_bytes)
    md, entries, start = _parse_header(payload)
    meta, dtype, names = _parse_meta(md)
    if set(names) != set(entries):
        raise WireFormatError(f"bundle tensors {sorted(entries)} differ from metadata names {sorted(names)}")
    shapes: dict[str, list[int]] = {}
    for name in names:
        entry = entries[name]
        if entry.get("dtype") != dtype.safetensors_code:
            raise WireFormatError(
                f"tensor {name!r} has dtype {entry.get('dtype')!r}, expected {dtype.safetensors_code} "
                f"as declared ({dtype})"
            )
        shape = entry.get("shape")
        if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape):
            raise WireFormatError(f"tensor {name!r} has a malformed shape {shape!r}")
        shapes[name] = shape
    if expect is not None:
        _check_expectation(meta, dtype, shapes, expect)
    spans = _check_offsets(entries, shapes, dtype, len(payload) - start)
    wire_dtype = dtype.torch_dtype()
    target = torch.float32 if as_float32 else wire_dtype
    tensors: dict[str, torch.Tensor] = {}
    with warnings.catch_warnings():  # a view of read-only received bytes; copied below before anyone writes
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        for name in names:
            begin, end = spans[name]
            wire = (
                torch.frombuffer(payload, dtype=wire_dtype, offset=start + begin, count=(end - begin)
                                 // _ITEMSIZE[dtype]).view(shapes[name])
                if end > begin
                else torch.empty(shapes[name], dtype=wire_dtype)
            )
            if not _all_finite(wire):
                bad = int((~torch.isfinite(wire)).sum())
                raise WireFormatError(f"tensor {name!r} has {bad} NaN/Inf values; expected finite values")
            tensors[name] = wire.to(dtype=target, copy=True)
    return Bundle(
        meta=meta,
        tensors=tensors,
        dtype=dtype,
        wire_bytes=len(data),
        sha256=digest.hex(),
    )


_ITEMSIZE = {WireDtype.FP32: 4, WireDtype.FP16: 2, WireDtype.BF16: 2}


def _check_offsets(
    entries: dict[str, dict[str, Any]], shapes: dict[str, list[int]], dtype: WireDtype, data_bytes: int
) -> dict[str, tuple[int, int]]:
    """Validate the tensors' ``data_offsets`` as safetensors does: each span holds exactly its shape's bytes, and
    the spans tile the data area from 0 to its end without gaps or overlaps. Returns ``{name: (begin, end)}``."""
    spans: dict[str, tuple[int, int]] = {}
    for name, shape in shapes.items():
        offsets = entries[name].get("data_offsets")
        if (
            not isinstance(offsets, list) or len(offsets) != 2
            or not all(type(o) is int and o >= 0 for o in offsets) or offsets[0] > offsets[1]
        ):
            raise WireFormatError(f"payload is not a valid safetensors buffer: tensor {name!r} has bad data_offsets")
        numel = 1
        for dim in shape:
            numel *= dim
        if offsets[1] - offsets[0] != numel * _ITEMSIZE[dtype]:
            raise WireFormatError(
                f"payload is not a valid safetensors buffer: tensor {name!r} spans {offsets[1] - offsets[0]} bytes, "
                f"its shape {shape} needs {numel * _ITEMSIZE[dtype]}"
            )
        spans[name] = (offsets[0], offsets[1])
    position = 0
    for begin, end in sorted(spans.values()):
        if begin != position:
            raise WireFormatError("payload is not a valid safetensors buffer: tensor data overlaps or has gaps")
        position = end
    if position != data_bytes:
        raise WireFormatError(
            f"payload is not a valid safetensors buffer: tensors cover {position} of {data_bytes} data bytes"
        )
    return spans


def _all_finite(tensor: torch.Tensor) -> bool:
    """Whether every value is finite. ``aminmax`` propagates NaN and meets ±Inf at an end, and is several times
    faster than ``isfinite(t).all()`` on large tensors."""
    import torch

    if tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low)) and bool(torch.isfinite(high))


def frame_sha256(data: bytes) -> str:
    """The digest stored in a frame's header (hex), without verifying it: what ``Bundle.sha256`` will be."""
    if len(data) < HEADER_SIZE or data[:4] != MAGIC:
        raise WireFormatError(f"not a Split-U-Net bundle frame; expected magic {MAGIC!r}, a 48-byte header")
    return bytes(data[16:HEADER_SIZE]).hex()


def tensor_nbytes(tensors: Mapping[str, torch.Tensor]) -> int:
    """Total bytes of the tensors' elements (``numel * element_size``), e.g. for metrics."""
    return sum(t.numel() * t.element_size() for t in tensors.values())
