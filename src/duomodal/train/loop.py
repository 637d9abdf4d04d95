"""The one training loop, for every model kind (a ``TrainTask`` supplies the model-specific part).

``train(task, config, out_dir)`` runs AdamW with warm-up + cosine learning rate, gradient clipping
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
import copy
import json
import math
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from duomodal.config import to_dict
from duomodal.files import atomic_write_bytes, load_json, save_json
from duomodal.modelfile import capture_rng_state, load_state_dict_strict, load_weights, read_config, restore_rng_state
from duomodal.train.batches import BatchStream, to_device, val_batches
from duomodal.train.checkpoints import list_checkpoints, load_checkpoint_state, save_checkpoint
from duomodal.train.distributed import DistInfo, all_gather_objects, all_reduce_sum, barrier, init_distributed, shutdown
from duomodal.train.plots import plot_loss
from duomodal.train.schedules import warmup_cosine
from duomodal.train.task import TrainTask

METRICS_FILE = "metrics.jsonl"
RUN_FILE = "run.json"


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000  # optimizer steps in all
    batch_size: int = 64  # global batch of one optimizer step (all processes x accumulation steps)
    lr: float = 1e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # the cosine decays the learning rate to lr * min_lr_ratio
    warmup_steps: int = 100  # linear warm-up steps
    weight_decay: float = 0.0  # AdamW decay, on weight matrices and conv kernels only
    betas: tuple[float, ...] = (0.9, 0.99)  # AdamW betas
    grad_clip: float = 1.0  # max global gradient norm; 0 = off
    grad_accum: int = 1  # micro-batches per optimizer step
    ema_decay: float = 0.0  # EMA of weights (saved weights are the EMA ones); 0 = off
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    seed: int = 0
    log_every: int = 50  # steps between train lines in metrics.jsonl
    sample_every: int = 500  # steps between sample grids in samples/; 0 = only at the end
    val_every: int = 500  # steps between validations; 0 = only at the end
    val_batches: int = 0  # validation batches per validation; 0 = the whole validation split
    checkpoint_every: int = 1000  # steps between checkpoints; 0 = only at the end
    keep_checkpoints: int = 2  # checkpoints kept (the newest)
    num_workers: int = 0  # DataLoader worker processes per training process

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "log_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "sample_every", "val_every", "val_batches", "checkpoint_every",
                     "num_workers", "weight_decay", "grad_clip", "ema_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if not (self.lr > 0):
            raise ValueError(f"train.lr must be > 0, got {self.lr}")
        if not (0 <= self.min_lr_ratio <= 1):
            raise ValueError(f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"train.betas must be two numbers in [0, 1), got {list(self.betas)}")
        if self.ema_decay >= 1:
            raise ValueError(f"train.ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError(f"train.precision must be auto, fp32, bf16 or fp16, got {self.precision!r}")


class TrainingError(ValueError):
    """Training cannot go on (a NaN/inf loss, a data set too small for one batch...)."""


# --- helpers ---------------------------------------------------------------------------------------


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' -> bf16 on CUDA (fp16 on GPUs without bf16), fp32 on CPU; fp16 needs CUDA."""
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("train.precision 'fp16' needs a CUDA device; use 'bf16' or 'fp32' on the CPU")
    return precision


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class _Ema:
    """Exponential moving average of a model's parameters (buffers are copied)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        ema_params = list(self.model.parameters())
        params = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_params, params, 1.0 - self.decay)
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)


# --- the loop --------------------------------------------------------------------------------------


class _Trainer:
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
        self.precision = resolve_precision(config.precision, info.device)

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
        config, info, task = self.config, self.info, self.task
        out_dir = self.out_dir
        checkpoints = list_checkpoints(out_dir)
        if resume and not checkpoints:
            raise ValueError(
                f"--resume: {out_dir} has no checkpoint to resume from (looked in {out_dir / 'checkpoints'}); "
                "run without --resume to start a new run"
            )
        if not resume and checkpoints:
            raise ValueError(
                f"{out_dir} already holds a training run (checkpoint at step {checkpoints[-1][0]}); "
                "pass --resume to continue it, or choose another --out"
            )

        train_set, val_set = task.datasets()
        if len(train_set) // info.world_size < self.micro_batch:  # type: ignore[arg-type]
            raise TrainingError(
                f"the training split has {len(train_set)} items, fewer than one batch per process "  # type: ignore[arg-type]
                f"({self.micro_batch} x {info.world_size} processes); lower train.batch_size or add data"
            )
        torch.manual_seed(config.seed)  # the same initial weights on every rank
        model = task.build_model().to(info.device)
        optimizer = torch.optim.AdamW(
            _param_groups(model, config.weight_decay), lr=config.lr, betas=tuple(config.betas),
            fused=info.device.type in ("cuda", "cpu"),  # one kernel for all parameters (CPU: 2.4+)
        )
        scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None
        ema = _Ema(model, config.ema_decay) if config.ema_decay > 0 else None

        step, epoch, position, dropped_total, elapsed_before = 0, 0, 0, 0, 0.0
        last_checkpoint: Path | None = None
        if resume:
            step, last_checkpoint = checkpoints[-1]
            saved_model = read_config(last_checkpoint, kind=task.kind)
            if saved_model != json.loads(json.dumps(task.model_config())):
                changed = sorted(k for k in set(saved_model) | set(task.model_config())
                                 if saved_model.get(k) != task.model_config().get(k))
                raise ValueError(
                    f"--resume: the model config differs from the checkpoint's in {', '.join(changed)}; "
                    "resume with the same model settings"
                )
            state = load_checkpoint_state(last_checkpoint)
            weights = load_weights(last_checkpoint)
            if ema is not None:
                load_state_dict_strict(ema.model, weights, str(last_checkpoint))
                weights = state["raw_model"]
            load_state_dict_strict(model, weights, str(last_checkpoint))
            optimizer.load_state_dict(state["optimizer"])
            if scaler is not None and "scaler" in state:
                scaler.load_state_dict(state["scaler"])
            per_rank = state["ranks"]
            mine = per_rank[info.rank] if len(per_rank) == info.world_size else per_rank[0]
            restore_rng_state(mine["rng"])
            if len(per_rank) != info.world_size:
                torch.manual_seed(config.seed + 1000 * step + info.rank)
            epoch = state["epoch"]
            position = state["items_in_epoch"] // (self.micro_batch * info.world_size)
            if len(per_rank) == info.world_size:
                position = mine["position"]
            dropped_total = state["dropped_total"]
            elapsed_before = state["elapsed_s"]
            self._truncate_metrics(step)
        else:
            torch.manual_seed(config.seed + info.rank)

        if info.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            run = self.run_config if self.run_config is not None else {
                "kind": task.kind, "model": task.model_config(), "train": to_dict(config)}
            save_json(run, out_dir / RUN_FILE)
        trained = (
            DistributedDataParallel(model, device_ids=[info.device] if info.device.type == "cuda" else None)
            if info.enabled else model
        )
        stream = BatchStream(train_set, task, self.micro_batch, info, config.seed, config.num_workers, epoch, position)
        autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)

        def autocast() -> contextlib.AbstractContextManager:
            if autocast_dtype is None:
                return contextlib.nullcontext()
            return torch.autocast(device_type=info.device.type, dtype=autocast_dtype)

        def eval_model() -> torch.nn.Module:
            return ema.model if ema is not None else model

        def validate() -> dict[str, float]:
            if val_set is None or len(val_set) == 0 or not info.is_main:  # type: ignore[arg-type]
                return {}
            counter = [0]
            net = eval_model()
            net.eval()
            with torch.random.fork_rng(devices=[info.device] if info.device.type == "cuda" else []):
                with torch.no_grad(), autocast():
                    figures = task.validate(net, val_batches(
                        val_set, task, self.micro_batch * info.world_size, config.val_batches,
                        info.device, counter))
            model.train()
            row = {"split": "val", "step": step, **{k: float(v) for k, v in figures.items()},
                   "dropped": counter[0]}
            self._log(row)
            return {k: float(v) for k, v in figures.items()}

        def write_samples() -> None:
            if not info.is_main:
                return
            net = eval_model()
            net.eval()
            with torch.random.fork_rng(devices=[info.device] if info.device.type == "cuda" else []):
                with torch.no_grad(), autocast():
                    task.write_samples(net, out_dir / "samples" / f"step_{step:07d}.png", step)
            model.train()

        def checkpoint() -> Path:
            per_rank = all_gather_objects(
                {"rng": capture_rng_state(), "position": stream.position}, info)
            path = out_dir / "checkpoints" / f"step_{step:07d}"
            if info.is_main:
                state: dict[str, Any] = {
                    "step": step,
                    "epoch": stream.epoch,
                    "items_in_epoch": stream.position * self.micro_batch * info.world_size,
                    "ranks": per_rank,
                    "optimizer": optimizer.state_dict(),
                    "dropped_total": dropped_total,
                    "elapsed_s": elapsed_before + (time.perf_counter() - started),
                    "world_size": info.world_size,
                }
                if scaler is not None:
                    state["scaler"] = scaler.state_dict()
                weights = model.state_dict()
                if ema is not None:
                    state["raw_model"] = weights
                    weights = ema.model.state_dict()
                path = save_checkpoint(out_dir, step, task.kind, task.model_config(), weights, state,
                                       task.save_extras, config.keep_checkpoints)
            barrier(info)
            return path

        params = [p for p in model.parameters() if p.requires_grad]
        started = time.perf_counter()
        train_time, interval_items, interval_time = 0.0, 0, 0.0
        interval_sums: dict[str, float] = {}
        interval_steps = 0
        total_items = 0
        last_loss = float("nan")
        val_figures: dict[str, float] = {}
        bar = tqdm(total=config.steps, initial=step, desc=f"train {task.kind}", unit="step",
                   disable=not info.is_main, dynamic_ncols=True)
        model.train()
        with self._signals():
            while step < config.steps:
                t0 = time.perf_counter()
                optimizer.zero_grad(set_to_none=True)
                loss_sum = torch.zeros((), device=info.device)
                figure_sums: dict[str, float] = {}
                items = dropped = 0
                for micro in range(config.grad_accum):
                    batch, kept, skipped = stream.next()
                    items += kept
                    dropped += skipped
                    batch = to_device(batch, info.device)
                    sync = (info.enabled and micro < config.grad_accum - 1)
                    with (trained.no_sync() if sync else contextlib.nullcontext()):  # type: ignore[union-attr]
                        with autocast():
                            loss, figures = task.loss(trained, batch, step)
                        scaled = loss.float() / config.grad_accum
                        (scaler.scale(scaled) if scaler is not None else scaled).backward()
                    loss_sum += loss.detach().float()
                    for k, v in figures.items():
                        figure_sums[k] = figure_sums.get(k, 0.0) + float(v)
                keys = sorted(figure_sums)
                stop = 1.0 if self.stop_signal is not None else 0.0
                packed = torch.tensor(
                    [float(loss_sum) / config.grad_accum, items, dropped, stop]
                    + [figure_sums[k] / config.grad_accum for k in keys],
                    dtype=torch.float64,
                )
                packed = all_reduce_sum(packed.to(info.device), info).cpu()
                loss_value = float(packed[0]) / info.world_size
                if not math.isfinite(loss_value):
                    bar.close()
                    kept_at = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else \
                        "no checkpoint was saved yet"
                    raise TrainingError(
                        f"loss is {loss_value} at step {step + 1}: training stopped; {kept_at}. "
                        "Lower train.lr or use train.precision=fp32, then resume with --resume"
                    )
                if scaler is not None:
                    scaler.unscale_(optimizer)
                clip = config.grad_clip if config.grad_clip > 0 else float("inf")
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
                lr = config.lr * warmup_cosine(step, config.steps, config.warmup_steps, config.min_lr_ratio)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                elif math.isfinite(grad_norm):
                    optimizer.step()
                else:
                    bar.close()
                    raise TrainingError(
                        f"gradient norm is {grad_norm} at step {step + 1}: training stopped; "
                        f"the last good checkpoint is {last_checkpoint or 'none (none saved yet)'}"
                    )
                if ema is not None:
                    ema.update(model)
                step += 1
                step_items, step_dropped = int(packed[1]), int(packed[2])
                dropped_total += step_dropped
                total_items += step_items
                dt = time.perf_counter() - t0
                train_time += dt
                interval_time += dt
                interval_items += step_items
                interval_steps += 1
                interval_sums["loss"] = interval_sums.get("loss", 0.0) + loss_value
                for i, k in enumerate(keys):
                    interval_sums[k] = interval_sums.get(k, 0.0) + float(packed[4 + i]) / info.world_size
                last_loss = loss_value
                bar.update(1)
                if step % config.log_every == 0 or step == config.steps:
                    rate = interval_items / max(interval_time, 1e-9)
                    row = {"split": "train", "step": step, "epoch": stream.epoch,
                           **{k: v / interval_steps for k, v in interval_sums.items()},
                           "lr": lr, "grad_norm": grad_norm, "items_per_s": rate,
                           "dropped": dropped_total,
                           "elapsed_s": elapsed_before + time.perf_counter() - started}
                    self._log(row)
                    bar.set_postfix(loss=f"{row['loss']:.4g}", items_s=f"{rate:.0f}")
                    interval_sums, interval_steps, interval_items, interval_time = {}, 0, 0, 0.0
                if config.val_every and step % config.val_every == 0 and step < config.steps:
                    val_figures = validate()
                if config.sample_every and step % config.sample_every == 0 and step < config.steps:
                    write_samples()
                if float(packed[3]) > 0:
                    break
                if config.checkpoint_every and step % config.checkpoint_every == 0 and step < config.steps:
                    last_checkpoint = checkpoint()
        bar.close()
        interrupted = None
        if self.stop_signal is not None or (step < config.steps):
            interrupted = signal.Signals(self.stop_signal).name if self.stop_signal else "signal"
            last_checkpoint = checkpoint()
        else:
            val_figures = validate()
            write_samples()
            if last_checkpoint is None or list_checkpoints(out_dir)[-1][0] != step:
                last_checkpoint = checkpoint()
            if info.is_main and (out_dir / METRICS_FILE).is_file():
                plot_loss(out_dir / METRICS_FILE, out_dir / "loss.png")
        result: dict[str, Any] = {
            "run_dir": str(out_dir),
            "step": step,
            "loss": last_loss,
            **{f"val_{k}": v for k, v in val_figures.items()},
            "dropped": dropped_total,
            "items_per_s": total_items / train_time if train_time else 0.0,
            "wall_time_s": elapsed_before + time.perf_counter() - started,
            "checkpoint": str(last_checkpoint) if last_checkpoint else None,
            "interrupted": interrupted,
            "precision": self.precision,
            "world_size": info.world_size,
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
