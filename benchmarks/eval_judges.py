"""How well the report's model-free judges do on real icons: the dominant-colour classifier (colour
accuracy) and the ink-mask template matcher (shape accuracy), on the dataset's own images.

A judge that is wrong on real images would make DALL-E's numbers meaningless, so this prints its
accuracy on a seeded sample of an icon dataset (`duomodal data icons OUT`), at the dataset's size and
shrunk to a model's size (--size). On a shared machine run it under the heavy lock:

    flock /tmp/duomodal-heavy.lock .venv/bin/python benchmarks/eval_judges.py work/icons-32 --images 2000 --size 16
"""

from __future__ import annotations

import argparse
import random
import time
from collections import Counter
from pathlib import Path

from duomodal.data.images import load_image, to_pil, to_tensor
from duomodal.data.records import load_records
from duomodal.data.profile import read_profile
from duomodal.metrics import accuracy, dominant_color
from duomodal.evaluate.shape import TemplateMatcher
from this_machine import print_header


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", type=Path, help="an icon dataset (captions.jsonl with icon/color labels)")
    parser.add_argument("--images", type=int, default=800, help="images to judge (a seeded sample)")
    parser.add_argument("--size", type=int, default=0, help="also judge the images resized to this side")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print_header("numpy and PIL (no model)", "cpu")

    records = [r for r in load_records(args.data) if "icon" in r.labels and "color" in r.labels]
    palette = read_profile(args.data).palette
    sample = random.Random(args.seed).sample(records, min(args.images, len(records)))
    heldout = [r for r in sample if r.split == "heldout"]
    print(f"{args.data}: {len(records)} labelled images; judging {len(sample)} ({len(heldout)} held-out)")
    sizes = [0] + ([args.size] if args.size else [])
    for size in sizes:
        images = [load_image(r.path) for r in sample]
        if size:
            images = [to_pil(to_tensor(im, size)) for im in images]
        label = f"{size} px" if size else "dataset size"
        started = time.perf_counter()
        predicted = [dominant_color(im, palette) for im in images]
        seconds = time.perf_counter() - started
        result = accuracy(predicted, [r.labels["color"] for r in sample])
        errors = Counter((r.labels["color"], p) for r, p in zip(sample, predicted) if p != r.labels["color"])
        print(f"colour classifier, {label}: {result}  ({1000 * seconds / len(sample):.2f} ms/image); "
              f"errors (true, predicted): {errors.most_common(5)}")
        started = time.perf_counter()
        matcher = TemplateMatcher.from_records(records, size or images[0].size[0], print)
        built = time.perf_counter() - started
        # templates come from each icon's first training image: score the images that are not templates
        # (all held-out images are in another colour than their icon's template)
        pool = heldout or sample
        pool_images = [images[sample.index(r)] for r in pool]
        result = accuracy(matcher.predict(pool_images), [r.labels["icon"] for r in pool])
        print(f"template matcher, {label}: {result} among {len(matcher.icons)} icon names "
              f"(templates built in {built:.1f} s)")


if __name__ == "__main__":
    main()
