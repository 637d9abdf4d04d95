"""Walking a user's folder (a dataset, a collection to index) without trusting what is in it.

`walk_files` is the one walk that `data check`, training and `index build` share. It yields every
file whose name a caller wants, in sorted order, each either accepted or with the reason it is
skipped: a named pipe, device or socket (opening one could block or never end), a symlink whose
target lies outside the folder, a file over the size cap. Hidden names ('.'-prefixed) are left out
and symlinked folders are not followed. Nothing is opened here: only `lstat`/`stat`.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from duomodal.data.images import SPECIAL_FILE, UNREADABLE

from duomodal.files import file_kind, refusal

# Kinds of skip besides the image kinds of data/images.py (SPECIAL_FILE, UNREADABLE), as `data
# check` counts them.
OUTSIDE_ROOT = "outside-root"
OVERSIZED_FILE = "oversized-file"

MAX_CAPTION_FILE_BYTES = 1 * 2**20  # a sidecar holds a few captions; a MiB is thousands
MAX_MANIFEST_BYTES = 1 * 2**30  # captions.jsonl / .csv: ~10 million rows


@dataclass(frozen=True)
class Entry:
    relative: str  # path relative to the root, '/' separators
    path: Path  # root / relative (not resolved: a symlink stays a symlink)
    skip_kind: str | None = None  # SPECIAL_FILE, OUTSIDE_ROOT, OVERSIZED_FILE, UNREADABLE; None: usable
    skip_reason: str | None = None


def check_file(path: Path, real_root: Path, max_bytes: int | None,
               folder_inside: bool = False) -> tuple[str, str] | None:
    """(kind, reason) when the file at `path` must not be read as part of the folder whose resolved
    path is `real_root`, else None. `folder_inside`: the caller resolved `path`'s folder and found it
    inside `real_root`, so a file that is not itself a symlink needs no resolving (one `lstat`, where
    `realpath` costs one per path component). Raises OSError for a file that is gone or unreadable."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not folder_inside:
        st = os.stat(path)  # follows a symlink: what would be opened (stat opens nothing)
        if stat.S_ISREG(st.st_mode) and not Path(os.path.realpath(path)).is_relative_to(real_root):
            return OUTSIDE_ROOT, "a symlink that leads outside the folder"  # the file or a folder above is a link
    if not stat.S_ISREG(st.st_mode):
        return SPECIAL_FILE, f"not a regular file: it is {file_kind(st.st_mode)}"
    reason = refusal(st, max_bytes)
    return None if reason is None else (OVERSIZED_FILE, reason)


def walk_files(
    root: Path,
    wanted: Callable[[str], bool],
    max_bytes: Callable[[str], int | None] = lambda name: None,
    exclude: Path | None = None,
) -> Iterator[Entry]:
    """Every file under `root` whose name `wanted` accepts, checked with `check_file` against the
    size cap `max_bytes(name)`; folder by folder (names sorted), lazily, so a walk over millions of
    files holds one folder's names at a time. A file that vanishes during the walk, or whose status
    can't be read, is an entry skipped as UNREADABLE with the OS's reason."""
    root = Path(root)
    real_root = Path(os.path.realpath(root))
    exclude = Path(os.path.realpath(exclude)) if exclude is not None else None
    for folder, subfolders, files in os.walk(root):
        current = Path(folder)
        folder_inside = Path(os.path.realpath(current)).is_relative_to(real_root)  # once per folder
        prefix = current.relative_to(root).as_posix() + "/" if current != root else ""
        subfolders[:] = sorted(
            d for d in subfolders if not d.startswith(".") and Path(os.path.realpath(current / d)) != exclude
        )
        for name in sorted(files):
            if name.startswith(".") or not wanted(name):
                continue
            path = current / name
            relative = prefix + name
            try:
                problem = check_file(path, real_root, max_bytes(name), folder_inside)
            except OSError as e:
                problem = (UNREADABLE, f"cannot read file ({e.strerror or e})")
            yield Entry(relative, path) if problem is None else Entry(relative, path, *problem)
