"""The prompts of the DALL-E evaluation and what is measured on the images drawn for each: a prompt's
samples, their colours and shapes, the name-blind comparison, and the summary over prompts (the
DALL-E section itself is ``samples.py``)."""

from __future__ import annotations

import random
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from duomodal import metrics as M
from duomodal.data.dataset import load_record_image
from duomodal.data.profile import unseen_phrasing
from duomodal.data.records import Record
from duomodal.evaluate.context import EvalContext, EvalOptions
from duomodal.evaluate.report import plot_image_rows
from duomodal.evaluate.shape import Judge, TemplateMatcher, TemplateScores
from duomodal.generate import generate_images
from duomodal.models.clip import ClipEmbedder
from duomodal.models.dalle import DalleRun

DATA_SPLITS = ("train", "heldout")  # the dataset splits that prompts come from
# the prompt sets: the data splits' first captions, and the held-out pairs again in words no training
# caption has (data/profile.py UNSEEN_PHRASINGS), sampled from the same seeds as "heldout"
PROMPT_SPLITS = (*DATA_SPLITS, "heldout_reworded")
LIKELIHOOD_SPLITS = ("train", "val", "heldout")
SEED_STRIDE = 100_003  # prompt p samples from seeds options.seed + p * SEED_STRIDE + i
SHAPE_TOP_K = 10  # shape_match_top10: the prompted icon's template among this many best


@dataclass(frozen=True)
class Prompt:
    text: str  # the dataset's first caption of the pair, or an unseen phrasing of it
    icon: str
    color: str
    record: Record  # the dataset image of the pair (a reference in the grid)


def choose_prompts(records: Sequence[Record], count: int, seed: int, palette: dict[str, str]) -> list[Prompt]:
    """A seeded sample of distinct (icon, colour) pairs among labelled records, in a fixed order."""
    pairs: dict[tuple[str, str], Record] = {}
    for r in sorted(records, key=lambda r: r.location):
        icon, color = r.labels.get("icon"), r.labels.get("color")
        if icon and color in palette:
            pairs.setdefault((icon, color), r)
    keys = sorted(pairs)
    if len(keys) > count:
        keys = sorted(random.Random(seed).sample(keys, count))
    return [Prompt(pairs[k].captions[0], k[0], k[1], pairs[k]) for k in keys]


def split_prompts(ctx: EvalContext, split: str) -> list[Prompt]:
    """The prompts of one prompt split (PROMPT_SPLITS)."""
    options = ctx.options
    if split == "heldout_reworded":
        prompts = choose_prompts(ctx.by_split["heldout"], options.prompts, options.seed, ctx.palette)
        return [replace(p, text=unseen_phrasing(p.icon, p.color, i)) for i, p in enumerate(prompts)]
    return choose_prompts(ctx.by_split[split], options.prompts, options.seed, ctx.palette)


@dataclass(frozen=True)
class Scorers:
    """What assesses the samples: the reranking CLIP, the independent shape judge, the template matcher."""

    reranker: ClipEmbedder | None
    judge: Judge | None
    matcher: TemplateMatcher | None  # None when the dataset has fewer than 2 icon names
    judge_info: dict[str, Any]  # what to report about the judge (path, model id, independent, how)


@dataclass
class PromptSamples:
    prompt: Prompt
    images: list[Image.Image]  # all R generated
    colors: list[str | None]  # dominant colour of each generated image
    shapes: list[str] | None  # judge's icon for each generated image (None without a judge)
    rerank_scores: list[float] | None  # reranking CLIP score of each image
    judge_scores: list[float] | None  # judge CLIP score of each image with the prompt
    judge_ranks: list[int] | None  # rank of the prompted icon among all icons for the judge (1 = first)
    template: TemplateScores | None  # the template matcher on each image against the prompted icon
    masks: np.ndarray | None  # (R, S, S) ink mask of each image, for the name-blind comparison
    first: list[int]  # indices kept without reranking
    best: list[int] | None  # indices kept with reranking, best first
    name_blind_iou: list[float | None] | None = None  # IoU of each image with another prompt's icon


def sample_prompt(run: DalleRun, prompt: Prompt, index: int, options: EvalOptions, palette: dict[str, str],
                  scorers: Scorers, generated: int) -> PromptSamples:
    """`generated` images for the prompt (index `index` of its split), with every assessment of them."""
    sampling = options.sampling_for(options.seed + index * SEED_STRIDE, min(generated, options.batch_size))
    result = generate_images(run, prompt.text, num=generated, options=sampling)
    reranker, judge, matcher = scorers.reranker, scorers.judge, scorers.matcher
    images = result.images
    colors = [M.dominant_color(im, palette) for im in images]
    shapes = judge_scores = judge_ranks = None
    if judge is not None:
        shapes, judge_scores, judge_ranks = judge.assess(images, prompt.color, prompt.text, prompt.icon)
    k = options.samples_per_prompt
    rerank_scores = best = None
    if reranker is not None:
        rerank_scores = [float(s) for s in reranker.score(images, [prompt.text])]
        best = sorted(range(len(images)), key=lambda i: -rerank_scores[i])[:k]
    masks = template = None
    if matcher is not None:
        masks = matcher.masks(images)
        template = matcher.assess_masks(masks, [prompt.icon] * len(images))
    return PromptSamples(prompt, images, colors, shapes, rerank_scores, judge_scores, judge_ranks, template, masks,
                         list(range(k)), best)


def name_blind_icons(icons: Sequence[str]) -> list[str | None]:
    """A fixed derangement of the prompts' icons: for prompt i, the icon of the next prompt (i+1, i+2...,
    wrapping around) whose icon differs from prompt i's; None when every prompt has the same icon."""
    out: list[str | None] = []
    for i, icon in enumerate(icons):
        later = (icons[(i + step) % len(icons)] for step in range(1, len(icons)))
        out.append(next((other for other in later if other != icon), None))
    return out


def add_name_blind(samples: Sequence[PromptSamples], matcher: TemplateMatcher) -> None:
    """Fill each prompt's name_blind_iou: its images against the icon ``name_blind_icons`` gives it."""
    for s, other in zip(samples, name_blind_icons([s.prompt.icon for s in samples])):
        if other is not None and s.masks is not None:
            s.name_blind_iou = matcher.assess_masks(s.masks, [other] * len(s.masks)).iou


def summarise(samples: Sequence[PromptSamples], choice: str) -> dict[str, Any]:
    """Accuracies and mean scores over the kept images of every prompt; choice: "first" or "best"."""
    colors_predicted, colors_expected, shapes_predicted, shapes_expected = [], [], [], []
    rerank, judge, matched, matched_expected = [], [], [], []
    ranks, ious, name_blind, judge_ranks = [], [], [], []
    for s in samples:
        kept = s.first if choice == "first" else (s.best or [])
        colors_predicted += [s.colors[i] for i in kept]
        colors_expected += [s.prompt.color] * len(kept)
        if s.shapes is not None:
            shapes_predicted += [s.shapes[i] for i in kept]
            shapes_expected += [s.prompt.icon] * len(kept)
        if s.template is not None:
            matched += [s.template.predicted[i] for i in kept]
            matched_expected += [s.prompt.icon] * len(kept)
            ranks += [s.template.ranks[i] for i in kept if s.template.ranks[i] is not None]
            ious += [s.template.iou[i] for i in kept if s.template.iou[i] is not None]
        if s.name_blind_iou is not None:
            name_blind += [s.name_blind_iou[i] for i in kept if s.name_blind_iou[i] is not None]
        if s.rerank_scores is not None:
            rerank += [s.rerank_scores[i] for i in kept]
        if s.judge_scores is not None:
            judge += [s.judge_scores[i] for i in kept]
        if s.judge_ranks is not None:
            judge_ranks += [s.judge_ranks[i] for i in kept]
    out: dict[str, Any] = {
        "prompts": len(samples),
        "images": len(colors_expected),
        "color_accuracy": M.accuracy(colors_predicted, colors_expected).to_dict(),
    }
    if shapes_expected:
        out["shape_accuracy"] = M.accuracy(shapes_predicted, shapes_expected).to_dict()
    if judge_ranks:
        out["shape_judge_top10"] = M.Accuracy(sum(r <= SHAPE_TOP_K for r in judge_ranks), len(judge_ranks)).to_dict()
        out["shape_judge_median_rank"] = float(np.median(judge_ranks))
    if matched:
        out["shape_match_accuracy"] = M.accuracy(matched, matched_expected).to_dict()
    if ranks:
        out["shape_match_top10"] = M.Accuracy(sum(r <= SHAPE_TOP_K for r in ranks), len(ranks)).to_dict()
        out["shape_median_rank"] = float(np.median(ranks))
        out["shape_iou"] = M.mean_score(ious)
    if name_blind:
        out["shape_iou_name_blind"] = M.mean_score(name_blind)
    if rerank:
        out["clip_score"] = M.mean_score(rerank)
    if judge:
        out["judge_clip_score"] = M.mean_score(judge)
    return out


def plot_samples(samples: Sequence[PromptSamples], choice: str, path: Path) -> None:
    rows, titles = [], []
    for s in samples:
        kept = s.first if choice == "first" else (s.best or [])
        reference = [load_reference(s.prompt) or Image.new("RGB", s.images[0].size, "white")]
        rows.append(("\n".join(textwrap.wrap(s.prompt.text, 28)), reference + [s.images[i] for i in kept]))
        titles.append(["dataset"] + [str(s.colors[i]) + ("" if s.shapes is None else f"\n{s.shapes[i]}")
                                     for i in kept])
    plot_image_rows(rows, path, cell_titles=titles)


def load_reference(prompt: Prompt) -> Image.Image | None:
    """The dataset's image of the prompt's pair, or None when it cannot be read."""
    try:
        return load_record_image(prompt.record)
    except ValueError:
        return None
