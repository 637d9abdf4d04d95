"""Indexing benchmark: images/s and peak memory of `build_index` on the icon dataset, then the time
of a no-change update (the rescan) and of an update after renaming 1% of the files.

Uses the given CLIP directory (default work/runs/clip-quick) when it holds weights, else a
random-weight CLIP of the "quick" preset's architecture (same cost per image, meaningless vectors).

Run (heavy: take the lock):
    flock /tmp/duomodal-heavy.lock timeout 1800 .venv/bin/python benchmarks/index.py \
        --data work/icons-32 --clip work/runs/clip-quick --json work/bench/index.json
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import tempfile
from pathlib import Path

import torch


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def quick_random_clip(directory: Path, data: Path) -> Path:
    """A random-weight CLIP with the quick preset's architecture and a tokenizer trained on `data`."""
    from duomodal.config import PRESETS, to_dict
    from duomodal.modelfile import save_model
    from duomodal.models.clip import ClipConfig, ContrastiveClip
    from duomodal.search.plan import read_caption_manifest
    from duomodal.text.tokenizer import Tokenizer

    captions = list(read_caption_manifest(data).values())[:5000] or ["an icon"]
    tokenizer = Tokenizer.train(captions, vocab_size=PRESETS["clip"]["quick"]["model"]["vocab_size"])
    config = ClipConfig(**{**PRESETS["clip"]["quick"]["model"], "vocab_size": tokenizer.vocab_size})
    torch.manual_seed(0)
    save_model(directory, "clip", to_dict(config), ContrastiveClip.from_config(config).state_dict())
    tokenizer.save(directory / "tokenizer.json")
    return directory


def linked_subset(data: Path, out: Path, limit: int) -> Path:
    """The first `limit` images of `data` (sorted) as symlinks under `out`, with the caption manifest."""
    from duomodal.search.plan import iter_image_files

    out.mkdir(parents=True)
    for n, (relative, path) in enumerate(iter_image_files(data)):
        if n >= limit:
            break
        (out / relative).parent.mkdir(parents=True, exist_ok=True)
        (out / relative).symlink_to(path.resolve())
    if (data / "captions.jsonl").exists():
        shutil.copy(data / "captions.jsonl", out / "captions.jsonl")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("work/icons-32"))
    parser.add_argument("--clip", type=Path, default=Path("work/runs/clip-quick"))
    parser.add_argument("--limit", type=int, default=0, help="index only the first N images (0 = all)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from duomodal.models.clip import load_clip
    from duomodal.search.build import BuildOptions, build_index, update_index

    work = Path(tempfile.mkdtemp(prefix="duomodal-index-bench-"))
    try:
        # always index a tree of symlinks: the rename step must not touch the real dataset
        data = linked_subset(args.data.resolve(), work / "data", args.limit or sys.maxsize)
        clip_dir, clip_kind = args.clip, "trained"
        if not (args.clip / "model.safetensors").is_file():
            clip_dir, clip_kind = quick_random_clip(work / "clip", args.data), "random-weight quick architecture"
        embedder = load_clip(clip_dir, device=args.device)
        options = BuildOptions(batch_size=args.batch_size)
        before = peak_rss_mb()
        skipped = []
        report = build_index(data, work / "index", embedder, clip_path=clip_dir, options=options,
                             on_skip=lambda p, r: skipped.append(p), progress=False)
        build_peak = peak_rss_mb()
        rescan = update_index(work / "index", embedder, progress=False)
        files = sorted(data.rglob("*.png"))
        moved = files[::100]  # 1%
        for path in moved:
            path.rename(path.with_name("renamed-" + path.name))
        renamed = update_index(work / "index", embedder, progress=False)
        index_bytes = sum(p.stat().st_size for p in (work / "index").iterdir() if p.is_file())
        result = {
            "data": str(args.data),
            "clip": f"{clip_dir} ({clip_kind}, {embedder.model_id}, dim {embedder.dim})",
            "device": args.device,
            "threads": torch.get_num_threads(),
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
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for key, value in result.items():
        print(f"{key:>26}: {value}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
