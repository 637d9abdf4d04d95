"""Where an index's images come from: a folder of files, or local WebDataset shards.

Planning and embedding (plan.py, build.py) and serving an indexed image go through an
``ImageSource``, so both kinds behave the same: an image has a path (a folder's: relative to the
root; a shard's: ``SHARD#MEMBER``, the shard relative to the shards' folder), a size and mtime (a
shard member has its shard's mtime, so an unchanged shard is not read again), a content hash, an
optional caption and bytes. A member moved to another shard (a repack) is recognised by its hash,
as a renamed file is. Captions and member bytes are read by data's readers, as datasets read them:
a folder's from its manifest (captions.jsonl or captions.csv) or a sidecar .txt, a shard's from its
.txt/.json members.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from PIL import Image

from duomodal.data.images import (
    DEFAULT_MAX_FILE_BYTES,
    ImageError,
    is_image_path,
    load_image,
    load_image_bytes,
)
from duomodal.data.records import Problem, Record, read_manifest_captions, read_sidecar, relative_key
from duomodal.data.shards import index_shard, is_local, is_shard_source, open_shards, read_member
from duomodal.data.walk import MAX_CAPTION_FILE_BYTES, Entry, check_file, walk_files
from duomodal.files import file_sha256
from duomodal.search.store import IndexStoreError

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


class ImageSource(Protocol):
    """The images an index reads, each by the path recorded for it (`relative`)."""

    kind: str  # "folder" or "shards"

    def files(self) -> Iterator[SourceFile | Unreadable]:
        """Every image with its facts and caption, or the reason it cannot be indexed."""
        ...

    def sha256(self, relative: str) -> str: ...

    def exists(self, relative: str) -> bool:
        """Whether `relative` is still an indexable image of the source."""
        ...

    def load_image(self, relative: str) -> Image.Image:
        """The decoded image; ImageError when it cannot be."""
        ...

    def read_bytes(self, relative: str) -> bytes:
        """The image's bytes; OSError when it is gone or cut short."""
        ...

    def file_path(self, relative: str) -> Path | None:
        """The image's own file, or None for a shard member."""
        ...

    def display(self, relative: str) -> str:
        """Where the image is, for people."""
        ...


def open_source(root: str, index_dir: Path) -> ImageSource:
    """The source an index's recorded root names (a folder path or a shard spec)."""
    if is_shard_source(root):
        return ShardSource(root)
    return FolderSource(Path(root), index_dir)


def resolve_root(root: str | os.PathLike) -> str:
    """The root to record for a new index: an absolute folder, or an absolute local shard spec;
    IndexStoreError when it is neither."""
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
    the folder's manifest (captions.jsonl or captions.csv), else a sidecar .txt next to the image.
    Special files, links that lead out of the folder and files over the size cap are Unreadable,
    with the walk's reason."""

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
            caption = manifest.get(relative_key(entry.relative)) or _sidecar_caption(self.real_root, entry.path)
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

    def read_bytes(self, relative: str) -> bytes:
        return (self.root / relative).read_bytes()

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
        self.spec = spec
        self.shards = open_shards(spec)
        self.base = Path(os.path.commonpath([str(Path(u).parent) for u in self.shards.urls]))
        self._members: dict[str, Record] | None = None  # by recorded path

    def files(self) -> Iterator[SourceFile | Unreadable]:
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
                self._members[relative] = sample.record()
                caption = sample.captions[0][:MAX_CAPTION_CHARS] if sample.captions else None
                yield SourceFile(relative, sample.size, mtime_ns, caption)

    def _name(self, shard: Path) -> str:
        return shard.relative_to(self.base).as_posix()

    def _member(self, relative: str) -> Record:
        if self._members is None:  # opened to serve or embed without a scan
            for _ in self.files():
                pass
        found = self._members.get(relative)
        if found is None:
            raise FileNotFoundError(f"{relative} is not in the shards of {self.spec}")
        return found

    def read_bytes(self, relative: str) -> bytes:
        record = self._member(relative)
        try:
            return read_member(record)
        except ValueError as e:  # a shard cut short: as gone as a missing file
            raise OSError(f"{record.location}: {e}") from None

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
    """The first caption of each image (by ``relative_key``) from the folder's manifest,
    captions.jsonl or captions.csv, read as a dataset's is (``data.records``); {} without one. A row
    the dataset reader refuses gives no caption (`duomodal data check` names it)."""
    manifest = read_manifest_captions(root, [])
    if manifest is None:
        return {}
    return {key: entry.captions[0][:MAX_CAPTION_CHARS] for key, entry in manifest[1].items() if entry.captions}


def _sidecar_caption(real_root: Path, path: Path) -> str | None:
    """The first caption of the sidecar .txt next to `path` (a regular file inside the root of at
    most MAX_CAPTION_FILE_BYTES, UTF-8; any other sidecar is ignored)."""
    sidecar = path.with_suffix(".txt")
    try:
        if check_file(sidecar, real_root, MAX_CAPTION_FILE_BYTES) is not None:
            return None
        captions = read_sidecar(sidecar)
    except (OSError, UnicodeDecodeError):
        return None
    return captions[0][:MAX_CAPTION_CHARS] if captions else None
