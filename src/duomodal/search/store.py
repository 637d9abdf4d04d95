"""The metadata store of an image index: one SQLite file, the source of truth.

Every indexed image is one row of ``images`` holding its path (relative to the indexed root, with
``/`` separators), content hash, size, mtime, width, height, caption and its CLIP vector (float32
blob). The faiss index beside it is derived data: it can always be rebuilt from these rows.

Triggers append the id of every row whose vector appears, changes or disappears to ``changes``, in
the same transaction as the change itself, so the faiss index can be brought up to date after an
interruption at any point (see ``duomodal.search.index``). ``pending`` holds the files a build has
planned to embed; ranks of a sharded build read their share of it.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

SCHEMA_VERSION = 1
STORE_FILE = "index.sqlite"
# Values bound in one IN (...) list: SQLite before 3.32 refuses statements with more than 999.
SQL_IN_CHUNK = 500

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS images (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    path TEXT NOT NULL UNIQUE,
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    caption TEXT,
    vector BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS images_sha256 ON images (sha256);
CREATE TABLE IF NOT EXISTS changes (seq INTEGER PRIMARY KEY AUTOINCREMENT, image_id INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS pending (
    path TEXT PRIMARY KEY,
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    caption TEXT
);
-- iter_pending walks pending in (sha256, path) order a chunk at a time: without this index every chunk
-- scanned and sorted the whole table (a build quadratic in the files to embed)
CREATE INDEX IF NOT EXISTS pending_order ON pending (sha256, path);
CREATE TRIGGER IF NOT EXISTS images_added AFTER INSERT ON images
    BEGIN INSERT INTO changes (image_id) VALUES (new.id); END;
CREATE TRIGGER IF NOT EXISTS images_revectored AFTER UPDATE OF vector ON images
    BEGIN INSERT INTO changes (image_id) VALUES (new.id); END;
CREATE TRIGGER IF NOT EXISTS images_removed AFTER DELETE ON images
    BEGIN INSERT INTO changes (image_id) VALUES (old.id); END;
"""

_COLUMNS = "id, path, sha256, size, mtime_ns, width, height, caption"


class IndexStoreError(ValueError):
    """An index directory that is missing, of another version, or inconsistent with a request."""


class ModelMismatchError(IndexStoreError):
    """The CLIP model given is not the one the index was built with."""


class VectorStoreUnavailable(IndexStoreError):
    """The vector engine (a Milvus server) did not answer a search; the index itself is intact."""


@dataclass(frozen=True)
class ImageFacts:
    """What the index records of an image besides its vector."""

    path: str
    sha256: str
    size: int
    mtime_ns: int
    width: int
    height: int
    caption: str | None


@dataclass(frozen=True)
class ImageRow(ImageFacts):
    """An indexed image: its facts and its row id."""

    id: int

    @classmethod
    def from_sql(cls, row: tuple[Any, ...]) -> ImageRow:
        """From a row selected as ``_COLUMNS`` (the id first)."""
        return cls(*row[1:], id=row[0])


@dataclass(frozen=True)
class NewImage(ImageFacts):
    """An image ready to be written: its facts plus its vector."""

    vector: np.ndarray  # (D,) float32


@dataclass(frozen=True)
class PendingFile:
    path: str
    sha256: str
    size: int
    mtime_ns: int
    caption: str | None


def in_chunks(values: Sequence[Any], size: int = SQL_IN_CHUNK) -> Iterator[tuple[list[Any], str]]:
    """`values` in slices of at most `size`, each with its "?,?,?" placeholders for ``IN (...)``."""
    for start in range(0, len(values), size):
        chunk = list(values[start : start + size])
        yield chunk, ",".join("?" * len(chunk))


def vector_to_blob(vector: np.ndarray) -> bytes:
    return np.ascontiguousarray(vector, dtype="<f4").tobytes()


def blob_to_vector(blob: bytes, dim: int) -> np.ndarray:
    vector = np.frombuffer(blob, dtype="<f4")
    if vector.shape[0] != dim:
        raise IndexStoreError(f"stored vector has {vector.shape[0]} values, the index says {dim}")
    return vector.astype(np.float32)


class MetadataStore:
    """SQLite access for one index directory. Thread-safe (one connection behind a lock)."""

    def __init__(self, path: Path, connection: sqlite3.Connection):
        self.path = path
        self._db = connection
        self._lock = threading.RLock()

    # --- opening ----------------------------------------------------------------------------

    @classmethod
    def create(cls, index_dir: str | os.PathLike, meta: dict[str, str]) -> MetadataStore:
        """Create the store (or open an existing one, checking `meta` agrees where it must)."""
        index_dir = Path(index_dir)
        index_dir.mkdir(parents=True, exist_ok=True)
        path = index_dir / STORE_FILE
        store = cls(path, cls._connect(path))
        try:
            complete = store.get_meta("schema_version") is not None
        except sqlite3.OperationalError:  # no meta table yet: a new store (or one cut off while created)
            complete = False
        if complete:
            store._check_version()
            store._db.execute("CREATE INDEX IF NOT EXISTS pending_order ON pending (sha256, path)")  # older stores
            return store
        store._db.executescript("BEGIN;" + _SCHEMA + f"PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;")
        store.set_meta({**meta, "schema_version": str(SCHEMA_VERSION)})  # last: marks the store complete
        return store

    @classmethod
    def open(cls, index_dir: str | os.PathLike) -> MetadataStore:
        index_dir = Path(index_dir)
        path = index_dir / STORE_FILE
        if not index_dir.is_dir():
            raise IndexStoreError(f"{index_dir} is not a directory; build one with 'duomodal index build'")
        if not path.is_file():
            raise IndexStoreError(f"{index_dir} has no {STORE_FILE}; is it a duomodal index directory?")
        store = cls(path, cls._connect(path))
        store._check_version()
        return store

    @staticmethod
    def _connect(path: Path) -> sqlite3.Connection:
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=60)
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = NORMAL")
        db.create_function("rank_of", 2, rank_of, deterministic=True)
        return db

    def _check_version(self) -> None:
        try:
            version = self.get_meta("schema_version")
        except sqlite3.DatabaseError as e:
            raise IndexStoreError(f"{self.path} is not a readable index database ({e})") from None
        if version is None:
            raise IndexStoreError(f"{self.path} has no schema version; it is not a duomodal index")
        if int(version) != SCHEMA_VERSION:
            raise IndexStoreError(
                f"{self.path} has schema version {version}; this duomodal reads version {SCHEMA_VERSION}; "
                "rebuild the index with 'duomodal index build'"
            )

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # --- transactions and meta --------------------------------------------------------------

    def transaction(self) -> _Transaction:
        return _Transaction(self)

    def get_meta(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def meta(self) -> dict[str, str]:
        with self._lock:
            return dict(self._db.execute("SELECT key, value FROM meta").fetchall())

    def set_meta(self, values: dict[str, str]) -> None:
        with self.transaction() as db:
            db.executemany(
                "INSERT INTO meta (key, value) VALUES (?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                [(k, str(v)) for k, v in values.items()],
            )

    # --- images -----------------------------------------------------------------------------

    def count(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM images").fetchone()[0]

    def by_path(self, path: str) -> ImageRow | None:
        with self._lock:
            row = self._db.execute(f"SELECT {_COLUMNS} FROM images WHERE path = ?", (path,)).fetchone()
        return None if row is None else ImageRow.from_sql(row)

    def by_paths(self, paths: Sequence[str]) -> dict[str, ImageRow]:
        return {r[1]: ImageRow.from_sql(r) for r in self._select_in(_COLUMNS, "path", paths)}

    def by_sha256(self, sha256: str) -> list[ImageRow]:
        with self._lock:
            rows = self._db.execute(f"SELECT {_COLUMNS} FROM images WHERE sha256 = ? ORDER BY id", (sha256,))
            return [ImageRow.from_sql(r) for r in rows.fetchall()]

    def rows(self, ids: Sequence[int]) -> dict[int, ImageRow]:
        return {r[0]: ImageRow.from_sql(r) for r in self._select_in(_COLUMNS, "id", [int(i) for i in ids])}

    def iter_rows(self, chunk: int = 1000) -> Iterator[ImageRow]:
        """All rows in id order, read `chunk` at a time (bounded memory)."""
        last = -1
        while True:
            with self._lock:
                rows = self._db.execute(
                    f"SELECT {_COLUMNS} FROM images WHERE id > ? ORDER BY id LIMIT ?", (last, chunk)
                ).fetchall()
            if not rows:
                return
            for r in rows:
                yield ImageRow.from_sql(r)
            last = rows[-1][0]

    def vectors(self, ids: Sequence[int], dim: int) -> dict[int, np.ndarray]:
        return {i: blob_to_vector(b, dim) for i, b in self._select_in("id, vector", "id", [int(i) for i in ids])}

    def _select_in(self, columns: str, key: str, values: Sequence[Any]) -> list[tuple[Any, ...]]:
        """``SELECT columns FROM images WHERE key IN values``, any number of values."""
        rows: list[tuple[Any, ...]] = []
        for chunk, marks in in_chunks(values):
            with self._lock:
                rows.extend(self._db.execute(f"SELECT {columns} FROM images WHERE {key} IN ({marks})", chunk))
        return rows

    def iter_vectors(self, dim: int, chunk: int = 10_000) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids (n,) int64, vectors (n, D) float32) chunks in id order."""
        last = -1
        while True:
            with self._lock:
                rows = self._db.execute(
                    "SELECT id, vector FROM images WHERE id > ? ORDER BY id LIMIT ?", (last, chunk)
                ).fetchall()
            if not rows:
                return
            ids = np.array([r[0] for r in rows], dtype=np.int64)
            vectors = np.stack([blob_to_vector(r[1], dim) for r in rows])
            yield ids, vectors
            last = int(ids[-1])

    def sample_vectors(self, dim: int, n: int, seed: int = 0) -> np.ndarray:
        """Up to `n` vectors spread over the id range (for training an IVF quantizer)."""
        total = self.count()
        if total == 0:
            return np.zeros((0, dim), dtype=np.float32)
        step = max(1, total // n)
        with self._lock:
            rows = self._db.execute(
                "SELECT vector FROM (SELECT vector, ROW_NUMBER() OVER (ORDER BY id) AS k FROM images) "
                "WHERE (k + ?) % ? = 0 LIMIT ?",
                (seed % step, step, n),
            ).fetchall()
        return np.stack([blob_to_vector(r[0], dim) for r in rows])

    def upsert(self, db: sqlite3.Connection, image: NewImage) -> None:
        """Insert a row, or replace the row at the same path keeping its id (inside a transaction)."""
        db.execute(
            "INSERT INTO images (path, sha256, size, mtime_ns, width, height, caption, vector) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (path) DO UPDATE SET "
            "sha256 = excluded.sha256, size = excluded.size, mtime_ns = excluded.mtime_ns, "
            "width = excluded.width, height = excluded.height, caption = excluded.caption, "
            "vector = excluded.vector",
            (
                image.path,
                image.sha256,
                image.size,
                image.mtime_ns,
                image.width,
                image.height,
                image.caption,
                vector_to_blob(image.vector),
            ),
        )

    def flag_changed(self, image_id: int) -> None:
        """Forget the recorded modification time of an image, so that the next plan sees its file
        as changed and hashes it again (refreshing, re-embedding or removing the row)."""
        with self._lock:
            self._db.execute("UPDATE images SET mtime_ns = -1 WHERE id = ?", (int(image_id),))

    def vector_blob(self, image_id: int) -> bytes | None:
        with self._lock:
            row = self._db.execute("SELECT vector FROM images WHERE id = ?", (image_id,)).fetchone()
        return None if row is None else row[0]

    # --- change log -------------------------------------------------------------------------

    def last_change(self) -> int:
        """The sequence number of the latest vector change (0 for none); never goes back."""
        with self._lock:
            row = self._db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'changes'").fetchone()
        return 0 if row is None else int(row[0])

    def oldest_change(self) -> int:
        """The sequence number of the oldest change still logged (``last_change() + 1`` when none
        is): a copy of the vectors that holds the changes up to N can catch up from the log only
        when N + 1 >= this (the log is pruned after each sync, whichever vector store it was for)."""
        with self._lock:
            row = self._db.execute("SELECT MIN(seq) FROM changes").fetchone()
        return self.last_change() + 1 if row[0] is None else int(row[0])

    def changed_ids(self, after: int) -> list[int]:
        with self._lock:
            rows = self._db.execute(
                "SELECT DISTINCT image_id FROM changes WHERE seq > ? ORDER BY image_id", (after,)
            ).fetchall()
        return [r[0] for r in rows]

    def forget_changes(self, upto: int) -> None:
        with self.transaction() as db:
            db.execute("DELETE FROM changes WHERE seq <= ?", (upto,))

    # --- pending files ----------------------------------------------------------------------

    def clear_pending(self) -> None:
        with self.transaction() as db:
            db.execute("DELETE FROM pending")

    def add_pending(self, files: Iterable[PendingFile]) -> None:
        with self.transaction() as db:
            db.executemany(
                "INSERT OR REPLACE INTO pending (path, sha256, size, mtime_ns, caption) VALUES (?, ?, ?, ?, ?)",
                [(f.path, f.sha256, f.size, f.mtime_ns, f.caption) for f in files],
            )

    def pending_count(self, rank: int = 0, world_size: int = 1) -> int:
        with self._lock:
            return self._db.execute(
                "SELECT COUNT(*) FROM pending WHERE rank_of(sha256, ?) = ?", (world_size, rank)
            ).fetchone()[0]

    def iter_pending(self, rank: int = 0, world_size: int = 1, chunk: int = 256) -> Iterator[list[PendingFile]]:
        """This rank's share of the pending files, in chunks, ordered by content hash.

        A file goes to rank ``rank_of(sha256, world_size)``, so files of equal content go to the
        same rank and, being adjacent in hash order, are embedded once.
        """
        last = ("", "")
        while True:
            with self._lock:
                rows = self._db.execute(
                    "SELECT path, sha256, size, mtime_ns, caption FROM pending "
                    "WHERE rank_of(sha256, ?) = ? AND (sha256, path) > (?, ?) ORDER BY sha256, path LIMIT ?",
                    (world_size, rank, last[1], last[0], chunk),
                ).fetchall()
            if not rows:
                return
            last = (rows[-1][0], rows[-1][1])
            yield [PendingFile(*r) for r in rows]


def rank_of(sha256: str, world_size: int) -> int:
    """The rank of a sharded build that embeds content with this hash."""
    return int(sha256[:8], 16) % world_size


class _Transaction:
    """``with store.transaction() as db:`` runs BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error)."""

    def __init__(self, store: MetadataStore):
        self._store = store

    def __enter__(self) -> sqlite3.Connection:
        self._store._lock.acquire()
        try:
            self._store._db.execute("BEGIN IMMEDIATE")
        except BaseException:
            self._store._lock.release()
            raise
        return self._store._db

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self._store._db.execute("ROLLBACK" if exc_type else "COMMIT")
        finally:
            self._store._lock.release()
