"""The icon dataset of the seed: Material Design Icons rendered in a fixed palette of colours.

``build_icon_dataset(out)`` writes::

    out/images/<icon>__<colour>.png   RGB PNGs, the icon in one colour on a white background
    out/captions.jsonl                one line per image: file, caption (a list of phrasings),
                                      icon, color, split ("train" | "val" | "heldout"), heldout
    out/dataset.json                  size, palette, counts, the options used, build time

The SVGs come from the ``material-design-icons-pack`` package (every icon of the Material Design
Icons set, viewBox 0 0 24 24, paths without a fill of their own). They are rasterised with
``resvg-py``: it is a self-contained wheel (resvg is written in Rust), so it needs no system cairo
library as cairosvg does, and resvg renders static SVG faithfully (anti-aliased, exact geometry),
which the simple path-only MDI icons need and nothing more. Rendering runs in one process per core
(build times in README.md).

The colour is set on the root ``<svg>`` element (``fill="#rrggbb"``) and inherited by every path.

Held-out combinations, for testing compositional generalisation: a seeded fraction of the
(icon, colour) pairs never appears in training, while every held-out icon still appears in
training in another colour and every colour appears in training on other icons. The other images
are split into train and validation by hashing their path (see `icon_plan.split_for_path`), so adding icons
never moves an old image across the split.

A build is idempotent and resumable: images are written atomically (temporary file, rename),
existing valid images are kept, the manifest and dataset.json are written last. Nothing here
prints: the progress bar goes to stderr through tqdm, skipped icons come back in the summary.
"""

from __future__ import annotations

import importlib.metadata
import io
import json
import multiprocessing
import os
import re
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import resvg_py
from PIL import Image
from tqdm import tqdm

from duomodal.data.icon_plan import (
    IMAGES_DIR,
    NAME_SEPARATOR,
    IconDatasetError,
    IconImage,
    load_icons,
    palette,
    plan_images,
)
from duomodal.data.profile import SUMMARY_FILE
from duomodal.files import atomic_write_text

MANIFEST_FILE = "captions.jsonl"
BACKGROUND = "#ffffff"


# --- rendering ----------------------------------------------------------------------------------

_ROOT_FILL = re.compile(r'(<svg\b[^>]*?)\s+fill\s*=\s*("[^"]*"|\'[^\']*\')', re.IGNORECASE)


def colored_svg(svg: str, hex_color: str) -> str:
    """`svg` with ``fill`` set on its root element, so that every path without a fill of its own
    takes `hex_color`. An existing fill on the root element is replaced."""
    if not re.fullmatch(r"#[0-9a-fA-F]{6}", hex_color):
        raise IconDatasetError(f"colour must look like #rrggbb, got {hex_color!r}")
    if not re.search(r"<svg\b", svg):
        raise IconDatasetError("not an SVG document: no <svg> element")
    svg = _ROOT_FILL.sub(r"\1", svg, count=1)
    return re.sub(r"<svg\b", f'<svg fill="{hex_color}"', svg, count=1)


def render_icon(svg: str, hex_color: str, size: int) -> Image.Image:
    """The icon in `hex_color` on white, `size` x `size`, as an RGB image."""
    png = resvg_py.svg_to_bytes(
        svg_string=colored_svg(svg, hex_color), width=size, height=size, background=BACKGROUND
    )
    with Image.open(io.BytesIO(bytes(png))) as image:
        return image.convert("RGB")  # the background is opaque, so dropping alpha loses nothing


def _is_valid_image(path: Path, size: int) -> bool:
    """Whether `path` is a complete RGB PNG of the right size (a quick check: header + CRCs)."""
    try:
        with Image.open(path) as image:
            if image.format != "PNG" or image.mode != "RGB" or image.size != (size, size):
                return False
            image.verify()
        return True
    except (OSError, SyntaxError, ValueError):
        return False


def _write_png(image: Image.Image, path: Path) -> None:
    """Write atomically (temporary file, rename) so an interrupted build never leaves half a PNG.
    No fsync per image: a file lost to a power cut fails the validity check and is rendered again."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(buffer.getvalue())
    os.replace(tmp, path)


@dataclass(frozen=True)
class _RenderJob:
    path: str
    svg: str
    hex_color: str
    size: int


def _render_job(job: _RenderJob) -> tuple[str, str | None]:
    """Render one image to disk; (path, None) on success or (path, reason) when it failed."""
    try:
        _write_png(render_icon(job.svg, job.hex_color, job.size), Path(job.path))
        return job.path, None
    except (ValueError, OSError) as e:  # resvg raises ValueError on an SVG it cannot render
        return job.path, f"{type(e).__name__}: {e}"


def _run_jobs(jobs: Sequence[_RenderJob], workers: int, progress: bool) -> Iterable[tuple[str, str | None]]:
    bar = tqdm(total=len(jobs), desc="rendering icons", unit="img", disable=not progress or not jobs)
    try:
        if workers <= 1 or len(jobs) < 64:
            for job in jobs:
                yield _render_job(job)
                bar.update(1)
        else:
            # spawn, not fork: the caller may hold threads (torch) that a fork would copy mid-lock.
            context = multiprocessing.get_context("spawn")
            with context.Pool(workers) as pool:
                for result in pool.imap_unordered(_render_job, jobs, chunksize=64):
                    yield result
                    bar.update(1)
    finally:
        bar.close()


# --- the build ----------------------------------------------------------------------------------


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _check_previous_build(out: Path, options: dict[str, Any], overwrite: bool) -> None:
    """Refuse to turn a finished dataset built with other options into another one, unless asked:
    then its manifest and summary go first, so no reader mixes the old manifest with new images."""
    summary_path = out / SUMMARY_FILE
    try:
        previous = json.loads(summary_path.read_text(encoding="utf-8")).get("options")
    except (OSError, ValueError, AttributeError):
        return  # no finished build here (or not one of ours): build, or resume an interrupted one
    if not isinstance(previous, dict) or previous == options:
        return
    if not overwrite:
        differences = ", ".join(
            f"{key} {previous.get(key)!r} (asked {value!r})"
            for key, value in options.items()
            if previous.get(key) != value
        )
        raise IconDatasetError(
            f"{out} already holds an icon dataset built with {differences}; pass the same options to "
            "finish or check it, choose another output folder, or overwrite it (--overwrite)"
        )
    summary_path.unlink(missing_ok=True)
    (out / MANIFEST_FILE).unlink(missing_ok=True)


def _write_if_changed(path: Path, text: str) -> None:
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return
    atomic_write_text(path, text)


def build_icon_dataset(
    out: str | os.PathLike,
    size: int = 128,
    colors: int = 8,
    heldout_fraction: float = 0.05,
    val_fraction: float = 0.05,
    limit: int | None = None,
    include_deprecated: bool = False,
    seed: int = 0,
    workers: int | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Build (or finish, or confirm) the icon dataset in `out` and return its summary.

    `workers` processes render (default: up to 2, one per CPU core). Images already on disk and
    valid are kept, so a re-run renders nothing and an interrupted build picks up where it stopped.
    A finished dataset built with other options is an error unless `overwrite`: then it is rebuilt,
    and PNGs in ``out/images`` that the new build does not plan are removed.
    """
    started = time.perf_counter()
    if not 8 <= size <= 4096:
        raise IconDatasetError(f"size must be between 8 and 4096 pixels, got {size}")
    if limit is not None and limit < 1:
        raise IconDatasetError(f"limit must be at least 1, got {limit}")
    colors_used = palette(colors)
    options = {
        "size": size,
        "colors": colors,
        "heldout_fraction": heldout_fraction,
        "val_fraction": val_fraction,
        "limit": limit,
        "include_deprecated": include_deprecated,
        "seed": seed,
    }
    out = Path(out)
    _check_previous_build(out, options, overwrite)
    (out / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    icons = load_icons(include_deprecated=include_deprecated, limit=limit)
    planned = plan_images(icons, list(colors_used), heldout_fraction, val_fraction, seed)
    removed = _remove_unplanned(out / IMAGES_DIR, planned)
    svg_by_slug = {icon.slug: icon.svg for icon in icons}
    jobs = [
        _RenderJob(str(out / image.file), svg_by_slug[image.icon], colors_used[image.color], size)
        for image in planned
        if not _is_valid_image(out / image.file, size)
    ]
    skipped: list[str] = []  # one line per image that could not be rendered: which and why
    failed: set[str] = set()
    for path, reason in _run_jobs(jobs, min(2, os.cpu_count() or 1) if workers is None else workers, progress):
        if reason is not None:
            failed.add(Path(path).name)
            skipped.append(f"{Path(path).name}: {reason}")
    images = [image for image in planned if Path(image.file).name not in failed]
    counts = Counter(image.split for image in images)
    summary: dict[str, Any] = {
        "out": str(out), "size": size, "icons": len({image.icon for image in images}), "colors": len(colors_used),
        "images": len(images), "train": counts["train"], "val": counts["val"], "heldout": counts["heldout"],
        "rendered": len(jobs) - len(skipped), "reused": len(planned) - len(jobs), "removed": removed,
        "skipped": skipped,
    }
    manifest = "".join(json.dumps(image.manifest_line(), ensure_ascii=False) + "\n" for image in images)
    _write_if_changed(out / MANIFEST_FILE, manifest)
    info = _dataset_info(summary, colors_used, options, round(time.perf_counter() - started, 2))
    atomic_write_text(out / SUMMARY_FILE, json.dumps(info, indent=2) + "\n")
    summary["seconds"] = info["build_seconds"]
    return summary


def _remove_unplanned(images_dir: Path, planned: Sequence[IconImage]) -> int:
    """Remove the temporary files of an interrupted build and the PNGs this build does not plan;
    how many PNGs were removed."""
    planned_names = {Path(image.file).name for image in planned}
    removed = 0
    for entry in images_dir.iterdir():
        if entry.name.endswith(".tmp") and entry.name.startswith("."):
            entry.unlink(missing_ok=True)
        elif entry.suffix == ".png" and NAME_SEPARATOR in entry.name and entry.name not in planned_names:
            entry.unlink(missing_ok=True)
            removed += 1
    return removed


def _dataset_info(summary: dict[str, Any], colors_used: dict[str, str], options: dict[str, Any],
                  seconds: float) -> dict[str, Any]:
    """The content of dataset.json: size, palette, counts, the options and packages used, build time."""
    return {
        "kind": "icons",
        "size": summary["size"],
        "background": BACKGROUND,
        "palette": colors_used,
        "counts": {key: summary[key] for key in ("icons", "images", "train", "val", "heldout")}
        | {"skipped": len(summary["skipped"])},
        "options": options,
        "source": {
            "icons": "material-design-icons-pack",
            "icons_version": _package_version("material-design-icons-pack"),
            "renderer": "resvg-py",
            "renderer_version": _package_version("resvg-py"),
        },
        "manifest": MANIFEST_FILE,
        "build_seconds": seconds,
        "rendered": summary["rendered"],
    }


def read_manifest(out: str | os.PathLike) -> list[dict[str, Any]]:
    """The lines of an icon dataset's captions.jsonl."""
    path = Path(out) / MANIFEST_FILE
    if not path.is_file():
        raise IconDatasetError(f"{Path(out)} has no {MANIFEST_FILE}; build it with `duomodal data icons`")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
