"""One optimizer step of the training loop: the model (DDP-wrapped under torchrun), its optimizer, fp16
scaler and EMA weights; the forward and backward passes over a step's micro-batches, gradient clipping,
the step at a given learning rate, and the weights to evaluate.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from duomodal.device import precision_dtype
from duomodal.train.batches import BatchStream, ShardBatchStream, to_device
from duomodal.train.distributed import DistInfo, all_reduce_sum
from duomodal.train.recipe import MuonWithAdamW, TrainConfig, TrainingError, build_optimizer
from duomodal.train.task import TrainTask


class Ema:
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


@dataclass(frozen=True)
class StepStats:
    """The figures of one optimizer step: `loss` and the task's `figures` are means over the
    micro-batches, `items` and `dropped` count the items used and skipped as unreadable, `stop`
    says a signal asked training to stop."""

    loss: float
    items: int
    dropped: int
    stop: bool
    figures: dict[str, float]

    def all_reduce(self, info: DistInfo) -> StepStats:
        """The step's figures over all processes, in one all-reduce: counts summed, loss and
        figures averaged, `stop` set when any process was signalled (so all stop at one step).
        Every process must name the same figures."""
        named = {"loss": self.loss, "items": self.items, "dropped": self.dropped, "stop": float(self.stop),
                 **{f"figure.{k}": self.figures[k] for k in sorted(self.figures)}}
        packed = torch.tensor(list(named.values()), dtype=torch.float64)
        summed = dict(zip(named, all_reduce_sum(packed.to(info.device), info).cpu().tolist()))
        return StepStats(
            loss=summed["loss"] / info.world_size,
            items=int(summed["items"]),
            dropped=int(summed["dropped"]),
            stop=summed["stop"] > 0,
            figures={k: summed[f"figure.{k}"] / info.world_size for k in sorted(self.figures)},
        )


@dataclass
class Interval:
    """The train figures summed since the last train line of metrics.jsonl."""

    sums: dict[str, float] = field(default_factory=dict)
    steps: int = 0
    items: int = 0
    seconds: float = 0.0

    def add(self, stats: StepStats, seconds: float) -> None:
        self.seconds += seconds
        self.items += stats.items
        self.steps += 1
        self.sums["loss"] = self.sums.get("loss", 0.0) + stats.loss
        for k, v in stats.figures.items():
            self.sums[k] = self.sums.get(k, 0.0) + v


class Stepper:
    """The model, its optimizer, fp16 scaler and EMA, and the optimizer step over them.

    `build` makes them afresh (the same initial weights on every rank), `wrap` DDP-wraps the model
    under torchrun once its weights are final (after a resume loaded them)."""

    model: torch.nn.Module
    trained: torch.nn.Module  # the model, DDP-wrapped under torchrun: the forward passes go through it
    params: list[torch.nn.Parameter]  # the trainable parameters (gradient clipping)
    optimizer: torch.optim.Optimizer | MuonWithAdamW
    scaler: torch.amp.GradScaler | None  # fp16 only
    ema: Ema | None

    def __init__(self, task: TrainTask, config: TrainConfig, info: DistInfo, precision: str):
        self.task, self.config, self.info, self.precision = task, config, info, precision
        self.autocast_dtype = None if precision == "fp32" else precision_dtype(precision)

    def build(self) -> None:
        """The model (the same initial weights on every rank), the optimizer, the fp16 scaler and the EMA."""
        config, info = self.config, self.info
        torch.manual_seed(config.seed)
        self.model = self.task.build_model().to(info.device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.model, config, info.device, self.precision)
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None
        self.ema = Ema(self.model, config.ema_decay) if config.ema_decay > 0 else None

    def wrap(self) -> None:
        """`trained`: the model, DDP-wrapped under torchrun."""
        info = self.info
        self.trained = (
            DistributedDataParallel(self.model, device_ids=[info.device] if info.device.type == "cuda" else None)
            if info.enabled else self.model
        )

    def forward_backward(self, stream: BatchStream | ShardBatchStream, step: int,
                         stopping: Callable[[], bool]) -> StepStats:
        """The gradients of one optimizer step, accumulated over train.grad_accum micro-batches of
        `stream`; this process's figures of the step (`stopping`: whether a signal asked this process
        to stop, asked once the step's passes are done)."""
        config, info = self.config, self.info
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=info.device)
        figure_sums: dict[str, float] = {}
        items = dropped = 0
        for micro in range(config.grad_accum):
            batch, kept, skipped = stream.next()
            items += kept
            dropped += skipped
            batch = to_device(batch, info.device)
            # DDP averages the gradients over processes on the last micro-batch only
            defer_sync = info.enabled and micro < config.grad_accum - 1
            with (self.trained.no_sync() if defer_sync else contextlib.nullcontext()):  # type: ignore[operator]
                with self.autocast():
                    loss, figures = self.task.loss(self.trained, batch, step)
                scaled = loss.float() / config.grad_accum
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            loss_sum += loss.detach().float()
            for k, v in figures.items():
                figure_sums[k] = figure_sums.get(k, 0.0) + float(v)
        return StepStats(
            loss=float(loss_sum) / config.grad_accum,
            items=items,
            dropped=dropped,
            stop=stopping(),
            figures={k: v / config.grad_accum for k, v in figure_sums.items()},
        )

    def optimizer_step(self, stats: StepStats, lr: float, step: int, last_checkpoint: Path | None) -> float:
        """Clip the gradients and step at learning rate `lr`, then update the EMA; the gradient norm.
        Raises TrainingError, naming optimizer step `step` + 1 and `last_checkpoint`, on a NaN/inf loss
        or gradient norm."""
        if not math.isfinite(stats.loss):
            kept_at = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else \
                "no checkpoint was saved yet"
            raise TrainingError(
                f"loss is {stats.loss} at step {step + 1}: training stopped; {kept_at}. "
                "Lower train.lr or use train.precision=fp32, then resume with --resume"
            )
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        clip = self.config.grad_clip if self.config.grad_clip > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, clip))
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skips the step itself when the norm is inf/NaN
            self.scaler.update()
        elif math.isfinite(grad_norm):
            self.optimizer.step()
        else:
            raise TrainingError(
                f"gradient norm is {grad_norm} at step {step + 1}: training stopped; "
                f"the last good checkpoint is {last_checkpoint or 'none (none saved yet)'}"
            )
        if self.ema is not None:
            self.ema.update(self.model)
        return grad_norm

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.info.device.type, dtype=self.autocast_dtype)

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[torch.nn.Module]:
        """The weights to evaluate (the EMA ones when kept), in eval mode, without gradients and
        on a forked RNG, so that evaluating leaves training's random stream as it was."""
        net = self.ema.model if self.ema is not None else self.model
        net.eval()
        devices = [self.info.device] if self.info.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad(), self.autocast():
            yield net
        self.model.train()
