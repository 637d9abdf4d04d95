"""Finding a dataset's images and their captions, and splitting them train/val/heldout.

A dataset is a folder (sub-folders scanned; names starting with "." skipped) of images, captioned
in one of two ways:
  (a) a sidecar text file next to each image, same name with `.txt` (`cat.jpg` + `cat.txt`), one
      caption per line, blank lines ignored;
  (b) a manifest at the top of the folder: `captions.jsonl` (one JSON object a line: "file", the
      image path relative to the folder, and "caption", a string or a list of strings) or
      `captions.csv` (a header with "file" and "caption" columns; several rows for one file give it
      several captions). Other fields become `Record.labels`; an optional "split" (train, val or
      heldout) overrides the hash split, and "heldout": true puts the image in "heldout".
With a manifest, sidecar .txt files are not read.

Without a manifest split, an image is in "val" when the hash of its path relative to the folder
falls below `val_fraction`: adding or removing other files never moves it across the split.

Reading the captions never decodes an image (see `scan.check_dataset` for that): this is quick.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from duomodal.data.images import DEFAULT_MAX_FILE_BYTES, IMAGE_EXTENSIONS, SPECIAL_FILE, UNREADABLE, is_image_path
from duomodal.data.walk import (
    MAX_CAPTION_FILE_BYTES,
    MAX_MANIFEST_BYTES,
    OUTSIDE_ROOT,
    OVERSIZED_FILE,
    check_file,
    walk_files,
)
from duomodal.data.record_types import (
    MANIFEST,
    NO_CAPTION,
    ORPHAN_CAPTION,
    SPLITS,
    DatasetError,
    Problem,
    Record,
    hash_split,
    relative_key,
)
from duomodal.data.shards import is_shard_source, load_shard_records, open_shards
from duomodal.files import UnsafeFileError, read_regular

log = logging.getLogger(__name__)
JSONL_MANIFEST = "captions.jsonl"
CSV_MANIFEST = "captions.csv"
_RESERVED_FIELDS = ("file", "caption", "split", "heldout")
_TRUE = ("true", "1", "yes")
_FALSE = ("false", "0", "no", "")

# Files the walk refuses to read (walk.py): logged and left out by load_records.
UNSAFE_KINDS = (SPECIAL_FILE, OUTSIDE_ROOT, OVERSIZED_FILE, UNREADABLE)


@dataclass
class CaptionEntry:
    """The captions given for one image path (which may not exist)."""

    relative: str  # the path as written (sidecar: the .txt file's image stem)
    captions: list[str]
    source: str  # "cat.txt" or "captions.jsonl line 3": where the captions come from
    split: str | None = None
    labels: dict[str, str] = field(default_factory=dict)


@dataclass
class DatasetScan:
    """What is in a dataset folder, before any image is decoded."""

    root: Path  # absolute
    caption_source: str  # "sidecar .txt files", "captions.jsonl" or "captions.csv"
    images: dict[str, str]  # key (NFC relative path) -> relative path on disk, sorted by key
    captions: dict[str, CaptionEntry]  # key -> the captions of the image with that key
    problems: list[Problem]  # manifest errors, captions without image, images without caption

    def captioned_keys(self) -> list[str]:
        return [key for key in self.images if key in self.captions and self.captions[key].captions]




def find_files(root: Path, skipped: list[Problem] | None = None) -> tuple[list[str], list[str]]:
    """(image paths, .txt paths) relative to `root`, sorted; hidden files and folders skipped.
    Files that must not be read (special files, links out of `root`, over the size caps) are left
    out, each added to `skipped` as a Problem naming why."""
    images: list[str] = []
    texts: list[str] = []

    def wanted(name: str) -> bool:
        return is_image_path(name) or name.lower().endswith(".txt")

    def cap(name: str) -> int:
        return DEFAULT_MAX_FILE_BYTES if is_image_path(name) else MAX_CAPTION_FILE_BYTES

    for entry in walk_files(root, wanted, cap):
        if entry.skip_kind is not None:
            if skipped is not None:
                skipped.append(Problem(entry.relative, entry.skip_kind, f"skipped: {entry.skip_reason}"))
        elif is_image_path(entry.relative):
            images.append(entry.relative)
        else:
            texts.append(entry.relative)
    return sorted(images), sorted(texts)


def scan_dataset(root: str | os.PathLike) -> DatasetScan:
    """Find images and captions under `root` and pair them; problems are collected, not raised."""
    root = Path(root).absolute()
    if not root.is_dir():
        what = "does not exist" if not root.exists() else "is not a folder"
        raise DatasetError(f"dataset folder {root} {what}")
    problems: list[Problem] = []
    image_paths, text_paths = find_files(root, problems)
    images = {relative_key(p): p for p in image_paths}
    manifest = read_manifest_captions(root, problems)
    if manifest is not None:
        source, entries = manifest
    else:
        source = "sidecar .txt files"
        entries = _read_sidecars(root, images, text_paths, problems)
    for key, entry in entries.items():
        if key not in images:  # only manifests name missing files: sidecar orphans are reported above
            reason = f"caption without image: {entry.source} names a file that does not exist"
            problems.append(Problem(entry.relative, ORPHAN_CAPTION, reason))
    for key, relative in images.items():
        entry = entries.get(key)
        if entry is None:
            where = f"no {Path(relative).stem}.txt next to it" if source.startswith("sidecar") else f"not in {source}"
            problems.append(Problem(relative, NO_CAPTION, f"no caption ({where})"))
        elif not entry.captions:
            problems.append(Problem(relative, NO_CAPTION, f"no caption ({entry.source} has no caption text)"))
    return DatasetScan(root, source, images, entries, problems)


def load_records(root: str | os.PathLike, val_fraction: float = 0.05) -> list[Record]:
    """The captioned images under `root`, sorted by path. Images without caption are left out;
    an error in the manifest, or a folder without any captioned image, raises DatasetError.
    `root` may also name WebDataset shards (see ``duomodal.data.shards``): their records are
    read from the shards' caption members, in shard order."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if is_shard_source(root):
        return load_shard_records(open_shards(root), val_fraction)
    scan = scan_dataset(root)
    manifest_problems = [p for p in scan.problems if p.kind == MANIFEST]
    if manifest_problems:
        raise DatasetError(
            f"{scan.root}: {len(manifest_problems)} problem(s) in the caption manifest, the first: "
            f"{manifest_problems[0]}; fix them (`duomodal data check {scan.root}` lists them all)"
        )
    unsafe = [p for p in scan.problems if p.kind in UNSAFE_KINDS]
    for problem in unsafe:
        log.warning("skipping %s", problem)
    if unsafe:
        log.warning("%d files under %s are not read (special files, links out, oversized)", len(unsafe), scan.root)
    records = []
    for key in scan.captioned_keys():
        relative = scan.images[key]
        entry = scan.captions[key]
        split = entry.split or hash_split(relative, val_fraction)
        records.append(Record(scan.root / relative, tuple(entry.captions), split, dict(entry.labels)))
    if not records:
        raise DatasetError(
            f"no captioned images in {scan.root} ({len(scan.images)} images found, captions from "
            f"{scan.caption_source}); give each image a .txt file of captions or add a {JSONL_MANIFEST}"
        )
    return records


def filter_split(records: Iterable[Record], split: str) -> list[Record]:
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    return [r for r in records if r.split == split]


# --- sidecar .txt files ---------------------------------------------------------------------------


def _read_sidecars(
    root: Path, images: dict[str, str], text_paths: list[str], problems: list[Problem]
) -> dict[str, CaptionEntry]:
    images_by_stem: dict[str, list[str]] = {}
    for key in images:
        images_by_stem.setdefault(_strip_suffix(key), []).append(key)
    entries: dict[str, CaptionEntry] = {}
    for text_path in text_paths:
        stem = _strip_suffix(text_path)
        keys = images_by_stem.get(relative_key(stem))
        if not keys:
            reason = f"caption without image: no image named {Path(stem).name}.* next to it"
            problems.append(Problem(text_path, ORPHAN_CAPTION, reason))
            continue
        try:
            captions = read_sidecar(root / text_path)
            source = text_path
        except UnicodeDecodeError as e:
            captions, source = [], f"{text_path} (not UTF-8 text: byte {e.start})"
        except OSError as e:
            captions, source = [], f"{text_path} (unreadable: {e.strerror or e})"
        for key in keys:
            entries[key] = CaptionEntry(images[key], captions, source)
    return entries


def read_sidecar(path: Path) -> list[str]:
    """The captions of a sidecar .txt file: one a line, blank lines left out, each once. The caller
    has checked the file (a regular file inside the folder, at most MAX_CAPTION_FILE_BYTES);
    OSError or UnicodeDecodeError when it cannot be read as UTF-8 text."""
    text = read_regular(path, MAX_CAPTION_FILE_BYTES).decode("utf-8-sig")
    return _unique(line.strip() for line in text.splitlines())


def _strip_suffix(relative: str) -> str:
    slash = relative.rfind("/")
    dot = relative.rfind(".")
    return relative[:dot] if dot > slash + 1 else relative


# --- manifests ------------------------------------------------------------------------------------


def read_manifest_captions(root: Path, problems: list[Problem]) -> tuple[str, dict[str, CaptionEntry]] | None:
    """(manifest name, captions by relative_key) from ROOT/captions.jsonl, else ROOT/captions.csv;
    None when the folder has neither. What is wrong in a manifest is added to `problems`."""
    jsonl, csv_path = root / JSONL_MANIFEST, root / CSV_MANIFEST
    if os.path.lexists(jsonl):
        entries = _read_jsonl(jsonl, root, problems)
        if os.path.lexists(csv_path):
            problems.append(Problem(CSV_MANIFEST, MANIFEST, f"ignored: {JSONL_MANIFEST} is used; keep one manifest"))
        return JSONL_MANIFEST, entries
    if os.path.lexists(csv_path):
        return CSV_MANIFEST, _read_csv(csv_path, root, problems)
    return None


def _read_jsonl(path: Path, root: Path, problems: list[Problem]) -> dict[str, CaptionEntry]:
    entries: dict[str, CaptionEntry] = {}
    try:
        lines = _read_manifest(path, root).decode("utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        problems.append(Problem(JSONL_MANIFEST, MANIFEST, f"cannot read the manifest: {e}"))
        return entries
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(_manifest_problem(JSONL_MANIFEST, where, f"not valid JSON ({e.msg}, column {e.colno})"))
            continue
        if not isinstance(row, dict):
            reason = f'expected an object with "file" and "caption", got {type(row).__name__}'
            problems.append(_manifest_problem(JSONL_MANIFEST, where, reason))
            continue
        captions = row.get("caption")
        if isinstance(captions, str):
            captions = [captions]
        elif captions is None:
            captions = []
        elif not (isinstance(captions, list) and all(isinstance(c, str) for c in captions)):
            reason = '"caption" must be a string or a list of strings'
            problems.append(_manifest_problem(JSONL_MANIFEST, where, reason))
            continue
        _add_manifest_row(row, captions, JSONL_MANIFEST, where, root, entries, problems)
    return entries


def _read_csv(path: Path, root: Path, problems: list[Problem]) -> dict[str, CaptionEntry]:
    entries: dict[str, CaptionEntry] = {}
    try:
        text = _read_manifest(path, root).decode("utf-8-sig")
        with io.StringIO(text, newline="") as f:
            reader = csv.DictReader(f)
            columns = reader.fieldnames or []
            missing = [c for c in ("file", "caption") if c not in columns]
            if missing:
                found = ", ".join(columns) if columns else "nothing"
                reason = f'the header must name "file" and "caption" columns; found {found}'
                problems.append(Problem(CSV_MANIFEST, MANIFEST, reason))
                return entries
            for row in reader:
                where = f"line {reader.line_num}"
                if None in row:
                    problems.append(_manifest_problem(CSV_MANIFEST, where, "more cells than header columns"))
                    continue
                caption = row.get("caption") or ""
                _add_manifest_row(row, [caption], CSV_MANIFEST, where, root, entries, problems)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        problems.append(Problem(CSV_MANIFEST, MANIFEST, f"cannot read the manifest: {e}"))
    return entries


def _read_manifest(path: Path, root: Path) -> bytes:
    """A manifest's bytes: a regular file inside `root`, at most MAX_MANIFEST_BYTES."""
    problem = check_file(path, Path(os.path.realpath(root)), MAX_MANIFEST_BYTES)
    if problem is not None:
        raise UnsafeFileError(path.name, problem[1])
    return read_regular(path, MAX_MANIFEST_BYTES)


def _add_manifest_row(
    row: dict[str, Any],
    captions: list[str],
    manifest: str,
    where: str,
    root: Path,
    entries: dict[str, CaptionEntry],
    problems: list[Problem],
) -> None:
    """Validate one manifest row and merge it into `entries` (several rows may name one file)."""

    def bad(reason: str) -> None:
        problems.append(_manifest_problem(manifest, where, reason))

    relative = row.get("file")
    if not isinstance(relative, str) or not relative.strip():
        return bad('no "file" given')
    relative = relative.strip().replace("\\", "/")
    if relative.startswith("/") or ".." in relative.split("/") or Path(relative).is_absolute():
        return bad(f'file "{relative}" is outside the dataset folder; give a path relative to {root}')
    relative = "/".join(part for part in relative.split("/") if part not in ("", "."))
    if not is_image_path(relative):
        return bad(f'file "{relative}" is not an image ({", ".join(e[1:] for e in IMAGE_EXTENSIONS)})')
    try:
        split = _row_split(row)
    except ValueError as e:
        return bad(str(e))
    key = relative_key(relative)
    entry = entries.get(key)
    if entry is None:
        entry = entries[key] = CaptionEntry(relative, [], f"{manifest} {where}")
    if split is not None:
        if entry.split is not None and entry.split != split:
            return bad(f'split "{split}" conflicts with "{entry.split}" given earlier for {relative}')
        entry.split = split
    entry.captions = _unique([*entry.captions, *(c.strip() for c in captions)])
    for name, value in row.items():
        if name not in _RESERVED_FIELDS and name not in entry.labels and value not in (None, ""):
            entry.labels[name] = _label_text(value)


def _manifest_problem(manifest: str, where: str, reason: str) -> Problem:
    return Problem(manifest, MANIFEST, f"{where}: {reason}")


def _row_split(row: dict[str, Any]) -> str | None:
    """The split a manifest row asks for ("heldout": true wins over "split"), or None for the hash."""
    heldout = row.get("heldout")
    if isinstance(heldout, str) and heldout.strip().lower() in (*_TRUE, *_FALSE):
        heldout = heldout.strip().lower() in _TRUE
    if heldout is not None and not isinstance(heldout, bool):
        raise ValueError(f'"heldout" must be true or false, got {heldout!r}')
    if heldout:
        return "heldout"
    split = row.get("split")
    if split is None or split == "":
        return None
    if split not in SPLITS:
        raise ValueError(f'split {split!r} is not one of {", ".join(SPLITS)}')
    return split


def _label_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def _unique(captions: Iterable[str]) -> list[str]:
    """Non-empty captions in order, each once."""
    return list(dict.fromkeys(c for c in captions if c))
