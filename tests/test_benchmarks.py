"""The benchmarks' shared header (benchmarks/this_machine.py): the matmul peak probe measures, the header
names the machine's ISA level and the peak of each precision, and every benchmark script prints it."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
CPU = torch.device("cpu")


@pytest.fixture
def this_machine(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the scripts import their helpers as top-level modules
    return importlib.import_module("this_machine")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_peak_probe_grows_to_the_cap_and_measures(this_machine, precision):
    rate, side = this_machine.matmul_rate(precision, "A B^T", CPU, seconds=10.0, cap=256, repeats=1)
    assert side == 256  # no matmul this small takes 10 s: it grew to the cap
    assert rate > 0


def test_peak_probe_stops_growing_once_a_matmul_is_long_enough(this_machine):
    _, side = this_machine.matmul_rate("fp32", "A B", CPU, seconds=0.0, cap=4096, repeats=1)
    assert side == 128


def test_header_names_the_isa_and_each_precisions_peak(this_machine, monkeypatch):
    peaks = {"fp32": 2e9, "bf16": 1e9}
    monkeypatch.setattr(this_machine, "matmul_peak", lambda precision, device: (peaks[precision], 512, "A B^T"))
    machine = this_machine.measure_machine("cpu")
    header = machine.header("fp32, bf16")
    assert torch.backends.cpu.get_cpu_capability() in header
    assert f"{torch.get_num_threads()} threads" in header
    assert "fp32 2.0 GFLOP/s (512^3, A B^T" in header and "bf16 1.0 GFLOP/s (512^3, A B^T" in header
    assert header.endswith("this run computes in fp32, bf16")
    assert machine.peak("bf16") == 1e9
    with pytest.raises(KeyError, match="no fp16 matmul peak was measured on cpu"):
        machine.peak("fp16")


def test_every_benchmark_script_prints_the_machine_header():
    scripts = [p for p in BENCHMARKS.glob("*.py") if '__name__ == "__main__"' in p.read_text()]
    assert len(scripts) >= 15
    silent = [p.name for p in scripts
              if p.name != "this_machine.py" and not re.search(r"\bprint_header\(", p.read_text())]
    assert silent == []


@pytest.mark.parametrize(("native", "compared"), [(True, ["fp32", "bf16"]), (False, ["fp32"])])
def test_step_benchmarks_compare_bf16_only_where_native(this_machine, monkeypatch, native, compared):
    step_common = importlib.import_module("step_common")
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: native)
    assert step_common.precisions_to_compare(CPU, None) == compared


def test_step_benchmarks_run_an_emulated_bf16_when_asked_with_the_warning(this_machine, monkeypatch):
    from duomodal import device as hw

    step_common = importlib.import_module("step_common")
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    monkeypatch.setattr(hw, "bf16_slowdown", lambda: 97.0)
    with pytest.warns(hw.SlowPrecisionWarning, match="--precisions bf16 is emulated"):
        assert step_common.precisions_to_compare(CPU, "fp32,bf16") == ["fp32", "bf16"]


def test_auto_line_puts_autos_pick_beside_the_fastest(this_machine, monkeypatch):
    step_common = importlib.import_module("step_common")
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert step_common.auto_line(CPU, {("fp32", "eager"): 0.10, ("fp32", "sdpa"): 0.12}) == \
        "auto on cpu: fp32, eager attention: the fastest"
    assert step_common.auto_line(CPU, {("fp32", "eager"): 0.12, ("fp32", "sdpa"): 0.10}) == \
        "auto on cpu: fp32, eager attention: 0.83x the speed of the fastest, fp32 sdpa"
