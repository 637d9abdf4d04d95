"""Which device to run on, and what it can do: the one place where precision and kernels are chosen
from the hardware.

Precision ``auto`` (the default of every entry point) is bf16 where the device computes it natively
(CUDA with bf16; a CPU for which torch reports native bf16, i.e. AVX512-BF16 or AMX), fp16 on CUDA
without bf16 (training adds a gradient scaler), fp32 elsewhere: on a CPU with AVX2 only, bf16 is
emulated and a matmul runs about 100x slower than in fp32. An explicit ``bf16`` there still runs, with
a `SlowPrecisionWarning` that gives the slowdown measured by a small matmul probe.

The attention kernel ``auto`` is the one the step benchmarks measured fastest for the device
(docs/kernels.md has the table): explicit matmuls ("eager") on a CPU, torch's fused
``scaled_dot_product_attention`` ("sdpa") on CUDA.
"""

from __future__ import annotations

import functools
import platform
import time
import warnings
from typing import Any

import torch

from duomodal.launch import launch_info

PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # what every entry point's precision setting takes
ATTENTION_KERNELS = ("auto", "sdpa", "eager")  # what a model's attention setting takes
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class DeviceError(ValueError):
    """A device or precision that was asked for but cannot be used here."""


class SlowPrecisionWarning(UserWarning):
    """A precision that runs here, but emulated and much slower than `auto` would be."""


def resolve_device(device: str | torch.device | None = None, local_rank: int | None = None) -> torch.device:
    """'auto', '' or None -> cuda:<local rank> when CUDA is there, else cpu; anything else as given.

    The local rank defaults to torchrun's LOCAL_RANK (0 outside torchrun), so that each process of a
    multi-GPU run takes its own GPU. Raises DeviceError for a CUDA device when CUDA is not available.
    """
    if local_rank is None:
        local_rank = launch_info().local_rank
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


def resolve_precision(precision: str, device: torch.device, setting: str = "precision") -> str:
    """The precision ("fp32", "bf16" or "fp16") that `precision` means on `device`.

    'auto' -> bf16 where `device` has it natively, fp16 on CUDA without bf16, fp32 elsewhere. An explicit
    'bf16' where it is emulated is kept, with a `SlowPrecisionWarning`. Raises DeviceError for an unknown
    precision and for fp16 off CUDA (a CPU has no fp16 arithmetic worth using); messages name `setting`."""
    if precision not in PRECISIONS:
        raise DeviceError(f"{setting} {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        if bf16_supported(device):
            return "bf16"
        return "fp16" if device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise DeviceError(f"{setting} 'fp16' needs a CUDA device; use 'auto' (or 'fp32') on the CPU")
    if precision == "bf16" and not bf16_supported(device):
        slowdown = f": a 256x256 matmul ran {bf16_slowdown():.0f}x slower than in fp32" if device.type == "cpu" else ""
        warnings.warn(
            f"{setting} bf16 is emulated on this {device.type} (no native bf16{slowdown}); it runs, slowly: "
            f"leave {setting} at auto for the fastest one here",
            SlowPrecisionWarning, stacklevel=2,
        )
    return precision


def precision_dtype(precision: str) -> torch.dtype:
    """The torch dtype of a resolved precision ("fp32", "bf16" or "fp16")."""
    if precision not in _DTYPES:
        raise DeviceError(f"precision {precision!r} is not resolved; pass it through resolve_precision first")
    return _DTYPES[precision]


@functools.cache
def bf16_slowdown(size: int = 256, repeats: int = 3) -> float:
    """How many times slower a (size x size) @ (size x size) bf16 matmul runs than an fp32 one on this CPU
    (best of `repeats` each; measured once): about 1 where bf16 is native, 50-100 where it is emulated. Emulated
    kernels vary with shape and layout, so this names the probe, not a model's step (a whole training step
    ran about 25x slower on an AVX2 CPU; docs/kernels.md)."""

    def best(dtype: torch.dtype) -> float:
        a = torch.randn(size, size).to(dtype)
        a @ a  # warm-up
        fastest = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            a @ a
            fastest = min(fastest, time.perf_counter() - started)
        return max(fastest, 1e-9)

    return best(torch.bfloat16) / best(torch.float32)


def attention_kernel(attention: str, device: torch.device) -> str:
    """The attention implementation ("sdpa" or "eager") that `attention` means on `device`.

    'auto' -> eager on a CPU, where explicit matmuls beat the fused kernel's backward in bf16 (1.63x
    against 0.77x of fp32's step, AMX) and match or beat it in fp32 (AVX2); sdpa on CUDA (flash
    attention). benchmarks/step_dalle.py and step_clip.py print the comparison on a given machine."""
    if attention not in ATTENTION_KERNELS:
        raise DeviceError(f"attention {attention!r} is not one of {', '.join(ATTENTION_KERNELS)}")
    if attention != "auto":
        return attention
    return "eager" if device.type == "cpu" else "sdpa"


def _cpu_model() -> str:
    """The CPU's model name as the OS reports it ('unknown' when it does not)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


@functools.cache
def machine() -> dict[str, Any]:
    """What this machine computes with: CPU model, ISA level torch dispatches to, native bf16, torch's
    threads, GPU (None without CUDA) and what `auto` resolves to on the default device."""
    device = resolve_device("auto")
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {
        "cpu": _cpu_model(),
        "isa": torch.backends.cpu.get_cpu_capability(),
        "cpu_native_bf16": bf16_supported(torch.device("cpu")),
        "threads": torch.get_num_threads(),
        "gpu": gpu,
        "device": str(device),
        "precision": resolve_precision("auto", device),
        "attention": attention_kernel("auto", device),
        "torch": torch.__version__,
    }


def describe_machine() -> str:
    """`machine()` in one line, e.g. 'AMD EPYC, AVX2 (no native bf16), 2 threads, no GPU; auto: fp32, eager'."""
    m = machine()
    bf16 = "native bf16" if m["cpu_native_bf16"] else "no native bf16"
    gpu = f"GPU {m['gpu']}" if m["gpu"] else "no GPU"
    return (f"{m['cpu']}, {m['isa']} ({bf16}), {m['threads']} threads, {gpu}; "
            f"auto: {m['precision']} on {m['device']}, {m['attention']} attention; torch {m['torch']}")
