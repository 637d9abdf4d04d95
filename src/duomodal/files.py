"""Files: atomic writes, JSON in and out, content hashes, opening user files safely.

Every checkpoint, index, dataset manifest and report is written through `atomic_write_bytes`, so a
reader (or a resumed run) sees the old file or the new one, never half of one. Every file a user's
folder holds (images, captions, manifests) is opened through `open_regular`, which refuses named
pipes, devices and sockets without blocking on them and refuses files over a size cap.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Any

from duomodal.config import ConfigError, to_dict

_HASH_CHUNK = 1 << 20


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` so that a reader sees the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # leave no half-written temporary file behind
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def save_json(data: Any, path: str | os.PathLike) -> None:
    """Save a config (dataclass) or plain data as indented JSON, atomically."""
    if dataclasses.is_dataclass(data):
        data = to_dict(data)
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def load_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path} does not exist") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None


class UnsafeFileError(OSError):
    """A file that is not a regular file, or larger than the cap it was opened with; `reason` (also
    the `strerror`) says which."""

    def __init__(self, path: str | os.PathLike, reason: str):
        super().__init__(0, reason, str(path))
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.filename}: {self.reason}"


def file_kind(mode: int) -> str:
    """What a stat mode is, in words, for messages: "a named pipe (FIFO)", "a character device"..."""
    if stat.S_ISREG(mode):
        return "a regular file"
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a special file"


def refusal(st: os.stat_result, max_bytes: int | None) -> str | None:
    """Why a file with status `st` must not be read (not regular, over `max_bytes`), or None."""
    if not stat.S_ISREG(st.st_mode):
        return f"not a regular file: it is {file_kind(st.st_mode)}"
    if max_bytes is not None and st.st_size > max_bytes:
        return f"file is {_mib(st.st_size)}, over the {_mib(max_bytes)} limit"
    return None


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n} bytes"


def open_regular(path: str | os.PathLike, max_bytes: int | None = None, follow_symlinks: bool = True):
    """Open a regular file for binary reading, or raise UnsafeFileError (special file, over
    `max_bytes`) or OSError (missing, unreadable; with follow_symlinks=False, a symlink: ELOOP).

    The path is stat-ed before opening (opening some devices has effects) and the open descriptor
    is checked again (the file may have been swapped in between); O_NONBLOCK means a named pipe
    never blocks the open.
    """
    st = os.stat(path, follow_symlinks=follow_symlinks)
    reason = refusal(st, max_bytes)
    if reason is not None:
        raise UnsafeFileError(path, reason)
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    if not follow_symlinks:
        flags |= os.O_NOFOLLOW
    fd = os.open(path, flags)
    try:
        reason = refusal(os.fstat(fd), max_bytes)
        if reason is not None:
            raise UnsafeFileError(path, reason)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: str | os.PathLike, max_bytes: int) -> bytes:
    """The bytes of a regular file of at most `max_bytes` (see `open_regular`); never reads more,
    even from a file that grows while it is read."""
    with open_regular(path, max_bytes) as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise UnsafeFileError(path, f"file grew past the {_mib(max_bytes)} limit while it was read")
    return data


def file_sha256(path: str | os.PathLike, max_bytes: int | None = None) -> str:
    """Hex SHA-256 of a regular file's bytes, read in 1 MiB chunks (UnsafeFileError for a special
    file or one over `max_bytes`)."""
    digest = hashlib.sha256()
    with open_regular(path, max_bytes) as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
