"""The torch device a service runs on: ``cpu``, ``cuda`` or ``auto`` (CUDA when available)."""

from __future__ import annotations

from enum import StrEnum

import torch

from splitunet.errors import ConfigurationError


class DeviceChoice(StrEnum):
    CPU = "cpu"
    CUDA = "cuda"
    AUTO = "auto"


def resolve_device(choice: DeviceChoice | str) -> torch.device:
    """The device for a setting; ``cuda`` without a CUDA device is a configuration error."""
    choice = DeviceChoice(choice)
    if choice == DeviceChoice.CUDA:
        if not torch.cuda.is_available():
            raise ConfigurationError("device=cuda but no CUDA device is available; use device=auto or cpu")
        return torch.device("cuda")
    if choice == DeviceChoice.AUTO and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")
