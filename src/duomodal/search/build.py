"""Building and updating an image index: scan, plan, embed in batches, write, sync faiss.

One run (``build_index`` or ``update_index``; a build of an existing index is an update):

1. plan (rank 0): walk the root; a file whose size and mtime match its row is unchanged; other
   files are hashed: same hash as its row -> only the facts are refreshed; a hash already indexed
   under a path that no longer exists -> a move (the row takes the new path, same id, no
   embedding); a hash indexed under a live path -> a copy (its vector is reused); anything else
   goes into the store's ``pending`` table. Rows whose file is gone are removed.
2. embed: pending files are loaded and embedded ``batch_size`` at a time. A single process writes
   each batch in one SQLite transaction (and removes it from ``pending`` in the same one). Under
   ``torchrun`` rank r embeds every world_size-th pending file and writes shard files
   (``shards/*.safetensors``, atomic); after a barrier rank 0 merges them.
3. sync: rank 0 brings the faiss file up to date with the store (``index.sync_faiss``).

An interruption anywhere leaves the store consistent (every write is one transaction; shards are
written atomically and merged idempotently); the next run plans again and finishes the work.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from duomodal import __version__
from duomodal.data.images import ImageError, is_image_path, load_image
from duomodal.data.scan import file_sha256
from duomodal.search.index import (
    INDEX_TYPES,
    FaissParams,
    IndexLock,
    sync_faiss,
)
from duomodal.search.query import Embedder
from duomodal.search.store import (
    IndexStoreError,
    MetadataStore,
    ModelMismatchError,
    NewImage,
    PendingFile,
)

SHARD_DIR = "shards"
CAPTION_MANIFEST = "captions.jsonl"
MAX_CAPTION_CHARS = 1000
_SCAN_CHUNK = 256

SkipCallback = Callable[[str, str], None]


@dataclass(frozen=True)
class BuildOptions:
    index_type: str = "auto"  # "auto" (flat up to AUTO_EXACT_MAX vectors, else hnsw) | "flat" | "hnsw" | "ivf"
    batch_size: int = 64  # images per embedding call
    faiss: FaissParams = field(default_factory=FaissParams)

    def __post_init__(self):
        if self.index_type not in ("auto", *INDEX_TYPES):
            raise ValueError(f"index type {self.index_type!r} is not one of auto, {', '.join(INDEX_TYPES)}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or not 1 <= self.batch_size <= 4096:
            raise ValueError(f"batch size must be an integer from 1 to 4096, got {self.batch_size!r}")


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
    seconds: float = 0.0


@dataclass(frozen=True)
class Distributed:
    """Where this process sits in a torchrun launch (rank 0 of 1 when not launched by it)."""

    rank: int = 0
    world_size: int = 1

    @classmethod
    def from_env(cls) -> Distributed:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size <= 1:
            return cls()
        import torch.distributed as dist

        if not dist.is_initialized():
            # rank 0 plans (hashes new files) while the others wait: allow a long wait
            dist.init_process_group("gloo", timeout=datetime.timedelta(hours=12))
        return cls(dist.get_rank(), dist.get_world_size())

    def broadcast(self, value: Any) -> Any:
        """Rank 0's `value` on every rank (a barrier too)."""
        if self.world_size == 1:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value: Any) -> list[Any]:
        """Every rank's `value` (on every rank)."""
        if self.world_size == 1:
            return [value]
        import torch.distributed as dist

        values: list[Any] = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values


def build_index(
    root: str | os.PathLike,
    index_dir: str | os.PathLike,
    embedder: Embedder,
    clip_path: str | os.PathLike | None = None,
    options: BuildOptions | None = None,
    on_skip: SkipCallback | None = None,
    progress: bool = True,
) -> BuildReport:
    """Index the images under `root` into `index_dir` (created, or resumed/updated if it exists)."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise IndexStoreError(f"{root} is not a directory of images")
    options = options or BuildOptions()
    meta = {
        "root": str(root),
        "clip_model_id": embedder.model_id,
        "clip_path": str(Path(clip_path).resolve()) if clip_path else "",
        "dim": str(embedder.dim),
        "index_type_option": options.index_type,
        "faiss_params": json.dumps(_params_dict(options.faiss), sort_keys=True),
        "created_by": f"duomodal {__version__}",
    }
    return _run(Path(index_dir), embedder, options, on_skip, progress, create_meta=meta)


def update_index(
    index_dir: str | os.PathLike,
    embedder: Embedder,
    options: BuildOptions | None = None,
    on_skip: SkipCallback | None = None,
    progress: bool = True,
) -> BuildReport:
    """Bring an existing index up to date with its root. `options` None keeps the recorded ones."""
    return _run(Path(index_dir), embedder, options, on_skip, progress, create_meta=None)


def _params_dict(params: FaissParams) -> dict[str, int]:
    return dataclasses.asdict(params)


def _run(
    index_dir: Path,
    embedder: Embedder,
    options: BuildOptions | None,
    on_skip: SkipCallback | None,
    progress: bool,
    create_meta: dict[str, str] | None,
) -> BuildReport:
    started = time.perf_counter()
    dist = Distributed.from_env()
    lock = None
    error = None
    root = None
    report = None
    if dist.rank == 0:
        try:
            if create_meta is None:
                MetadataStore.open(index_dir).close()  # a clear error when there is no index
            index_dir.mkdir(parents=True, exist_ok=True)
            lock = IndexLock(index_dir)
            store = _open_for_run(index_dir, embedder, options, create_meta)
            root = Path(store.get_meta("root"))
            report = BuildReport(root, index_dir)
            _merge_shards(store, index_dir, embedder.dim)
            _plan(store, root, index_dir, report, on_skip, progress)
            store.close()
        except (ValueError, OSError) as e:
            error = (type(e).__name__, str(e))
            if lock is not None:
                lock.release()
            if dist.world_size == 1:
                raise
    error, root = dist.broadcast((error, root))
    if error is not None:
        raise IndexStoreError(error[1])
    if report is None:
        report = BuildReport(root, index_dir)
    try:
        store = MetadataStore.open(index_dir)
        try:
            _embed_pending(store, root, index_dir, embedder, (options or BuildOptions()).batch_size, dist, report, on_skip, progress)
        finally:
            store.close()
        shares = dist.gather((report.embedded, report.reused, report.skipped))  # a barrier: shards are written
        if dist.rank == 0:
            if dist.world_size > 1:
                report.embedded = sum(share[0] for share in shares)
                report.reused += sum(share[1] for share in shares[1:])
                report.skipped = [s for share in shares for s in share[2]]
            store = MetadataStore.open(index_dir)
            try:
                _merge_shards(store, index_dir, embedder.dim)
                store.clear_pending()
                bar = tqdm if progress else None
                faiss_index = sync_faiss(store, index_dir, writable=True, progress=bar)
                report.count = int(faiss_index.ntotal)
                report.index_type = store.get_meta("index_type") or ""
            finally:
                store.close()
    finally:
        if lock is not None:
            lock.release()
    report.seconds = time.perf_counter() - started
    return report


def _open_for_run(
    index_dir: Path, embedder: Embedder, options: BuildOptions | None, create_meta: dict[str, str] | None
) -> MetadataStore:
    store = MetadataStore.create(index_dir, create_meta) if create_meta else MetadataStore.open(index_dir)
    meta = store.meta()
    if create_meta and meta["root"] != create_meta["root"]:
        store.close()
        raise IndexStoreError(
            f"{index_dir} already indexes {meta['root']}, not {create_meta['root']}; "
            "choose another --out, or run 'duomodal index update' on it"
        )
    if meta["clip_model_id"] != embedder.model_id:
        store.close()
        raise ModelMismatchError(
            f"{index_dir} was built with CLIP model {meta['clip_model_id']!r}, not {embedder.model_id!r}; "
            "update it with the same CLIP, or build a new index with this one"
        )
    if int(meta["dim"]) != embedder.dim:
        store.close()
        raise ModelMismatchError(f"{index_dir} holds {meta['dim']}-d vectors; this CLIP makes {embedder.dim}-d ones")
    if options is not None:
        changes = {
            "index_type_option": options.index_type,
            "faiss_params": json.dumps(_params_dict(options.faiss), sort_keys=True),
        }
        if create_meta and create_meta.get("clip_path"):
            changes["clip_path"] = create_meta["clip_path"]
        store.set_meta(changes)
    return store


# --- planning ------------------------------------------------------------------------------------


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


def _skip(report: BuildReport, on_skip: SkipCallback | None, path: str, reason: str) -> None:
    report.skipped.append((path, reason))
    if on_skip is not None:
        on_skip(path, reason)


def _plan(
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
                _skip(report, on_skip, relative, f"cannot read file ({e.strerror or e})")
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
                _skip(report, on_skip, relative, f"cannot read file ({e.strerror or e})")
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


# --- embedding ----------------------------------------------------------------------------------


def _embed_pending(
    store: MetadataStore,
    root: Path,
    index_dir: Path,
    embedder: Embedder,
    batch_size: int,
    dist: Distributed,
    report: BuildReport,
    on_skip: SkipCallback | None,
    progress: bool,
) -> None:
    total = store.pending_count()
    share = (total - dist.rank + dist.world_size - 1) // dist.world_size
    run_id = uuid.uuid4().hex[:12]
    desc = "embedding" if dist.world_size == 1 else f"embedding (rank {dist.rank})"
    bar = tqdm(total=share, desc=desc, unit="img", disable=not progress)
    for number, files in enumerate(store.iter_pending(dist.rank, dist.world_size, chunk=batch_size)):
        records = _embed_batch(store, root, files, embedder, report, on_skip)
        if dist.world_size == 1:
            _write_records(store, records, [f.path for f in files])
        elif records:
            _write_shard(index_dir, f"{run_id}-r{dist.rank}-{number:06d}", records)
        bar.update(len(files))
    bar.close()


def _embed_batch(
    store: MetadataStore,
    root: Path,
    files: list[PendingFile],
    embedder: Embedder,
    report: BuildReport,
    on_skip: SkipCallback | None,
) -> list[NewImage]:
    """Images for `files`: content already indexed is copied, each new content embedded once."""
    records = []
    first_of: dict[str, int] = {}  # sha256 -> position in `loaded`
    loaded: list[tuple[PendingFile, tuple[int, int]]] = []
    images = []
    copies: list[tuple[PendingFile, int]] = []
    for pending in files:
        donor = next(iter(store.by_sha256(pending.sha256)), None)
        if donor is not None:
            vector = np.frombuffer(store.vector_blob(donor.id), dtype="<f4")
            records.append(_new_image(pending, (donor.width, donor.height), vector))
            report.reused += 1
            continue
        if pending.sha256 in first_of:
            copies.append((pending, first_of[pending.sha256]))
            continue
        try:
            image = load_image(root / pending.path)
        except ImageError as e:
            _skip(report, on_skip, pending.path, e.reason)
            continue
        first_of[pending.sha256] = len(loaded)
        loaded.append((pending, image.size))
        images.append(image)
    if images:
        vectors = _embed(embedder, images)
        records.extend(_new_image(p, size, v) for (p, size), v in zip(loaded, vectors))
        report.embedded += len(images)
        for pending, position in copies:
            records.append(_new_image(pending, loaded[position][1], vectors[position]))
            report.reused += 1
    return records


def _new_image(pending: PendingFile, size: tuple[int, int], vector: np.ndarray) -> NewImage:
    width, height = size
    return NewImage(
        pending.path, pending.sha256, pending.size, pending.mtime_ns, width, height, pending.caption, vector
    )


def _embed(embedder: Embedder, images: list) -> np.ndarray:
    vectors = embedder.embed_images(images)
    if isinstance(vectors, torch.Tensor):
        vectors = vectors.detach().float().cpu().numpy()
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.shape != (len(images), embedder.dim):
        raise IndexStoreError(f"the embedder returned shape {vectors.shape}, expected ({len(images)}, {embedder.dim})")
    if not np.isfinite(vectors).all():
        raise IndexStoreError("the embedder returned NaN or infinite values; check the CLIP model")
    return vectors


def _write_records(store: MetadataStore, records: list[NewImage], done_paths: list[str]) -> None:
    """Write embedded images and drop them (and the skipped ones) from pending: one transaction."""
    with store.transaction() as db:
        for record in records:
            store.upsert(db, record)
        if done_paths:
            db.execute(f"DELETE FROM pending WHERE path IN ({','.join('?' * len(done_paths))})", done_paths)


def _write_shard(index_dir: Path, name: str, records: list[NewImage]) -> None:
    from safetensors.numpy import save

    from duomodal.config import atomic_write_bytes

    facts = [[r.path, r.sha256, r.size, r.mtime_ns, r.width, r.height, r.caption] for r in records]
    data = save({"vectors": np.stack([r.vector for r in records])}, metadata={"records": json.dumps(facts)})
    atomic_write_bytes(index_dir / SHARD_DIR / f"{name}.safetensors", data)


def _merge_shards(store: MetadataStore, index_dir: Path, dim: int) -> int:
    """Write every shard file's images into the store (idempotent), then delete the file."""
    from safetensors import safe_open

    merged = 0
    for path in sorted((index_dir / SHARD_DIR).glob("*.safetensors")):
        with safe_open(str(path), framework="np") as f:
            vectors = f.get_tensor("vectors")
            facts = json.loads(f.metadata()["records"])
        if vectors.shape != (len(facts), dim):
            raise IndexStoreError(f"shard {path} holds vectors of shape {vectors.shape}, expected ({len(facts)}, {dim})")
        records = [NewImage(*fact, vector=vector) for fact, vector in zip(facts, vectors)]
        _write_records(store, records, [r.path for r in records])
        path.unlink()
        merged += len(records)
    return merged
