"""Indexing benchmark: images/s and peak memory of `build_index` on the icon dataset, then the time
of a no-change update (the rescan) and of an update after renaming 1% of the files; with
`--sources folder,shards` also the same images packed as WebDataset shards (`duomodal data pack`),
indexed from the shards, side by side with the folder in one run.

Uses the given CLIP directory (default work/runs/clip-quick) when it holds weights, else a
random-weight CLIP of the "quick" preset's architecture (same cost per image, meaningless vectors).

Run (heavy: take the lock):
    flock /tmp/duomodal-heavy.lock timeout 1800 .venv/bin/python benchmarks/index.py \
        --data work/icons-32 --clip work/runs/clip-quick --json work/bench/index.json
    # a folder beside shards, 10k icons:
    nice -n 19 flock /tmp/duomodal-heavy.lock .venv/bin/python benchmarks/index.py --data work/icons-32 \
        --limit 10000 --sources folder,shards --json work/bench/index-shards.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from this_machine import auto_precision, print_header


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def quick_random_clip(directory: Path, data: Path) -> Path:
    """A random-weight CLIP with the quick preset's architecture and a tokenizer trained on `data`."""
    from duomodal.config import preset, to_dict
    from duomodal.modelfile import save_model
    from duomodal.models.clip import ClipConfig, ContrastiveClip
    from duomodal.search.sources import read_caption_manifest
    from duomodal.text.tokenizer import Tokenizer

    captions = list(read_caption_manifest(data).values())[:5000] or ["an icon"]
    tokenizer = Tokenizer.train(captions, vocab_size=preset("clip", "quick")["model"]["vocab_size"])
    config = ClipConfig(**{**preset("clip", "quick")["model"], "vocab_size": tokenizer.vocab_size})
    torch.manual_seed(0)
    save_model(directory, "clip", to_dict(config), ContrastiveClip.from_config(config).state_dict())
    tokenizer.save(directory / "tokenizer.json")
    return directory


def linked_subset(data: Path, out: Path, limit: int) -> Path:
    """The first `limit` images of `data` (sorted) as hard links under `out` (copies across file
    systems; symlinks would lead outside `out`, which the indexer skips), with the caption manifest."""
    from duomodal.search.sources import iter_image_files

    out.mkdir(parents=True)
    usable = (entry for entry in iter_image_files(data) if entry.skip_reason is None)
    for n, entry in enumerate(usable):
        if n >= limit:
            break
        (out / entry.relative).parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(entry.path.resolve(), out / entry.relative)
        except OSError:
            shutil.copy2(entry.path.resolve(), out / entry.relative)
    if (data / "captions.jsonl").exists():
        shutil.copy(data / "captions.jsonl", out / "captions.jsonl")
    return out


def bench_folder(data: Path, work: Path, embedder, clip_dir: Path, options) -> dict:
    from duomodal.search.build import build_index, update_index

    before = peak_rss_mb()
    report = build_index(data, work / "index", embedder, clip_path=clip_dir, options=options, progress=False)
    build_peak = peak_rss_mb()
    rescan = update_index(work / "index", embedder, progress=False)
    files = sorted(data.rglob("*.png"))
    moved = files[::100]  # 1%
    for path in moved:
        path.rename(path.with_name("renamed-" + path.name))
    renamed = update_index(work / "index", embedder, progress=False)
    index_bytes = sum(p.stat().st_size for p in (work / "index").iterdir() if p.is_file())
    return {
        "source": "folder",
        "images": report.count,
        "skipped": len(report.skipped),
        "build_s": round(report.seconds, 2),
        "images_per_s": round(report.count / report.seconds, 1),
        "peak_rss_mb_before": round(before, 1),
        "peak_rss_mb_build": round(build_peak, 1),
        "index_on_disk_mb": round(index_bytes / 2**20, 1),
        "rescan_no_change_s": round(rescan.seconds, 2),
        "update_after_renaming_s": round(renamed.seconds, 2),
        "renamed": len(moved),
        "renamed_recognised": renamed.moved,
        "renamed_embedded": renamed.embedded,
        "index_type": report.index_type,
    }


def bench_shards(data: Path, work: Path, embedder, clip_dir: Path, options, shard_size: int) -> dict:
    """Pack `data` into shards, index the shards, rescan; then a repack (another shard size):
    every image recognised by content, none embedded again."""
    import time

    from duomodal.data.pack import pack_dataset
    from duomodal.search.build import build_index, update_index

    started = time.perf_counter()
    pack_dataset(data, work / "shards", shard_size=shard_size)
    pack_s = time.perf_counter() - started
    shards_mb = sum(p.stat().st_size for p in (work / "shards").iterdir()) / 2**20
    before = peak_rss_mb()
    report = build_index(work / "shards", work / "shard-index", embedder, clip_path=clip_dir, options=options,
                         progress=False)
    build_peak = peak_rss_mb()
    rescan = update_index(work / "shard-index", embedder, progress=False)
    pack_dataset(data, work / "shards", shard_size=shard_size // 2 + 1)
    repacked = update_index(work / "shard-index", embedder, progress=False)
    return {
        "source": "shards",
        "shard_size": shard_size,
        "pack_s": round(pack_s, 2),
        "shards_on_disk_mb": round(shards_mb, 1),
        "images": report.count,
        "skipped": len(report.skipped),
        "build_s": round(report.seconds, 2),
        "images_per_s": round(report.count / report.seconds, 1),
        "peak_rss_mb_before": round(before, 1),
        "peak_rss_mb_build": round(build_peak, 1),
        "rescan_no_change_s": round(rescan.seconds, 2),
        "update_after_repack_s": round(repacked.seconds, 2),
        "repack_moved_or_refreshed": repacked.moved + repacked.refreshed,
        "repack_embedded": repacked.embedded,
        "index_type": report.index_type,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("work/icons-32"))
    parser.add_argument("--clip", type=Path, default=Path("work/runs/clip-quick"))
    parser.add_argument("--limit", type=int, default=0, help="index only the first N images (0 = all)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    parser.add_argument("--sources", default="folder", help="folder,shards: index the folder and/or its shards")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard (--sources shards)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    # in a child process: the probe's matrices would raise the peak RSS this benchmark reports
    print_header(f"{auto_precision(args.device)} in the CLIP embedder", args.device, separate_process=True)

    from duomodal.models.clip import load_clip
    from duomodal.search.build import BuildOptions

    work = Path(tempfile.mkdtemp(prefix="duomodal-index-bench-"))
    try:
        # always index a tree of symlinks: the rename step must not touch the real dataset
        data = linked_subset(args.data.resolve(), work / "data", args.limit or sys.maxsize)
        clip_dir, clip_kind = args.clip, "trained"
        if not (args.clip / "model.safetensors").is_file():
            clip_dir, clip_kind = quick_random_clip(work / "clip", args.data), "random-weight quick architecture"
        embedder = load_clip(clip_dir, device=args.device)
        options = BuildOptions(batch_size=args.batch_size)
        common = {
            "data": str(args.data),
            "clip": f"{clip_dir} ({clip_kind}, {embedder.model_id}, dim {embedder.dim})",
            "device": args.device,
            "threads": torch.get_num_threads(),
        }
        results = []
        sources = args.sources.split(",")
        if "shards" in sources:  # first: the folder step renames files
            results.append({**common, **bench_shards(data, work, embedder, clip_dir, options, args.shard_size)})
        if "folder" in sources:
            results.append({**common, **bench_folder(data, work, embedder, clip_dir, options)})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for result in results:
        for key, value in result.items():
            print(f"{key:>26}: {value}")
        print()
    if len(results) == 2:
        by = {r["source"]: r for r in results}
        print(f"shards / folder images/s: {by['shards']['images_per_s'] / by['folder']['images_per_s']:.2f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
