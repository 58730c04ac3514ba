"""Checkpoints of a party's model and optimizer, without pickle: atomic, checksummed, verified before use.

A checkpoint is one safetensors file: the module's ``state_dict`` tensors under ``model.<name>``, the optimizer's
per-parameter state tensors under ``optim.<param index>.<key>``, and JSON in the safetensors metadata for
everything that is not a tensor (the optimizer's ``param_groups``, scalar state, the module's architecture
fingerprint and caller metadata such as run id and step).

Writing (:func:`save_checkpoint`) is atomic and durable: the bytes go to a temporary file in the same folder, which
is fsynced, renamed over the final name, and the folder is fsynced, so a crash (even SIGKILL or a power cut) leaves
either the previous file or the complete new one. The metadata carries ``content_sha256``, a SHA-256 over every
tensor (name, dtype, shape, bytes) and the other metadata, so a flipped bit, a truncated or an empty file is found.

Reading is two steps, so nothing unverified ever reaches a live model:

1. :func:`read_checkpoint` parses the file from bytes, recomputes the checksum, checks the format, the architecture
   fingerprint and (given the module) every tensor name and shape — and raises before anything is loaded;
2. :func:`apply_checkpoint` loads a :class:`VerifiedCheckpoint` into the module and optimizer.

:func:`latest_checkpoint` picks the newest file that verifies, reporting (logging and returning) the corrupt ones.

Errors: a missing, empty, truncated or corrupt file is a :class:`~splitunet.errors.DataError` (422, ``bad_data``);
a checkpoint of another architecture is a :class:`~splitunet.errors.ConflictError` (409).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from splitunet.errors import ConflictError, DataError, PolicyError
from splitunet.networks.split_unet import architecture_fingerprint

logger = logging.getLogger(__name__)

FORMAT = "splitunet-checkpoint/2"
#: Largest safetensors header accepted (JSON metadata of the optimizer included).
MAX_HEADER_BYTES = 64 * 2**20


def module_fingerprint(module: torch.nn.Module) -> str:
    """The module's own ``fingerprint()`` when it has one (a :class:`SiteEncoder`), else its architecture hash."""
    own = getattr(module, "fingerprint", None)
    return own() if callable(own) else architecture_fingerprint(module)


@dataclass(frozen=True)
class VerifiedCheckpoint:
    """A checkpoint file whose checksum, format and fingerprint were checked; nothing is loaded yet.

    ``tensors`` are the file's tensors (CPU), ``meta`` the caller's metadata, ``optimizer`` the optimizer's
    ``{param_groups, scalars}`` (``None`` if none was saved), ``sha256`` the digest of the whole file.
    """

    path: Path
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]
    optimizer: dict[str, Any] | None
    fingerprint: str
    sha256: str

    @property
    def step(self) -> int | None:
        step = self.meta.get("step")
        return step if isinstance(step, int) else None


def _content_digest(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps({k: v for k, v in metadata.items() if k != "content_sha256"}, sort_keys=True).encode())
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _write_durably(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: temp file, fsync, rename, fsync of the folder."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    path: Path | str,
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    meta: dict[str, Any],
    *,
    fingerprint: str | None = None,
) -> str:
    """Write ``module`` (+ ``optimizer``) and JSON-serialisable ``meta`` to ``path``; return the file's SHA-256.

    ``fingerprint`` defaults to :func:`module_fingerprint`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {
        f"model.{k}": v.detach().cpu().contiguous() for k, v in module.state_dict().items()
    }
    optim_doc: dict[str, Any] | None = None
    if optimizer is not None:
        state = optimizer.state_dict()
        scalars: dict[str, dict[str, Any]] = {}
        for idx, entry in state["state"].items():
            for key, value in entry.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optim.{idx}.{key}"] = value.detach().cpu().contiguous()
                else:
                    scalars.setdefault(str(idx), {})[key] = value
        optim_doc = {"param_groups": state["param_groups"], "scalars": scalars}
    metadata = {
        "format": FORMAT,
        "fingerprint": fingerprint or module_fingerprint(module),
        "meta": json.dumps(meta),
        "optimizer": json.dumps(optim_doc),
    }
    metadata["content_sha256"] = _content_digest(tensors, metadata)
    data = save_bytes(tensors, metadata=metadata)
    _write_durably(path, data)
    return hashlib.sha256(data).hexdigest()


def _corrupt(path: Path, why: str) -> DataError:
    return DataError(
        f"checkpoint {path.name} is unusable: {why}; use an earlier checkpoint or retrain from there",
        detail={"path": path.name, "reason": why},
    )


def read_checkpoint(
    path: Path | str, *, fingerprint: str | None = None, module: torch.nn.Module | None = None
) -> VerifiedCheckpoint:
    """Read and verify a checkpoint without loading it anywhere.

    Checks the format, the content checksum, ``fingerprint`` (the architecture the caller holds; default: that of
    ``module`` if given) and, given ``module``, that the file holds exactly its tensor names and shapes.

    Raises:
        DataError: the file is missing, empty, truncated, corrupt or of another format.
        ConflictError: the checkpoint was written by another architecture.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no checkpoint {path.name}", detail={"path": path.name})
    data = path.read_bytes()
    if not data:
        raise _corrupt(path, "the file is empty")
    if len(data) < 8:
        raise _corrupt(path, "the file is truncated")
    header_len = int.from_bytes(data[:8], "little")
    if header_len > min(MAX_HEADER_BYTES, len(data) - 8):
        raise _corrupt(path, "the file is truncated or not a safetensors file")
    try:
        header = json.loads(data[8 : 8 + header_len])
        metadata = header.get("__metadata__") or {}
        tensors = load_bytes(data)
    except Exception as exc:  # noqa: BLE001 - any parse failure of the bytes means a corrupt file
        raise _corrupt(path, f"it does not parse ({type(exc).__name__})") from None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        found = metadata.get("format") if isinstance(metadata, dict) else None
        raise _corrupt(path, f"it is not a {FORMAT} file (format {found!r})")
    if _content_digest(tensors, metadata) != metadata.get("content_sha256"):
        raise _corrupt(path, "its checksum does not match its content")
    try:
        meta = json.loads(metadata.get("meta", "{}"))
        optim_doc = json.loads(metadata.get("optimizer", "null"))
    except json.JSONDecodeError:
        raise _corrupt(path, "its metadata is not JSON") from None
    want = fingerprint or (module_fingerprint(module) if module is not None else None)
    if want is not None and metadata.get("fingerprint") != want:
        raise ConflictError(
            f"checkpoint {path.name} was written by another architecture (fingerprint {metadata.get('fingerprint')}, "
            f"this model is {want}); restore it into the model it was saved from",
            detail={"path": path.name, "checkpoint": metadata.get("fingerprint"), "model": want},
        )
    checkpoint = VerifiedCheckpoint(path, tensors, meta, optim_doc, str(metadata.get("fingerprint")),
                                    hashlib.sha256(data).hexdigest())
    if module is not None:
        _check_fits(checkpoint, module)
    return checkpoint


def _check_fits(checkpoint: VerifiedCheckpoint, module: torch.nn.Module) -> None:
    have = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    got = {k.removeprefix("model."): tuple(v.shape) for k, v in checkpoint.tensors.items() if k.startswith("model.")}
    if have != got:
        missing = sorted(set(have) - set(got))
        unexpected = sorted(set(got) - set(have))
        reshaped = sorted(k for k in set(have) & set(got) if have[k] != got[k])
        raise ConflictError(
            f"checkpoint {checkpoint.path} does not fit the model: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}, other shapes {reshaped[:5]}",
            detail={"missing": missing, "unexpected": unexpected, "reshaped": reshaped},
        )


def apply_checkpoint(
    checkpoint: VerifiedCheckpoint, module: torch.nn.Module, optimizer: torch.optim.Optimizer | None
) -> dict[str, Any]:
    """Load a verified checkpoint into ``module`` (+ ``optimizer``); return its meta."""
    _check_fits(checkpoint, module)
    if optimizer is not None and checkpoint.optimizer is None:
        raise DataError(f"checkpoint {checkpoint.path} holds no optimizer state")
    model_state = {k.removeprefix("model."): v for k, v in checkpoint.tensors.items() if k.startswith("model.")}
    module.load_state_dict(model_state, strict=True)
    if optimizer is not None and checkpoint.optimizer is not None:
        state: dict[int, dict[str, Any]] = {}
        for key, value in checkpoint.tensors.items():
            if key.startswith("optim."):
                _, idx, name = key.split(".", 2)
                state.setdefault(int(idx), {})[name] = value
        for idx, entries in checkpoint.optimizer["scalars"].items():
            state.setdefault(int(idx), {}).update(entries)
        optimizer.load_state_dict({"state": state, "param_groups": checkpoint.optimizer["param_groups"]})
    return checkpoint.meta


def load_checkpoint(
    path: Path | str, module: torch.nn.Module, optimizer: torch.optim.Optimizer | None, *,
    fingerprint: str | None = None,
) -> dict[str, Any]:
    """Verify a checkpoint (:func:`read_checkpoint`), then load it into ``module`` (+ optimizer); return its meta."""
    return apply_checkpoint(read_checkpoint(path, fingerprint=fingerprint, module=module), module, optimizer)


@dataclass(frozen=True)
class CorruptCheckpoint:
    """A checkpoint :func:`latest_checkpoint` passed over, and why."""

    path: Path
    reason: str


def latest_checkpoint(
    paths: Iterable[Path | str], *, fingerprint: str | None = None, module: torch.nn.Module | None = None
) -> tuple[VerifiedCheckpoint | None, list[CorruptCheckpoint]]:
    """The newest of ``paths`` that verifies, and the corrupt ones found on the way (each logged as a warning).

    Newest is the largest file name (checkpoint names carry zero-padded steps). ``(None, [...])`` if none verifies.
    """
    corrupt: list[CorruptCheckpoint] = []
    for path in sorted((Path(p) for p in paths), key=lambda p: p.name, reverse=True):
        try:
            checkpoint = read_checkpoint(path, fingerprint=fingerprint, module=module)
        except (DataError, ConflictError) as exc:
            logger.warning("skipping checkpoint %s: %s", path, exc.message)
            corrupt.append(CorruptCheckpoint(path, exc.message))
            continue
        return checkpoint, corrupt
    return None, corrupt


def checkpoint_bytes(root: Path | str) -> int:
    """Bytes of the checkpoints (``*.safetensors``) under ``root`` now."""
    root = Path(root)
    return sum(p.stat().st_size for p in root.rglob("*.safetensors") if p.is_file()) if root.is_dir() else 0


def check_disk_budget(root: Path | str, parameters: int, budget: int, *, setting: str) -> None:
    """Refuse (403 ``checkpoint_budget_bytes``) a checkpoint of a model with ``parameters`` parameters that would
    take ``root`` past ``budget`` bytes (weights and Adam's two moments in fp32, plus the header); ``setting``
    names the setting to raise in the message."""
    used = checkpoint_bytes(root)
    needed = 3 * 4 * parameters + 2**16
    if used + needed > budget:
        raise PolicyError(
            f"a checkpoint would exceed the disk budget of {budget} bytes ({used} used); delete old checkpoints "
            f"or raise {setting}",
            detail={"rule": "checkpoint_budget_bytes", "used": used, "needed": needed, "budget": budget},
        )
