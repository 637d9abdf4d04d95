"""The training recipe: ``TrainConfig`` and what it decides for every model kind, the optimizer and the
learning-rate schedule.

``train.optimizer=adamw`` is AdamW on every parameter. ``train.optimizer=muon`` follows the small-model
speedruns (modded-nanogpt): Muon (momentum, then the update orthogonalised by Newton-Schulz iterations)
for the model's hidden weight matrices, which it names with ``hidden_matrices()``, and AdamW for the rest
(embeddings, output heads, norms, biases). Muon's step is scaled to AdamW's update size (as
torch.optim.Muon's ``adjust_lr_fn="match_rms_adamw"``), so both take the same ``train.lr``;
``train.embed_lr_scale`` multiplies it for the embeddings a model names with ``embedding_parameters()``.
``train.schedule=wsd`` holds the learning rate after warm-up and decays it linearly over the last
``train.cooldown_fraction`` of the steps.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch

from duomodal.config import ConfigError
from duomodal.device import PRECISIONS
from duomodal.train.budget import check_budget
from duomodal.train.schedules import warmup_cosine, warmup_stable_decay


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000  # optimizer steps in all (with `minutes`: replaced by the steps the budget buys)
    # wall-clock budget of the run in minutes, data preparation included; the steps are planned from a probe
    # of this machine's speed and written to the run (train/budget.py); None = train.steps as given
    minutes: float | None = None
    # with `minutes`: check the pace at 10-50% of the steps and re-plan them when the machine turned slower or
    # faster; false keeps the probe's plan, so that train.steps repeats the run exactly
    replan: bool = True
    batch_size: int = 64  # global batch of one optimizer step (all processes x accumulation steps)
    lr: float = 1e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # the schedule decays the learning rate to lr * min_lr_ratio
    warmup_steps: int = 100  # linear warm-up steps
    weight_decay: float = 0.0  # decoupled decay, on weight matrices and conv kernels only
    betas: tuple[float, ...] = (0.9, 0.99)  # AdamW betas
    optimizer: Literal["adamw", "muon"] = "adamw"  # muon: Muon for the model's hidden matrices, AdamW for the rest
    muon_momentum: float = 0.95  # Muon's (Nesterov) momentum
    embed_lr_scale: float = 1.0  # the embeddings' learning rate as a multiple of train.lr (models that name them)
    schedule: Literal["cosine", "wsd"] = "cosine"  # after warm-up: cosine decay, or warmup-stable-decay
    cooldown_fraction: float = 0.4  # wsd: the last fraction of the steps, decaying linearly to lr * min_lr_ratio
    grad_clip: float = 1.0  # max global gradient norm; 0 = off
    grad_accum: int = 1  # micro-batches per optimizer step
    ema_decay: float = 0.0  # EMA of weights (saved weights are the EMA ones); 0 = off
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: from the hardware (duomodal.device)
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
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "sample_every", "val_every", "val_batches", "checkpoint_every",
                     "num_workers", "weight_decay", "grad_clip", "ema_decay"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        check_budget(self.minutes)
        if not (self.lr > 0):
            raise ConfigError(f"train.lr must be > 0, got {self.lr}")
        if not (0 <= self.min_lr_ratio <= 1):
            raise ConfigError(f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"train.betas must be two numbers in [0, 1), got {list(self.betas)}")
        if self.ema_decay >= 1:
            raise ConfigError(f"train.ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"train.precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.optimizer not in ("adamw", "muon"):
            raise ConfigError(f"train.optimizer must be adamw or muon, got {self.optimizer!r}")
        if self.schedule not in ("cosine", "wsd"):
            raise ConfigError(f"train.schedule must be cosine or wsd, got {self.schedule!r}")
        if not self.embed_lr_scale > 0:
            raise ConfigError(f"train.embed_lr_scale must be > 0, got {self.embed_lr_scale}")
        if not 0 <= self.muon_momentum < 1:
            raise ConfigError(f"train.muon_momentum must be in [0, 1), got {self.muon_momentum}")
        if not 0 < self.cooldown_fraction <= 1:
            raise ConfigError(f"train.cooldown_fraction must be in (0, 1], got {self.cooldown_fraction}")


class TrainingError(ValueError):
    """Training cannot go on (a NaN/inf loss, a data set too small for one batch...)."""


def lr_multiplier(config: TrainConfig, step: int) -> float:
    """The learning rate of optimizer step `step` as a fraction of train.lr."""
    if config.schedule == "wsd":
        return warmup_stable_decay(step, config.steps, config.warmup_steps, config.cooldown_fraction,
                                   config.min_lr_ratio)
    return warmup_cosine(step, config.steps, config.warmup_steps, config.min_lr_ratio)


def _adamw_groups(params: Iterable[torch.nn.Parameter], weight_decay: float,
                  embeddings: Iterable[torch.nn.Parameter] = (), embed_lr_scale: float = 1.0) -> list[dict[str, Any]]:
    """Decay on matrices and kernels only: norms, biases and scalars keep their scale. With an
    `embed_lr_scale` other than 1, the `embeddings` form groups of their own whose "lr_scale" the
    training loop multiplies the learning rate by (no such group otherwise, so older checkpoints'
    optimizer states keep loading)."""
    params = [p for p in params if p.requires_grad]
    scaled = {id(p) for p in embeddings} if embed_lr_scale != 1.0 else set()
    groups = []
    for chosen, scale in (([p for p in params if id(p) not in scaled], 1.0),
                          ([p for p in params if id(p) in scaled], embed_lr_scale)):
        for decayed in (True, False):
            members = [p for p in chosen if (p.ndim >= 2) == decayed]
            if members or scale == 1.0:
                group = {"params": members, "weight_decay": weight_decay if decayed else 0.0}
                groups.append(group if scale == 1.0 else {**group, "lr_scale": scale})
    return groups


def embedding_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters `model.embedding_parameters()` names (token and position embeddings), or none."""
    named = getattr(model, "embedding_parameters", None)
    return [p for p in named() if p.requires_grad] if named is not None else []


# Keller Jordan's quintic Newton-Schulz coefficients, as torch.optim.Muon uses them
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5


def orthogonalize(updates: torch.Tensor, dtype: torch.dtype, eps: float = 1e-7) -> torch.Tensor:
    """Newton-Schulz orthogonalisation of a stack of matrices (n, r, c) with r <= c, computed in `dtype`
    (bf16 where the run computes in it, as the speedruns do; fp32 where bf16 would be emulated)."""
    a, b, c = NS_COEFFICIENTS
    x = updates.to(dtype)
    x = x / x.norm(dim=(1, 2), keepdim=True).clamp(min=eps)  # spectral norm at most 1
    for _ in range(NS_STEPS):
        gram = x @ x.mT  # (n, r, r)
        x = a * x + torch.baddbmm(gram, gram, gram, beta=b, alpha=c) @ x
    return x


class Muon(torch.optim.Optimizer):
    """torch.optim.Muon's update (Nesterov momentum, Newton-Schulz orthogonalisation, the step scaled to
    AdamW's size by 0.2 * sqrt(max(rows, cols)), decoupled weight decay), with the matrices of one shape
    orthogonalised together as one batch: a model's layers repeat a few shapes, and on a CPU the small
    per-matrix matmuls cost more in calls than in arithmetic (benchmarks/step_dalle.py times both). The
    Newton-Schulz iterations run in `dtype`: the training precision's, fp32 under fp32 or fp16 training."""

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float, momentum: float,
                 dtype: torch.dtype = torch.float32):
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, "momentum": momentum})
        self.dtype = dtype
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon takes matrices, got a parameter of shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self) -> None:  # type: ignore[override]
        for group in self.param_groups:
            lr, decay, momentum = group["lr"], group["weight_decay"], group["momentum"]
            params = [p for p in group["params"] if p.grad is not None]
            by_shape: dict[tuple[int, int], list[tuple[torch.nn.Parameter, torch.Tensor]]] = {}
            for p in params:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buffer = state["momentum_buffer"]
                buffer.lerp_(p.grad, 1 - momentum)
                update = p.grad.lerp(buffer, momentum)  # Nesterov
                wide = update if update.shape[0] <= update.shape[1] else update.mT
                by_shape.setdefault(tuple(wide.shape), []).append((p, wide))
            for pairs in by_shape.values():
                ortho = orthogonalize(torch.stack([wide for _, wide in pairs]), self.dtype)
                for (p, _), o in zip(pairs, ortho):
                    o = o if p.shape[0] <= p.shape[1] else o.mT
                    p.mul_(1 - lr * decay)
                    p.add_(o.to(p.dtype), alpha=-lr * 0.2 * math.sqrt(max(p.shape)))


class MuonWithAdamW:
    """Muon for the hidden matrices and AdamW for every other parameter, stepped as one optimizer.

    `param_groups` are the two optimizers' groups (Muon's first), so the loop sets one learning rate
    on all of them; the state dict holds both optimizers' states under "muon" and "adamw".
    """

    def __init__(self, matrices: list[torch.nn.Parameter], others: list[dict[str, Any]], lr: float,
                 weight_decay: float, betas: tuple[float, float], momentum: float, fused: bool,
                 dtype: torch.dtype = torch.float32):
        self.muon = Muon(matrices, lr=lr, weight_decay=weight_decay, momentum=momentum, dtype=dtype)
        self.adamw = torch.optim.AdamW(others, lr=lr, betas=betas, fused=fused)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.muon.param_groups + self.adamw.param_groups

    @torch.no_grad()
    def step(self) -> None:
        self.muon.step()
        self.adamw.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none)
        self.adamw.zero_grad(set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if set(state_dict) != {"muon", "adamw"}:
            raise ConfigError("the checkpoint's optimizer state is not Muon + AdamW: it was trained with another "
                              "train.optimizer; resume with the optimizer it was started with")
        self.muon.load_state_dict(state_dict["muon"])
        self.adamw.load_state_dict(state_dict["adamw"])


def build_optimizer(model: torch.nn.Module, config: TrainConfig, device: torch.device,
                    precision: str = "fp32") -> torch.optim.Optimizer | MuonWithAdamW:
    """The optimizer of `config` over `model`'s trainable parameters; `precision` is the run's resolved
    one (Muon orthogonalises in bf16 under bf16, in fp32 otherwise).

    Raises ConfigError for train.optimizer=muon on a model that names no hidden matrices."""
    fused = device.type in ("cuda", "cpu")  # one AdamW kernel for all parameters
    betas = (float(config.betas[0]), float(config.betas[1]))
    embeddings = embedding_parameters(model)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(_adamw_groups(model.parameters(), config.weight_decay, embeddings,
                                               config.embed_lr_scale), lr=config.lr, betas=betas, fused=fused)
    hidden = getattr(model, "hidden_matrices", None)
    if hidden is None:
        raise ConfigError(f"train.optimizer=muon needs a model that names its hidden matrices; "
                          f"{type(model).__name__} does not: use train.optimizer=adamw")
    matrices = [p for p in hidden() if p.requires_grad]
    chosen = {id(p) for p in matrices}
    others = [p for p in model.parameters() if p.requires_grad and id(p) not in chosen]
    return MuonWithAdamW(matrices, _adamw_groups(others, config.weight_decay, embeddings, config.embed_lr_scale),
                         config.lr, config.weight_decay, betas, config.muon_momentum, fused,
                         torch.bfloat16 if precision == "bf16" else torch.float32)
