"""Filters and a cut-off on search results: folder, file date, size and format, a minimum score, and
ordering by date within the cut-off.

The file facts are columns of the index's ``images`` table, so a filter is a SQL ``WHERE`` clause
run first: the images it admits are scored exactly from their stored vectors (up to
``EXACT_FILTER_MAX`` of them); above that, the vector index is searched for ``k * OVERSAMPLE``
candidates (at most ``MAX_K``) and those the filter admits are kept, which may leave fewer than k.
Results are never filtered out of a plain top-k after the fact.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, fields
from datetime import date, datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # the index module loads faiss, which the CLI's option parsing does not need
    from duomodal.search.index import Hit, ImageIndex


STORE_FILE = "index.sqlite"  # the metadata store's file (duomodal.search.store)
SORTS = ("score", "date")
# a format name -> the file name endings it covers
FORMATS = {"jpeg": ("jpg", "jpeg"), "png": ("png",), "gif": ("gif",), "webp": ("webp",), "bmp": ("bmp",),
           "tiff": ("tif", "tiff")}
FORMAT_NAMES = (*FORMATS, "jpg", "tif")  # what a request may name (jpg: jpeg, tif: tiff)
EXACT_FILTER_MAX = 100_000  # admitted images scored exactly; above, the vector index is searched
OVERSAMPLE = 8  # candidates per result searched when the selection is too large to score exactly


@dataclass(frozen=True)
class SearchFilters:
    folder: str | None = None  # only images under this folder, relative to the index root ("2024/cats")
    after: float | None = None  # file modified at or after (Unix seconds)
    before: float | None = None  # file modified before (Unix seconds)
    min_bytes: int | None = None  # file size at least
    max_bytes: int | None = None  # file size at most
    formats: tuple[str, ...] = ()  # names of FORMATS; empty: any
    min_score: float | None = None  # CLIP cosine similarity at least (-1 to 1): the cut-off
    sort: str = "score"  # "score": best first; "date": newest first, among the results within the cut-off

    # An empty selection (a date range or size range that is empty, a folder that is not there)
    # is not an error: it selects nothing, as a query that matches nothing returns nothing.
    def __post_init__(self):
        if self.folder is not None:
            object.__setattr__(self, "folder", self.folder.strip("/") or None)  # "/": the whole index
        for name in ("min_bytes", "max_bytes"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"{name} must be a whole number of bytes >= 0, got {value!r}")
        formats = tuple(dict.fromkeys(f.lower().lstrip(".") for f in self.formats))
        formats = tuple("jpeg" if f == "jpg" else "tiff" if f == "tif" else f for f in formats)
        unknown = [f for f in formats if f not in FORMATS]
        if unknown:
            raise ValueError(f"unknown format(s) {', '.join(unknown)}; choose from {', '.join(FORMATS)}")
        object.__setattr__(self, "formats", formats)
        if self.min_score is not None and not -1.0 <= self.min_score <= 1.0:
            raise ValueError(f"min_score must be from -1 to 1 (a cosine similarity), got {self.min_score!r}")
        if self.sort not in SORTS:
            raise ValueError(f"sort must be one of {', '.join(SORTS)}, got {self.sort!r}")

    @property
    def selects(self) -> bool:
        """Whether the filter admits only some images (folder, date, size or format)."""
        return any(getattr(self, f.name) not in (None, ()) for f in fields(self) if f.name not in ("min_score", "sort"))

    @property
    def active(self) -> bool:
        return self.selects or self.min_score is not None or self.sort != "score"

    def admits(self, hit: Hit) -> bool:
        """Whether `hit` passes the selection (folder, date, size, format): `where` in Python, for an
        index without a metadata store to query."""
        path = hit.path.lower()
        mtime = hit.mtime_ns if hit.mtime_ns is not None else 0
        size = hit.size if hit.size is not None else 0
        return (
            (self.folder is None or hit.path.startswith(self.folder + "/"))
            and (self.after is None or mtime >= _int64(self.after * 1e9))
            and (self.before is None or mtime < _int64(self.before * 1e9))
            and (self.min_bytes is None or size >= self.min_bytes)
            and (self.max_bytes is None or size <= self.max_bytes)
            and (not self.formats or any(path.endswith(f".{e}") for f in self.formats for e in FORMATS[f]))
        )

    def where(self) -> tuple[str, list]:
        """The SQL condition on ``images`` and its parameters ("1" when nothing is selected)."""
        clauses, params = [], []
        if self.folder is not None:
            clauses.append("path LIKE ? ESCAPE '\\'")
            params.append(_like_escape(self.folder) + "/%")
        if self.after is not None:
            clauses.append("mtime_ns >= ?")
            params.append(_int64(self.after * 1e9))
        if self.before is not None:
            clauses.append("mtime_ns < ?")
            params.append(_int64(self.before * 1e9))
        if self.min_bytes is not None:
            clauses.append("size >= ?")
            params.append(_int64(self.min_bytes))
        if self.max_bytes is not None:
            clauses.append("size <= ?")
            params.append(_int64(self.max_bytes))
        if self.formats:
            endings = [e for f in self.formats for e in FORMATS[f]]
            clauses.append("(" + " OR ".join("lower(path) LIKE ?" for _ in endings) + ")")
            params.extend(f"%.{e}" for e in endings)
        return (" AND ".join(clauses) or "1"), params


def _int64(value: float) -> int:
    """`value` within SQLite's integer range (a date in the year 9999 in nanoseconds is beyond it)."""
    return int(min(max(value, -(2**63)), 2**63 - 1))


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _connect(index_dir: str | os.PathLike) -> contextlib.closing[sqlite3.Connection]:
    return contextlib.closing(sqlite3.connect(f"file:{Path(index_dir) / STORE_FILE}?mode=ro", uri=True))


def admitted_ids(index_dir: str | os.PathLike, filters: SearchFilters, limit: int) -> list[int] | None:
    """The ids of the images `filters` selects, or None when there are more than `limit`."""
    where, params = filters.where()
    with _connect(index_dir) as db:
        rows = db.execute(f"SELECT id FROM images WHERE {where} LIMIT ?", (*params, limit + 1)).fetchall()
    return None if len(rows) > limit else [r[0] for r in rows]


def admitted_among(index_dir: str | os.PathLike, filters: SearchFilters, ids: Sequence[int]) -> set[int]:
    """Those of `ids` that `filters` selects."""
    if not filters.selects:
        return set(ids)
    where, params = filters.where()
    found: set[int] = set()
    with _connect(index_dir) as db:
        for start in range(0, len(ids), 500):
            chunk = [int(i) for i in ids[start : start + 500]]
            marks = ",".join("?" * len(chunk))
            found.update(r[0] for r in db.execute(f"SELECT id FROM images WHERE id IN ({marks}) AND {where}",
                                                  (*chunk, *params)))
    return found


def can_select(index: ImageIndex) -> bool:
    """Whether `index` has the metadata store that selecting filters query."""
    index_dir = getattr(index, "index_dir", None)
    return index_dir is not None and (Path(index_dir) / STORE_FILE).is_file()


def filtered_search(index: ImageIndex, vector: np.ndarray, k: int, filters: SearchFilters) -> list[Hit]:
    """The `k` best images for `vector` among those `filters` selects, above its minimum score, in
    its order (see the module's docstring)."""
    if filters.selects and not can_select(index):  # no SQL to ask: every image's facts are in its hit
        from duomodal.search.index import MAX_K  # lazy: the index module loads faiss

        hits = [h for h in index.search(vector, min(MAX_K, max(k, index.count))) if filters.admits(h)][:k]
    elif not filters.selects:
        hits = index.search(vector, k)
    else:
        ids = admitted_ids(index.index_dir, filters, EXACT_FILTER_MAX)
        if ids is None:
            from duomodal.search.index import MAX_K  # lazy: the index module loads faiss

            found = index.search(vector, min(MAX_K, k * OVERSAMPLE))
            keep = admitted_among(index.index_dir, filters, [h.id for h in found])
            hits = [h for h in found if h.id in keep][:k]
        else:
            hits = exact_hits(index, vector, ids, k)
    return cut_and_sort(hits, filters)


def exact_hits(index: ImageIndex, vector: np.ndarray, ids: Sequence[int], k: int) -> list[Hit]:
    """The `k` best of `ids` by exact similarity to `vector`, from their stored vectors."""
    best: list[tuple[float, int]] = []
    query = np.asarray(vector, dtype=np.float32)
    for start in range(0, len(ids), 10_000):
        chunk = list(ids[start : start + 10_000])
        scores = index.vectors(chunk) @ query
        best.extend(zip(scores.tolist(), chunk))
        best = sorted(best, key=lambda p: (-p[0], p[1]))[:k]
    rows = {i: index.get(i) for _, i in best}
    return [dataclasses.replace(rows[i], score=float(s)) for s, i in best if rows[i] is not None]


def cut_and_sort(hits: list[Hit], filters: SearchFilters) -> list[Hit]:
    """`hits` (best first) above the minimum score, newest first when sorting by date."""
    if filters.min_score is not None:
        hits = [h for h in hits if h.score >= filters.min_score]
    if filters.sort == "date":
        hits = sorted(hits, key=lambda h: (-(h.mtime_ns or 0), -h.score))
    return hits


class FilterError(ValueError):
    """A filter value that cannot be read; the message names it and what is allowed."""


_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


# The sizes parse_size reads (the API's schema states it): a number, then k, M or G (powers of
# 1024), optionally followed by "iB" or "B"; or bytes with a "B".
SIZE_PATTERN = r"^[0-9]+(\.[0-9]+)?([kKmMgG](i?[bB])?|[bB])?$"


def parse_size(text: str, name: str) -> int:
    """``"250k"`` -> 256000 bytes (units k, M, G are powers of 1024; none: bytes)."""
    match = re.fullmatch(SIZE_PATTERN, text.strip())
    if match is None:
        raise FilterError(f"{name} {text!r} is not a size; write bytes or a number with k, M or G, like 250k")
    number = float(text.strip().rstrip("bBiI").rstrip("kKmMgG"))
    unit = match.group(2)[0].lower() if match.group(2) and match.group(2)[0] not in "bB" else ""
    return _int64(number * _SIZE_UNITS[unit]) if np.isfinite(number) else 2**63 - 1


def parse_date(text: str | date, name: str) -> float:
    """An ISO date or date-time (``2024-05-01``, ``2024-05-01T13:30``; local time unless it says
    otherwise), or a date or datetime, as Unix seconds."""
    if isinstance(text, str):
        try:
            text = datetime.fromisoformat(text.strip())
        except ValueError:
            raise FilterError(
                f"{name} {text!r} is not a date; write it like 2024-05-01 or 2024-05-01T13:30"
            ) from None
    moment = text if isinstance(text, datetime) else datetime.combine(text, datetime.min.time())
    try:
        return moment.timestamp()
    except (OverflowError, OSError, ValueError):  # beyond what this platform's local time holds: as UTC
        aware = moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)
        return (aware - datetime(1970, 1, 1, tzinfo=timezone.utc)).total_seconds()


def filters_from_text(
    folder: str | None = None,
    after: str | date | None = None,
    before: str | date | None = None,
    min_size: str | None = None,
    max_size: str | None = None,
    formats: Sequence[str] = (),
    min_score: float | None = None,
    sort: str = "score",
) -> SearchFilters:
    """SearchFilters from what a person types (the CLI's options, the API's fields): dates as ISO
    text, sizes with units, formats comma-separated or repeated. Raises FilterError."""
    try:
        return SearchFilters(
            folder=folder or None,
            after=parse_date(after, "after") if after else None,
            before=parse_date(before, "before") if before else None,
            min_bytes=parse_size(min_size, "min size") if min_size else None,
            max_bytes=parse_size(max_size, "max size") if max_size else None,
            formats=tuple(f.strip() for value in formats for f in value.split(",") if f.strip()),
            min_score=min_score,
            sort=sort,
        )
    except FilterError:
        raise
    except ValueError as e:
        raise FilterError(str(e)) from None
