"""What folders and shards of captioned images share: the record of one image, where it lies in a
shard, the problems found while reading captions, and the train/val/heldout split.

``records.py`` (folders) and ``shards.py`` (WebDataset tars) both build on this module.
"""

from __future__ import annotations

import hashlib
import os
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

SPLITS = ("train", "val", "heldout")

# Problem kinds found while reading captions (scan.py adds the image-decoding ones).
NO_CAPTION = "no-caption"
ORPHAN_CAPTION = "orphan-caption"
MANIFEST = "manifest"


class DatasetError(ValueError):
    """A dataset folder that cannot be used as asked."""


@dataclass(frozen=True)
class Member:
    """Where an image lies inside a tar shard (see ``duomodal.data.shards``)."""

    name: str  # the member's name in the tar
    offset: int  # byte offset of its data in the shard file; -1 for a remote shard (read by streaming only)
    size: int  # bytes


@dataclass(frozen=True)
class Record:
    path: Path  # absolute path of the image file, or of the shard holding it (see `member`)
    captions: tuple[str, ...]  # at least one
    split: str  # "train" | "val" | "heldout"
    labels: dict[str, str] = field(default_factory=dict, hash=False)  # extra manifest fields
    member: Member | None = None  # set when the image is a member of a WebDataset shard

    @property
    def location(self) -> str:
        """The image's place for messages and ordering: its path, or SHARD#MEMBER."""
        return str(self.path) if self.member is None else f"{self.path}#{self.member.name}"


@dataclass(frozen=True)
class Problem:
    path: str  # relative to the dataset folder, with "/" separators
    kind: str  # NO_CAPTION, ORPHAN_CAPTION, MANIFEST, or an ImageError kind, or "duplicate"
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"




def relative_key(relative: str) -> str:
    """The key under which a relative path is matched: "/" separators, Unicode NFC (so a manifest
    written on macOS matches files on Linux)."""
    return unicodedata.normalize("NFC", relative.replace(os.sep, "/"))


def caption_key(caption: str) -> str:
    """The key under which captions are compared: case and runs of spaces ignored, so captions that
    read the same count as the same (a retrieval hit is any item with the query's caption key)."""
    return " ".join(caption.lower().split())


def hash_split(relative: str, val_fraction: float) -> str:
    """"val" or "train" from the SHA-256 of the relative path: stable whatever else is in the folder."""
    digest = hashlib.sha256(relative_key(relative).encode("utf-8", "surrogateescape")).digest()
    position = int.from_bytes(digest[:8], "big") / 2.0**64  # uniform in [0, 1)
    return "val" if position < val_fraction else "train"
