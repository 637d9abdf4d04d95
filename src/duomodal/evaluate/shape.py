"""Judging the shape of generated icons, two ways.

``Judge``: an independent CLIP (not the reranker) ranks every icon name of the dataset for the image,
with the colour word held at the prompt's, so only the shape decides. ``independence`` says whether
a judge is independent of the reranker and how. ``TemplateMatcher``: no model at all; the icon whose
dataset image has the most overlapping ink mask.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from duomodal.data.images import to_tensor
from duomodal.data.records import Record
from duomodal.evaluate import metrics as M


@dataclass
class Judge:
    """Shape judge: which icon name an independent CLIP ranks first for an image, the colour held fixed."""

    clip: Any
    icons: list[str]
    _classes: dict[str, torch.Tensor] = field(default_factory=dict)

    def class_embeddings(self, color: str) -> torch.Tensor:
        from duomodal.data.icons import captions_for

        if color not in self._classes:
            texts = [captions_for(icon, color)[0] for icon in self.icons]
            self._classes[color] = F.normalize(self.clip.embed_texts(texts).float(), dim=-1)  # (C, D)
        return self._classes[color]

    def predict(self, images: Sequence[Image.Image], color: str) -> list[str]:
        return self.assess(images, color)[0]

    def assess(self, images: Sequence[Image.Image], color: str, prompt: str | None = None) -> tuple[list[str], list[float] | None]:
        """(the icon ranked first for each image, each image's cosine similarity with `prompt` if given)."""
        features = self.clip.embed_images(list(images)).float()  # (N, D)
        indices = M.zero_shot_predictions(features, self.class_embeddings(color))
        scores = None
        if prompt is not None:
            text = F.normalize(self.clip.embed_texts([prompt]).float(), dim=-1)  # (1, D)
            scores = (features @ text.T).squeeze(1).tolist()  # (N,)
        return [self.icons[i] for i in indices.tolist()], scores


@dataclass
class TemplateMatcher:
    """Shape by template, no model involved: the icon whose dataset image has the ink mask that overlaps
    the image's ink mask most (IoU). Masks ignore colour, so a held-out (icon, colour) pair is matched
    against the icon's render in another colour."""

    icons: list[str]
    templates: np.ndarray  # (C, S, S) bool, one ink mask per icon
    size: int

    @classmethod
    def from_records(cls, records: Sequence[Record], size: int, log: Callable[[str], None]) -> TemplateMatcher:
        """One template per icon: its first training image by path (another split if it has none)."""
        from duomodal.data.images import load_image, to_pil

        chosen: dict[str, Record] = {}
        for r in sorted(records, key=lambda r: (r.split != "train", str(r.path))):
            if r.labels.get("icon"):
                chosen.setdefault(r.labels["icon"], r)
        icons, masks = [], []
        for icon, record in tqdm(sorted(chosen.items()), desc="shape templates", file=sys.stderr, leave=False):
            try:
                image = load_image(record.path)
            except ValueError as e:
                log(f"skipped the template of {icon}: {e}")
                continue
            icons.append(icon)
            masks.append(M.ink_mask(to_pil(to_tensor(image, size))))
        return cls(icons, np.stack(masks) if masks else np.zeros((0, size, size), bool), size)

    def predict(self, images: Sequence[Image.Image]) -> list[str | None]:
        from duomodal.data.images import to_pil

        masks = np.stack([M.ink_mask(to_pil(to_tensor(im, self.size))) for im in images])
        return [self.icons[i] if i >= 0 else None for i in M.nearest_template(masks, self.templates).tolist()]


def run_info(directory: Path | None) -> dict[str, Any]:
    """Seed and data of a training run, from its run.json (empty when absent)."""
    if directory is None:
        return {}
    path = Path(directory) / "run.json"
    try:
        run = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    train = run.get("train", {}) if isinstance(run, dict) else {}
    data = run.get("data", {}) if isinstance(run, dict) else {}
    info = {}
    if isinstance(train, dict) and "seed" in train:
        info["seed"] = train["seed"]
    if isinstance(run, dict) and isinstance(run.get("data_dir"), str):
        info["data"] = run["data_dir"]
    elif isinstance(data, dict) and isinstance(data.get("root"), str):
        info["data"] = data["root"]
    return info


def independence(options: Any, reranker_id: str | None, judge_id: str | None) -> tuple[bool, str]:
    """(is the judge independent of the reranker, the sentence that says why or why not)."""
    if options.judge_clip is None:
        return False, ("no --judge-clip given; the reranking CLIP would be judging its own choices, "
                       "which flatters reranking (train a second CLIP with another seed, e.g. "
                       "`duomodal train clip --set train.seed=1`, and pass it as --judge-clip)")
    if reranker_id is not None and judge_id == reranker_id:
        return False, (f"--judge-clip has the same weights as --clip (model id {judge_id}); give a CLIP "
                       "trained separately (another seed or another dataset) or a pretrained one")
    judge_run, rerank_run = run_info(options.judge_clip), run_info(options.clip)
    how = [f"judge `{options.judge_clip}` (model id `{judge_id}`) has different weights from the reranker"
           + (f" `{options.clip}` (model id `{reranker_id}`)" if reranker_id else " (no reranker given)")]
    if "seed" in judge_run and "seed" in rerank_run:
        how.append(f"trained with seed {judge_run['seed']} vs {rerank_run['seed']}")
        if judge_run["seed"] == rerank_run["seed"] and judge_run.get("data") == rerank_run.get("data"):
            how.append("(same seed and data: weak independence)")
    if not judge_run:
        how.append("the judge is not a duomodal training run (e.g. a pretrained CLIP)")
    return True, "; ".join(how)
