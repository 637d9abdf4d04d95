"""The order and batching of training data: seeded per epoch, sharded per rank, resumable."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from duomodal.data.stream import ShardStream, StreamBatch, StreamPosition
from duomodal.train.distributed import DistInfo
from duomodal.train.task import TrainTask


class SeededItems(Dataset):
    """Item i of epoch e draws its randomness from a generator seeded with (seed, e, i), so an
    item is the same whatever the worker, the process count or an interruption."""

    def __init__(self, dataset: Dataset, seed: int, epoch: int):
        self.dataset, self.seed, self.epoch = dataset, seed, epoch

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        # items draw on the CPU generator only; torch.manual_seed would also queue a (lazy) seed for every
        # CUDA device and record a stack trace each time, which costs more than the item itself
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed((self.seed * 1_000_003 + self.epoch * 10_007 + int(index)) % (2**63))
            return self.dataset[index]


class DropNone:
    """Collate the readable items; report how many were kept and dropped (unreadable -> None)."""

    def __init__(self, collate: Any):
        self.collate = collate

    def __call__(self, items: list[Any]) -> tuple[Any, int, int]:
        kept = [item for item in items if item is not None]
        batch = self.collate(kept) if kept else None
        return batch, len(kept), len(items) - len(kept)


_EPOCH_END = object()  # what a loader's iterator gives after its last batch


class _MicroBatches:
    """Endless micro-batches of this rank's share, epoch after epoch: what the two batch streams share.

    A stream opens one epoch's loader at a time (`_open`), takes each loader output into its position
    (`_take`: the batch, items kept, items dropped) and is told when an epoch ends (`_end_epoch`);
    `next` skips the micro-batches whose items were all unreadable, counting them."""

    def __init__(self, dataset: Dataset, task: TrainTask, micro_batch: int, info: DistInfo,
                 seed: int, num_workers: int):
        self.dataset, self.task, self.micro_batch, self.info = dataset, task, micro_batch, info
        self.seed, self.num_workers = seed, num_workers
        self._iterator: Iterator | None = None

    def _open(self) -> Iterator:
        raise NotImplementedError

    def _take(self, output: Any) -> tuple[Any, int, int]:
        raise NotImplementedError

    def _end_epoch(self) -> None:
        raise NotImplementedError

    def next(self) -> tuple[Any, int, int]:
        """(batch, kept, dropped); a micro-batch whose items were all unreadable is skipped (and counted)."""
        dropped_total = 0
        while True:
            if self._iterator is None:
                self._iterator = self._open()
            output = next(self._iterator, _EPOCH_END)
            if output is _EPOCH_END:
                self._iterator = None
                self._end_epoch()
                continue
            batch, kept, dropped = self._take(output)
            dropped_total += dropped
            if kept:
                return batch, kept, dropped_total


class BatchStream(_MicroBatches):
    """Endless micro-batches of this rank's shard of a dataset, epoch after epoch, from (epoch, position)."""

    def __init__(self, dataset: Dataset, task: TrainTask, micro_batch: int, info: DistInfo,
                 seed: int, num_workers: int, epoch: int = 0, position: int = 0):
        super().__init__(dataset, task, micro_batch, info, seed, num_workers)
        self.epoch, self.position = epoch, position

    def batches_per_epoch(self) -> int:
        return (len(self.dataset) // self.info.world_size) // self.micro_batch  # type: ignore[arg-type]

    def _open(self) -> Iterator:
        sampler = DistributedSampler(
            self.dataset, num_replicas=self.info.world_size, rank=self.info.rank,
            shuffle=True, seed=self.seed, drop_last=True,
        )
        sampler.set_epoch(self.epoch)
        indices = list(sampler)[: self.batches_per_epoch() * self.micro_batch]
        order = getattr(self.task, "order_epoch", None)  # a task may arrange its rank's share into batches
        if order is not None:
            indices = order(indices, self.micro_batch, torch.Generator().manual_seed(self.seed * 7919 + self.epoch))
        loader = DataLoader(
            SeededItems(self.dataset, self.seed, self.epoch),
            batch_size=self.micro_batch,
            sampler=indices[self.position * self.micro_batch:],
            collate_fn=DropNone(self.task.collate),
            num_workers=self.num_workers,
            generator=torch.Generator().manual_seed(self.seed + self.epoch),
            pin_memory=self.info.device.type == "cuda",
        )
        return iter(loader)

    def _take(self, output: tuple[Any, int, int]) -> tuple[Any, int, int]:
        self.position += 1
        return output

    def _end_epoch(self) -> None:
        self.epoch += 1
        self.position = 0


def grouped_order(indices: list[int], groups: list[Any], micro_batch: int, fraction: float,
                  generator: torch.Generator) -> list[int]:
    """`indices` (an epoch's shuffled share) rearranged so that about `fraction` of its micro-batches each
    hold items of one group only (`groups[i]`: the group of item i), the rest mixed as they came.

    The grouped items keep their shuffled order within each group; the batches are then shuffled, so
    grouped and mixed batches alternate at random. Every index stays exactly once.
    """
    count = len(indices) // micro_batch * micro_batch
    if micro_batch < 2 or fraction <= 0 or count == 0:
        return indices
    cut = round(count * min(fraction, 1.0)) // micro_batch * micro_batch
    grouped, mixed = indices[:cut], indices[cut:]
    by_group: dict[Any, list[int]] = {}
    for index in grouped:
        by_group.setdefault(groups[index], []).append(index)
    runs = [index for members in by_group.values() for index in members]  # one run per group
    # cut into batches: a batch straddling two groups' runs is the only mixed one per group boundary
    batches = [runs[i : i + micro_batch] for i in range(0, len(runs), micro_batch)]
    batches += [mixed[i : i + micro_batch] for i in range(0, len(mixed), micro_batch)]
    order = torch.randperm(len(batches), generator=generator).tolist()
    return [index for b in order for index in batches[b]]


class _CollateStream:
    """Collate a StreamBatch in the worker: (batch or None, kept, dropped, finished shards)."""

    def __init__(self, collate: Any):
        self.drop_none = DropNone(collate)

    def __call__(self, batch: StreamBatch) -> tuple[Any, int, int, list[int]]:
        if not batch.items:
            return None, 0, 0, batch.finished
        return (*self.drop_none(batch.items), batch.finished)


class ShardBatchStream(_MicroBatches):
    """BatchStream's twin for a ShardStream: endless micro-batches of this rank's shards, epoch after
    epoch; `position` (a dict: epoch and finished shards) goes into checkpoints, and a stream made
    with it goes on from the next unfinished shard."""

    dataset: ShardStream

    def __init__(self, dataset: ShardStream, task: TrainTask, micro_batch: int, info: DistInfo,
                 seed: int, num_workers: int, position: dict[str, Any] | None = None):
        super().__init__(dataset, task, micro_batch, info, seed, num_workers)
        self._position = StreamPosition.from_dict(position) if position else StreamPosition()
        self._kept_in_epoch = False

    @property
    def epoch(self) -> int:
        return self._position.epoch

    @property
    def position(self) -> dict[str, Any]:
        return self._position.to_dict()

    @staticmethod
    def merge(positions: list[dict[str, Any]]) -> dict[str, Any]:
        """One position from the ranks' positions of a run with another process count: the earliest
        epoch, and the shards finished in it by any rank."""
        parsed = [StreamPosition.from_dict(p) for p in positions]
        epoch = min(p.epoch for p in parsed)
        done = frozenset().union(*(p.done for p in parsed if p.epoch == epoch))
        return StreamPosition(epoch, done).to_dict()

    def _open(self) -> Iterator:
        stream = self.dataset
        stream.start_epoch(self._position, seed=self.seed, rank=self.info.rank, world_size=self.info.world_size,
                           micro_batch=self.micro_batch)
        self._kept_in_epoch = False
        workers = min(self.num_workers, max(1, len(stream.rank_shards(self._position.epoch))))
        loader = DataLoader(stream, batch_size=None, collate_fn=_CollateStream(self.task.collate),
                            num_workers=workers if self.num_workers else 0,
                            pin_memory=self.info.device.type == "cuda")
        return iter(loader)

    def _take(self, output: tuple[Any, int, int, list[int]]) -> tuple[Any, int, int]:
        batch, kept, dropped, finished = output
        self._position = StreamPosition(self._position.epoch, self._position.done | frozenset(finished))
        self._kept_in_epoch = self._kept_in_epoch or kept > 0
        return batch, kept, dropped

    def _end_epoch(self) -> None:
        if not self._kept_in_epoch and not self._position.done:  # a whole epoch, nothing usable
            raise ValueError(
                f"rank {self.info.rank} read a whole epoch of {self.dataset.shards.spec} without one "
                "usable micro-batch; give each process more shards or lower train.batch_size"
            )
        self._position = StreamPosition(self._position.epoch + 1)


def make_batch_stream(dataset: Dataset, task: TrainTask, micro_batch: int, info: DistInfo, seed: int,
                      num_workers: int, epoch: int = 0, position: Any = 0) -> BatchStream | ShardBatchStream:
    """The batch stream for a training set: a ShardStream streams, any other dataset is sampled."""
    if isinstance(dataset, ShardStream):
        return ShardBatchStream(dataset, task, micro_batch, info, seed, num_workers,
                                position if isinstance(position, dict) else None)
    return BatchStream(dataset, task, micro_batch, info, seed, num_workers, epoch, position)


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


class ValBatches:
    """The validation micro-batches of `dataset` on `device`, at most `limit` of them (0: all), for one
    pass; `dropped` counts the unreadable items left out so far (all of them once the pass is done)."""

    def __init__(self, dataset: Dataset, task: TrainTask, batch_size: int, limit: int, device: torch.device):
        self.dataset, self.task, self.batch_size, self.limit, self.device = dataset, task, batch_size, limit, device
        self.dropped = 0

    def __iter__(self) -> Iterator[Any]:
        loader = DataLoader(self.dataset, batch_size=self.batch_size, shuffle=False,
                            collate_fn=DropNone(self.task.collate))
        for i, (batch, kept, dropped) in enumerate(loader):
            if self.limit and i >= self.limit:
                break
            self.dropped += dropped
            if kept:
                yield to_device(batch, self.device)
