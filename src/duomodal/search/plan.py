"""Planning an index run: list the source (a folder or shards, see sources.py), compare with the
store, decide what to do with each file.

A file whose size and mtime match its row is unchanged. Other files are hashed (sha256): the same
hash as its row -> only the facts are refreshed; a hash indexed under a path that no longer exists
-> a move (the row takes the new path, keeping its id and vector); a hash indexed under a live path
-> a copy (its vector is reused); anything else goes into the store's ``pending`` table to be
embedded. Rows whose file is gone are removed. Every change is committed per chunk of files.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from duomodal.search.sources import ImageSource, SourceFile, Unreadable
from duomodal.search.store import MetadataStore, NewImage, PendingFile
from duomodal.search.text_index import OcrReport

_SCAN_CHUNK = 256

SkipCallback = Callable[[str, str], None]


@dataclass
class BuildReport:
    root: str  # the folder or shard spec indexed
    index_dir: Path
    scanned: int = 0  # image files seen
    unchanged: int = 0
    embedded: int = 0  # by this process (rank 0 reports all ranks after a sharded run)
    reused: int = 0  # new paths whose content was already indexed: vector copied
    moved: int = 0  # renamed/moved files recognised by content hash: row kept, path updated
    refreshed: int = 0  # same content, new mtime or caption: facts updated
    removed: int = 0  # rows whose file is gone
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    count: int = 0  # images in the index afterwards
    index_type: str = ""
    vector_store: str = "faiss"  # "faiss" or the Milvus store spec
    seconds: float = 0.0
    ocr: OcrReport | None = None  # the OCR pass, when the run read the words in the images


def skip_file(report: BuildReport, on_skip: SkipCallback | None, path: str, reason: str) -> None:
    report.skipped.append((path, reason))
    if on_skip is not None:
        on_skip(path, reason)


def plan_run(
    store: MetadataStore,
    source: ImageSource,
    report: BuildReport,
    on_skip: SkipCallback | None,
    progress: bool,
) -> None:
    store.clear_pending()
    files = source.files()
    bar = tqdm(desc="scanning", unit="file", disable=not progress)
    while True:
        chunk = [item for _, item in zip(range(_SCAN_CHUNK), files)]
        if not chunk:
            break
        _plan_chunk(store, source, chunk, report, on_skip)
        report.scanned += len(chunk)
        bar.update(len(chunk))
    bar.close()
    _remove_missing(store, source, report)


def _plan_chunk(
    store: MetadataStore,
    source: ImageSource,
    chunk: list[SourceFile | Unreadable],
    report: BuildReport,
    on_skip: SkipCallback | None,
) -> None:
    rows = store.by_paths([item.relative for item in chunk])
    pending = []
    with store.transaction() as db:
        for item in chunk:
            if isinstance(item, Unreadable):
                skip_file(report, on_skip, item.relative, item.reason)
                continue
            relative, caption = item.relative, item.caption
            row = rows.get(relative)
            if row is not None and row.size == item.size and row.mtime_ns == item.mtime_ns:
                report.unchanged += 1
                if row.caption != caption:
                    db.execute("UPDATE images SET caption = ? WHERE id = ?", (caption, row.id))
                continue
            try:
                sha256 = source.sha256(relative)
            except OSError as e:
                skip_file(report, on_skip, relative, f"cannot read file ({e.strerror or e})")
                continue
            if row is not None and row.sha256 == sha256:
                db.execute(
                    "UPDATE images SET size = ?, mtime_ns = ?, caption = ? WHERE id = ?",
                    (item.size, item.mtime_ns, caption, row.id),
                )
                report.refreshed += 1
                continue
            donors = [r for r in store.by_sha256(sha256) if r.path != relative]
            gone = next((r for r in donors if not source.exists(r.path)), None)
            if gone is not None and row is None:
                db.execute(
                    "UPDATE images SET path = ?, size = ?, mtime_ns = ?, caption = ? WHERE id = ?",
                    (relative, item.size, item.mtime_ns, caption, gone.id),
                )
                report.moved += 1
            elif donors:
                donor = donors[0]
                vector = np.frombuffer(store.vector_blob(donor.id), dtype="<f4")
                image = NewImage(
                    relative, sha256, item.size, item.mtime_ns, donor.width, donor.height, caption, vector
                )
                store.upsert(db, image)
                report.reused += 1
            else:
                pending.append(PendingFile(relative, sha256, item.size, item.mtime_ns, caption))
    if pending:
        store.add_pending(pending)


def _remove_missing(store: MetadataStore, source: ImageSource, report: BuildReport) -> None:
    """Delete the rows whose file is gone (or is no longer an indexable image)."""
    gone = [row.id for row in store.iter_rows() if not source.exists(row.path)]
    for start in range(0, len(gone), 500):
        chunk = gone[start : start + 500]
        with store.transaction() as db:
            db.execute(f"DELETE FROM images WHERE id IN ({','.join('?' * len(chunk))})", chunk)
    report.removed += len(gone)
