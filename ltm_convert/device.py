"""Which device to run on, checked: a device this machine does not have is one clear error."""
from __future__ import annotations

import torch

from ltm_convert.errors import LtmError


def pick_device(device: str | None = None) -> torch.device:
    """The device to run on: ``device`` if it exists on this machine, else CUDA when available, else CPU."""
    if not device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise LtmError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LtmError(f"--device {device}: this machine has no CUDA GPU (torch sees none); use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise LtmError(f"--device {device}: there are only {torch.cuda.device_count()} CUDA devices")
    if dev.type not in ("cpu", "cuda"):
        raise LtmError(f"--device {device}: ltm_convert runs on cpu or cuda")
    return dev
