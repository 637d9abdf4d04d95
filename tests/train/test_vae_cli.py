"""`duomodal train vae` and `duomodal reconstruct` as the user calls them: end to end, SIGKILL
and resume, and a 2-process DDP run (torchrun, gloo) against a single process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from duomodal.cli import main
from duomodal.modelfile import load_weights

TINY_SETS = [
    "model.image_size=16", "data.image_size=16", "model.width=16", "model.max_width=32",
    "model.codebook_size=32", "model.codebook_dim=16", "model.quantizer=vq",
    "train.batch_size=8", "train.lr=3e-3", "train.warmup_steps=2", "train.log_every=2",
    "train.val_every=4", "train.sample_every=4",
]


def sets(*extra: str) -> list[str]:
    return [arg for item in (*TINY_SETS, *extra) for arg in ("--set", item)]


def child_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    src = str(Path(__file__).resolve().parents[2] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_train_then_reconstruct(shape_dataset, tmp_path, capsys):
    run = tmp_path / "run"
    status = main(["train", "vae", "--data", str(shape_dataset), "--out", str(run),
                   *sets("train.steps=8", "train.checkpoint_every=4")])
    out = capsys.readouterr().out
    assert status == 0
    assert "trained vae for 8 steps" in out and "validation: " in out and "psnr" in out
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if r["split"] == "val"][-1]
    assert {"mse", "psnr", "codebook_used", "perplexity"} <= set(val)
    assert 0 < val["codebook_used"] <= 1
    samples = sorted((run / "samples").iterdir())
    assert [p.name for p in samples] == ["step_0000004.png", "step_0000008.png"]
    width, height = Image.open(samples[0]).size
    assert height == 2 * 18 + 2 and (width - 2) % 18 == 0  # a row of originals above their reconstructions
    assert json.loads((run / "run.json").read_text())["model"]["codebook_size"] == 32

    images = sorted(str(p) for p in shape_dataset.glob("*.png"))[:3]
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    grid = tmp_path / "grid.png"
    status = main(["reconstruct", str(run), *images, str(bad), "--out", str(grid)])
    captured = capsys.readouterr()
    assert status == 0
    assert "mean PSNR" in captured.out and "skipped 1" in captured.out
    assert str(bad) in captured.err
    assert Image.open(grid).size == (3 * 18 + 2, 2 * 18 + 2)

    # a second run into the same directory needs --resume; --resume with more steps continues
    assert main(["train", "vae", "--data", str(shape_dataset), "--out", str(run), *sets("train.steps=8")]) == 2
    assert "already holds a training run (checkpoint at step 8); pass --resume" in capsys.readouterr().err
    assert main(["train", "vae", "--data", str(shape_dataset), "--out", str(run), "--resume",
                 *sets("train.steps=10", "train.checkpoint_every=4")]) == 0
    assert "trained vae for 10 steps" in capsys.readouterr().out


def test_unknown_override_and_preset_messages(shape_dataset, tmp_path, capsys):
    assert main(["train", "vae", "--data", str(shape_dataset), "--out", str(tmp_path / "r"),
                 "--set", "model.colour=3"]) == 2
    assert "override 'model.colour': unknown key 'colour'" in capsys.readouterr().err
    assert main(["train", "vae", "--data", str(shape_dataset), "--out", str(tmp_path / "r"),
                 "--preset", "huge"]) == 2
    assert "unknown vae preset 'huge'; presets: quick, seed" in capsys.readouterr().err


def test_sigkill_then_resume_reaches_the_same_weights(shape_dataset, tmp_path):
    args = ["train", "vae", "--data", str(shape_dataset), *sets("train.steps=24", "train.checkpoint_every=4",
                                                                   "model.restart_threshold=0.5")]
    assert main([*args, "--out", str(tmp_path / "full")]) == 0
    cut = tmp_path / "cut"
    process = subprocess.Popen([sys.executable, "-m", "duomodal", *args, "--out", str(cut)],
                               env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not (cut / "checkpoints" / "step_0000008").is_dir() and process.poll() is None:
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("the training subprocess wrote no checkpoint within 60 s")
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, process.stderr.read().decode()[-2000:]
    assert not (cut / "result.json").exists()  # it really died mid-way
    assert main([*args, "--out", str(cut), "--resume"]) == 0
    a, b = load_weights(tmp_path / "full"), load_weights(cut)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_two_process_ddp_matches_one_process(shape_dataset, tmp_path):
    """torchrun --nproc_per_node 2 (gloo on CPU), 2 accumulation steps: each process takes half of
    each micro-batch of the same global batch; gradients are averaged (no_sync on the first
    micro-batch) and the VQ codebook statistics summed, so the weights match."""
    args = ["train", "vae", "--data", str(shape_dataset),
            *sets("train.steps=6", "train.checkpoint_every=0", "train.grad_accum=2")]
    assert main([*args, "--out", str(tmp_path / "single")]) == 0
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "duomodal", *args, "--out", str(tmp_path / "ddp")]
    done = subprocess.run(command, env=child_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "trained vae for 6 steps" in done.stdout and "2 process(es)" in done.stdout
    assert done.stdout.count("trained vae") == 1  # only rank 0 reports
    a, b = load_weights(tmp_path / "single"), load_weights(tmp_path / "ddp")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=2e-4, rtol=1e-3, msg=key)
    single = json.loads((tmp_path / "single" / "result.json").read_text())
    ddp = json.loads((tmp_path / "ddp" / "result.json").read_text())
    assert ddp["loss"] == pytest.approx(single["loss"], rel=1e-3)


def test_two_process_ddp_plans_by_time_alike_and_undoes_its_probe(shape_dataset, tmp_path):
    """Under torchrun both ranks plan the same steps from the slower rank's timings (no hang), and the probe
    is undone: the same two processes trained for the planned steps reach the very same weights."""
    args = ["train", "vae", "--data", str(shape_dataset),
            *sets("train.checkpoint_every=0", "train.val_every=0", "train.sample_every=0")]

    def torchrun(*extra: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   "-m", "duomodal", *args, *extra]
        done = subprocess.run(command, env=child_env(), capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stderr[-3000:]
        return done

    planned = torchrun("--minutes", "0.2", *sets("train.replan=false"), "--out", str(tmp_path / "planned"))
    plan = json.loads((tmp_path / "planned" / "run.json").read_text())["plan"]
    assert plan["steps"] > 1 and f"time budget: 0.2 minutes bought {plan['steps']} steps" in planned.stdout
    torchrun(*sets(f"train.steps={plan['steps']}", f"train.warmup_steps={plan['warmup_steps']}"),
             "--out", str(tmp_path / "fixed"))
    a, b = load_weights(tmp_path / "planned"), load_weights(tmp_path / "fixed")
    for key in a:
        assert torch.equal(a[key], b[key]), key
