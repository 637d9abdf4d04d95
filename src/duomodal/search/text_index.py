"""The words read in each image (OCR), stored in the index's SQLite and searchable with FTS5.

Tables, created by the first ``index build --ocr`` (an index without them has no text):

- ``image_text``: ``image_id`` (the ``images`` row), ``sha256`` (the content the words were read
  from), ``engine`` (the OCR engine and version), ``text`` (as read), ``letters`` (the text's
  letters and digits, lower case, without spaces or punctuation);
- ``image_letters``: an FTS5 index over ``letters`` with the ``trigram`` tokenizer (external content,
  kept in step by triggers), so any run of 3 or more letters is found by substring.

Matching is on letters, not on words, because OCR engines often drop the space between two words
("DEADLINEHUNGRY") or put one inside a word: a query word matches where its letters appear, and a
phrase where the letters of its words appear consecutively (spaces, case and punctuation ignored).

Incremental like the vectors: a row whose image is deleted goes with it (a trigger on ``images``);
a moved file keeps its id and so its words; a changed file has a new hash, so its words are stale
and are read again; a copy of indexed content takes the words read from it; a change of engine
re-reads everything. ``read_missing`` does one such pass.

The text index opens its own connection to ``index.sqlite`` (WAL: readers never wait for the
writer), so it sits beside the metadata store without changing it.
"""

from __future__ import annotations

import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from duomodal.search.ocr import OcrEngine

STORE_FILE = "index.sqlite"  # the metadata store's file (duomodal.search.store)
OCR_META_KEY = "ocr_engine"  # in the store's meta: the kind of OCR engine the index reads with (ocr.OCR_ENGINES)
_READ_CHUNK = 32  # images read per transaction
_MIN_FTS_LETTERS = 3  # the trigram tokenizer finds runs of at least 3 letters; shorter ones are scanned
MAX_TEXT_CANDIDATES = 5000  # images matching any query word that are scored, best BM25 first

_SCHEMA = """
CREATE TABLE IF NOT EXISTS image_text (
    image_id INTEGER PRIMARY KEY,
    sha256 TEXT NOT NULL,
    engine TEXT NOT NULL,
    text TEXT NOT NULL,
    letters TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS image_text_content ON image_text (sha256, engine);
CREATE VIRTUAL TABLE IF NOT EXISTS image_letters USING fts5(
    letters, content='image_text', content_rowid='image_id', tokenize='trigram'
);
CREATE TRIGGER IF NOT EXISTS image_text_added AFTER INSERT ON image_text
    BEGIN INSERT INTO image_letters (rowid, letters) VALUES (new.image_id, new.letters); END;
CREATE TRIGGER IF NOT EXISTS image_text_removed AFTER DELETE ON image_text BEGIN
    INSERT INTO image_letters (image_letters, rowid, letters) VALUES ('delete', old.image_id, old.letters);
END;
CREATE TRIGGER IF NOT EXISTS image_text_changed AFTER UPDATE ON image_text BEGIN
    INSERT INTO image_letters (image_letters, rowid, letters) VALUES ('delete', old.image_id, old.letters);
    INSERT INTO image_letters (rowid, letters) VALUES (new.image_id, new.letters);
END;
CREATE TRIGGER IF NOT EXISTS images_text_gone AFTER DELETE ON images
    BEGIN DELETE FROM image_text WHERE image_id = old.id; END;
"""

LoadImage = Callable[[str], Image.Image]  # relative path -> image (raises ImageError or OSError)
SkipCallback = Callable[[str, str], None]


@dataclass
class OcrReport:
    read: int = 0  # images read by the engine
    copied: int = 0  # images whose content was read before (a copy): words copied
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    seconds: float = 0.0


@dataclass(frozen=True)
class TextMatch:
    """An image whose words match a query: its rank (1 = best), score and words."""

    image_id: int
    rank: int
    score: int  # query words found + adjacent pairs of query words found together (see `match_score`)
    text: str


class TextIndex:
    """The OCR text of one index directory (thread-safe: one connection behind a lock)."""

    def __init__(self, index_dir: str | os.PathLike):
        path = Path(index_dir) / STORE_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{index_dir} has no {STORE_FILE}; build the index first")
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=60)
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> TextIndex:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- state ------------------------------------------------------------------------------

    def engine(self) -> str:
        """The kind of OCR engine recorded in the index (one of ocr.OCR_ENGINES), "" when it has no text."""
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = ?", (OCR_META_KEY,)).fetchone()
        return row[0] if row else ""

    def enable(self, engine: str) -> None:
        """Create the tables (if new) and record `engine` (a kind) as the one the index reads with."""
        with self._lock:
            self._db.executescript("BEGIN IMMEDIATE;" + _SCHEMA + "COMMIT;")
            self._db.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (OCR_META_KEY, engine),
            )

    def count(self) -> int:
        """Images whose words have been read (some may have none)."""
        if not self.engine():
            return 0
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM image_text").fetchone()[0]

    def text_of(self, ids: Sequence[int]) -> dict[int, str]:
        if not ids or not self.engine():
            return {}
        marks = ",".join("?" * len(ids))
        with self._lock:
            rows = self._db.execute(f"SELECT image_id, text FROM image_text WHERE image_id IN ({marks})", list(ids))
            return dict(rows.fetchall())

    def unread(self, engine: str) -> list[tuple[int, str, str]]:
        """(id, path, sha256) of the images with no words read by `engine` from their current content."""
        with self._lock:
            return self._db.execute(
                "SELECT i.id, i.path, i.sha256 FROM images i LEFT JOIN image_text t ON t.image_id = i.id "
                "WHERE t.image_id IS NULL OR t.sha256 != i.sha256 OR t.engine != ? ORDER BY i.sha256, i.id",
                (engine,),
            ).fetchall()

    # --- reading ----------------------------------------------------------------------------

    def read_missing(
        self,
        engine: OcrEngine,
        load_image: LoadImage,
        batch_size: int = 16,
        on_skip: SkipCallback | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> OcrReport:
        """Read the words of every image that has none from its current content; commit per chunk.

        A file that cannot be loaded or read is skipped with its reason (its row stays unread, so
        a later run tries again); `progress(n)` is called after each chunk with the images done."""
        started = time.perf_counter()
        report = OcrReport()
        self.enable(engine.kind)
        todo = self.unread(engine.name)
        for start in range(0, len(todo), _READ_CHUNK):
            chunk = todo[start : start + _READ_CHUNK]
            rows = self._copies(chunk, engine.name, report)
            rows += self._read_chunk([c for c in chunk if c[0] not in {r[0] for r in rows}],
                                     engine, load_image, batch_size, report, on_skip)
            with self._lock:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    self._db.executemany(
                        "INSERT INTO image_text (image_id, sha256, engine, text, letters) VALUES (?, ?, ?, ?, ?) "
                        "ON CONFLICT (image_id) DO UPDATE SET sha256 = excluded.sha256, "
                        "engine = excluded.engine, text = excluded.text, letters = excluded.letters",
                        # an image deleted meanwhile is not written back
                        [(*r, letters(r[3])) for r in rows
                         if self._db.execute("SELECT 1 FROM images WHERE id = ?", (r[0],)).fetchone()],
                    )
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
            if progress is not None:
                progress(len(chunk))
        report.seconds = time.perf_counter() - started
        return report

    def _copies(self, chunk, engine: str, report: OcrReport) -> list[tuple[int, str, str, str]]:
        rows = []
        for image_id, _, sha256 in chunk:
            with self._lock:
                found = self._db.execute(
                    "SELECT text FROM image_text WHERE sha256 = ? AND engine = ? AND image_id != ? LIMIT 1",
                    (sha256, engine, image_id),
                ).fetchone()
            if found is not None:
                rows.append((image_id, sha256, engine, found[0]))
                report.copied += 1
        return rows

    def _read_chunk(self, chunk, engine: OcrEngine, load_image: LoadImage, batch_size: int,
                    report: OcrReport, on_skip: SkipCallback | None) -> list[tuple[int, str, str, str]]:
        rows = []
        first_of: dict[str, int] = {}  # equal content in one chunk is read once
        for start in range(0, len(chunk), batch_size):
            loaded, images = [], []
            for image_id, path, sha256 in chunk[start : start + batch_size]:
                if sha256 in first_of:
                    continue
                try:
                    images.append(load_image(path))
                except (OSError, ValueError) as e:
                    reason = getattr(e, "reason", None) or str(e)
                    report.skipped.append((path, reason))
                    if on_skip is not None:
                        on_skip(path, f"OCR: {reason}")
                    continue
                first_of[sha256] = image_id
                loaded.append((image_id, sha256))
            texts = engine.read_batch(images) if images else []
            rows.extend((image_id, sha256, engine.name, text) for (image_id, sha256), text in zip(loaded, texts))
            report.read += len(images)
        by_sha = {r[1]: r[3] for r in rows}
        for image_id, _, sha256 in chunk:
            if sha256 in by_sha and first_of.get(sha256) != image_id:
                rows.append((image_id, sha256, engine.name, by_sha[sha256]))
                report.copied += 1
        return rows

    # --- searching --------------------------------------------------------------------------

    def search(self, words: Sequence[str], phrases: Sequence[str], limit: int) -> list[TextMatch]:
        """Images whose letters hold every phrase and, when `words` are given, at least one word;
        ranked by `match_score` (ties: BM25 of the trigram match, then id), at most `limit`."""
        phrase_letters = [letters(p) for p in phrases if letters(p)]
        word_letters = query_letters(words)
        if not (phrase_letters or word_letters) or not self.engine():
            return []
        searched = [p for p in phrase_letters if len(p) >= _MIN_FTS_LETTERS]
        any_word = [w for w in word_letters if len(w) >= _MIN_FTS_LETTERS]
        conditions = [f'"{p}"' for p in searched]
        if any_word:  # a word of 1 or 2 letters adds to the score but does not find an image alone
            conditions.append("(" + " OR ".join(f'"{w}"' for w in any_word) + ")")
        # short phrases and words are checked on the candidates' letters (a scan without any long one)
        scanned = [p for p in phrase_letters if len(p) < _MIN_FTS_LETTERS]
        with self._lock:
            if conditions:
                rows = self._db.execute(
                    "SELECT t.image_id, t.text, t.letters FROM image_letters f JOIN image_text t "
                    "ON t.image_id = f.rowid WHERE image_letters MATCH ? ORDER BY bm25(image_letters), t.image_id "
                    "LIMIT ?",
                    (" AND ".join(conditions), MAX_TEXT_CANDIDATES),
                ).fetchall()
            else:
                rows = self._db.execute(
                    "SELECT image_id, text, letters FROM image_text ORDER BY image_id LIMIT ?",
                    (MAX_TEXT_CANDIDATES,),
                ).fetchall()
        found = []
        for order, (image_id, text, image_letters) in enumerate(rows):
            if not all(p in image_letters for p in scanned):
                continue
            score = match_score(word_letters, image_letters)
            if word_letters and score == 0:
                continue
            found.append((-score, order, image_id, text))
        found.sort()
        return [TextMatch(int(i), rank, -negative, text)
                for rank, (negative, _, i, text) in enumerate(found[:limit], start=1)]


_TOKEN = re.compile(r"\w+")


def tokens(text: str) -> list[str]:
    """The words of `text` (runs of letters and digits), lower case."""
    return [t.lower() for t in _TOKEN.findall(text) if t.strip("_")]


def letters(text: str) -> str:
    """The letters and digits of `text`, lower case, without spaces or punctuation."""
    return "".join(c for c in text.lower() if c.isalnum())


def query_letters(words: Sequence[str]) -> list[str]:
    """The distinct words of a query as matching reads them (`letters` of each token), in order."""
    return list(dict.fromkeys(letters(t) for w in words for t in tokens(w)))


def best_match_score(words: Sequence[str]) -> int:
    """The `match_score` of an image holding every query word, in order: n words + n - 1 pairs."""
    return max(0, 2 * len(query_letters(words)) - 1)


def match_score(word_letters: Sequence[str], image_letters: str) -> int:
    """How well an image's letters match a query's words: each query word found counts 1, and each
    pair of adjacent query words found together ("deadline hungry" in "...deadlinehungry...") 1 more,
    so the image holding the remembered words in order ranks first."""
    found = sum(w in image_letters for w in word_letters)
    pairs = sum(a + b in image_letters for a, b in zip(word_letters, word_letters[1:]))
    return found + pairs


def read_index_text(
    index_dir: str | os.PathLike,
    source,
    engine: OcrEngine,
    on_skip: SkipCallback | None = None,
    progress: bool = True,
) -> OcrReport:
    """One OCR pass of an index run: read the images of `source` (a FolderSource or ShardSource)
    that have no words from their current content (TextIndex.read_missing)."""
    with TextIndex(index_dir) as text_index:
        text_index.enable(engine.kind)
        bar = tqdm(total=len(text_index.unread(engine.name)), desc="reading words", unit="img", disable=not progress)
        try:
            return text_index.read_missing(engine, source.load_image, on_skip=on_skip, progress=bar.update)
        finally:
            bar.close()
