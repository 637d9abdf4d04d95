"""`duomodal data pack`: a folder dataset written as WebDataset shards, one series per split."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from duomodal.data.profile import SUMMARY_FILE
from duomodal.data.records import SPLITS, DatasetError, load_records
from duomodal.data.shards import MANIFEST_VERSION, SHARD_MANIFEST, is_shard_source
from duomodal.files import atomic_write_text


def pack_dataset(source: str | os.PathLike, out: str | os.PathLike, shard_size: int = 1000,
                 val_fraction: float = 0.05, on_skip: Callable[[str, str], None] | None = None) -> dict[str, Any]:
    """Write the captioned images of the folder dataset `source` as shards in `out`, one series per
    split (``train-000000.tar``...), each sample's split, captions and labels in its ``.json``, then
    ``shards.json`` (and an icon dataset's ``dataset.json``). Images are copied byte for byte (not decoded; `duomodal data check` checks
    them); a file that cannot be read is skipped (`on_skip(path, reason)`) and counted. Every shard
    is written atomically and ``shards.json`` last, so an interrupted pack leaves no half shard and
    is simply run again. Returns counts per split, shards per split and skipped."""
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard size must be a positive integer, got {shard_size!r}")
    if is_shard_source(source):
        raise DatasetError(f"{source} is already shards; `duomodal data pack` reads a folder dataset")
    source, out = Path(source).absolute(), Path(out).absolute()
    if out == source or out.is_relative_to(source):
        raise DatasetError(f"{out} is inside the dataset folder {source}; write the shards elsewhere")
    records = load_records(source, val_fraction)
    out.mkdir(parents=True, exist_ok=True)
    names: dict[str, list[str]] = {}
    counts: dict[str, int] = {}
    skipped: list[tuple[str, str]] = []
    number = 0
    for split in SPLITS:
        writer = _ShardSeries(out, split, shard_size)
        for record in (r for r in records if r.split == split):
            relative = record.path.relative_to(source).as_posix()
            try:
                data = record.path.read_bytes()
            except OSError as e:
                skipped.append((relative, f"cannot read file ({e.strerror or e})"))
                if on_skip is not None:
                    on_skip(*skipped[-1])
                continue
            ext = record.path.suffix.lower().lstrip(".")
            meta = {"file": relative, "caption": list(record.captions), "split": split, "labels": record.labels}
            writer.add(f"{number:09d}", {ext: data, "txt": "\n".join(record.captions).encode() + b"\n",
                                         "json": json.dumps(meta, ensure_ascii=False, sort_keys=True).encode()})
            number += 1
        names[split], counts[split] = writer.close(), writer.count
    manifest = {"version": MANIFEST_VERSION, "source": str(source), "shard_size": shard_size,
                "splits": {s: n for s, n in names.items() if n}, "counts": {s: c for s, c in counts.items() if c}}
    if (source / SUMMARY_FILE).is_file():  # an icon dataset's summary (its palette): evaluation reads it
        atomic_write_text(out / SUMMARY_FILE, (source / SUMMARY_FILE).read_text(encoding="utf-8"))
    atomic_write_text(out / SHARD_MANIFEST, json.dumps(manifest, indent=2) + "\n")
    listed = {n for series in names.values() for n in series}
    for stale in out.glob("*-[0-9][0-9][0-9][0-9][0-9][0-9].tar"):  # left by an earlier, larger pack
        if stale.name not in listed:
            stale.unlink()
    return {"out": str(out), "counts": counts, "shards": {s: len(n) for s, n in names.items()}, "skipped": skipped}


class _ShardSeries:
    """``SPLIT-000000.tar``, ``SPLIT-000001.tar``... of at most `shard_size` samples, each written to a
    temporary file and renamed when complete."""

    def __init__(self, out: Path, split: str, shard_size: int):
        self.out, self.split, self.shard_size = out, split, shard_size
        self.names: list[str] = []
        self.count = 0
        self._writer = None
        self._file = None
        self._in_shard = 0

    def add(self, key: str, members: dict[str, bytes]) -> None:
        # webdataset (the shards extra) loads here: folder datasets work without it
        import webdataset

        if self._writer is None:
            name = f"{self.split}-{len(self.names):06d}.tar"
            self._tmp = self.out / f".{name}.{os.getpid()}.tmp"
            self._file = open(self._tmp, "wb")
            # an int mtime: a float one makes tarfile add a pax header to every member (twice the parsing)
            self._writer = webdataset.TarWriter(self._file, encoder=False, mtime=0)
            self.names.append(name)
        self._writer.write({"__key__": key, **members})
        self.count += 1
        self._in_shard += 1
        if self._in_shard == self.shard_size:
            self._finish()

    def _finish(self) -> None:
        self._writer.close()  # ends the tar; the file is ours to close
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._tmp, self.out / self.names[-1])
        self._writer, self._file, self._in_shard = None, None, 0

    def close(self) -> list[str]:
        if self._writer is not None:
            self._finish()
        return self.names
