"""Prompted colour accuracy of a trained DALL-E on the icon dataset, and a grid of samples for the docs.

For N (icon, colour) combinations of the `heldout` split (never trained on) and N of the `train`
split, it generates K images from the first caption ("a red heart icon") and counts an image right when
its dominant non-white colour (duomodal.metrics.dominant_color over the dataset's 8-colour
palette) is the prompted one. It also writes a grid: one row per fixed prompt, the real icon first.

Shape, without any model: every icon's ink mask (its first image, colour ignored) is a template, and
each generated image's ink mask is compared by IoU with all 7,188 of them. It prints how often the
prompted icon's template is the best match (top-1) or among the 10 best (top-10), its median rank (ties count against it, as in `duomodal eval`),
and the mean IoU with it; beside them the same figures for the VAE's reconstruction of the real image
(what a perfect DALL-E could reach through this VAE) and for a name-blind baseline (each image
compared with the template of another prompt of the same split).

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

import numpy as np

from duomodal.data.images import to_pil, to_tensor
from duomodal.metrics import dominant_color, ink_mask, template_ranks
from duomodal.generate import decode_tokens, generate_images, image_tokens
from duomodal.models.dalle import load_dalle
from duomodal.models.sampling import SamplingOptions
from this_machine import auto_precision, print_header

# (icon, colour) rows of the grid: held-out combinations of the icons-32 dataset (never trained on; the
# icon was seen in other colours), then four trained ones
GRID_ROWS = (("heart", "green"), ("plus", "green"), ("arrow-down", "blue"), ("clock", "blue"), ("email", "blue"),
             ("map-marker", "blue"), ("gift", "green"), ("shield", "orange"), ("laptop", "black"), ("leaf", "yellow"),
             ("anchor", "yellow"), ("bird", "blue"), ("home", "black"), ("cloud", "blue"), ("bell", "yellow"),
             ("star", "blue"))


def caption(entry: dict) -> str:
    return entry["caption"][0]  # "a red heart icon", "an orange ..." as the dataset writes it


def templates(data: Path, entries: list[dict], size: int) -> tuple[list[str], np.ndarray]:
    """Icon names and one ink mask per icon (C, size, size): its first image by file name."""
    first: dict[str, dict] = {}
    for entry in sorted(entries, key=lambda e: e["file"]):
        first.setdefault(entry["icon"], entry)
    icons = sorted(first)
    masks = [ink_mask(to_pil(to_tensor(Image.open(data / first[i]["file"]), size))) for i in icons]
    return icons, np.stack(masks)


def shape_figures(images: list[Image.Image], wanted: list[int], masks: np.ndarray, size: int) -> dict:
    """Rank of the wanted template among all by IoU for each image, summarised; and the mean IoU with it."""
    own = np.stack([ink_mask(to_pil(to_tensor(im, size))) for im in images])
    ranks, target = template_ranks(own, masks, wanted)  # ties count against the prompted icon
    return {"top1": float((ranks == 1).mean()), "top10": float((ranks <= 10).mean()),
            "median_rank": float(np.median(ranks)), "mean_iou": float(target.mean()), "images": len(images)}


def describe(name: str, f: dict) -> str:
    return (f"{name:>26}: top-1 {100 * f['top1']:5.1f}%  top-10 {100 * f['top10']:5.1f}%  median rank "
            f"{f['median_rank']:6.0f}  IoU with the prompted icon {f['mean_iou']:.3f}  ({f['images']} images)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--data", required=True, help="the icon dataset (captions.jsonl, dataset.json)")
    parser.add_argument("--combos", type=int, default=100, help="(icon, colour) pairs per split (0: only the grid)")
    parser.add_argument("--per-prompt", type=int, default=4, help="images per prompt")
    parser.add_argument("--grid", default=None, help="write a sample grid PNG here")
    parser.add_argument("--grid-scale", type=int, default=2, help="nearest-neighbour upscaling of the grid")
    parser.add_argument("--clip", default=None, help="grid only: rerank with this CLIP directory (keep 8 of --rerank-from)")
    parser.add_argument("--rerank-from", type=int, default=32, help="grid only: images generated per row with --clip")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=None, help="default: off (0 = off too)")
    parser.add_argument("--guidance", type=float, default=1.0, help="default 1: off (plain sampling)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    args.top_k = args.top_k or None
    print_header(f"{auto_precision()} for sampling")

    data = Path(args.data)
    palette = json.loads((data / "dataset.json").read_text())["palette"]
    entries = [json.loads(line) for line in (data / "captions.jsonl").read_text().splitlines()]
    dalle = load_dalle(args.run_dir)
    rng = random.Random(0)
    figures: dict[str, dict] = {}
    started = time.perf_counter()
    size = dalle.config.image_size
    icons, masks = templates(data, entries, size)
    icon_index = {icon: i for i, icon in enumerate(icons)}
    for split in ("heldout", "train") if args.combos > 0 else ():
        pool = [e for e in entries if e["split"] == split]
        chosen = rng.sample(pool, min(args.combos, len(pool)))
        right = total = skipped = 0
        generated, wanted, reconstructed, wanted_real = [], [], [], []
        for entry in chosen:
            prompt = caption(entry)
            try:
                options = SamplingOptions(temperature=args.temperature, top_k=args.top_k, guidance=args.guidance,
                                          batch_size=args.per_prompt)
                result = generate_images(dalle, prompt, num=args.per_prompt, options=options)
            except ValueError:  # a caption longer than the model's context
                skipped += 1
                continue
            for image in result.images:
                right += dominant_color(image, palette) == entry["color"]
                total += 1
            generated += result.images
            wanted += [icon_index[entry["icon"]]] * len(result.images)
            real = to_pil(to_tensor(Image.open(data / entry["file"]), size))
            reconstructed += decode_tokens(dalle, image_tokens(dalle, real)[None])
            wanted_real.append(icon_index[entry["icon"]])
        shape = shape_figures(generated, wanted, masks, size)
        blind = shape_figures(generated, [wanted[(i + args.per_prompt) % len(wanted)] for i in range(len(wanted))],
                              masks, size)
        upper = shape_figures(reconstructed, wanted_real, masks, size)
        figures[split] = {"prompts": len(chosen) - skipped, "images": total, "colour_accuracy": right / max(total, 1),
                          "skipped_prompts": skipped, "shape": shape, "shape_name_blind": blind,
                          "shape_vae_reconstruction": upper}
        print(f"{split:>8}: prompted colour in {right}/{total} images ({100 * right / max(total, 1):.1f}%) "
              f"over {len(chosen) - skipped} (icon, colour) prompts", flush=True)
        print(describe("shape, generated", shape))
        print(describe("name-blind baseline", blind))
        print(describe("VAE reconstruction (bound)", upper), flush=True)
    print(f"sampling and scoring took {time.perf_counter() - started:.0f} s")

    if args.grid:
        scorer = None
        if args.clip:
            from duomodal.models.clip import load_clip

            scorer = load_clip(args.clip)
        by_pair = {(e["icon"], e["color"]): e for e in entries}
        rows_spec = [(by_pair[pair], by_pair[pair]["split"]) for pair in GRID_ROWS if pair in by_pair]
        size = dalle.config.image_size
        cell = size * args.grid_scale
        columns = 1 + 8
        grid = Image.new("RGB", (columns * (cell + 2), len(rows_spec) * (cell + 2)), (255, 255, 255))
        lines = []
        for r, (entry, split) in enumerate(rows_spec):
            prompt = caption(entry)
            num = args.rerank_from if scorer is not None else 8
            options = SamplingOptions(temperature=args.temperature, top_k=args.top_k, guidance=args.guidance,
                                      batch_size=min(num, 32))
            result = generate_images(dalle, prompt, num=num, keep=8, scorer=scorer, options=options)
            real = Image.open(data / entry["file"]).convert("RGB").resize((size, size))
            for c, image in enumerate([real, *result.images]):
                grid.paste(image.resize((cell, cell), Image.NEAREST), (c * (cell + 2), r * (cell + 2)))
            lines.append(f"{prompt} ({split})" + (f", best 8 of {num} by CLIP" if scorer is not None else ""))
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
