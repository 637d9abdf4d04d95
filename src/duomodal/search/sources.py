"""Where an index's images come from: a folder of files, or local WebDataset shards.

Planning and embedding (plan.py, build.py) and serving an indexed image go through a source, so both
kinds behave the same: an image has a path (a folder's: relative to the root; a shard's:
``SHARD#MEMBER``, the shard relative to the shards' folder), a size and mtime (a shard member has
its shard's mtime, so an unchanged shard is not read again), a content hash, an optional caption
and bytes. A member moved to another shard (a repack) is recognised by its hash, as a renamed file is.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from duomodal.data.images import (
    DEFAULT_MAX_FILE_BYTES,
    ImageError,
    is_image_path,
    load_image,
    load_image_bytes,
)
from duomodal.data.walk import (
    MAX_CAPTION_FILE_BYTES,
    MAX_MANIFEST_BYTES,
    Entry,
    check_file,
    walk_files,
)
from duomodal.files import file_sha256, read_regular
from duomodal.search.store import IndexStoreError

CAPTION_MANIFEST = "captions.jsonl"
MAX_CAPTION_CHARS = 1000


@dataclass(frozen=True)
class SourceFile:
    relative: str  # the path recorded in the index
    size: int
    mtime_ns: int
    caption: str | None


@dataclass(frozen=True)
class Unreadable:
    relative: str
    reason: str


def open_source(root: str, index_dir: Path) -> FolderSource | ShardSource:
    """The source an index's recorded root names (a folder path or a shard spec)."""
    from duomodal.data.shards import is_shard_source

    if is_shard_source(root):
        return ShardSource(root)
    return FolderSource(Path(root), index_dir)


def resolve_root(root: str | os.PathLike) -> str:
    """The root to record for a new index: an absolute folder, or an absolute local shard spec;
    IndexStoreError when it is neither."""
    from duomodal.data.shards import is_local, is_shard_source

    text = str(root)
    if is_shard_source(text):
        if not is_local(text):
            raise IndexStoreError(
                f"{text}: an index reads local shards (it serves images from them); copy the shards to local "
                "or shared storage and index that copy"
            )
        return str(Path(text).absolute())
    path = Path(text).resolve()
    if not path.is_dir():
        raise IndexStoreError(f"{path} is not a directory of images")
    return str(path)


class FolderSource:
    """Image files under a folder (hidden names and the index directory left out); captions from
    ROOT/captions.jsonl, else a sidecar .txt next to the image. Special files, links that lead out
    of the folder and files over the size cap are Unreadable, with the walk's reason."""

    kind = "folder"

    def __init__(self, root: Path, index_dir: Path):
        self.root = root
        self.real_root = Path(os.path.realpath(root))
        self.index_dir = index_dir.resolve()

    def files(self) -> Iterator[SourceFile | Unreadable]:
        manifest = read_caption_manifest(self.root)
        for entry in iter_image_files(self.root, exclude=self.index_dir):
            if entry.skip_reason is not None:
                yield Unreadable(entry.relative, entry.skip_reason)
                continue
            try:
                stat = entry.path.stat()
            except OSError as e:
                yield Unreadable(entry.relative, f"cannot read file ({e.strerror or e})")
                continue
            caption = _caption(self.real_root, entry.path, entry.relative, manifest)
            yield SourceFile(entry.relative, stat.st_size, stat.st_mtime_ns, caption)

    def sha256(self, relative: str) -> str:
        return file_sha256(self.root / relative, DEFAULT_MAX_FILE_BYTES)

    def exists(self, relative: str) -> bool:
        """Whether `relative` is still an indexable image: a regular file inside the root (a link
        may lead only inside it) under the size cap, outside the index directory."""
        path = self.root / relative
        try:
            unusable = check_file(path, self.real_root, DEFAULT_MAX_FILE_BYTES) is not None
        except OSError:
            return False
        return not unusable and is_image_path(path) and not path.resolve().is_relative_to(self.index_dir)

    def load_image(self, relative: str) -> Image.Image:
        return load_image(self.root / relative)

    def file_path(self, relative: str) -> Path:
        return self.root / relative

    def display(self, relative: str) -> str:
        """Where the image is, for people: its absolute path."""
        return str(self.root / relative)


class ShardSource:
    """The images of local WebDataset shards (a packed folder or a pattern; see data/shards.py),
    every sample with an image, captioned or not. `files` must run first: it indexes the shards."""

    kind = "shards"

    def __init__(self, spec: str):
        from duomodal.data.shards import open_shards

        self.spec = spec
        self.shards = open_shards(spec)
        self.base = Path(os.path.commonpath([str(Path(u).parent) for u in self.shards.urls]))
        self._members: dict[str, tuple[Path, int, int]] | None = None

    def files(self) -> Iterator[SourceFile | Unreadable]:
        from duomodal.data.records import Problem
        from duomodal.data.shards import index_shard

        self._members = {}
        for url in self.shards.urls:
            shard = Path(url)
            try:
                mtime_ns = shard.stat().st_mtime_ns
            except OSError as e:
                yield Unreadable(self._name(shard), f"cannot read shard ({e.strerror or e})")
                continue
            for sample in index_shard(url, require_caption=False):
                if isinstance(sample, Problem):
                    yield Unreadable(sample.path.replace(url, self._name(shard), 1), sample.reason)
                    continue
                relative = f"{self._name(shard)}#{sample.image_name}"
                if sample.size > DEFAULT_MAX_FILE_BYTES:  # the folder's cap on one image file
                    limit_mib = DEFAULT_MAX_FILE_BYTES // 2**20
                    yield Unreadable(relative, f"member is {sample.size / 2**20:.1f} MiB, over the {limit_mib} MiB limit")
                    continue
                self._members[relative] = (shard, sample.offset, sample.size)
                caption = sample.captions[0][:MAX_CAPTION_CHARS] if sample.captions else None
                yield SourceFile(relative, sample.size, mtime_ns, caption)

    def _name(self, shard: Path) -> str:
        return shard.relative_to(self.base).as_posix()

    def _member(self, relative: str) -> tuple[Path, int, int]:
        if self._members is None:  # opened to serve or embed without a scan
            for _ in self.files():
                pass
        found = self._members.get(relative)
        if found is None:
            raise FileNotFoundError(f"{relative} is not in the shards of {self.spec}")
        return found

    def read_bytes(self, relative: str) -> bytes:
        shard, offset, size = self._member(relative)
        with open(shard, "rb") as f:
            f.seek(offset)
            data = f.read(size)
        if len(data) != size:
            raise OSError(f"{shard} ends inside member {relative}")
        return data

    def sha256(self, relative: str) -> str:
        return hashlib.sha256(self.read_bytes(relative)).hexdigest()

    def exists(self, relative: str) -> bool:
        try:
            self._member(relative)
        except FileNotFoundError:
            return False
        return True

    def load_image(self, relative: str) -> Image.Image:
        try:
            data = self.read_bytes(relative)
        except OSError as e:
            raise ImageError(relative, f"cannot read shard member ({e})") from None
        return load_image_bytes(data, relative)

    def file_path(self, relative: str) -> None:
        return None  # a member has no file of its own

    def display(self, relative: str) -> str:
        """Where the image is, for people: /path/to/SHARD.tar#MEMBER."""
        return str(self.base / relative)


# --- folders --------------------------------------------------------------------------------------


def iter_image_files(root: Path, exclude: Path | None = None) -> Iterator[Entry]:
    """Every image file under `root` (see `walk_files`): hidden names and `exclude` left out,
    symlinked folders not followed; special files, links out of `root` and files over the size cap
    come with their skip reason."""
    return walk_files(root, is_image_path, lambda name: DEFAULT_MAX_FILE_BYTES, exclude=exclude)


def read_caption_manifest(root: Path) -> dict[str, str]:
    """First caption per file from ROOT/captions.jsonl (lines of {"file": ..., "caption": str | [str]}).
    A manifest that is not a regular file inside `root` under MAX_MANIFEST_BYTES is ignored."""
    path = root / CAPTION_MANIFEST
    captions: dict[str, str] = {}
    try:
        if not os.path.lexists(path) or check_file(path, Path(os.path.realpath(root)), MAX_MANIFEST_BYTES):
            return captions
        text = read_regular(path, MAX_MANIFEST_BYTES).decode("utf-8-sig", errors="replace")
    except OSError:
        return captions
    for line in text.splitlines():
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


def _caption(real_root: Path, path: Path, relative: str, manifest: dict[str, str]) -> str | None:
    """The manifest's caption, or the first line of the sidecar .txt (a regular file inside the
    root of at most MAX_CAPTION_FILE_BYTES; any other sidecar is ignored)."""
    if relative in manifest:
        return manifest[relative]
    sidecar = path.with_suffix(".txt")
    try:
        if check_file(sidecar, real_root, MAX_CAPTION_FILE_BYTES) is not None:
            return None
        text = read_regular(sidecar, MAX_CAPTION_FILE_BYTES).decode("utf-8-sig", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        if line.strip():
            return line.strip()[:MAX_CAPTION_CHARS]
    return None
