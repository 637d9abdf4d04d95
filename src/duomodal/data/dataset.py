"""The torch Dataset of captioned images that every trainer uses.

`ds[i]` is a dict {"image": (3, S, S) float in [0, 1], "caption": str, "tokens": (T,) long (when a
`tokenize` callable is given), "index": i}, or None when the file cannot be read: training skips
and counts it instead of crashing (the training loop drops the Nones before collating).
The dataset knows no model and no tokenizer: it is handed a `tokenize` function.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from duomodal.data.images import (
    DEFAULT_MAX_PIXELS,
    WHITE,
    ImageError,
    load_image,
    load_image_bytes,
    parse_color,
    to_tensor,
)
from duomodal.data.records import Record, filter_split, load_records
from duomodal.data.shards import read_member

log = logging.getLogger(__name__)

Tokenize = Callable[[str], Any]  # caption -> LongTensor (T,) (a list of ints is accepted too)


@dataclass(frozen=True)
class DataConfig:
    image_size: int = 32  # images are resized (shortest side) and centre-cropped to this square
    val_fraction: float = 0.05  # share of images in "val" when the manifest gives no split
    background: str = "#ffffff"  # colour that transparent pixels are composited on
    # Decoded images kept in memory (uint8) after their first read, per split, so that later epochs and
    # validations skip decoding and resizing; images past this budget are decoded every time. 0 = off.
    memory_cache_mb: int = 1024

    def __post_init__(self) -> None:
        if self.image_size < 1:
            raise ValueError(f"data.image_size must be at least 1, got {self.image_size}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.memory_cache_mb < 0:
            raise ValueError(f"data.memory_cache_mb must be >= 0, got {self.memory_cache_mb}")
        parse_color(self.background)

    @property
    def background_rgb(self) -> tuple[int, int, int]:
        return parse_color(self.background)


def load_record_image(
    record: Record,
    background: tuple[int, int, int] = WHITE,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    *,
    draft_size: int | None = None,
) -> Image.Image:
    """A record's image, from its file or its shard member, checked and decoded like `load_image`
    (`draft_size` as there); raises ImageError naming where it is and why it cannot be used."""
    if record.member is None:
        return load_image(record.path, background, max_pixels, draft_size=draft_size)
    try:
        data = read_member(record)
    except (OSError, ValueError) as e:
        raise ImageError(record.location, f"cannot read shard member ({e})") from None
    return load_image_bytes(data, record.location, background, max_pixels, draft_size=draft_size)


class CaptionedImageDataset(Dataset):
    def __init__(
        self,
        records: Sequence[Record],
        image_size: int,
        tokenize: Tokenize | None = None,
        background: tuple[int, int, int] | str = WHITE,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        memory_cache_mb: int = 0,
    ):
        if image_size < 1:
            raise ValueError(f"image_size must be at least 1, got {image_size}")
        self.records = list(records)
        self.image_size = image_size
        self.tokenize = tokenize
        self.background = parse_color(background) if isinstance(background, str) else tuple(background)
        self.max_pixels = max_pixels
        self._reported: set[int] = set()  # indices already logged as bad (in this process)
        # index -> (3, S, S) uint8: to_tensor's values are k / 255, so the memory copy is exact
        self._pixels: dict[int, torch.Tensor] = {}
        self._cache_left = memory_cache_mb * 2**20

    def __len__(self) -> int:
        return len(self.records)

    def _image(self, index: int) -> torch.Tensor | None:
        """(3, S, S) float in [0, 1], from the memory cache or decoded (None when unreadable)."""
        pixels = self._pixels.get(index)
        if pixels is not None:
            return pixels.float().div_(255.0)
        record = self.records[index]
        try:
            image = load_record_image(record, self.background, self.max_pixels, draft_size=self.image_size)
            image = to_tensor(image, self.image_size)
        except ImageError as e:
            if index not in self._reported:
                self._reported.add(index)
                log.warning("skipping %s", e)
            return None
        if image.numel() <= self._cache_left:
            self._pixels[index] = image.mul(255.0).round_().to(torch.uint8)
            self._cache_left -= image.numel()
        return image

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        image = self._image(index)
        if image is None:
            return None
        record = self.records[index]
        caption = record.captions[int(torch.randint(len(record.captions), ()))]
        item: dict[str, Any] = {"image": image, "caption": caption, "index": index}
        if self.tokenize is not None:
            tokens = self.tokenize(caption)
            item["tokens"] = torch.as_tensor(tokens, dtype=torch.long)  # (T,)
        return item


def open_split(
    root: str | os.PathLike,
    config: DataConfig,
    split: str,
    tokenize: Tokenize | None = None,
    records: Sequence[Record] | None = None,
) -> CaptionedImageDataset:
    """The dataset of one split ("train", "val" or "heldout") of the folder `root`.
    Pass `records` (from load_records) to avoid scanning the folder again for each split."""
    if records is None:
        records = load_records(root, config.val_fraction)
    return CaptionedImageDataset(filter_split(records, split), config.image_size, tokenize, config.background_rgb,
                                 memory_cache_mb=config.memory_cache_mb)
