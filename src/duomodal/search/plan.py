"""Planning an index run: walk the root, compare with the store, decide what to do with each file.

A file whose size and mtime match its row is unchanged. Other files are hashed (sha256): the same
hash as its row -> only the facts are refreshed; a hash indexed under a path that no longer exists
-> a move (the row takes the new path, keeping its id and vector); a hash indexed under a live path
-> a copy (its vector is reused); anything else goes into the store's ``pending`` table to be
embedded. Rows whose file is gone are removed. Every change is committed per chunk of files.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from duomodal.data.images import is_image_path
from duomodal.files import file_sha256
from duomodal.search.store import MetadataStore, NewImage, PendingFile

CAPTION_MANIFEST = "captions.jsonl"
MAX_CAPTION_CHARS = 1000
_SCAN_CHUNK = 256

SkipCallback = Callable[[str, str], None]


@dataclass
class BuildReport:
    root: Path
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


def iter_image_files(root: Path, exclude: Path | None = None) -> Iterator[tuple[str, Path]]:
    """(path relative to root with '/' separators, absolute path) of every image file, sorted.

    Hidden files and directories (name starting with '.') and `exclude` are left out; symlinked
    directories are not followed.
    """
    exclude = exclude.resolve() if exclude is not None else None
    for directory, dirs, files in os.walk(root):
        current = Path(directory)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and (current / d).resolve() != exclude)
        for name in sorted(files):
            if name.startswith(".") or not is_image_path(name):
                continue
            path = current / name
            yield path.relative_to(root).as_posix(), path


def read_caption_manifest(root: Path) -> dict[str, str]:
    """First caption per file from ROOT/captions.jsonl (lines of {"file": ..., "caption": str | [str]})."""
    path = root / CAPTION_MANIFEST
    captions: dict[str, str] = {}
    if not path.is_file():
        return captions
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(row, dict) or not isinstance(row.get("file"), str):
                continue
            caption = row.get("caption")
            if isinstance(caption, list):
                caption = next((c for c in caption if isinstance(c, str) and c.strip()), None)
            if isinstance(caption, str) and caption.strip():
                captions[Path(row["file"]).as_posix()] = caption.strip()[:MAX_CAPTION_CHARS]
    return captions


def _caption(path: Path, relative: str, manifest: dict[str, str]) -> str | None:
    if relative in manifest:
        return manifest[relative]
    sidecar = path.with_suffix(".txt")
    try:
        with open(sidecar, encoding="utf-8-sig", errors="replace") as f:
            for line in f:
                if line.strip():
                    return line.strip()[:MAX_CAPTION_CHARS]
    except OSError:
        return None
    return None


def skip_file(report: BuildReport, on_skip: SkipCallback | None, path: str, reason: str) -> None:
    report.skipped.append((path, reason))
    if on_skip is not None:
        on_skip(path, reason)


def plan_run(
    store: MetadataStore,
    root: Path,
    index_dir: Path,
    report: BuildReport,
    on_skip: SkipCallback | None,
    progress: bool,
) -> None:
    manifest = read_caption_manifest(root)
    store.clear_pending()
    files = iter_image_files(root, exclude=index_dir)
    bar = tqdm(desc="scanning", unit="file", disable=not progress)
    while True:
        chunk = [item for _, item in zip(range(_SCAN_CHUNK), files)]
        if not chunk:
            break
        _plan_chunk(store, root, chunk, manifest, report, on_skip)
        report.scanned += len(chunk)
        bar.update(len(chunk))
    bar.close()
    _remove_missing(store, root, index_dir, report)


def _plan_chunk(
    store: MetadataStore,
    root: Path,
    chunk: list[tuple[str, Path]],
    manifest: dict[str, str],
    report: BuildReport,
    on_skip: SkipCallback | None,
) -> None:
    rows = store.by_paths([relative for relative, _ in chunk])
    pending = []
    with store.transaction() as db:
        for relative, path in chunk:
            try:
                stat = path.stat()
            except OSError as e:
                skip_file(report, on_skip, relative, f"cannot read file ({e.strerror or e})")
                continue
            caption = _caption(path, relative, manifest)
            row = rows.get(relative)
            if row is not None and row.size == stat.st_size and row.mtime_ns == stat.st_mtime_ns:
                report.unchanged += 1
                if row.caption != caption:
                    db.execute("UPDATE images SET caption = ? WHERE id = ?", (caption, row.id))
                continue
            try:
                sha256 = file_sha256(path)
            except OSError as e:
                skip_file(report, on_skip, relative, f"cannot read file ({e.strerror or e})")
                continue
            if row is not None and row.sha256 == sha256:
                db.execute(
                    "UPDATE images SET size = ?, mtime_ns = ?, caption = ? WHERE id = ?",
                    (stat.st_size, stat.st_mtime_ns, caption, row.id),
                )
                report.refreshed += 1
                continue
            donors = [r for r in store.by_sha256(sha256) if r.path != relative]
            gone = next((r for r in donors if not (root / r.path).is_file()), None)
            if gone is not None and row is None:
                db.execute(
                    "UPDATE images SET path = ?, size = ?, mtime_ns = ?, caption = ? WHERE id = ?",
                    (relative, stat.st_size, stat.st_mtime_ns, caption, gone.id),
                )
                report.moved += 1
            elif donors:
                donor = donors[0]
                vector = np.frombuffer(store.vector_blob(donor.id), dtype="<f4")
                image = NewImage(
                    relative, sha256, stat.st_size, stat.st_mtime_ns, donor.width, donor.height, caption, vector
                )
                store.upsert(db, image)
                report.reused += 1
            else:
                pending.append(PendingFile(relative, sha256, stat.st_size, stat.st_mtime_ns, caption))
    if pending:
        store.add_pending(pending)


def _remove_missing(store: MetadataStore, root: Path, index_dir: Path, report: BuildReport) -> None:
    """Delete the rows whose file is gone (or is no longer an indexable image)."""
    index_dir = index_dir.resolve()
    gone: list[int] = []
    for row in store.iter_rows():
        path = root / row.path
        if not path.is_file() or not is_image_path(path) or path.resolve().is_relative_to(index_dir):
            gone.append(row.id)
    for start in range(0, len(gone), 500):
        chunk = gone[start : start + 500]
        with store.transaction() as db:
            db.execute(f"DELETE FROM images WHERE id IN ({','.join('?' * len(chunk))})", chunk)
    report.removed += len(gone)
