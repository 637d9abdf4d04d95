"""What every part of one evaluation shares: the options, the data and the loaded models.

``run`` (VAE, CLIP, curves, the report) and ``samples`` (the DALL-E part) both take an `EvalContext`;
neither imports the other's internals through it.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from duomodal.data.dataset import load_record_image
from duomodal.data.images import ImageError
from duomodal.data.records import Record
from duomodal.models.clip import ClipEmbedder, load_clip
from duomodal.models.sampling import SamplingOptions

Log = Callable[[str], None]


class EvalError(ValueError):
    """Options or inputs the evaluation cannot work with."""


@dataclass(frozen=True)
class EvalOptions:
    data: Path  # the captioned-image dataset (an icon dataset gives colour/shape labels)
    out: Path  # the report directory
    vae: Path | None = None  # a VAE model or run directory
    dalle: Path | None = None  # a DALL-E run directory
    clip: Path | None = None  # the CLIP used for reranking and the CLIP figures
    judge_clip: Path | None = None  # an independent CLIP that judges the shape of generated images
    prompts: int = 16  # prompts per split (train, heldout) for the DALL-E samples
    samples_per_prompt: int = 4  # images kept per prompt (k)
    rerank_from: int = 16  # images generated per prompt when reranking (R >= k)
    seed: int = 0  # prompt choice and sampling seed
    # DALL-E sampling, by default as `duomodal generate` and the server sample; its seed, batch size and
    # precision are set per prompt from the fields here
    sampling: SamplingOptions = SamplingOptions()
    max_images: int = 256  # at most this many images per split for the VAE/CLIP/likelihood figures
    batch_size: int = 32
    val_fraction: float = 0.05  # for datasets whose manifest does not give splits
    device: str | None = None  # "cpu", "cuda"...; default: CUDA when available
    precision: str = "auto"  # of DALL-E sampling and CLIP; auto: from the hardware (duomodal.device)

    def __post_init__(self) -> None:
        for name in ("prompts", "samples_per_prompt", "rerank_from", "max_images", "batch_size"):
            if getattr(self, name) < 1:
                raise EvalError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.rerank_from < self.samples_per_prompt:
            raise EvalError(
                f"rerank-from ({self.rerank_from}) must be at least samples-per-prompt "
                f"({self.samples_per_prompt}): reranking keeps the best k of R"
            )
        if self.vae is None and self.dalle is None and self.clip is None:
            raise EvalError("nothing to evaluate: give at least one of --vae, --dalle, --clip")

    def sampling_for(self, seed: int, batch_size: int) -> SamplingOptions:
        """The DALL-E sampling options of these settings, for one prompt's seed and batch."""
        return replace(self.sampling, seed=seed, batch_size=batch_size, precision=self.precision)


@dataclass(frozen=True)
class EvalResult:
    metrics: dict[str, Any]
    paths: dict[str, Path]  # "markdown", "html", "metrics"


# --- data --------------------------------------------------------------------------------------


@dataclass
class LoadedImages:
    records: list[Record]
    images: list[Image.Image]


def sample_records(records: Sequence[Record], limit: int, seed: int) -> list[Record]:
    """At most `limit` records, a seeded choice, in path order."""
    ordered = sorted(records, key=lambda r: r.location)
    if len(ordered) <= limit:
        return ordered
    chosen = random.Random(seed).sample(range(len(ordered)), limit)
    return [ordered[i] for i in sorted(chosen)]


def load_images(records: Sequence[Record], log: Log, skipped: list[str]) -> LoadedImages:
    """Decode the images; an unreadable one is skipped with one line saying which and why."""
    kept, images = [], []
    for record in records:
        try:
            images.append(load_record_image(record))
        except ImageError as e:
            log(f"skipped {record.location}: {e}")
            skipped.append(record.location)
            continue
        kept.append(record)
    return LoadedImages(kept, images)


# --- the context ---------------------------------------------------------------------------------


@dataclass
class EvalContext:
    """What every part of one evaluation shares: options, data, where to write, loaded images and CLIPs."""

    options: EvalOptions
    device: torch.device
    by_split: dict[str, list[Record]]
    palette: dict[str, str]
    icons: list[str]  # every icon name of the dataset, sorted
    out: Path
    log: Log
    skipped: list[str] = field(default_factory=list)  # unreadable images
    _images: dict[str, LoadedImages] = field(default_factory=dict)
    _clips: dict[Path, ClipEmbedder] = field(default_factory=dict)

    def split_images(self, split: str) -> LoadedImages:
        """At most max_images decoded images of a split (a seeded choice), loaded once."""
        if split not in self._images:
            chosen = sample_records(self.by_split[split], self.options.max_images, self.options.seed)
            self._images[split] = load_images(chosen, self.log, self.skipped)
        return self._images[split]

    def clip(self, path: Path) -> ClipEmbedder:
        """The CLIP at `path`, loaded once."""
        if path not in self._clips:
            self._clips[path] = load_clip(path, device=self.device, precision=self.options.precision)
        return self._clips[path]
