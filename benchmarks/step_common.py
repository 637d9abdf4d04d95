"""What the two step benchmarks (step_dalle.py, step_clip.py) share: the precisions worth comparing on a
device, variants timed interleaved round after round, Muon's Newton-Schulz batched by shape against one
matrix at a time, and the line that puts what `auto` picks beside the fastest measured."""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Callable, Hashable, Iterator

import torch

from duomodal.device import attention_kernel, bf16_supported, precision_dtype, resolve_precision
from duomodal.train.recipe import Muon, orthogonalize
from this_machine import synchronize

KERNELS = ("eager", "sdpa")


def precisions_to_compare(device: torch.device, asked: str | None) -> list[str]:
    """fp32, and bf16 where `device` has it natively (fp16 too on CUDA without bf16); or the comma list
    `asked` (an emulated bf16 then runs after duomodal's warning that says how much slower it is)."""
    if asked:
        return [resolve_precision(p.strip(), device, "--precisions") for p in asked.split(",")]
    chosen = ["fp32"]
    if bf16_supported(device):
        chosen.append("bf16")
    elif device.type == "cuda":
        chosen.append("fp16")
    return chosen


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The training loop's autocast for `precision` (none in fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=precision_dtype(precision))


@contextlib.contextmanager
def cold_compile_cache() -> Iterator[None]:
    """torch.compile's on-disk caches in a new, empty folder while inside, so that a compile time measured
    is a first run's: a later run reuses /tmp/torchinductor_<user> and compiles in a few seconds."""
    previous = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    with tempfile.TemporaryDirectory(prefix="duomodal-inductor-") as folder:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = folder
        try:
            yield
        finally:
            if previous is None:
                os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
            else:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = previous


def interleaved(steps: dict[Hashable, Callable[[], dict[str, float]]], rounds: int
                ) -> tuple[dict[Hashable, dict[str, list[float]]], dict[Hashable, float]]:
    """Run each of `steps` once per round, round after round, so that other load on the machine falls on
    all of them. A step returns the seconds of its parts ({"step": ..., ...}). Returns each step's part
    times over the rounds, and the seconds of its first (warm-up) call, which is not among them: a
    compiled model compiles there."""
    first = {}
    for key, step in steps.items():
        started = time.perf_counter()
        step()
        first[key] = time.perf_counter() - started
    times: dict[Hashable, dict[str, list[float]]] = {key: {} for key in steps}
    for _ in range(rounds):
        for key, step in steps.items():
            for part, seconds in step().items():
                times[key].setdefault(part, []).append(seconds)
    return times, first


def newton_schulz(matrices: list[torch.nn.Parameter], precisions: list[str], device: torch.device,
                  rounds: int) -> list[str]:
    """Lines comparing, in each precision, Muon's Newton-Schulz on the shapes of `matrices` batched by
    shape (duomodal's Muon) against one matrix at a time (torch.optim.Muon's way), and torch.optim.Muon's
    whole step (as shipped: its Newton-Schulz in bf16 whatever the run's) against duomodal's on the same
    matrices and gradients; interleaved over `rounds`, the fastest of each."""
    torch.manual_seed(0)
    wide = [torch.randn(min(p.shape), max(p.shape), device=device) for p in matrices]
    by_shape: dict[tuple[int, ...], list[torch.Tensor]] = {}
    for m in wide:
        by_shape.setdefault(tuple(m.shape), []).append(m)
    stacks = [torch.stack(group) for group in by_shape.values()]

    def copies() -> list[torch.nn.Parameter]:
        params = [torch.nn.Parameter(p.detach().clone()) for p in matrices]
        for p in params:
            p.grad = torch.randn_like(p)
        return params

    def timed(fn: Callable[[], object]) -> Callable[[], dict[str, float]]:
        def step() -> dict[str, float]:
            synchronize(device)
            started = time.perf_counter()
            fn()
            synchronize(device)
            return {"step": time.perf_counter() - started}
        return step

    steps: dict[Hashable, Callable[[], dict[str, float]]] = {}
    for precision in precisions:
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32  # as build_optimizer: fp32 under fp16
        steps[("batched", precision)] = timed(lambda dtype=dtype: [orthogonalize(s, dtype) for s in stacks])
        steps[("per matrix", precision)] = timed(lambda dtype=dtype: [orthogonalize(m[None], dtype) for m in wide])
        ours = Muon(copies(), lr=1e-3, weight_decay=0.01, momentum=0.95, dtype=dtype)
        steps[("duomodal.Muon step", precision)] = timed(ours.step)
    reference = torch.optim.Muon(copies(), lr=1e-3, weight_decay=0.01, adjust_lr_fn="match_rms_adamw")
    steps[("torch.optim.Muon step", "bf16")] = timed(reference.step)
    times, _ = interleaved(steps, rounds)
    ms = {key: 1000 * min(parts["step"]) for key, parts in times.items()}
    shapes = ", ".join(f"{len(group)} x {r}x{c}" for (r, c), group in by_shape.items())
    lines = [f"Muon's Newton-Schulz on the {len(matrices)} hidden matrices ({shapes}), fastest of {rounds} rounds:"]
    for precision in precisions:
        batched, single = ms[("batched", precision)], ms[("per matrix", precision)]
        lines.append(f"  {precision}: batched by shape {batched:.1f} ms, one matrix at a time {single:.1f} ms "
                     f"({single / batched:.2f}x); duomodal's Muon step {ms[('duomodal.Muon step', precision)]:.1f} ms")
    lines.append(f"  torch.optim.Muon step (one matrix at a time, in bf16 whatever the run's precision): "
                 f"{ms[('torch.optim.Muon step', 'bf16')]:.1f} ms")
    return lines


def compile_line(label: str, first_step: float, compiled: float, plain: float) -> str:
    """What torch.compile costs (its first step, less a plain step) and saves per step."""
    cost = first_step - plain
    saving = plain - compiled
    verdict = f"pays back after {cost / saving:.0f} steps" if saving > 0 else "never pays back"
    return (f"torch.compile ({label}): {cost:.1f} s of compiling in its first step; then a step of "
            f"{1000 * compiled:.1f} ms against {1000 * plain:.1f} ms uncompiled: it {verdict}")


def auto_line(device: torch.device, speeds: dict[tuple[str, str], float]) -> str:
    """What `auto` picks on `device` (precision and attention kernel) beside the fastest of `speeds`
    ((precision, kernel) -> seconds of a step; uncompiled variants only)."""
    precision = resolve_precision("auto", device)
    kernel = attention_kernel("auto", device)
    best = min(speeds, key=speeds.get)
    if (precision, kernel) not in speeds:
        return (f"auto on {device}: {precision}, {kernel} attention (not measured here); "
                f"fastest measured: {best[0]}, {best[1]}")
    ratio = speeds[best] / speeds[(precision, kernel)]
    verdict = ("the fastest" if best == (precision, kernel)
               else f"{ratio:.2f}x the speed of the fastest, {best[0]} {best[1]}")
    return f"auto on {device}: {precision}, {kernel} attention: {verdict}"
