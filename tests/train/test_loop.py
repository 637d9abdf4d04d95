"""The one training loop, with a tiny regression task: exact resume, NaN stop, accumulation,
dropped items, outputs, error messages."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, default_collate

from duomodal.data.images import save_grid
from duomodal.modelfile import load_weights
from duomodal.train.loop import train
from duomodal.train.recipe import TrainConfig, TrainingError


class Pairs(Dataset):
    def __init__(self, n: int, bad: frozenset[int] = frozenset()):
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(n, 4, generator=g)
        self.y = self.x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]) + 0.1
        self.bad = bad

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        if i in self.bad:
            return None
        return {"x": self.x[i], "y": self.y[i]}


class TinyNet(nn.Sequential):
    def __init__(self):
        super().__init__(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))

    def hidden_matrices(self):
        return [self[0].weight]  # what train.optimizer=muon orthogonalises

    def embedding_parameters(self):
        return [self[2].weight]  # what train.embed_lr_scale applies to


class TinyTask:
    """y = w x + b with input noise (so the RNG matters); hooks to inject NaN or a signal."""

    kind = "tiny"

    def __init__(self, n: int = 32, bad: frozenset[int] = frozenset(), nan_at: int | None = None,
                 signal_at: int | None = None, noise: float = 0.01):
        self.n, self.bad, self.nan_at, self.signal_at, self.noise = n, bad, nan_at, signal_at, noise

    def model_config(self):
        return {"hidden": 8}

    def build_model(self):
        return TinyNet()

    def datasets(self):
        return Pairs(self.n, self.bad), Pairs(8)

    def collate(self, items):
        return default_collate(items)

    def loss(self, model, batch, step):
        if self.signal_at is not None and step == self.signal_at:
            os.kill(os.getpid(), signal.SIGTERM)
        x = batch["x"] + self.noise * torch.randn_like(batch["x"])
        loss = ((model(x) - batch["y"]) ** 2).mean()
        if self.nan_at is not None and step >= self.nan_at:
            loss = loss * float("nan")
        return loss, {"mse": float(loss.detach())}

    def validate(self, model, batches):
        losses = [float(((model(b["x"]) - b["y"]) ** 2).mean()) for b in batches]
        return {"loss": sum(losses) / len(losses)}

    def write_samples(self, model, path, step):
        save_grid(torch.rand(2, 3, 4, 4), path, nrow=2)

    def save_extras(self, directory):
        (Path(directory) / "extra.txt").write_text("tiny\n")


def config(**changes) -> TrainConfig:
    base = dict(steps=12, batch_size=8, lr=0.05, warmup_steps=2, log_every=2, val_every=4,
                sample_every=6, checkpoint_every=4, keep_checkpoints=2, seed=3)
    base.update(changes)
    return TrainConfig(**base)


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_weights(run_dir)


def metric_steps(run_dir: Path, split: str) -> list[int]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if r["split"] == split]


def test_outputs_of_a_run(tmp_path):
    result = train(TinyTask(), config(), tmp_path / "run")
    run = tmp_path / "run"
    assert result["step"] == 12 and result["interrupted"] is None
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert result["val_loss"] < first["loss"]  # it learns
    assert (run / "config.json").is_file() and (run / "model.safetensors").is_file()
    assert (run / "extra.txt").read_text() == "tiny\n"
    assert (run / "loss.png").stat().st_size > 1000
    assert json.loads((run / "run.json").read_text())["train"]["steps"] == 12
    # checkpoints at 4, 8, 12; the last two kept
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000008", "step_0000012"]
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step_0000006.png", "step_0000012.png"]
    assert metric_steps(run, "train") == [2, 4, 6, 8, 10, 12]
    assert metric_steps(run, "val") == [4, 8, 12]


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_embed_lr_scale_multiplies_the_embeddings_step(tmp_path, optimizer):
    """AdamW's first step moves every coordinate by about the learning rate: the named embedding by
    train.embed_lr_scale times as much, every other parameter as without it."""
    class FixedStart(TinyTask):
        def build_model(self):
            torch.manual_seed(0)
            return TinyNet()

    start = FixedStart().build_model().state_dict()
    moved = {}
    for scale in (1.0, 3.0):
        train(FixedStart(), config(steps=1, warmup_steps=0, embed_lr_scale=scale, optimizer=optimizer),
              tmp_path / str(scale))
        moved[scale] = {k: (v - start[k]).abs().mean() for k, v in weights(tmp_path / str(scale)).items()}
    assert torch.allclose(moved[3.0]["2.weight"], 3 * moved[1.0]["2.weight"], rtol=1e-3)
    assert torch.allclose(moved[3.0]["2.bias"], moved[1.0]["2.bias"], rtol=1e-3)


@pytest.mark.parametrize("recipe", [{"ema_decay": 0.0}, {"ema_decay": 0.8},
                                    {"optimizer": "muon", "schedule": "wsd", "weight_decay": 0.01},
                                    {"optimizer": "muon", "embed_lr_scale": 4.0}])
def test_sigterm_saves_and_resume_is_exact(tmp_path, recipe):
    """Interrupt at step 7 (mid-epoch: 4 steps per epoch), resume, and end with the very weights
    of an uninterrupted run."""
    full = train(TinyTask(), config(**recipe), tmp_path / "full")
    stopped = train(TinyTask(signal_at=6), config(**recipe), tmp_path / "cut")
    assert stopped["interrupted"] == "SIGTERM" and stopped["step"] == 7
    assert stopped["checkpoint"].endswith("step_0000007")
    resumed = train(TinyTask(), config(**recipe), tmp_path / "cut", resume=True)
    assert resumed["step"] == 12
    a, b = weights(tmp_path / "full"), weights(tmp_path / "cut")
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert resumed["loss"] == full["loss"]
    assert metric_steps(tmp_path / "cut", "train") == [2, 4, 6, 8, 10, 12]


def test_nan_loss_stops_naming_the_step_and_keeps_the_checkpoint(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(TrainingError) as info:
        train(TinyTask(nan_at=5), config(checkpoint_every=2), run)
    assert str(info.value) == (
        f"loss is nan at step 6: training stopped; the last good checkpoint is {run / 'checkpoints' / 'step_0000004'}. "
        "Lower train.lr or use train.precision=fp32, then resume with --resume"
    )
    assert (run / "checkpoints" / "step_0000004" / "model.safetensors").is_file()
    assert (run / "model.safetensors").is_file()


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    one = train(TinyTask(noise=0.0), config(steps=6, checkpoint_every=0), tmp_path / "one")
    two = train(TinyTask(noise=0.0), config(steps=6, checkpoint_every=0, grad_accum=2), tmp_path / "two")
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-5)
    assert one["loss"] == pytest.approx(two["loss"], rel=1e-5)


def test_unreadable_items_are_dropped_and_counted(tmp_path):
    result = train(TinyTask(bad=frozenset({3, 10})), config(steps=4, checkpoint_every=0), tmp_path / "run")
    assert result["dropped"] == 2  # one epoch: each bad item met once
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["dropped"] for r in rows if r["split"] == "train"][-1] == 2


def test_error_messages(tmp_path):
    with pytest.raises(ValueError, match=r"has no checkpoint to resume from .*run without --resume"):
        train(TinyTask(), config(), tmp_path / "empty", resume=True)
    train(TinyTask(), config(steps=4), tmp_path / "done")
    with pytest.raises(ValueError, match="already holds a training run \\(checkpoint at step 4\\); pass --resume"):
        train(TinyTask(), config(steps=4), tmp_path / "done")
    with pytest.raises(ValueError, match=r"train.batch_size 9 must be a multiple of processes x grad_accum = 1 x 2"):
        train(TinyTask(), config(batch_size=9, grad_accum=2), tmp_path / "x")
    with pytest.raises(ValueError, match="train.precision 'fp16' needs a CUDA device"):
        train(TinyTask(), config(precision="fp16"), tmp_path / "y", device="cpu")
    with pytest.raises(TrainingError, match="the training split has 32 items, fewer than one batch per process"):
        train(TinyTask(), config(batch_size=64), tmp_path / "z")
    with pytest.raises(ValueError, match=r"train.betas must be two numbers in \[0, 1\), got \[0.9, 1.5\]"):
        TrainConfig(betas=(0.9, 1.5))
