"""Checkpoints of a party's model and optimizer, without pickle.

A checkpoint is one safetensors file: the module's ``state_dict`` tensors under ``model.<name>``, the optimizer's
per-parameter state tensors under ``optim.<param index>.<key>``, and JSON in the safetensors metadata for
everything that is not a tensor (the optimizer's ``param_groups``, scalar state, and caller metadata such as run id
and step). Files are written to a temporary name and renamed, so a crash never leaves a half-written checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from splitunet.errors import DataError, PolicyError

FORMAT = "splitunet-checkpoint/1"


def save_checkpoint(
    path: Path | str, module: torch.nn.Module, optimizer: torch.optim.Optimizer | None, meta: dict[str, Any]
) -> str:
    """Write ``module`` (+ ``optimizer``) and JSON-serialisable ``meta`` to ``path``; return the file's SHA-256."""
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
    metadata = {"format": FORMAT, "meta": json.dumps(meta), "optimizer": json.dumps(optim_doc)}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_checkpoint(
    path: Path | str, module: torch.nn.Module, optimizer: torch.optim.Optimizer | None
) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` into ``module`` (+ ``optimizer``); return its meta."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no checkpoint at {path}", detail={"path": str(path)})
    from safetensors import safe_open

    try:  # an empty, truncated or corrupt file is a typed error, never a crash
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise DataError(f"{path} is not a {FORMAT} file (format {str(metadata.get('format'))[:40]!r})")
        tensors = load_file(str(path))
    except DataError:
        raise
    except Exception as exc:  # safetensors raises its own SafetensorError, OSError or ValueError
        raise DataError(f"checkpoint {path} is corrupt or truncated ({type(exc).__name__})",
                        detail={"path": str(path)}) from None
    model_state = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    missing, unexpected = module.load_state_dict(model_state, strict=False)
    if missing or unexpected:
        raise DataError(
            f"checkpoint {path} does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}",
            detail={"missing": missing, "unexpected": unexpected},
        )
    optim_doc = json.loads(metadata.get("optimizer", "null"))
    if optimizer is not None:
        if optim_doc is None:
            raise DataError(f"checkpoint {path} holds no optimizer state")
        state: dict[int, dict[str, Any]] = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, idx, name = key.split(".", 2)
                state.setdefault(int(idx), {})[name] = value
        for idx, entries in optim_doc["scalars"].items():
            state.setdefault(int(idx), {}).update(entries)
        optimizer.load_state_dict({"state": state, "param_groups": optim_doc["param_groups"]})
    return json.loads(metadata.get("meta", "{}"))


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
