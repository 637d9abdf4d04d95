"""WebDataset tar shards as a dataset source: finding them, reading their samples, packing a folder.

A sample is the run of tar members sharing a key (the member name up to the first dot of its base
name: webdataset's rule): one image (jpg, jpeg, png, webp, bmp or gif) and its captions, from a
``.txt`` member (one caption a line) and/or a ``.json`` member ("caption": a string or a list of
strings, else "captions", else "text"), as img2dataset writes them. A ``.json`` may also give
"split" (train, val, heldout) or "heldout": true, and "labels" (an object of strings); without a
split the sample's split comes from the hash of its key, as a folder's comes from its path.

A source is one of:
- a packed dataset folder holding ``shards.json`` (written by ``duomodal data pack``): the shards of
  each split listed apart, so a split is read without reading the others;
- a pattern: ``shards/{00000..00099}.tar`` (brace expansion), one ``.tar`` file, or URLs (``http://``,
  ``https://``, ``pipe:CMD``: whatever ``webdataset.gopen`` opens).

Local shards are indexed (member headers and caption members read, image data skipped by seeking):
their records point at (shard, offset, size), so every command can read any image of them. Remote
shards are read as a stream only (`stream_shard`): training streams them; commands that need one
image at a time (index build, eval, DALL-E's token cache) ask for a local copy.
"""

from __future__ import annotations

import json
import os
import re
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from duomodal.data.images import IMAGE_EXTENSIONS, UNREADABLE
from duomodal.data.record_types import (
    MANIFEST,
    NO_CAPTION,
    ORPHAN_CAPTION,
    SPLITS,
    DatasetError,
    Member,
    Problem,
    Record,
    hash_split,
)

SHARD_MANIFEST = "shards.json"
MANIFEST_VERSION = 1
MAX_TEXT_MEMBER = 1 << 20  # bytes: a caption member larger than this is refused (not read into memory)
_URL = re.compile(r"^(?:[a-z][a-z0-9+.-]*://|pipe:)")
_IMAGE_EXTS = tuple(e[1:] for e in IMAGE_EXTENSIONS)
_KEY = re.compile(r"^((?:.*/|)[^./]+)[.]([^/]*)$")  # webdataset's base_plus_ext


def is_shard_source(data: str | os.PathLike) -> bool:
    """Whether `data` names shards (a URL, a .tar path or pattern, a packed folder), not a folder of files."""
    text = str(data)
    if _URL.match(text) or re.search(r"\.tar(\.gz)?($|\})", text) or re.search(r"\{[^}]*\.\.[^}]*\}", text):
        return True
    return (Path(text) / SHARD_MANIFEST).is_file()


def is_local(url: str) -> bool:
    return not _URL.match(url) or url.startswith("file://")


def _local_path(url: str) -> Path:
    return Path(url.removeprefix("file://"))


@dataclass(frozen=True)
class ShardSet:
    """The shards of a source, in order, and (for a packed folder) the shards of each split."""

    spec: str  # as given
    urls: tuple[str, ...]
    split_urls: dict[str, tuple[str, ...]] | None = field(default=None, hash=False)  # packed folders only
    counts: dict[str, int] | None = field(default=None, hash=False)  # samples per split (packed folders)

    def urls_for(self, split: str | None) -> tuple[str, ...]:
        """The shards that may hold samples of `split` (None: all)."""
        if split is None or self.split_urls is None:
            return self.urls
        return self.split_urls.get(split, ())

    @property
    def local(self) -> bool:
        return all(is_local(u) for u in self.urls)


def open_shards(spec: str | os.PathLike) -> ShardSet:
    """The shards `spec` names; DatasetError when there are none or local ones are missing."""
    text = str(spec)
    manifest = Path(text) / SHARD_MANIFEST
    if not _URL.match(text) and manifest.is_file():
        return _read_manifest(Path(text))
    from braceexpand import braceexpand  # webdataset's own dependency (the shards extra): loaded only for shards

    urls = tuple(braceexpand(text))
    missing = [u for u in urls if is_local(u) and not _local_path(u).is_file()]
    if missing:
        raise DatasetError(
            f"{len(missing)} of the {len(urls)} shards of {text} do not exist, the first: {missing[0]}; "
            "check the pattern (e.g. shards/{00000..00099}.tar)"
        )
    return ShardSet(text, urls)


def _read_manifest(root: Path) -> ShardSet:
    path = root / SHARD_MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        if manifest.get("version") != MANIFEST_VERSION:
            raise ValueError(f"version {manifest.get('version')!r}, this duomodal reads {MANIFEST_VERSION}")
        splits = {s: tuple(str(root / name) for name in manifest["splits"][s]) for s in manifest["splits"]}
        counts = {s: int(n) for s, n in manifest["counts"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise DatasetError(f"{path} is not a readable shard manifest ({e}); pack the dataset again") from None
    unknown = [s for s in splits if s not in SPLITS]
    if unknown:
        raise DatasetError(f"{path} lists split {unknown[0]!r}, not one of {', '.join(SPLITS)}")
    missing = [u for urls in splits.values() for u in urls if not Path(u).is_file()]
    if missing:
        raise DatasetError(f"{path} lists {missing[0]}, which does not exist; pack the dataset again")
    urls = tuple(u for s in SPLITS for u in splits.get(s, ()))
    return ShardSet(str(root), urls, splits, counts)


# --- samples -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardSample:
    """One sample of a shard, its image not decoded."""

    url: str
    key: str
    image_name: str  # the image member's name
    captions: tuple[str, ...]
    split: str
    labels: dict[str, str]
    image: bytes | None  # the image bytes (streamed samples); None when indexed
    offset: int = -1  # where the image bytes lie in a local shard (indexed samples)
    size: int = 0

    @property
    def where(self) -> str:
        return f"{self.url}#{self.image_name}"

    def record(self) -> Record:
        member = Member(self.image_name, self.offset, self.size if self.image is None else len(self.image))
        return Record(Path(self.url.removeprefix("file://")), self.captions, self.split, self.labels, member)


SampleOrProblem = ShardSample | Problem


def _group(url: str, members: Iterator[tuple[str, Any]]) -> Iterator[tuple[str, dict[str, tuple[str, Any]]]]:
    """Runs of members sharing a key: (key, {extension (lower case): (member name, payload)})."""
    key, group = None, {}
    for name, payload in members:
        match = _KEY.match(name)
        if match is None or os.path.basename(name).startswith("__"):
            continue  # no extension, or webdataset metadata such as __index__
        member_key, ext = match.group(1), match.group(2).lower()
        if member_key != key:
            if key is not None:
                yield key, group
            key, group = member_key, {}
        group[ext] = (name, payload)
    if key is not None:
        yield key, group


def _interpret(url: str, key: str, group: dict[str, tuple[str, Any]], val_fraction: float,
               text_of: Callable[[Any], bytes],
               require_caption: bool = True) -> tuple[str, tuple[str, ...], str, dict[str, str]] | Problem:
    """(image extension, captions, split, labels) of a sample, or the Problem that skips it."""
    where = f"{url}#{key}"
    image_ext = next((ext for ext in group if ext in _IMAGE_EXTS or ext.split(".")[-1] in _IMAGE_EXTS), None)
    if image_ext is None:
        found = ", ".join(sorted(group)) or "nothing"
        return Problem(where, ORPHAN_CAPTION, f"caption without image: the sample has {found} but no image member")
    captions: list[str] = []
    split, labels = None, {}
    for ext in ("txt", "json"):
        if ext not in group:
            continue
        try:
            raw = text_of(group[ext][1])
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            return Problem(where, MANIFEST, f"{group[ext][0]} is not UTF-8 text (byte {e.start})")
        except ValueError as e:
            return Problem(where, MANIFEST, str(e))
        if ext == "txt":
            captions.extend(line.strip() for line in text.splitlines())
            continue
        try:
            meta = json.loads(text)
            if not isinstance(meta, dict):
                raise ValueError(f"expected an object, got {type(meta).__name__}")
            captions.extend(_json_captions(meta))
            split = _json_split(meta)
            raw_labels = meta.get("labels") or {}
            if not isinstance(raw_labels, dict):
                raise ValueError('"labels" must be an object')
            labels = {str(k): str(v) for k, v in raw_labels.items()}
        except ValueError as e:  # json.JSONDecodeError is a ValueError
            return Problem(where, MANIFEST, f"{group[ext][0]}: {e}")
    captions = list(dict.fromkeys(c for c in captions if c))
    if not captions and require_caption:
        return Problem(where, NO_CAPTION, "no caption (no .txt or .json member with caption text)")
    return image_ext, tuple(captions), split or hash_split(key, val_fraction), labels


def _json_captions(meta: dict[str, Any]) -> list[str]:
    for name in ("caption", "captions", "text"):
        value = meta.get(name)
        if value is None:
            continue
        if isinstance(value, str):
            return [value.strip()]
        if isinstance(value, list) and all(isinstance(c, str) for c in value):
            return [c.strip() for c in value]
        raise ValueError(f'"{name}" must be a string or a list of strings')
    return []


def _json_split(meta: dict[str, Any]) -> str | None:
    if meta.get("heldout") is True:
        return "heldout"
    split = meta.get("split")
    if split in (None, ""):
        return None
    if split not in SPLITS:
        raise ValueError(f'split {split!r} is not one of {", ".join(SPLITS)}')
    return split


def index_shard(url: str, val_fraction: float = 0.05, require_caption: bool = True) -> Iterator[SampleOrProblem]:
    """The samples of a local uncompressed shard, images left on disk (offset and size recorded).
    A shard that is not a readable tar yields one Problem and ends. Without `require_caption`,
    samples without captions are yielded too (with none)."""
    path = _local_path(url)

    def text_of(payload: tuple[int, int]) -> bytes:
        offset, size = payload
        if size > MAX_TEXT_MEMBER:
            raise ValueError(f"a caption member of {size} bytes (more than {MAX_TEXT_MEMBER}) is refused")
        f.seek(offset)
        return f.read(size)

    try:
        with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            members = ((m.name, (m.offset_data, m.size)) for m in _regular_members(tar))
            for key, group in _group(url, members):
                found = _interpret(url, key, group, val_fraction, text_of, require_caption)
                if isinstance(found, Problem):
                    yield found
                    continue
                ext, captions, split, labels = found
                name, (offset, size) = group[ext]
                yield ShardSample(url, key, name, captions, split, labels, None, offset, size)
    except (tarfile.TarError, OSError, EOFError) as e:
        yield Problem(url, UNREADABLE, f"not a readable tar shard ({e}); the rest of it is skipped")


def stream_shard(url: str, val_fraction: float = 0.05) -> Iterator[SampleOrProblem]:
    """The samples of any shard (local or remote, compressed or not), read front to back holding one
    sample in memory. A shard that cannot be read to its end yields one Problem and ends."""
    # webdataset (the shards extra) loads here: folder datasets work without it
    import webdataset

    try:
        with webdataset.gopen(url, "rb") as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            members = ((m.name, tar.extractfile(m).read()) for m in _regular_members(tar))
            for key, group in _group(url, members):
                found = _interpret(url, key, group, val_fraction, lambda data: data)
                if isinstance(found, Problem):
                    yield found
                    continue
                ext, captions, split, labels = found
                name, data = group[ext]
                yield ShardSample(url, key, name, captions, split, labels, data)
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        yield Problem(url, UNREADABLE, f"not a readable tar shard ({e}); the rest of it is skipped")


def _regular_members(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    for member in tar:
        if member.isfile():
            yield member


def iter_samples(shards: ShardSet, split: str | None = None, val_fraction: float = 0.05,
                 read_images: bool = False) -> Iterator[SampleOrProblem]:
    """Every sample (of `split`, None: all) and problem of the shard set, in shard order. Local
    uncompressed shards are indexed unless `read_images`; the others are streamed."""
    for url in shards.urls_for(split):
        stream = read_images or not is_local(url) or not url.endswith(".tar")
        for item in (stream_shard if stream else index_shard)(url, val_fraction):
            if isinstance(item, ShardSample) and split is not None and item.split != split:
                continue
            yield item


def load_shard_records(shards: ShardSet, val_fraction: float = 0.05) -> list[Record]:
    """The captioned samples of `shards` as Records (in shard order); bad samples are left out."""
    records = [item.record() for item in iter_samples(shards, None, val_fraction) if isinstance(item, ShardSample)]
    if not records:
        raise DatasetError(
            f"no captioned images in the {len(shards.urls)} shard(s) of {shards.spec}; a sample needs an "
            "image member and a .txt or .json member with its caption (`duomodal data check` lists the problems)"
        )
    return records


def read_member(record: Record) -> bytes:
    """The bytes of a record's image member (local shards); OSError or ValueError when unreadable."""
    member = record.member
    if member is None:
        raise ValueError(f"{record.path} is a plain file, not a shard member")
    if member.offset < 0:
        raise ValueError(
            f"{record.location} is in a remote shard, which is read as a stream only; copy the shards "
            "to local storage for this command"
        )
    with open(record.path, "rb") as f:
        f.seek(member.offset)
        data = f.read(member.size)
    if len(data) != member.size:
        raise ValueError(f"the shard ends after {len(data)} of the member's {member.size} bytes (truncated?)")
    return data
