"""The conftest shape images as a labelled icon-style dataset: a captions.jsonl manifest with
icon/color labels and train/val/heldout splits, and a dataset.json palette."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from duomodal.data.profile import captions_for
from duomodal.files import save_json

COLORS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (30, 60, 220), "yellow": (235, 200, 20)}
PALETTE = {name: "#%02x%02x%02x" % rgb for name, rgb in COLORS.items()}
SHAPES = ("square", "circle", "triangle")
HELDOUT = {("triangle", "yellow"), ("circle", "blue")}  # both copies held out
VAL = {("square", "green"), ("circle", "red")}  # the second copy in val


def labelled_shapes(root: Path, shape_dataset: Path) -> Path:
    shutil.copytree(shape_dataset, root)
    lines = []
    for png in sorted(root.glob("*.png")):
        color, shape, copy = png.stem.split("_")
        split = "heldout" if (shape, color) in HELDOUT else "val" if (shape, color) in VAL and copy == "1" else "train"
        lines.append(json.dumps({"file": png.name, "caption": list(captions_for(shape, color)), "icon": shape,
                                 "color": color, "split": split, "heldout": split == "heldout"}))
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    save_json({"palette": PALETTE, "size": 16}, root / "dataset.json")
    return root


@pytest.fixture(scope="session")
def labelled_data(tmp_path_factory, shape_dataset) -> Path:
    """24 images: train 18, val 2, heldout 4 (the pairs in HELDOUT). Read-only."""
    return labelled_shapes(tmp_path_factory.mktemp("labelled") / "shapes", shape_dataset)
