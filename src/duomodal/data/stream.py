"""Streaming a split of WebDataset shards for training: each rank and each dataloader worker reads
its own shards, front to back, with bounded memory.

In epoch e the shards of the split are put in an order seeded by (seed, e); rank r of R takes every
R-th shard of that order and, within the rank, dataloader worker w of W every W-th of those. A
worker reads its shards one after another through a shuffle buffer of `shuffle_buffer` samples and
yields micro-batches; with each micro-batch go the shards it finished (every sample of them has
left the buffer). A checkpoint keeps the finished shards of the epoch, so a resumed run reads the
others: it goes on at a shard boundary (the samples of shards in flight are read again).

Items are those of ``CaptionedImageDataset`` ({"image", "caption", "tokens", "index"}), or None
for a sample whose image cannot be used: the batch collation drops and counts it, and the first
time a worker meets it, it logs why.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from duomodal.data.dataset import Tokenize
from duomodal.data.images import DEFAULT_MAX_PIXELS, WHITE, ImageError, load_image_bytes, to_tensor
from duomodal.data.records import Problem
from duomodal.data.shards import ShardSample, ShardSet, is_shard_source, open_shards, stream_shard

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamPosition:
    """Where a rank is in the stream: the epoch and the shards of it already finished."""

    epoch: int = 0
    done: frozenset[int] = frozenset()

    def to_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "done": sorted(self.done)}

    @classmethod
    def from_dict(cls, value: dict[str, Any]) -> StreamPosition:
        return cls(int(value["epoch"]), frozenset(int(i) for i in value["done"]))


@dataclass(frozen=True)
class StreamBatch:
    items: list[dict[str, Any] | None]  # micro_batch items; None where a sample could not be used
    finished: list[int]  # shards (indices into the split's shard list) finished with this batch


class ShardStream(IterableDataset):
    """One epoch of this rank's share of a split's shards, as micro-batches of items (see the module)."""

    def __init__(
        self,
        shards: ShardSet,
        split: str,
        count: int,
        image_size: int,
        tokenize: Tokenize | None = None,
        background: tuple[int, int, int] = WHITE,
        val_fraction: float = 0.05,
        transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        shuffle_buffer: int = 256,
    ):
        self.shards, self.split, self.count = shards, split, count
        self.urls = shards.urls_for(split)
        if not self.urls:
            raise ValueError(f"{shards.spec} has no shards of the {split!r} split")
        self.image_size, self.tokenize, self.background = image_size, tokenize, background
        self.val_fraction, self.transform, self.max_pixels = val_fraction, transform, max_pixels
        self.shuffle_buffer = shuffle_buffer
        # what the next iteration reads, set in one call by `start_epoch`
        self.seed, self.rank, self.world_size, self.micro_batch = 0, 0, 1, 1
        self.position = StreamPosition()

    def start_epoch(self, position: StreamPosition, *, seed: int, rank: int, world_size: int,
                    micro_batch: int) -> None:
        """What the next iteration reads: the shards of `position`'s epoch that it has not finished,
        rank `rank` of `world_size`'s share of them in the order `seed` gives, as micro-batches of
        `micro_batch` items. The batch stream calls it before each epoch; a stream never told reads
        epoch 0 as rank 0 of 1 with seed 0, one item a batch."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        if micro_batch < 1:
            raise ValueError(f"micro_batch must be at least 1, got {micro_batch}")
        self.seed, self.rank, self.world_size, self.micro_batch = seed, rank, world_size, micro_batch
        self.position = position

    def __len__(self) -> int:
        """Samples of the split (what the checks on batch sizes use)."""
        return self.count

    def shard_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.urls)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def rank_shards(self, epoch: int) -> list[int]:
        """The shards rank `self.rank` reads in `epoch` (before removing the finished ones)."""
        return self.shard_order(epoch)[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[StreamBatch]:
        worker = get_worker_info()
        worker_id, workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        epoch, done = self.position.epoch, self.position.done
        mine = [s for j, s in enumerate(self.rank_shards(epoch)) if j % workers == worker_id and s not in done]
        rng = random.Random(hash((self.seed, epoch, self.rank, worker_id)))
        buffer: list[tuple[int, dict[str, Any] | None]] = []
        outstanding: dict[int, int] = {}
        ended: set[int] = set()
        finished: list[int] = []
        batch: list[dict[str, Any] | None] = []

        def release() -> Iterator[StreamBatch]:
            shard, item = buffer.pop(rng.randrange(len(buffer)))
            outstanding[shard] -= 1
            if shard in ended and outstanding[shard] == 0:
                finished.append(shard)
            batch.append(item)
            if len(batch) == self.micro_batch:
                yield StreamBatch(batch[:], finished[:])
                batch.clear()
                finished.clear()

        for shard in mine:
            outstanding[shard] = 0
            for number, sample in enumerate(stream_shard(self.urls[shard], self.val_fraction)):
                if isinstance(sample, Problem):
                    log.warning("skipping %s", sample)
                    continue
                if sample.split != self.split:
                    continue
                # an item's randomness (caption choice, augmentation) comes from (seed, epoch, shard, number)
                with torch.random.fork_rng(devices=[]):
                    seed = (self.seed * 1_000_003 + epoch * 10_007 + shard * 65_537 + number) % (2**63)
                    torch.default_generator.manual_seed(seed)
                    item = self._item(sample)
                buffer.append((shard, item))
                outstanding[shard] += 1
                if len(buffer) > self.shuffle_buffer:
                    yield from release()
            ended.add(shard)
            if outstanding[shard] == 0:
                finished.append(shard)
        while buffer:
            yield from release()
        if finished:  # the last partial micro-batch is dropped (as a sampler's drop_last), its shards are done
            yield StreamBatch([], finished[:])

    def _item(self, sample: ShardSample) -> dict[str, Any] | None:
        try:
            image = load_image_bytes(sample.image, sample.where, self.background, self.max_pixels)
        except ImageError as e:
            log.warning("skipping %s", e)
            return None
        caption = sample.captions[int(torch.randint(len(sample.captions), ()))]
        item: dict[str, Any] = {"image": to_tensor(image, self.image_size), "caption": caption, "index": -1}
        if self.tokenize is not None:
            item["tokens"] = torch.as_tensor(self.tokenize(caption), dtype=torch.long)  # (T,)
        return self.transform(item) if self.transform is not None else item


def training_stream(
    data: str,
    train_count: int,
    image_size: int,
    tokenize: Tokenize | None = None,
    background: tuple[int, int, int] = WHITE,
    val_fraction: float = 0.05,
    transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> ShardStream | None:
    """The streamed "train" split of `data` when it names shards (`train_count` samples); None for a folder."""
    if not is_shard_source(data):
        return None
    return ShardStream(open_shards(data), "train", train_count, image_size, tokenize, background, val_fraction,
                       transform)
