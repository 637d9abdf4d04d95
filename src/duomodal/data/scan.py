"""`duomodal data check`: is a dataset folder usable, and what is wrong in it.

Pairs images with captions (records.scan_dataset), then streams over the images one at a time:
content hash (duplicates), header size (decompression bombs), full decode (truncated and corrupt
files). Memory stays bounded by one image of at most `max_pixels` plus one hash per file.
"""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from duomodal.data.images import (
    DEFAULT_MAX_FILE_BYTES,
    DEFAULT_MAX_PIXELS,
    DEGENERATE,
    EMPTY,
    SPECIAL_FILE,
    TOO_LARGE,
    UNREADABLE,
    ImageError,
    load_image,
    load_image_bytes,
)
from duomodal.data.record_types import MANIFEST, NO_CAPTION, ORPHAN_CAPTION, Problem
from duomodal.data.records import scan_dataset
from duomodal.data.shards import ShardSample, ShardSet, is_shard_source, iter_samples, open_shards
from duomodal.data.walk import OUTSIDE_ROOT, OVERSIZED_FILE
from duomodal.files import file_sha256

DUPLICATE = "duplicate"
# Every problem kind, in the order the summary lists them, with the summary's words for it.
PROBLEM_KINDS = {
    NO_CAPTION: "images without caption",
    ORPHAN_CAPTION: "captions without image",
    UNREADABLE: "unreadable or corrupt images",
    EMPTY: "zero-byte files",
    TOO_LARGE: "images over the pixel limit",
    DEGENERATE: "degenerate or sliver images",
    SPECIAL_FILE: "pipes, devices, sockets",
    OUTSIDE_ROOT: "links out of the folder",
    OVERSIZED_FILE: "files over the size cap",
    DUPLICATE: "duplicate files",
    MANIFEST: "manifest problems",
}


@dataclass
class CheckReport:
    root: Path | str  # the folder, or the shard spec as given
    caption_source: str  # "sidecar .txt files", "captions.jsonl", "captions.csv" or ".txt/.json shard members"
    max_pixels: int
    image_count: int  # image files found
    captioned_count: int  # images with at least one caption
    caption_count: int  # caption texts over all images that exist
    usable_count: int  # captioned images that decode: what training will use
    problems: list[Problem]  # sorted by path

    @property
    def usable(self) -> bool:
        return self.usable_count > 0

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(PROBLEM_KINDS, 0)
        for problem in self.problems:
            counts[problem.kind] += 1
        return counts

    def to_dict(self) -> dict[str, Any]:
        return {
            "root": str(self.root),
            "caption_source": self.caption_source,
            "max_pixels": self.max_pixels,
            "images": self.image_count,
            "captioned_images": self.captioned_count,
            "captions": self.caption_count,
            "usable_images": self.usable_count,
            "usable": self.usable,
            "problem_counts": self.counts(),
            "problems": [{"path": p.path, "kind": p.kind, "reason": p.reason} for p in self.problems],
        }


def check_dataset(
    root: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS, progress: bool = False
) -> CheckReport:
    """Scan `root` and decode every image. Bad files become Problems; nothing is raised for them.
    Raises DatasetError only when `root` is not a folder."""
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be at least 1, got {max_pixels}")
    if is_shard_source(root):
        return check_shards(open_shards(root), max_pixels, progress)
    scan = scan_dataset(root)
    problems = list(scan.problems)
    captioned = set(scan.captioned_keys())
    first_with_hash: dict[str, str] = {}
    usable_count = 0
    bar = tqdm(scan.images.items(), total=len(scan.images), unit="image", desc="checking",
               file=sys.stderr, disable=not progress, dynamic_ncols=True)
    for key, relative in bar:
        path = scan.root / relative
        try:
            if path.stat().st_size > 0:
                digest = file_sha256(path, DEFAULT_MAX_FILE_BYTES)
                first = first_with_hash.setdefault(digest, relative)
                if first != relative:
                    problems.append(Problem(relative, DUPLICATE, f"duplicate: same content as {first}"))
            load_image(path, max_pixels=max_pixels)
        except ImageError as e:
            problems.append(Problem(relative, e.kind, e.reason))
            continue
        except OSError as e:  # UnsafeFileError too: the file was swapped for a pipe since the scan
            problems.append(Problem(relative, UNREADABLE, f"cannot read file ({e.strerror or e})"))
            continue
        if key in captioned:
            usable_count += 1
    bar.close()
    kind_order = {kind: i for i, kind in enumerate(PROBLEM_KINDS)}
    problems.sort(key=lambda p: (p.path, kind_order[p.kind]))
    return CheckReport(
        root=scan.root,
        caption_source=scan.caption_source,
        max_pixels=max_pixels,
        image_count=len(scan.images),
        captioned_count=len(captioned),
        caption_count=sum(len(scan.captions[key].captions) for key in captioned),
        usable_count=usable_count,
        problems=problems,
    )


def report_lines(report: CheckReport) -> list[str]:
    """The human-readable report: one line per problem, then the summary, then the verdict."""
    lines = [str(problem) for problem in report.problems]
    lines.append(f"checked {report.root} (captions from {report.caption_source})")
    rows = [
        ("images found", str(report.image_count)),
        ("captions found", f"{report.caption_count} for {report.captioned_count} images"),
        *((label, str(count)) for label, count in zip(PROBLEM_KINDS.values(), report.counts().values())),
    ]
    width = max(len(label) for label, _ in rows) + 1
    lines += [f"  {label + ':':<{width}} {value}" for label, value in rows]
    if report.usable:
        lines.append(f"usable: {report.usable_count} captioned images decode and can be used for training")
    else:
        lines.append("not usable: no captioned image that decodes")
    return lines


def check_shards(shards: ShardSet, max_pixels: int, progress: bool = False) -> CheckReport:
    """`duomodal data check` over shards: read every sample (streamed, one in memory at a time),
    decode every image; a ``CheckReport`` whose problems name SHARD#MEMBER."""
    problems: list[Problem] = []
    first_with_hash: dict[str, str] = {}
    samples = usable = captions = 0
    bar = tqdm(total=len(shards.urls), unit="shard", desc="checking", disable=not progress)
    current = None
    for item in iter_samples(shards, None, read_images=True):
        url = item.url if isinstance(item, ShardSample) else item.path.split("#")[0]
        if url != current:
            current = url
            bar.update(1)
        if isinstance(item, Problem):
            problems.append(item)
            continue
        samples += 1
        captions += len(item.captions)
        first = first_with_hash.setdefault(hashlib.sha256(item.image).hexdigest(), item.where)
        if first != item.where:
            problems.append(Problem(item.where, DUPLICATE, f"duplicate: same content as {first}"))
        try:
            load_image_bytes(item.image, item.where, max_pixels=max_pixels)
        except ImageError as e:
            problems.append(Problem(item.where, e.kind, e.reason))
            continue
        usable += 1
    bar.close()
    kind_order = {kind: i for i, kind in enumerate(PROBLEM_KINDS)}
    problems.sort(key=lambda p: (p.path, kind_order[p.kind]))
    without_caption = sum(1 for p in problems if p.kind == NO_CAPTION)
    return CheckReport(
        root=shards.spec,
        caption_source=".txt/.json shard members",
        max_pixels=max_pixels,
        image_count=samples + without_caption,
        captioned_count=samples,
        caption_count=captions,
        usable_count=usable,
        problems=problems,
    )
