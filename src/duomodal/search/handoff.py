"""Sharded index builds under torchrun, and the hand-off files ranks pass their work to rank 0 in.

Rank r embeds every world_size-th pending file and writes each batch to
``INDEX_DIR/shards/<run>-r<rank>-<n>.safetensors`` (vectors + the files' facts as JSON metadata,
written atomically). Rank 0 merges hand-off files into the store after a barrier, and at the start
of a run merges any left by an interrupted one; merging is idempotent (an upsert by path).
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch.distributed as dist
from safetensors import safe_open
from safetensors.numpy import save

from duomodal.files import atomic_write_bytes
from duomodal.launch import launch_info
from duomodal.search.store import IndexStoreError, MetadataStore, NewImage

HANDOFF_DIR = "shards"  # the folder's name on disk, kept from the first format


@dataclass(frozen=True)
class Distributed:
    """Where this process sits in a torchrun launch (rank 0 of 1 when not launched by it)."""

    rank: int = 0
    world_size: int = 1
    owns_group: bool = False  # this object started the process group (and so ends it in `close`)

    @classmethod
    def from_env(cls) -> Distributed:
        if not launch_info().distributed:
            return cls()
        owns = not dist.is_initialized()
        if owns:
            # rank 0 plans (hashes new files) while the others wait: allow a long wait
            dist.init_process_group("gloo", timeout=datetime.timedelta(hours=12))
        return cls(dist.get_rank(), dist.get_world_size(), owns)

    def close(self) -> None:
        """Wait for every rank, then end the process group if this object started it: no rank leaves
        before rank 0 has merged."""
        if self.world_size == 1 or not self.owns_group:
            return
        dist.barrier()
        dist.destroy_process_group()

    def broadcast(self, value: Any) -> Any:
        """Rank 0's `value` on every rank (a barrier too)."""
        if self.world_size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value: Any) -> list[Any]:
        """Every rank's `value` (on every rank)."""
        if self.world_size == 1:
            return [value]
        values: list[Any] = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values


def write_records(store: MetadataStore, records: list[NewImage], done_paths: list[str]) -> None:
    """Write embedded images and drop them (and the skipped ones) from pending: one transaction."""
    with store.transaction() as db:
        for record in records:
            store.upsert(db, record)
        if done_paths:
            db.execute(f"DELETE FROM pending WHERE path IN ({','.join('?' * len(done_paths))})", done_paths)


def write_handoff(index_dir: Path, name: str, records: list[NewImage]) -> None:
    """One rank's embedded batch as INDEX_DIR/shards/<name>.safetensors, written atomically."""
    facts = [[r.path, r.sha256, r.size, r.mtime_ns, r.width, r.height, r.caption] for r in records]
    data = save({"vectors": np.stack([r.vector for r in records])}, metadata={"records": json.dumps(facts)})
    atomic_write_bytes(index_dir / HANDOFF_DIR / f"{name}.safetensors", data)


def merge_handoffs(store: MetadataStore, index_dir: Path, dim: int) -> int:
    """Write every hand-off file's images into the store (idempotent), then delete the file."""
    merged = 0
    for path in sorted((index_dir / HANDOFF_DIR).glob("*.safetensors")):
        with safe_open(str(path), framework="np") as f:
            vectors = f.get_tensor("vectors")
            facts = json.loads(f.metadata()["records"])
        if vectors.shape != (len(facts), dim):
            expected = (len(facts), dim)
            raise IndexStoreError(f"hand-off file {path} holds vectors of shape {vectors.shape}, expected {expected}")
        records = [NewImage(*fact, vector=vector) for fact, vector in zip(facts, vectors)]
        write_records(store, records, [r.path for r in records])
        path.unlink()
        merged += len(records)
    return merged
