"""What every benchmark prints first: the machine it runs on, the precision it computes in, and this
machine's fp32 and bf16 matmul peaks measured in the same run, so that each figure can be read against
the machine that gave it, and "% of peak" divides by the peak of the precision in use.

The machine line is `duomodal.device.describe_machine()`: CPU model, the ISA level torch dispatches to
(`torch.backends.cpu.get_cpu_capability()`), native bf16 or not, torch's threads, the GPU if any, and
what `auto` resolves to. The peak probe is sized by time, not fixed: a square matmul doubles from 128
until one takes 20 ms or the side reaches 4096, and the rate is the best of a few at that side; the peak is
the faster of two layouts, A B and A B^T (emulated bf16 runs the second, nn.Linear's, 15x faster). So the
header costs a few seconds whether bf16 runs at 1 TFLOP/s (AMX) or at 1-20 GFLOP/s (emulated on AVX2),
where a fixed 4096^3 bf16 matmul of the slow layout would take over a minute.

    from this_machine import auto_precision, print_header
    machine = print_header("fp32, bf16", device)  # before any timing; or print_header(auto_precision(device))
    share = flops / seconds / machine.peak("bf16")

On its own, `python benchmarks/this_machine.py [--threads N]` prints the header.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass

import torch

from duomodal.device import bf16_supported, describe_machine, precision_dtype, resolve_device, resolve_precision


LAYOUTS = ("A B", "A B^T")  # the operand layouts the peak probe tries


def synchronize(device: torch.device) -> None:
    """Wait for `device`'s queued work (CUDA runs asynchronously), so that a clock around it is honest."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(precision: str, layout: str, device: torch.device, seconds: float = 0.02, cap: int = 4096,
                repeats: int = 5) -> tuple[float, int]:
    """(FLOP/s, side) of the best of `repeats` square matmuls in `precision` on `device`, at the first side
    (doubling from 128) where one takes at least `seconds`, or at `cap`. `layout`: "A B" (both operands
    row-major) or "A B^T" (the second transposed, as nn.Linear computes x W^T)."""
    if layout not in LAYOUTS:
        raise ValueError(f"matmul layout {layout!r} is not one of {', '.join(LAYOUTS)}")
    dtype = precision_dtype(precision)
    side = min(128, cap)
    while True:
        a = torch.randn(side, side, device=device).to(dtype)
        b = torch.randn(side, side, device=device).to(dtype)
        b = b.mT if layout == "A B^T" else b
        a @ b  # warm-up: the first call at a shape may create its kernel
        best = float("inf")
        for repeat in range(repeats):
            synchronize(device)
            started = time.perf_counter()
            a @ b
            synchronize(device)
            best = min(best, time.perf_counter() - started)
            if repeat >= 1 and best < seconds and side < cap:
                break  # too short to measure well (twice, so that one disturbed call does not decide): grow
        if best >= seconds or side >= cap:
            return 2 * side**3 / max(best, 1e-12), side
        side = min(2 * side, cap)


def matmul_peak(precision: str, device: torch.device) -> tuple[float, int, str]:
    """(FLOP/s, side, layout) of the faster layout: they can differ by 15x where bf16 is emulated (AVX2:
    A B^T, what nn.Linear runs, at ~15-20 GFLOP/s on 2 cores, A B at ~1.3)."""
    return max((*matmul_rate(precision, layout, device), layout) for layout in LAYOUTS)


def auto_precision(device: torch.device | str | None = None) -> str:
    """'fp32 (auto on cpu)': what a run that leaves its precision at auto computes in on `device`."""
    device = resolve_device(device)
    return f"{resolve_precision('auto', device)} (auto on {device})"


def flops_text(rate: float) -> str:
    """A FLOP/s figure for a table: '118 GFLOP/s', '1.1 GFLOP/s', '1.35 TFLOP/s'."""
    if rate >= 1e12:
        return f"{rate / 1e12:.2f} TFLOP/s"
    return f"{rate / 1e9:.0f} GFLOP/s" if rate >= 10e9 else f"{rate / 1e9:.1f} GFLOP/s"


@dataclass(frozen=True)
class Machine:
    """The machine a benchmark runs on, as measured at its start."""

    description: str  # duomodal.device.describe_machine()
    device: torch.device  # where the benchmark computes (the peaks are measured there)
    peaks: dict[str, float]  # precision -> matmul FLOP/s
    shapes: dict[str, str]  # precision -> the matmul that gave its peak ("2048^3, A B^T")
    load: float  # the 1-minute load average before the probe: the last minute's work, a previous run's included

    def peak(self, precision: str) -> float:
        """The matmul peak (FLOP/s) of `precision`; raises KeyError for one that was not measured."""
        if precision not in self.peaks:
            raise KeyError(f"no {precision} matmul peak was measured on {self.device}; measured: "
                           f"{', '.join(self.peaks)}")
        return self.peaks[precision]

    def header(self, precision: str | None) -> str:
        """Two lines: the machine and its load; the matmul peaks and the precision this run computes in
        (`precision`, in words; None: no run)."""
        emulated = "" if bf16_supported(self.device) else ", emulated"
        peaks = ", ".join(f"{name} {flops_text(rate)} ({self.shapes[name]}{emulated if name == 'bf16' else ''})"
                          for name, rate in self.peaks.items())
        return (f"# machine: {self.description}; load average {self.load:.1f} at the start\n"
                f"# matmul peak on {self.device}: {peaks}"
                + (f"; this run computes in {precision}" if precision else ""))


def matmul_peaks(device: torch.device) -> dict[str, tuple[float, int, str]]:
    """{precision: (FLOP/s, side, layout)} for fp32 and bf16 on `device`, and for fp16 on CUDA (where it is a
    training precision)."""
    precisions = ("fp32", "bf16", "fp16") if device.type == "cuda" else ("fp32", "bf16")
    return {precision: matmul_peak(precision, device) for precision in precisions}


def measure_machine(device: torch.device | str | None = None, separate_process: bool = False) -> Machine:
    """The machine `device` ('auto' or None: CUDA where there is one, else the CPU) belongs to, with its
    matmul peaks. `separate_process`: probe in a child process with this one's threads, for a benchmark
    that reports its own peak memory (the probe's matrices would raise it)."""
    device = resolve_device(device)
    load = os.getloadavg()[0]
    if separate_process:
        command = [sys.executable, __file__, "--device", str(device), "--threads", str(torch.get_num_threads()),
                   "--json"]
        measured = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)
    else:
        measured = matmul_peaks(device)
    return Machine(describe_machine(), device, {p: rate for p, (rate, _, _) in measured.items()},
                   {p: f"{side}^3, {layout}" for p, (_, side, layout) in measured.items()}, load)


def print_header(precision: str | None, device: torch.device | str | None = None,
                 separate_process: bool = False) -> Machine:
    """Measure the machine (after any `torch.set_num_threads`: the line gives torch's threads), print its
    header with `precision` (what this run computes in, in words), and return it for "% of peak".
    `separate_process`: see `measure_machine`."""
    machine = measure_machine(device, separate_process)
    print(machine.header(precision), flush=True)
    return machine


def main() -> None:
    parser = argparse.ArgumentParser(description="The machine and its matmul peaks, as every benchmark prints them.")
    parser.add_argument("--device", default="auto", help="auto: CUDA where there is one, else cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--json", action="store_true", help="only the peaks, as JSON (for measure_machine)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.json:
        print(json.dumps(matmul_peaks(resolve_device(args.device))))
    else:
        print_header(None, args.device)


if __name__ == "__main__":
    main()
