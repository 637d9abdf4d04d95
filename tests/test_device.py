"""Precision and kernels from the hardware: the rules with the hardware probes mocked both ways (native
bf16 or not; CUDA or not), the warning for an emulated bf16, and no preset that pins either."""

from __future__ import annotations

import warnings

import pytest
import torch

from duomodal import device as hw
from duomodal.cli import main
from duomodal.config import preset_kinds, presets
from duomodal.device import DeviceError, SlowPrecisionWarning, attention_kernel, resolve_precision

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


@pytest.fixture
def hardware(monkeypatch):
    """Set what the probes report: `hardware(cpu_bf16=..., cuda_bf16=...)`."""

    def set_hardware(cpu_bf16: bool, cuda_bf16: bool = False, slowdown: float = 97.0) -> None:
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: cpu_bf16)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: cuda_bf16)
        monkeypatch.setattr(hw, "bf16_slowdown", lambda: slowdown)

    return set_hardware


@pytest.mark.parametrize(("cpu_bf16", "cuda_bf16", "cpu", "cuda"), [
    (True, True, "bf16", "bf16"),  # AMX / AVX512-BF16 CPU; Ampere or newer GPU
    (False, False, "fp32", "fp16"),  # AVX2-only CPU; a GPU before bf16 (training adds a gradient scaler)
    (False, True, "fp32", "bf16"),
])
def test_auto_precision_follows_the_hardware(hardware, cpu_bf16, cuda_bf16, cpu, cuda):
    hardware(cpu_bf16=cpu_bf16, cuda_bf16=cuda_bf16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # auto never warns
        assert resolve_precision("auto", CPU) == cpu
        assert resolve_precision("auto", CUDA) == cuda


def test_explicit_bf16_where_it_is_emulated_runs_after_a_warning_with_the_slowdown(hardware):
    hardware(cpu_bf16=False, slowdown=97.0)
    with pytest.warns(SlowPrecisionWarning, match=r"^train.precision bf16 is emulated on this cpu \(no native bf16: "
                      r"a 256x256 matmul ran 97x slower than in fp32\); it runs, slowly: leave train.precision "
                      r"at auto for the fastest one here$"):
        assert resolve_precision("bf16", CPU, "train.precision") == "bf16"
    hardware(cpu_bf16=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_precision("bf16", CPU) == "bf16"
        assert resolve_precision("fp32", CPU) == "fp32"


def test_precision_errors_name_the_setting():
    with pytest.raises(DeviceError, match=r"^train.precision 'fp16' needs a CUDA device; use 'auto' \(or 'fp32'\) "
                                          r"on the CPU$"):
        resolve_precision("fp16", CPU, "train.precision")
    with pytest.raises(DeviceError, match=r"^precision 'fp8' is not one of auto, fp32, bf16, fp16$"):
        resolve_precision("fp8", CPU)


def test_the_bf16_probe_measures_a_ratio():
    slowdown = hw.bf16_slowdown()
    assert slowdown > 0
    if not hw.bf16_supported(CPU):
        assert slowdown > 3  # emulated bf16 is far slower than fp32 (about 100x on an AVX2 CPU)


def test_attention_kernel_from_the_device():
    assert attention_kernel("auto", CPU) == "eager"
    assert attention_kernel("auto", CUDA) == "sdpa"
    assert attention_kernel("sdpa", CPU) == "sdpa"  # an explicit choice is kept
    with pytest.raises(DeviceError, match=r"^attention 'flash' is not one of auto, sdpa, eager$"):
        attention_kernel("flash", CPU)


def test_no_preset_pins_a_precision_or_a_kernel():
    for kind in preset_kinds():
        for name, preset in presets(kind).items():
            assert "precision" not in preset.get("train", {}), (kind, name)
            assert "attention" not in preset.get("model", {}), (kind, name)


def test_the_machine_is_described():
    machine = hw.machine()
    assert machine["isa"] == torch.backends.cpu.get_cpu_capability()
    assert machine["threads"] == torch.get_num_threads()
    assert machine["precision"] == resolve_precision("auto", hw.resolve_device("auto"))
    line = hw.describe_machine()
    assert machine["isa"] in line and f"{machine['threads']} threads" in line


def test_the_cli_prints_an_emulated_precision_once_as_one_line(hardware, shape_dataset, tmp_path, capsys):
    hardware(cpu_bf16=False, slowdown=97.0)
    tiny = ["model.image_size=16", "data.image_size=16", "model.width=16", "model.max_width=32",
            "model.codebook_size=32", "model.codebook_dim=16", "train.batch_size=8", "train.steps=2",
            "train.warmup_steps=1", "train.precision=bf16"]
    status = main(["train", "vae", "--data", str(shape_dataset), "--out", str(tmp_path / "run"), "--device", "cpu",
                   *[arg for item in tiny for arg in ("--set", item)]])
    captured = capsys.readouterr()
    assert status == 0
    lines = [line for line in captured.err.splitlines() if "warning" in line]
    assert lines == ["duomodal: warning: train.precision bf16 is emulated on this cpu (no native bf16: a 256x256 "
                     "matmul ran 97x slower than in fp32); it runs, slowly: leave train.precision at auto for the "
                     "fastest one here"]
    assert "bf16" in captured.out  # the summary names the precision it trained in
