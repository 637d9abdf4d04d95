"""Which device to run on, and what it can do."""

from __future__ import annotations

import os

import torch


class DeviceError(ValueError):
    """A device that was asked for but is not there."""


def resolve_device(device: str | torch.device | None = None, local_rank: int | None = None) -> torch.device:
    """'auto', '' or None -> cuda:<local rank> when CUDA is there, else cpu; anything else as given.

    The local rank defaults to torchrun's LOCAL_RANK (0 outside torchrun), so that each process of a
    multi-GPU run takes its own GPU. Raises DeviceError for a CUDA device when CUDA is not available.
    """
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None or str(device) in ("", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        return torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {str(device)!r} was asked for but CUDA is not available; use --device cpu")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device


def bf16_supported(device: torch.device) -> bool:
    """Whether `device` computes in bfloat16 natively (CUDA with bf16, or a CPU with AVX512-BF16/AMX)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False
