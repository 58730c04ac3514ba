"""The site's disk budget: checkpoints count against ``SITE_CHECKPOINT_BUDGET_BYTES``."""

from __future__ import annotations

from pathlib import Path

from splitunet.errors import PolicyError


def checkpoint_bytes(state_dir: Path) -> int:
    """Bytes of the checkpoints (``*.safetensors``) under ``state_dir`` now."""
    root = Path(state_dir)
    return sum(p.stat().st_size for p in root.rglob("*.safetensors") if p.is_file()) if root.is_dir() else 0


def check_checkpoint_budget(state_dir: Path, parameters: int, budget: int, site: str) -> None:
    """Refuse (403 ``checkpoint_budget_bytes``) a checkpoint of a model with ``parameters`` parameters that would
    take ``state_dir`` past ``budget`` bytes: weights and Adam's two moments in fp32, plus the header."""
    used = checkpoint_bytes(state_dir)
    needed = 3 * 4 * parameters + 2**16
    if used + needed > budget:
        raise PolicyError(
            f"site {site}: a checkpoint would exceed the disk budget of {budget} bytes ({used} used); delete old "
            "checkpoints or raise SITE_CHECKPOINT_BUDGET_BYTES",
            detail={"rule": "checkpoint_budget_bytes", "used": used, "needed": needed, "budget": budget},
        )
