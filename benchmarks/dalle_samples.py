"""Prompted colour accuracy of a trained DALL-E on the icon dataset, and a grid of samples for the docs.

For N (icon, colour) combinations of the `heldout` split (never trained on) and N of the `train`
split, it generates K images from the first caption ("a red heart icon") and counts an image right when
its dominant non-white colour (duomodal.evaluate.metrics.dominant_color over the dataset's 8-colour
palette) is the prompted one. It also writes a grid: one row per fixed prompt, the real icon first.

    flock /tmp/duomodal-heavy.lock .venv/bin/python benchmarks/dalle_samples.py work/runs/dalle-quick \
        --data work/icons-32 --grid docs/img/dalle-quick-samples.png
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
from PIL import Image

from duomodal.evaluate.metrics import dominant_color
from duomodal.generate import generate_images
from duomodal.models.dalle import load_dalle

# (icon, colour) rows of the grid: held-out combinations of the icons-32 dataset, then two trained ones
GRID_ROWS = (("heart", "green"), ("anchor", "yellow"), ("bird", "blue"), ("clock", "blue"), ("cake", "purple"),
             ("church", "orange"), ("bone", "black"), ("alarm", "red"), ("heart", "red"), ("star", "yellow"))


def caption(entry: dict) -> str:
    return entry["caption"][0]  # "a red heart icon", "an orange ..." as the dataset writes it


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--data", required=True, help="the icon dataset (captions.jsonl, dataset.json)")
    parser.add_argument("--combos", type=int, default=100, help="(icon, colour) pairs per split")
    parser.add_argument("--per-prompt", type=int, default=4, help="images per prompt")
    parser.add_argument("--grid", default=None, help="write a sample grid PNG here")
    parser.add_argument("--grid-scale", type=int, default=2, help="nearest-neighbour upscaling of the grid")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--guidance", type=float, default=1.0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    data = Path(args.data)
    palette = json.loads((data / "dataset.json").read_text())["palette"]
    entries = [json.loads(line) for line in (data / "captions.jsonl").read_text().splitlines()]
    dalle = load_dalle(args.run_dir)
    rng = random.Random(0)
    figures: dict[str, dict] = {}
    started = time.perf_counter()
    for split in ("heldout", "train"):
        pool = [e for e in entries if e["split"] == split]
        chosen = rng.sample(pool, min(args.combos, len(pool)))
        right = total = skipped = 0
        for entry in chosen:
            prompt = caption(entry)
            try:
                result = generate_images(dalle, prompt, num=args.per_prompt, temperature=args.temperature,
                                         top_k=args.top_k, guidance=args.guidance, seed=0,
                                         batch_size=args.per_prompt)
            except ValueError:  # a caption longer than the model's context
                skipped += 1
                continue
            for image in result.images:
                right += dominant_color(image, palette) == entry["color"]
                total += 1
        figures[split] = {"prompts": len(chosen) - skipped, "images": total, "colour_accuracy": right / max(total, 1),
                          "skipped_prompts": skipped}
        print(f"{split:>8}: prompted colour in {right}/{total} images ({100 * right / max(total, 1):.1f}%) "
              f"over {len(chosen) - skipped} (icon, colour) prompts", flush=True)
    print(f"sampling and scoring took {time.perf_counter() - started:.0f} s")

    if args.grid:
        by_pair = {(e["icon"], e["color"]): e for e in entries}
        rows_spec = [(by_pair[pair], by_pair[pair]["split"]) for pair in GRID_ROWS if pair in by_pair]
        size = dalle.config.image_size
        cell = size * args.grid_scale
        columns = 1 + 8
        grid = Image.new("RGB", (columns * (cell + 2), len(rows_spec) * (cell + 2)), (255, 255, 255))
        lines = []
        for r, (entry, split) in enumerate(rows_spec):
            prompt = caption(entry)
            result = generate_images(dalle, prompt, num=8, temperature=args.temperature, top_k=args.top_k,
                                     guidance=args.guidance, seed=0, batch_size=8)
            real = Image.open(data / entry["file"]).convert("RGB").resize((size, size))
            for c, image in enumerate([real, *result.images]):
                grid.paste(image.resize((cell, cell), Image.NEAREST), (c * (cell + 2), r * (cell + 2)))
            lines.append(f"{prompt} ({split})")
        Path(args.grid).parent.mkdir(parents=True, exist_ok=True)
        grid.save(args.grid)
        Path(args.grid).with_suffix(".txt").write_text("\n".join(lines) + "\n")
        print(f"wrote {args.grid}: rows (first column = the real icon):")
        for line in lines:
            print(f"  {line}")
        figures["grid_prompts"] = lines  # type: ignore[assignment]
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
