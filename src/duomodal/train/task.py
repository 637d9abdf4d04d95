"""What the one training loop needs from a model kind (VAE, DALL-E, CLIP).

The loop (``train/loop.py``) owns everything generic: devices, DDP, AMP, the optimizer and
schedule, gradient accumulation and clipping, EMA, checkpoints and resume, signals, metrics,
progress. A ``TrainTask`` owns what is specific to a model kind: how to build the model and its
data, what the loss is, how to validate and what sample pictures to draw.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch
from torch.utils.data import Dataset


class TrainTask(Protocol):
    kind: str  # "vae" | "dalle" | "clip": written into config.json of every checkpoint

    def model_config(self) -> dict[str, Any]:
        """The resolved model config, saved as config.json's `config` (enough to rebuild the model)."""
        ...

    def build_model(self) -> torch.nn.Module:
        """A fresh model on the CPU (the loop moves it to the device)."""
        ...

    def datasets(self) -> tuple[Dataset, Dataset | None]:
        """(train, validation). Items may be None for unreadable files: the loop's collate skips them."""
        ...

    def collate(self, items: list[Any]) -> Any:
        """Batch the non-None items of a list (the loop removes the Nones and counts them)."""
        ...

    def loss(self, model: torch.nn.Module, batch: Any, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """Scalar loss to minimise and named figures to log. `model` may be DDP-wrapped: call it,
        don't reach into it. `step` is the optimizer step (schedules such as Gumbel temperature)."""
        ...

    def validate(self, model: torch.nn.Module, batches: Any) -> dict[str, float]:
        """Validation figures over an iterable of batches (rank 0, eval mode, no grad)."""
        ...

    def write_samples(self, model: torch.nn.Module, path: Path, step: int) -> None:
        """Draw a PNG of samples (reconstructions, generations...) to `path`."""
        ...

    def save_extras(self, directory: Path) -> None:
        """Write files that belong beside the weights (tokenizer.json...)."""
        ...
