"""Checkpoints: atomic durable writes, checksum and fingerprint, verification before anything is loaded."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from splitunet.checkpoint import (
    apply_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from splitunet.errors import ConflictError, DataError


def _model(seed: int = 0, width: int = 4) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, width), torch.nn.ReLU(), torch.nn.Linear(width, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss = model(torch.randn(5, 3)).square().mean()
    loss.backward()
    optimizer.step()
    return model, optimizer


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _flip_last_byte(path: Path) -> None:
    """Flip one bit of the last tensor byte: the file still parses, only the checksum can tell."""
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def test_round_trip_restores_model_and_optimizer(tmp_path: Path) -> None:
    model, optimizer = _model(0)
    digest = save_checkpoint(tmp_path / "a.safetensors", model, optimizer, {"step": 3})
    other, other_opt = _model(1)
    meta = load_checkpoint(tmp_path / "a.safetensors", other, other_opt)
    assert meta == {"step": 3}
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in model.state_dict().items())
    assert other_opt.state_dict()["state"][0]["step"] == optimizer.state_dict()["state"][0]["step"]
    assert read_checkpoint(tmp_path / "a.safetensors").sha256 == digest
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]  # no temporary file left behind


def test_writes_are_fsynced_and_renamed_into_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst) -> None:
        events.append(("replace", str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    model, optimizer = _model()
    target = tmp_path / "ckpt" / "step-1.safetensors"
    save_checkpoint(target, model, optimizer, {"step": 1})
    kinds = [kind for kind, _ in events]
    assert kinds == ["fsync", "replace", "fsync"], events
    assert events[0][1].endswith(".tmp") and Path(events[0][1]).parent == target.parent  # the temp file first
    assert events[1][1] == str(target)
    assert events[2][1] == str(target.parent)  # then the folder, so the rename itself is durable


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(_flip_last_byte, id="flipped-bit"),
        pytest.param(lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), id="truncated"),
        pytest.param(lambda p: p.write_bytes(b""), id="empty"),
        pytest.param(lambda p: p.write_bytes(b"\x00" * 3), id="tiny"),
        pytest.param(lambda p: p.write_bytes(b"not a checkpoint at all, just some text"), id="garbage"),
    ],
)
def test_a_damaged_checkpoint_is_refused_before_the_model_is_touched(tmp_path: Path, damage) -> None:
    path = tmp_path / "step.safetensors"
    save_checkpoint(path, *_model(0), {"step": 1})
    damage(path)
    live, live_opt = _model(1)
    before = _state(live)
    with pytest.raises(DataError) as info:
        load_checkpoint(path, live, live_opt)
    # named by its file name: the message reaches a site's replies, which never show a server path
    assert path.name in info.value.message and str(path.parent) not in info.value.message
    assert info.value.status_code == 422
    assert all(torch.equal(before[k], v) for k, v in live.state_dict().items())
    assert live_opt.state_dict()["state"][0]["step"] == 1  # the optimizer is untouched too


def test_a_checkpoint_of_another_architecture_is_refused_before_loading(tmp_path: Path) -> None:
    path = tmp_path / "step.safetensors"
    model, optimizer = _model(0)
    save_checkpoint(path, model, optimizer, {"step": 1}, fingerprint="another-model")
    live, live_opt = _model(1)
    before = _state(live)
    with pytest.raises(ConflictError, match="another architecture"):
        load_checkpoint(path, live, live_opt)
    assert all(torch.equal(before[k], v) for k, v in live.state_dict().items())

    wider, _ = _model(0, width=5)  # same fingerprint asked for, but the shapes do not fit
    save_checkpoint(path, wider, None, {"step": 1}, fingerprint="x")
    with pytest.raises(ConflictError, match="does not fit"):
        read_checkpoint(path, fingerprint="x", module=live)


def test_apply_needs_optimizer_state_when_an_optimizer_is_given(tmp_path: Path) -> None:
    model, _ = _model(0)
    save_checkpoint(tmp_path / "m.safetensors", model, None, {})
    checkpoint = read_checkpoint(tmp_path / "m.safetensors", module=model)
    with pytest.raises(DataError, match="no optimizer state"):
        apply_checkpoint(checkpoint, *_model(1))


def test_the_latest_corrupt_checkpoint_is_reported_and_the_previous_one_used(tmp_path: Path) -> None:
    model, optimizer = _model(0)
    paths = [tmp_path / f"step-{s:08d}.safetensors" for s in (1, 2, 3)]
    for step, path in enumerate(paths, start=1):
        save_checkpoint(path, model, optimizer, {"step": step})
    _flip_last_byte(paths[2])
    checkpoint, corrupt = latest_checkpoint(paths, module=model)
    assert checkpoint is not None and checkpoint.step == 2
    assert [c.path for c in corrupt] == [paths[2]] and "checksum" in corrupt[0].reason

    for path in paths[:2]:
        path.write_bytes(b"")
    checkpoint, corrupt = latest_checkpoint(paths, module=model)
    assert checkpoint is None and len(corrupt) == 3
