"""Following an indexed folder: when its files change, run an index update (new, changed, renamed
and deleted images; renames keep their vectors), so search reflects the folder within seconds.

The folder is polled: every ``interval_s`` the walk that plans an update (sources.FolderSource,
stat only, nothing opened) is summarised as a signature of (path, size, mtime) of every image. A
changed signature waits until the folder has been quiet for ``settle_s`` (a burst of thousands of
copies is one update, embedded in batches), then ``update_index`` runs. The update takes the
index's lock and writes in transactions, so a server searching the index keeps answering and
reloads when it sees the change (``ImageIndex.is_stale``).

A folder that is gone (unmounted), unreadable, or that lists no image while the index holds some,
is taken as unavailable, not as emptied: nothing is removed, and the watch waits for it to come
back. (Deleting every image of a watched folder is so reflected only once one image is back, or by
an explicit ``duomodal index update``.)
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from duomodal.search.plan import BuildReport
from duomodal.search.sources import FolderSource, SourceFile, open_source
from duomodal.search.store import IndexStoreError, MetadataStore


@dataclass(frozen=True)
class WatchOptions:
    interval_s: float = 1.0  # seconds between two looks at the folder
    settle_s: float = 0.5  # a change is indexed once the folder has not changed for this long

    def __post_init__(self):
        for name in ("interval_s", "settle_s"):
            value = getattr(self, name)
            if not 0 < value <= 3600:
                raise ValueError(f"{name} must be above 0 and at most 3600 seconds, got {value!r}")


def folder_signature(source: FolderSource) -> tuple[int, str] | None:
    """(images, a hash of every image's path, size and mtime), or None when the folder cannot be walked."""
    digest = hashlib.sha256()
    count = 0
    try:
        if not source.root.is_dir():
            return None
        for item in source.files():
            if isinstance(item, SourceFile):
                digest.update(f"{item.relative}\0{item.size}\0{item.mtime_ns}\n".encode("utf-8", "surrogateescape"))
                count += 1
    except OSError:
        return None
    return count, digest.hexdigest()


def watch_index(
    index_dir: str | os.PathLike,
    update: Callable[[], BuildReport],
    stop: threading.Event,
    options: WatchOptions | None = None,
    on_update: Callable[[BuildReport], None] | None = None,
    on_wait: Callable[[str], None] | None = None,
) -> None:
    """Poll the folder of the index at `index_dir` until `stop` is set, calling `update()` (an
    ``update_index`` with the caller's CLIP and OCR engine) after each settled change and
    `on_update` with its report; `on_wait(reason)` when the folder is unavailable (once per outage).
    An update that fails is reported through `on_wait` and tried again at the next change."""
    options = options or WatchOptions()
    index_dir = Path(index_dir)
    with contextlib.closing(MetadataStore.open(index_dir)) as store:
        root = store.get_meta("root")
    source = open_source(root, index_dir)
    if not isinstance(source, FolderSource):
        raise IndexStoreError(f"{index_dir} indexes shards ({root}); only a folder can be watched")
    indexed: tuple[int, str] | None = None  # the signature the index was last brought up to
    waiting = False
    first = True
    while not stop.is_set():
        signature = folder_signature(source)
        if signature is None or (signature[0] == 0 and _count(index_dir) > 0):
            if not waiting and on_wait is not None:
                on_wait(f"{root} is not available (unmounted, unreadable or empty); waiting for it")
            waiting = True
            stop.wait(options.interval_s)
            continue
        waiting = False
        if first or signature != indexed:
            if not first:  # let a burst finish: quiet for settle_s
                while not stop.is_set():
                    stop.wait(options.settle_s)
                    settled = folder_signature(source)
                    if settled == signature or settled is None:
                        break
                    signature = settled
            first = False
            if stop.is_set():
                break
            try:
                report = update()
            except (IndexStoreError, OSError) as e:
                if on_wait is not None:
                    on_wait(f"the update failed ({e}); trying again at the next change")
                indexed = signature
                stop.wait(options.interval_s)
                continue
            indexed = signature
            if on_update is not None:
                on_update(report)
        stop.wait(options.interval_s)


def _count(index_dir: Path) -> int:
    with contextlib.closing(MetadataStore.open(index_dir)) as store:
        return store.count()
