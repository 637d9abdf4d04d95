"""The one training loop, for every model kind (a ``TrainTask`` supplies the model-specific part; the
optimizer step itself is ``train/step.py``).

``train(task, config, out_dir)`` runs the recipe of ``train/recipe.py`` (AdamW or Muon, warm-up then a
cosine or warmup-stable-decay learning rate), gradient clipping
and accumulation, optional EMA weights and mixed precision, on one process or under ``torchrun``
with DDP (gloo on CPU, NCCL on CUDA; only rank 0 writes). ``train.batch_size`` is the global batch
of one optimizer step, split over processes and accumulation steps, so the same config gives the
same updates on 1 or N processes.

Reproducible and resumable: the data order of epoch e is the permutation of a generator seeded
with (seed, e), sharded per rank as DistributedSampler does; each item's own randomness (caption
choice...) comes from a generator seeded with (seed, epoch, index). A checkpoint stores weights,
optimizer, step, RNG states and the position in the data order, so ``resume=True`` continues
exactly. SIGINT/SIGTERM save a checkpoint and return; a NaN/inf loss raises ``TrainingError``
naming the step and keeps the last good checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from duomodal.config import to_dict
from duomodal.device import resolve_precision
from duomodal.files import atomic_write_bytes, load_json, save_json
from duomodal.modelfile import capture_rng_state, load_state_dict_strict, load_weights, restore_rng_state
from duomodal.train.budget import BudgetError, PaceChecks, StepPlan, plan_steps, revise_steps, time_probe
from duomodal.train.batches import BatchStream, ShardBatchStream, ValBatches, make_batch_stream
from duomodal.train.checkpoints import (
    CHECKPOINTS_DIR,
    check_model_config,
    checkpoint_name,
    checkpoints_to_resume,
    list_checkpoints,
    load_checkpoint_state,
    save_checkpoint,
)
from duomodal.train.distributed import DistInfo, all_gather_objects, barrier, init_distributed, shutdown
from duomodal.train.plots import plot_loss
from duomodal.train.recipe import TrainConfig, TrainingError, lr_multiplier
from duomodal.train.step import Interval, StepStats, Stepper
from duomodal.train.task import TrainTask

METRICS_FILE = "metrics.jsonl"
RUN_FILE = "run.json"


class _Trainer:
    """One training run: `run` restores or builds the model, trains it step by step and finishes.

    `stepper` holds the model and its optimizer once `run` has built them; the counters that
    `__init__` sets are what a checkpoint saves and the result reports."""

    stream: BatchStream | ShardBatchStream
    val_set: Dataset | None

    def __init__(self, task: TrainTask, config: TrainConfig, out_dir: Path, info: DistInfo,
                 run_config: dict | None):
        self.task, self.config, self.out_dir, self.info = task, config, Path(out_dir), info
        self.run_config = run_config
        self.stop_signal: int | None = None
        world, accum = info.world_size, config.grad_accum
        if config.batch_size % (world * accum):
            raise ValueError(
                f"train.batch_size {config.batch_size} must be a multiple of processes x grad_accum "
                f"= {world} x {accum}"
            )
        self.micro_batch = config.batch_size // (world * accum)
        self.precision = resolve_precision(config.precision, info.device, "train.precision")
        self.stepper = Stepper(task, config, info, self.precision)  # the model, optimizer, scaler and EMA
        self.step = 0
        self.last_checkpoint: Path | None = None
        self.dropped_total = 0
        self.elapsed_before = 0.0  # seconds trained before this process started (a resumed run)
        self.started = 0.0  # perf_counter() when this process began its steps
        self.train_time = 0.0  # seconds in optimizer steps, validation and checkpoints left out
        self.total_items = 0
        self.interval = Interval()
        self.last_loss = float("nan")
        self.val_figures: dict[str, float] = {}
        self.plan: StepPlan | None = None  # the steps train.minutes bought (from a checkpoint on resume)
        self.pace_checks = PaceChecks()  # where this process checks the plan's pace (set when it plans)
        self.clock_start = 0.0  # perf_counter() when run() began

    # signals -------------------------------------------------------------------------------------

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.stop_signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.stop_signal = signum

    @contextlib.contextmanager
    def _signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    # metrics -------------------------------------------------------------------------------------

    def _log(self, row: dict[str, Any]) -> None:
        if self.info.is_main:
            with open(self.out_dir / METRICS_FILE, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")

    def _truncate_metrics(self, step: int) -> None:
        """On resume, drop the lines a killed run wrote after its last checkpoint."""
        path = self.out_dir / METRICS_FILE
        if not self.info.is_main or not path.is_file():
            return
        lines = [ln for ln in path.read_text(encoding="utf-8").splitlines()
                 if ln.strip() and json.loads(ln).get("step", 0) <= step]
        atomic_write_bytes(path, ("".join(ln + "\n" for ln in lines)).encode("utf-8"))

    # the run -------------------------------------------------------------------------------------

    def run(self, resume: bool) -> dict[str, Any]:
        """Train from scratch, or from the last checkpoint when `resume`; the final figures."""
        self.clock_start = time.perf_counter()  # a train.minutes budget counts from here
        config, info, task = self.config, self.info, self.task
        checkpoints = checkpoints_to_resume(self.out_dir, resume)
        train_set, self.val_set = task.datasets()
        if len(train_set) // info.world_size < self.micro_batch:  # type: ignore[arg-type]
            raise TrainingError(
                f"the training split has {len(train_set)} items, fewer than one batch per process "  # type: ignore[arg-type]
                f"({self.micro_batch} x {info.world_size} processes); lower train.batch_size or add data"
            )
        self.stepper.build()
        epoch, position = 0, 0
        if resume:
            epoch, position = self._restore(*checkpoints[-1])
        else:
            torch.manual_seed(config.seed + info.rank)  # each rank its own random stream (noise, dropout...)
        if info.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        self.stepper.wrap()
        if config.minutes is not None and self.plan is None:
            self._plan_by_time(train_set)
        elif self.plan is not None and config.minutes not in (None, self.plan.minutes):
            raise BudgetError(
                f"--resume: this run was planned for {self.plan.minutes:g} minutes ({self.plan.steps} steps); resume "
                f"with train.minutes={self.plan.minutes:g}, or without a budget (the planned steps are kept)"
            )
        if self.plan is not None:  # the planned steps and fitted warm-up replace the configured ones
            self.config = config = replace(config, steps=self.plan.steps, warmup_steps=self.plan.warmup_steps)
        if info.is_main:
            run = dict(self.run_config) if self.run_config is not None else {
                "kind": task.kind, "model": task.model_config()}
            run["train"] = to_dict(config)
            if self.plan is not None:
                run["plan"] = self.plan.as_dict()
            save_json(run, self.out_dir / RUN_FILE)
        self.stream = make_batch_stream(train_set, task, self.micro_batch, info, config.seed, config.num_workers,
                                        epoch, position)
        self._train()
        return self._finish()

    def _plan_by_time(self, train_set: Dataset) -> None:
        """Fix the step count that train.minutes buys here (see train/budget.py): time the step-0 validation
        and sample grid (kept: the untrained model's figures), then a few optimizer steps (undone: the model,
        optimizer, random streams and data order start again as they were)."""
        config, info = self.config, self.info
        started = time.perf_counter()
        self.val_figures = self._validate()
        validation_s = time.perf_counter() - started
        started = time.perf_counter()
        self._write_samples()
        samples_s = time.perf_counter() - started
        self.stream = make_batch_stream(train_set, self.task, self.micro_batch, info, config.seed, config.num_workers,
                                        0, 0)
        self.stepper.model.train()
        with tqdm(desc=f"time {self.task.kind} steps", unit="step", disable=not info.is_main,
                  dynamic_ncols=True) as bar:
            timed, step_s = time_probe(lambda: (self._step(), bar.update(1)), config.minutes,
                                       lambda done: any(all_gather_objects(done, info)))
        # every rank plans from the slowest rank's figures, so all plan the same steps
        slowest = [max(f) for f in zip(*all_gather_objects((step_s, validation_s, samples_s), info))]
        self.plan = plan_steps(config.minutes, time.perf_counter() - self.clock_start, slowest[0], timed,
                               slowest[1], config.val_every, slowest[2], config.sample_every, config.warmup_steps)
        self.pace_checks = PaceChecks(self.plan.steps, enabled=config.replan)
        self.stepper.build()  # the probe's steps undone: the initial weights and a fresh optimizer again
        torch.manual_seed(config.seed + info.rank)
        self.stepper.wrap()

    def _restore(self, step: int, path: Path) -> tuple[int, int]:
        """Load checkpoint `path` of step `step`: weights, optimizer, scaler, RNG and counters; the
        (epoch, position) in the data order to go on from."""
        config, info = self.config, self.info
        check_model_config(path, self.task.kind, self.task.model_config())
        state = load_checkpoint_state(path)
        weights = load_weights(path)
        if self.stepper.ema is not None:
            # the checkpoint's weights are the EMA ones; the raw ones travel in the training state
            load_state_dict_strict(self.stepper.ema.model, weights, str(path))
            weights = state["raw_model"]
        load_state_dict_strict(self.stepper.model, weights, str(path))
        self.stepper.optimizer.load_state_dict(state["optimizer"])
        if self.stepper.scaler is not None and "scaler" in state:
            self.stepper.scaler.load_state_dict(state["scaler"])
        per_rank = state["ranks"]
        same_world = len(per_rank) == info.world_size
        mine = per_rank[info.rank] if same_world else per_rank[0]
        restore_rng_state(mine["rng"])
        if same_world:
            position = mine["position"]
        elif isinstance(mine["position"], dict):  # streamed shards: go on from the shards any rank finished
            torch.manual_seed(config.seed + 1000 * step + info.rank)
            position = ShardBatchStream.merge([r["position"] for r in per_rank])
        else:
            # another process count: a fresh seed per rank, and the data order from the items
            # the whole run has used in this epoch
            torch.manual_seed(config.seed + 1000 * step + info.rank)
            position = state["items_in_epoch"] // (self.micro_batch * info.world_size)
        self.step, self.last_checkpoint = step, path
        self.dropped_total = state["dropped_total"]
        self.elapsed_before = state["elapsed_s"]
        self.plan = StepPlan.from_dict(state["plan"]) if state.get("plan") else None
        self._truncate_metrics(step)
        return state["epoch"], position

    # training steps ------------------------------------------------------------------------------

    def _train(self) -> None:
        """Optimizer steps until train.steps or a stop signal, with the train lines, validations,
        sample grids and checkpoints that fall due on the way."""
        config = self.config
        self.started = time.perf_counter()
        with self._signals(), tqdm(total=config.steps, initial=self.step, desc=f"train {self.task.kind}",
                                   unit="step", disable=not self.info.is_main, dynamic_ncols=True) as bar:
            self.stepper.model.train()
            postfix: dict[str, str] = {}
            while self.step < self.config.steps:  # (a time budget's revision may change the steps)
                t0 = time.perf_counter()
                stats, lr, grad_norm = self._step()
                self.step += 1
                self._count(stats, time.perf_counter() - t0)
                if self.step % config.log_every == 0 or self.step == self.config.steps:
                    row = self._log_train(lr, grad_norm)
                    postfix.update(loss=f"{row['loss']:.4g}", items_s=f"{row['items_per_s']:.0f}")
                if self.plan is not None:  # what is left of the time budget
                    left = self.plan.minutes * 60 - self.plan.before_s - self._elapsed()
                    postfix["left"] = f"{'-' if left < 0 else ''}{int(abs(left)) // 60}:{int(abs(left)) % 60:02d}"
                if self.pace_checks.due(self.step):
                    bar.total = self._revise_plan()
                bar.set_postfix(postfix, refresh=False)
                bar.update(1)
                if self._due(config.val_every):
                    self.val_figures = self._validate()
                if self._due(config.sample_every):
                    self._write_samples()
                if stats.stop:
                    break  # every rank stops here: _finish saves the checkpoint
                if self._due(config.checkpoint_every):
                    self.last_checkpoint = self._checkpoint()

    def _revise_plan(self) -> int:
        """Check the pace since the last check against the plan's probe; re-plan the step count where it
        no longer fits the budget (see train/budget.py). Returns the step count."""
        config, plan = self.config, self.plan
        pace = self.pace_checks.pace(self.step, self.train_time)
        pace, elapsed = (max(f) for f in zip(*all_gather_objects((pace, self._elapsed()), self.info)))
        steps = revise_steps(plan, self.step, elapsed, pace, config.val_every, config.sample_every)
        if steps is not None:
            if self.info.is_main:
                tqdm.write(f"time budget: steps take {pace:.3g} s here against {plan.step_s:.3g} s in the probe; "
                           f"re-planned at step {self.step}: {plan.steps} -> {steps} steps", file=sys.stderr)
            self.plan = plan.revised(self.step, steps, pace)
            self.config = replace(config, steps=steps)
            self.pace_checks.keep_before(steps)
        return self.config.steps

    def _elapsed(self) -> float:
        """Seconds of the run since its first step, the processes before a resume included."""
        return self.elapsed_before + time.perf_counter() - self.started

    def _due(self, every: int) -> bool:
        """Whether a task done every `every` steps (0 = off) falls on this step; the last step is
        left to _finish."""
        return every > 0 and self.step % every == 0 and self.step < self.config.steps


    def _step(self) -> tuple[StepStats, float, float]:
        """One optimizer step at this step's learning rate: its figures over all processes, the
        learning rate and the gradient norm."""
        stats = self.stepper.forward_backward(self.stream, self.step, lambda: self.stop_signal is not None)
        stats = stats.all_reduce(self.info)
        lr = self.config.lr * lr_multiplier(self.config, self.step)
        return stats, lr, self.stepper.optimizer_step(stats, lr, self.step, self.last_checkpoint)

    def _count(self, stats: StepStats, seconds: float) -> None:
        """Add a finished step (all processes') to the run's totals and to the log interval."""
        self.dropped_total += stats.dropped
        self.total_items += stats.items
        self.train_time += seconds
        self.interval.add(stats, seconds)
        self.last_loss = stats.loss

    # log, validate, sample -----------------------------------------------------------------------

    def _log_train(self, lr: float, grad_norm: float) -> dict[str, Any]:
        """Write the train line of the interval that ends at this step and start a new interval;
        the line."""
        interval = self.interval
        rate = interval.items / max(interval.seconds, 1e-9)
        row = {"split": "train", "step": self.step, "epoch": self.stream.epoch,
               **{k: v / interval.steps for k, v in interval.sums.items()},
               "lr": lr, "grad_norm": grad_norm, "items_per_s": rate,
               "dropped": self.dropped_total,
               "elapsed_s": self._elapsed()}
        self._log(row)
        self.interval = Interval()
        return row

    def _validate(self) -> dict[str, float]:
        """The validation figures, also written as a val line; rank 0 only ({} elsewhere), and {}
        without a validation split."""
        info = self.info
        if self.val_set is None or len(self.val_set) == 0 or not info.is_main:  # type: ignore[arg-type]
            return {}
        with self.stepper.evaluating() as net:
            batches = ValBatches(self.val_set, self.task, self.micro_batch * info.world_size,
                                 self.config.val_batches, info.device)
            figures = self.task.validate(net, batches)
        row = {"split": "val", "step": self.step, **{k: float(v) for k, v in figures.items()},
               "dropped": batches.dropped, "train_s": self.train_time}
        self._log(row)
        return {k: float(v) for k, v in figures.items()}

    def _write_samples(self) -> None:
        if not self.info.is_main:
            return
        with self.stepper.evaluating() as net:
            self.task.write_samples(net, self.out_dir / "samples" / f"step_{self.step:07d}.png", self.step)

    # checkpoint and finish -----------------------------------------------------------------------

    def _checkpoint(self) -> Path:
        """Save the checkpoint of this step (rank 0 writes it; every rank gives its RNG state and
        data position); its path. Every rank must call it at the same step."""
        info = self.info
        per_rank = all_gather_objects({"rng": capture_rng_state(), "position": self.stream.position}, info)
        path = self.out_dir / CHECKPOINTS_DIR / checkpoint_name(self.step)
        if info.is_main:
            state: dict[str, Any] = {
                "step": self.step,
                "epoch": self.stream.epoch,
                "items_in_epoch": (self.stream.position * self.micro_batch * info.world_size
                                   if isinstance(self.stream, BatchStream) else 0),
                "ranks": per_rank,
                "optimizer": self.stepper.optimizer.state_dict(),
                "dropped_total": self.dropped_total,
                "elapsed_s": self._elapsed(),
                "world_size": info.world_size,
                "plan": self.plan.as_dict() if self.plan is not None else None,
            }
            if self.stepper.scaler is not None:
                state["scaler"] = self.stepper.scaler.state_dict()
            weights = self.stepper.model.state_dict()
            if self.stepper.ema is not None:
                state["raw_model"] = weights
                weights = self.stepper.ema.model.state_dict()
            path = save_checkpoint(self.out_dir, self.step, self.task.kind, self.task.model_config(), weights,
                                   state, self.task.save_extras, self.config.keep_checkpoints)
        barrier(info)
        return path

    def _finish(self) -> dict[str, Any]:
        """After the last step: the final validation, samples, checkpoint and loss plot; after an
        interruption: a checkpoint only. The result, also written to result.json."""
        info, out_dir = self.info, self.out_dir
        interrupted = None
        if self.stop_signal is not None or self.step < self.config.steps:
            # a rank that got no signal itself stopped because another one did
            interrupted = signal.Signals(self.stop_signal).name if self.stop_signal else "signal"
            self.last_checkpoint = self._checkpoint()
        else:
            self.val_figures = self._validate()
            self._write_samples()
            if self.last_checkpoint is None or list_checkpoints(out_dir)[-1][0] != self.step:
                self.last_checkpoint = self._checkpoint()
            if info.is_main and (out_dir / METRICS_FILE).is_file():
                plot_loss(out_dir / METRICS_FILE, out_dir / "loss.png")
        result: dict[str, Any] = {
            "run_dir": str(out_dir),
            "step": self.step,
            "loss": self.last_loss,
            **{f"val_{k}": v for k, v in self.val_figures.items()},
            "dropped": self.dropped_total,
            "items_per_s": self.total_items / self.train_time if self.train_time else 0.0,
            "train_s": self.train_time,
            "wall_time_s": self._elapsed(),
            "checkpoint": str(self.last_checkpoint) if self.last_checkpoint else None,
            "interrupted": interrupted,
            "precision": self.precision,
            "world_size": info.world_size,
            "plan": self.plan.as_dict() if self.plan is not None else None,
        }
        if info.is_main:
            save_json(result, out_dir / "result.json")
        return result


def train(
    task: TrainTask,
    config: TrainConfig,
    out_dir: Path,
    resume: bool = False,
    run_config: dict | None = None,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Train `task`'s model into `out_dir` (see the module docstring); the final figures.

    Under torchrun (WORLD_SIZE > 1) each process calls this; the result is the same on all."""
    info = init_distributed(device)
    try:
        result = _Trainer(task, config, Path(out_dir), info, run_config).run(resume)
        # no rank leaves while rank 0 still writes
        barrier(info)
        return result
    finally:
        shutdown(info)


def read_run_config(run_dir: Path) -> dict[str, Any]:
    """The run.json of a training run (the full config it was started with)."""
    return load_json(Path(run_dir) / RUN_FILE)
