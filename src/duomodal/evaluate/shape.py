"""Judging the shape of generated icons, two ways.

``Judge``: an independent CLIP (not the reranker) ranks every icon name of the dataset for the image,
with the colour word held at the prompt's, so only the shape decides. ``independence`` says whether
a judge is independent of the reranker and how. ``TemplateMatcher``: no model at all; the icon whose
dataset image has the most overlapping ink mask, and (``assess``) where the prompted icon's template ranks
among all by overlap and how much it overlaps.
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

from duomodal import metrics as M
from duomodal.data.dataset import load_record_image
from duomodal.data.images import to_pil, to_tensor
from duomodal.data.profile import captions_for
from duomodal.data.records import Record

from duomodal.evaluate.context import EvalOptions


@dataclass
class Judge:
    """Shape judge: which icon name an independent CLIP ranks first for an image, the colour held fixed."""

    clip: Any
    icons: list[str]
    _classes: dict[str, torch.Tensor] = field(default_factory=dict)

    def class_embeddings(self, color: str) -> torch.Tensor:
        if color not in self._classes:
            texts = [captions_for(icon, color)[0] for icon in self.icons]
            self._classes[color] = F.normalize(self.clip.embed_texts(texts).float(), dim=-1)  # (C, D)
        return self._classes[color]

    def predict(self, images: Sequence[Image.Image], color: str) -> list[str]:
        return self.assess(images, color)[0]

    def assess(self, images: Sequence[Image.Image], color: str, prompt: str | None = None,
               wanted: str | None = None) -> tuple[list[str], list[float] | None, list[int] | None]:
        """(the icon ranked first for each image, each image's cosine similarity with `prompt` if given,
        the rank of the `wanted` icon among all icons for each image if given: 1 = first)."""
        features = self.clip.embed_images(list(images)).float()  # (N, D)
        classes = self.class_embeddings(color)  # (C, D)
        indices = M.zero_shot_predictions(features, classes)
        scores = ranks = None
        if prompt is not None:
            text = F.normalize(self.clip.embed_texts([prompt]).float(), dim=-1)  # (1, D)
            scores = (features @ text.T).squeeze(1).tolist()  # (N,)
        if wanted is not None and wanted in self.icons:
            similarity = features @ classes.T  # (N, C)
            target = similarity[:, self.icons.index(wanted)]  # (N,)
            ranks = ((similarity > target[:, None]).sum(1) + 1).tolist()
        return [self.icons[i] for i in indices.tolist()], scores, ranks


@dataclass(frozen=True)
class TemplateScores:
    """What the template matcher says about a batch of images, each against its wanted icon."""

    predicted: list[str | None]  # the icon whose template overlaps most (None for a blank image)
    ranks: list[int | None]  # the wanted icon's rank among all templates (1 = best, ties count against)
    iou: list[float | None]  # IoU of the image's ink mask with the wanted icon's template


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
        chosen: dict[str, Record] = {}
        for r in sorted(records, key=lambda r: (r.split != "train", r.location)):
            if r.labels.get("icon"):
                chosen.setdefault(r.labels["icon"], r)
        icons, masks = [], []
        for icon, record in tqdm(sorted(chosen.items()), desc="shape templates", file=sys.stderr, leave=False):
            try:
                image = load_record_image(record)
            except ValueError as e:
                log(f"skipped the template of {icon}: {e}")
                continue
            icons.append(icon)
            masks.append(M.ink_mask(to_pil(to_tensor(image, size))))
        return cls(icons, np.stack(masks) if masks else np.zeros((0, size, size), bool), size)

    def masks(self, images: Sequence[Image.Image]) -> np.ndarray:
        """The ink mask of each image at the templates' size: (N, S, S) bool."""
        if not images:
            return np.zeros((0, self.size, self.size), bool)
        return np.stack([M.ink_mask(to_pil(to_tensor(im, self.size))) for im in images])

    def predict(self, images: Sequence[Image.Image]) -> list[str | None]:
        return self.predict_masks(self.masks(images))

    def predict_masks(self, masks: np.ndarray) -> list[str | None]:
        """The icon with the best-overlapping template for each mask; None for a blank mask."""
        return [self.icons[i] if i >= 0 else None for i in M.nearest_template(masks, self.templates).tolist()]

    def assess(self, images: Sequence[Image.Image], wanted_icons: Sequence[str]) -> TemplateScores:
        """Each image against the template of its wanted icon, among all templates."""
        return self.assess_masks(self.masks(images), wanted_icons)

    def assess_masks(self, masks: np.ndarray, wanted_icons: Sequence[str]) -> TemplateScores:
        """As ``assess`` for ink masks. An icon without a template (its images were unreadable) gets None."""
        if len(masks) != len(wanted_icons):
            raise M.MetricError(f"{len(masks)} masks but {len(wanted_icons)} wanted icons")
        index = {icon: i for i, icon in enumerate(self.icons)}
        known = [i for i, icon in enumerate(wanted_icons) if icon in index]
        ranks: list[int | None] = [None] * len(masks)
        iou: list[float | None] = [None] * len(masks)
        if known:
            found, overlap = M.template_ranks(masks[known], self.templates, [index[wanted_icons[i]] for i in known])
            for i, r, o in zip(known, found.tolist(), overlap.tolist()):
                ranks[i], iou[i] = r, o
        return TemplateScores(self.predict_masks(masks), ranks, iou)


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


def independence(options: EvalOptions, reranker_id: str | None, judge_id: str | None) -> tuple[bool, str]:
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
