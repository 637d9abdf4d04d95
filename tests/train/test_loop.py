"""The one training loop, with a tiny regression task: exact resume, NaN stop, accumulation,
dropped items, outputs, error messages, training by time."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, default_collate

from duomodal.data.images import save_grid
from duomodal.modelfile import load_weights
from duomodal.train.budget import BudgetError
from duomodal.train.checkpoints import list_checkpoints, load_checkpoint_state
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


# --- training by time (train.minutes) under a mocked clock --------------------------------------------


class FakeClock:
    """The loop's `time` module with a perf_counter that only the task moves."""

    def __init__(self):
        self.now = 1000.0

    def perf_counter(self) -> float:
        return self.now

    def __getattr__(self, name):
        return getattr(time, name)


class TimedTask(TinyTask):
    """Each micro-batch costs 1 s of the clock in the probe's 3 steps and `later_step_s` after, a
    validation 5 s, a sample grid 2 s."""

    def __init__(self, clock: FakeClock, later_step_s: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.clock, self.later_step_s, self.calls = clock, later_step_s, 0

    def loss(self, model, batch, step):
        self.calls += 1
        self.clock.now += 1.0 if self.calls <= 3 else self.later_step_s
        return super().loss(model, batch, step)

    def validate(self, model, batches):
        self.clock.now += 5.0
        return super().validate(model, batches)

    def write_samples(self, model, path, step):
        self.clock.now += 2.0
        super().write_samples(model, path, step)


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr("duomodal.train.loop.time", fake)
    monkeypatch.setattr("duomodal.train.budget.time", fake)  # the probe's timing
    return fake


def timed_config(**changes) -> TrainConfig:
    return config(**{"minutes": 1.0, "steps": 999, "warmup_steps": 2, "val_every": 0, "sample_every": 0,
                     "checkpoint_every": 10, **changes})


def test_a_budget_plans_the_steps_that_fit_and_records_them(tmp_path, clock):
    run = tmp_path / "run"
    result = train(TimedTask(clock), timed_config(), run)
    # before planning: step-0 validation 5 s + samples 2 s + 1 untimed and 2 timed probe steps (1 s each; the
    # probe times at least 2 steps, then stops after 1% of the budget) = 10 s; then 60 x 0.95 - 10 = 47 s
    # hold 40 steps and the final validation and samples (47 s)
    plan = result["plan"]
    assert (plan["steps"], plan["probe_steps"], plan["step_s"]) == (40, 2, 1.0)
    assert (plan["validation_s"], plan["samples_s"], plan["before_s"]) == (5.0, 2.0, 10.0)
    assert result["step"] == 40 and result["interrupted"] is None
    assert 10.0 + result["wall_time_s"] <= 60.0
    recorded = json.loads((run / "run.json").read_text())
    assert recorded["train"]["steps"] == 40 and recorded["train"]["minutes"] == 1.0
    assert recorded["plan"] == plan
    assert metric_steps(run, "val") == [0, 40]  # the untrained model's figures, then the final ones
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step_0000000.png", "step_0000040.png"]
    assert metric_steps(run, "train")[0] == 2  # the probe's steps are not logged


def test_the_probe_is_undone_and_the_planned_run_repeats_by_its_steps(tmp_path, clock):
    planned = train(TimedTask(clock), timed_config(), tmp_path / "planned")
    again = train(TinyTask(), config(steps=planned["step"], warmup_steps=2, val_every=0, sample_every=0,
                                     checkpoint_every=10), tmp_path / "again")
    a, b = weights(tmp_path / "planned"), weights(tmp_path / "again")
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert planned["loss"] == again["loss"]


def test_a_planned_run_resumes_exactly_and_keeps_its_budget(tmp_path, clock):
    full = train(TimedTask(clock), timed_config(), tmp_path / "full")
    stopped = train(TimedTask(clock, signal_at=14), timed_config(), tmp_path / "cut")
    assert stopped["interrupted"] == "SIGTERM" and stopped["step"] == 15
    with pytest.raises(BudgetError, match=r"^--resume: this run was planned for 1 minutes \(40 steps\); resume with "
                                          r"train.minutes=1, or without a budget \(the planned steps are kept\)$"):
        train(TimedTask(clock), timed_config(minutes=2.0), tmp_path / "cut", resume=True)
    resumed = train(TimedTask(clock), config(steps=999, warmup_steps=2, val_every=0, sample_every=0,
                                             checkpoint_every=10), tmp_path / "cut", resume=True)
    assert resumed["step"] == 40 and resumed["plan"] == full["plan"]
    a, b = weights(tmp_path / "full"), weights(tmp_path / "cut")
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_steps_slower_than_the_probe_re_plan_the_run_into_its_budget(tmp_path, clock, capsys):
    # the probe plans 40 steps of 1 s (as above); then steps take 2 s, which would end at 10 + 87 s. At the
    # first check (step 4, 10% of the plan) 60 x 0.95 - 10 - 8 = 39 s are left: 12 more steps of 2 s and the
    # final validation and samples at twice their probed time (14 s) fit, so the run ends at step 16.
    result = train(TimedTask(clock, later_step_s=2.0), timed_config(), tmp_path / "run")
    assert result["step"] == 16 and result["interrupted"] is None
    assert result["plan"]["steps"] == 16 and result["plan"]["revisions"] == [[4, 40, 16, 2.0]]
    assert 10.0 + result["wall_time_s"] <= 60.0
    assert "time budget: steps take 2 s here against 1 s in the probe; re-planned at step 4: 40 -> 16 steps" \
        in capsys.readouterr().err
    last = load_checkpoint_state(list_checkpoints(tmp_path / "run")[-1][1])
    assert last["plan"]["steps"] == 16  # a resume keeps the revised steps


def test_steps_faster_than_the_probe_re_plan_the_run_up_to_twice_its_steps(tmp_path, clock):
    result = train(TimedTask(clock, later_step_s=0.5), timed_config(), tmp_path / "run")
    # at step 4, 45 s are left: 83 more steps of 0.5 s fit, capped at twice the probe's 40 steps
    assert result["step"] == 80 and [r[:3] for r in result["plan"]["revisions"]] == [[4, 40, 80]]
    assert 10.0 + result["wall_time_s"] <= 60.0


def test_a_budget_shorter_than_the_probe_is_refused(tmp_path, clock):
    with pytest.raises(BudgetError, match=r"^train.minutes=0.1 \(6 s\) is shorter than the probe"):
        train(TimedTask(clock), timed_config(minutes=0.1), tmp_path / "run")


def test_train_cli_takes_minutes(shape_dataset, tmp_path, capsys):
    from duomodal.cli import main

    tiny = ["model.image_size=16", "data.image_size=16", "model.width=16", "model.max_width=32",
            "model.codebook_size=32", "model.codebook_dim=16", "train.batch_size=8", "train.warmup_steps=2"]
    args = ["train", "vae", "--data", str(shape_dataset), "--out", str(tmp_path / "run"), "--device", "cpu",
            *[arg for item in tiny for arg in ("--set", item)]]
    assert main([*args, "--minutes", "0"]) == 2
    assert capsys.readouterr().err.strip() == "duomodal: error: train.minutes must be above 0 minutes, got 0"
    assert main([*args, "--minutes", "0.15"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    recorded = json.loads((Path(tmp_path / "run") / "run.json").read_text())
    steps = recorded["train"]["steps"]
    assert steps == recorded["plan"]["steps"] > 1
    assert lines[-1].startswith(f"time budget: 0.15 minutes bought {steps} steps on this machine (")
    final = json.loads((Path(tmp_path / "run") / "result.json").read_text())  # steps re-planned on the way
    assert final["step"] == final["plan"]["steps"]  # (the pace checks may have re-planned it: timing is real)
    assert f"reached step {final['step']} in " in lines[-1] and lines[-1].endswith(" images/s")
