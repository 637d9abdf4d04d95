"""Building and updating an image index: scan, plan, embed in batches, write, sync the vectors.

One run (``build_index`` or ``update_index``; a build of an existing index is an update):

1. plan (rank 0): walk the root; a file whose size and mtime match its row is unchanged; other
   files are hashed: same hash as its row -> only the facts are refreshed; a hash already indexed
   under a path that no longer exists -> a move (the row takes the new path, same id, no
   embedding); a hash indexed under a live path -> a copy (its vector is reused); anything else
   goes into the store's ``pending`` table. Rows whose file is gone are removed.
2. embed: pending files are loaded and embedded ``batch_size`` at a time. A single process writes
   each batch in one SQLite transaction (and removes it from ``pending`` in the same one). Under
   ``torchrun`` rank r embeds every world_size-th pending file and writes hand-off files
   (``shards/*.safetensors``, atomic; see handoff.py); after a barrier rank 0 merges them.
3. sync: rank 0 brings the vector store up to date with the store (``vectors.open_vectors``: the
   faiss file, or the Milvus collection when the index was built with ``store="milvus:..."``).

An interruption anywhere leaves the store consistent (every write is one transaction; hand-off
files are written atomically and merged idempotently); the next run plans again and finishes the work.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from duomodal import __version__
from duomodal.data.images import ImageError
from duomodal.search.index import IndexLock
from duomodal.search.ocr import OcrEngine
from duomodal.search.plan import BuildReport, SkipCallback, plan_run, skip_file
from duomodal.search.query import Embedder
from duomodal.search.handoff import Distributed, merge_handoffs, write_handoff, write_records
from duomodal.search.sources import ImageSource, open_source, resolve_root
from duomodal.search.store import IndexStoreError, MetadataStore, ModelMismatchError, NewImage, PendingFile
from duomodal.search.text_index import read_index_text
from duomodal.search.vectors import INDEX_TYPES, FaissParams, check_vector_store, open_vectors, vector_store_spec

__all__ = ["BuildOptions", "BuildReport", "build_index", "update_index"]


@dataclass(frozen=True)
class BuildOptions:
    index_type: str = "auto"  # "auto" (flat up to AUTO_EXACT_MAX vectors, else hnsw) | "flat" | "hnsw" | "ivf"
    batch_size: int = 64  # images per embedding call
    faiss: FaissParams = field(default_factory=FaissParams)  # also the Milvus index params (same meaning)
    # vector store: "faiss" (a file in the index directory) or a Milvus spec (see vectors/milvus_target.py);
    # None: as recorded in the index (faiss for a new one)
    store: str | None = None

    def __post_init__(self):
        if self.store is not None:
            vector_store_spec(self.store)  # ValueError naming a bad spec
        if self.index_type not in ("auto", *INDEX_TYPES):
            raise ValueError(f"index type {self.index_type!r} is not one of auto, {', '.join(INDEX_TYPES)}")
        size = self.batch_size
        if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= 4096:
            raise ValueError(f"batch size must be an integer from 1 to 4096, got {self.batch_size!r}")


def build_index(
    root: str | os.PathLike,
    index_dir: str | os.PathLike,
    embedder: Embedder,
    clip_path: str | os.PathLike | None = None,
    options: BuildOptions | None = None,
    on_skip: SkipCallback | None = None,
    progress: bool = True,
    ocr: OcrEngine | None = None,
) -> BuildReport:
    """Index the images under `root` (a folder, or local WebDataset shards: a packed folder or a
    pattern) into `index_dir` (created, or resumed/updated if it exists). With `ocr`, the words in
    the images are read too (text_index.py)."""
    root = resolve_root(root)
    options = options or BuildOptions()
    meta = {
        "root": root,
        "clip_model_id": embedder.model_id,
        "clip_path": str(Path(clip_path).resolve()) if clip_path else "",
        "dim": str(embedder.dim),
        "index_type_option": options.index_type,
        "faiss_params": json.dumps(_params_dict(options.faiss), sort_keys=True),
        "created_by": f"duomodal {__version__}",
        "index_id": uuid.uuid4().hex,
        "vector_store": vector_store_spec(options.store or "faiss"),
    }
    return _run(Path(index_dir), embedder, options, on_skip, progress, create_meta=meta, ocr=ocr)


def update_index(
    index_dir: str | os.PathLike,
    embedder: Embedder,
    options: BuildOptions | None = None,
    on_skip: SkipCallback | None = None,
    progress: bool = True,
    ocr: OcrEngine | None = None,
) -> BuildReport:
    """Bring an existing index up to date with its root. `options` None keeps the recorded ones.
    With `ocr`, the words of new and changed images are read (and every image's, for a new engine)."""
    return _run(Path(index_dir), embedder, options, on_skip, progress, create_meta=None, ocr=ocr)


def _params_dict(params: FaissParams) -> dict[str, int]:
    return dataclasses.asdict(params)


def _run(
    index_dir: Path,
    embedder: Embedder,
    options: BuildOptions | None,
    on_skip: SkipCallback | None,
    progress: bool,
    create_meta: dict[str, str] | None,
    ocr: OcrEngine | None = None,
) -> BuildReport:
    started = time.perf_counter()
    dist = Distributed.from_env()
    lock = None
    report = None
    source = None
    if dist.rank == 0:
        try:
            lock, report, source = _prepare(index_dir, embedder, options, create_meta, on_skip, progress)
        except BaseException as e:
            dist.broadcast((f"rank 0 failed: {e}", None))  # let the other ranks stop too
            raise
    error, root = dist.broadcast((None, None if report is None else report.root))
    if error is not None:
        raise IndexStoreError(error)
    report = report or BuildReport(root, index_dir)
    try:
        batch_size = (options or BuildOptions()).batch_size
        source = source or open_source(root, index_dir)  # rank 0 goes on with the source it planned with
        with contextlib.closing(MetadataStore.open(index_dir)) as store:
            _embed_pending(store, source, index_dir, embedder, batch_size, dist, report, on_skip, progress)
        shares = dist.gather((report.embedded, report.reused, report.skipped))  # a barrier: hand-off files are written
        if dist.rank == 0:
            if dist.world_size > 1:
                report.embedded = sum(share[0] for share in shares)
                report.reused += sum(share[1] for share in shares[1:])
                report.skipped = [s for share in shares for s in share[2]]
            with contextlib.closing(MetadataStore.open(index_dir)) as store:
                merge_handoffs(store, index_dir, embedder.dim)
                store.clear_pending()
                vectors = open_vectors(store, index_dir, writable=True, progress=tqdm if progress else None)
                report.count = vectors.count
                report.index_type = vectors.index_type
                report.vector_store = store.get_meta("vector_store") or "faiss"
                vectors.close()
            if ocr is not None:  # after the sync: the pictures are searchable while the words are read
                report.ocr = read_index_text(index_dir, source, ocr, on_skip, progress)
    finally:
        if lock is not None:
            lock.release()
    dist.close()  # every rank waits here until rank 0 has merged (after a failure, ranks just exit)
    report.seconds = time.perf_counter() - started
    return report


def _prepare(
    index_dir: Path,
    embedder: Embedder,
    options: BuildOptions | None,
    create_meta: dict[str, str] | None,
    on_skip: SkipCallback | None,
    progress: bool,
) -> tuple[IndexLock, BuildReport, ImageSource]:
    """Rank 0: lock the index, check it fits this run, merge leftover hand-off files, plan the work."""
    if create_meta is None:
        MetadataStore.open(index_dir).close()  # a clear error when there is no index
    index_dir.mkdir(parents=True, exist_ok=True)
    lock = IndexLock(index_dir)
    try:
        with contextlib.closing(_open_for_run(index_dir, embedder, options, create_meta)) as store:
            check_vector_store(store.get_meta("vector_store") or "faiss")  # fail now, not after embedding
            report = BuildReport(store.get_meta("root"), index_dir)
            merge_handoffs(store, index_dir, embedder.dim)
            source = open_source(report.root, index_dir)
            plan_run(store, source, report, on_skip, progress)
    except BaseException:
        lock.release()
        raise
    return lock, report, source


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
        if options.store is not None:
            changes["vector_store"] = vector_store_spec(options.store)
        if create_meta and create_meta.get("clip_path"):
            changes["clip_path"] = create_meta["clip_path"]
        store.set_meta(changes)
    return store


# --- embedding ----------------------------------------------------------------------------------


def _embed_pending(
    store: MetadataStore,
    source: ImageSource,
    index_dir: Path,
    embedder: Embedder,
    batch_size: int,
    dist: Distributed,
    report: BuildReport,
    on_skip: SkipCallback | None,
    progress: bool,
) -> None:
    share = store.pending_count(dist.rank, dist.world_size)
    run_id = uuid.uuid4().hex[:12]
    desc = "embedding" if dist.world_size == 1 else f"embedding (rank {dist.rank})"
    bar = tqdm(total=share, desc=desc, unit="img", disable=not progress)
    for number, files in enumerate(store.iter_pending(dist.rank, dist.world_size, chunk=batch_size)):
        records = _embed_batch(store, source, files, embedder, report, on_skip)
        if dist.world_size == 1:
            write_records(store, records, [f.path for f in files])
        elif records:
            write_handoff(index_dir, f"{run_id}-r{dist.rank}-{number:06d}", records)
        bar.update(len(files))
    bar.close()


def _embed_batch(
    store: MetadataStore,
    source: ImageSource,
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
            image = source.load_image(pending.path)
        except ImageError as e:
            skip_file(report, on_skip, pending.path, e.reason)
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


