"""The DALL-E part of the evaluation: likelihood of real images, and what it draws for a fixed prompt set.

Prompts are a seeded sample of (icon, colour) pairs from the training split and from the held-out
split (combinations the models never saw); each prompt is the dataset's first caption of that pair.
For every prompt R images are generated (image i from seed + i). "Without reranking" keeps the first
k, "with reranking" the k that the reranking CLIP (--clip) scores best: same generations, only the
choice differs, so the difference is reranking alone.

Colour accuracy: the dominant non-background colour of each kept image (``metrics.dominant_color``)
against the colour word of its prompt. Shape accuracy: an independent judge CLIP (--judge-clip, a
different model from the reranker) must rank the prompted icon name first among all icon names of
the dataset (prompts "a <colour> <icon> icon", colour fixed to the prompt's, so only the shape
decides). Without an independent judge, that shape accuracy is reported as not measured.

Shape by template, model-free (``shape.TemplateMatcher``): each icon's dataset image gives an ink mask
(colour-blind), and each generated image's ink mask is compared with all of them by IoU. Top-1: the
prompted icon's template overlaps most (among thousands of near-duplicate icons, so it stays near 0 for
small models); top-10 and the median rank of the prompted icon's template (1 = best, ties count against
it) show progress before top-1 does; IoU: the mean IoU with the prompted icon's template, next to the
same mean against another prompt's icon (name-blind: what a model that ignores the icon's name would
get). The gap between the two is the evidence that shapes follow the prompt.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from duomodal import metrics as M
from duomodal.data.images import to_tensor
from duomodal.data.profile import UNSEEN_PHRASINGS
from duomodal.data.records import Record
from duomodal.evaluate.context import EvalContext, LoadedImages
from duomodal.evaluate.prompts import (
    DATA_SPLITS,
    LIKELIHOOD_SPLITS,
    PROMPT_SPLITS,
    SHAPE_TOP_K,
    Prompt,
    PromptSamples,
    Scorers,
    add_name_blind,
    load_reference,
    plot_samples,
    sample_prompt,
    split_prompts,
    summarise,
)
from duomodal.evaluate.report import Section, Table, fmt, fmt_accuracy
from duomodal.evaluate.shape import Judge, TemplateMatcher, independence
from duomodal.generate import GenerationError
from duomodal.models.dalle import DalleRun, load_dalle


# --- likelihood -------------------------------------------------------------------------------------


@torch.no_grad()
def image_token_nats(run: DalleRun, images: Sequence[Image.Image], captions: Sequence[str], batch_size: int) -> tuple[float, int]:
    """(mean cross-entropy in nats per image token, tokens counted) of real images given their captions."""
    if not images:
        raise M.MetricError("no images to measure the likelihood of")
    dalle = run.model
    was_training = dalle.training
    dalle.eval()
    device = next(dalle.parameters()).device
    total, count = 0.0, 0
    try:
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            pixels = torch.stack([to_tensor(im, run.vae.image_size) for im in chunk]).to(device)
            tokens = run.vae.encode(pixels).flatten(1).to(device)  # (B, N)
            text = run.tokenizer.encode_batch(list(captions[start : start + batch_size]),
                                                run.config.text_seq_len, truncate=True).to(device)  # (B, T)
            _, image_logits = dalle(text, tokens[:, :-1])  # (B, N, V)
            total += float(F.cross_entropy(image_logits.float().flatten(0, 1), tokens.flatten(), reduction="sum"))
            count += tokens.numel()
    finally:
        dalle.train(was_training)
    return total / count, count


# --- the DALL-E section ---------------------------------------------------------------------------------


def evaluate_dalle(ctx: EvalContext) -> tuple[dict[str, Any], list[Section]]:
    """Likelihood, prompt samples and reranking."""
    run = load_dalle(ctx.options.dalle, device=ctx.device)
    result: dict[str, Any] = {"path": str(ctx.options.dalle)}
    result["bits_per_image_token"], likelihood = likelihood_section(run, ctx)
    samples_section = Section("DALL-E: samples, colour and shape accuracy")
    if not _has_labels(ctx.by_split):
        reason = "the dataset has no icon/color labels (an icon dataset from `duomodal data icons` has them)"
        samples_section.text(f"Not measured: {reason}.")
        result["samples"] = {"skipped": reason}
        return result, [likelihood, samples_section]
    assessors = scorers(ctx, run.config.image_size)
    result["judge"] = assessors.judge_info
    rerank_section = Section("Reranking with CLIP")
    result.update(sample_splits(run, ctx, assessors, samples_section, rerank_section))
    return result, [likelihood, samples_section, rerank_section]


def likelihood_section(run: DalleRun, ctx: EvalContext) -> tuple[dict[str, Any], Section]:
    """Bits per image token of real images given their first caption, per split."""
    section = Section("DALL-E: likelihood of real images")
    figures: dict[str, Any] = {}
    rows = []
    for split in tqdm(LIKELIHOOD_SPLITS, desc="DALL-E likelihood", file=sys.stderr, leave=False):
        loaded = ctx.split_images(split)
        if not loaded.images:
            figures[split] = {"bits": None, "images": 0}
            rows.append((split, "0", "n/a", "n/a"))
            continue
        nats, tokens = image_token_nats(run, loaded.images, [r.captions[0] for r in loaded.records],
                                        ctx.options.batch_size)
        bits = M.bits_per_token(nats)
        figures[split] = {"bits": bits, "nats": nats, "images": len(loaded.images), "tokens": tokens}
        rows.append((split, str(len(loaded.images)), fmt(bits, 3), fmt(nats, 3)))
    uniform = M.bits_per_token(math.log(run.vae.codebook_size))
    section.table(("split", "images", "bits / image token", "nats / image token"), rows,
                  caption="Cross-entropy of the VAE tokens of real images given their first caption "
                  f"(uniform guessing would be {uniform:.2f} bits).")
    return figures, section


def scorers(ctx: EvalContext, image_size: int) -> Scorers:
    """The reranker, judge and template matcher of this evaluation."""
    options = ctx.options
    reranker = ctx.clip(options.clip) if options.clip is not None else None
    judge_clip = ctx.clip(options.judge_clip) if options.judge_clip is not None else None
    judge_id = judge_clip.model_id if judge_clip is not None else None
    independent, how = independence(options, reranker.model_id if reranker is not None else None, judge_id)
    if independent and len(ctx.icons) < 2:
        independent, how = False, f"the dataset has {len(ctx.icons)} icon name(s); ranking needs at least 2"
    judge = Judge(judge_clip, ctx.icons) if independent else None
    info = {"path": str(options.judge_clip) if options.judge_clip else None, "model_id": judge_id,
            "independent": independent, "how": how}
    matcher = None
    if len(ctx.icons) >= 2:
        records = [r for split in ctx.by_split.values() for r in split]
        matcher = TemplateMatcher.from_records(records, image_size, ctx.log)
    return Scorers(reranker, judge, matcher, info)


@dataclass
class _Rows:
    """The table rows of the samples and reranking sections, gathered split by split."""

    samples: list[tuple[str, ...]] = field(default_factory=list)
    rerank: list[tuple[str, ...]] = field(default_factory=list)
    judge: list[tuple[str, M.Accuracy]] = field(default_factory=list)  # the judge on the dataset's images
    matcher: list[tuple[str, M.Accuracy]] = field(default_factory=list)  # the matcher on the dataset's images


def sample_splits(run: DalleRun, ctx: EvalContext, scorers: Scorers, samples_section: Section,
                  rerank_section: Section) -> dict[str, Any]:
    """Sample every prompt of both prompt splits; fill the two sections; return the figures."""
    options = ctx.options
    generated = options.rerank_from if scorers.reranker is not None else options.samples_per_prompt
    result: dict[str, Any] = {"samples": {}, "reranking": {}, "prompts": {}}
    rows = _Rows()
    for split in PROMPT_SPLITS:
        prompts = split_prompts(ctx, split)
        result["prompts"][split] = [{"prompt": p.text, "icon": p.icon, "color": p.color} for p in prompts]
        samples, skipped = _sample_prompts(run, ctx, split, prompts, scorers, generated)
        _report_split(ctx, split, prompts, samples, skipped, scorers, generated, result, rows, samples_section)
    calibration = color_calibration(ctx.split_images, ctx.palette)
    result["color_classifier_on_dataset_images"] = {s: a.to_dict() for s, a in calibration.items()}
    if scorers.matcher is not None:
        result["template_matcher"] = {"icons": len(scorers.matcher.icons),
                                      "accuracy_on_dataset_images": {s: a.to_dict() for s, a in rows.matcher}}
    if rows.judge:
        scorers.judge_info["accuracy_on_dataset_images"] = {s: a.to_dict() for s, a in rows.judge}
    samples_section.blocks[:0] = _samples_header(ctx, scorers, rows, calibration)  # above the sample grids
    _fill_rerank_section(rerank_section, rows.rerank, scorers.reranker is not None, generated,
                         options.samples_per_prompt)
    return result


def _sample_prompts(run: DalleRun, ctx: EvalContext, split: str, prompts: Sequence[Prompt], scorers: Scorers,
                    generated: int) -> tuple[list[PromptSamples], list[dict[str, str]]]:
    """The samples of every prompt of a split, and the prompts skipped (with why)."""
    samples, skipped = [], []
    for i, p in enumerate(tqdm(prompts, desc=f"sampling {split} prompts", file=sys.stderr, leave=False)):
        try:
            samples.append(sample_prompt(run, p, i, ctx.options, ctx.palette, scorers, generated))
        except GenerationError as e:  # e.g. a prompt with characters the model's tokenizer never saw
            ctx.log(f"skipped prompt {p.text!r}: {e}")
            skipped.append({"prompt": p.text, "reason": str(e)})
    if scorers.matcher is not None:
        add_name_blind(samples, scorers.matcher)
    return samples, skipped


def _report_split(ctx: EvalContext, split: str, prompts: Sequence[Prompt], samples: list[PromptSamples],
                  skipped: list[dict[str, str]], scorers: Scorers, generated: int, result: dict[str, Any],
                  rows: _Rows, samples_section: Section) -> None:
    """One split's figures into `result`, its rows into `rows`, its grids into `samples_section`."""
    k = ctx.options.samples_per_prompt
    judge, matcher = scorers.judge, scorers.matcher
    templates = len(matcher.icons) if matcher is not None else None
    not_measured = {"accuracy": None, "correct": 0, "count": 0, "reason": scorers.judge_info["how"]}
    prompt_cell = str(len(samples)) + (f" ({len(skipped)} skipped)" if skipped else "")
    if not samples:
        result["samples"][split] = {"prompts": 0, "images": 0, "skipped_prompts": skipped}
        rows.samples.append((split, prompt_cell, "0", "n/a", "n/a", "n/a"))
        return
    first = {**summarise(samples, "first"), "skipped_prompts": skipped}
    first.setdefault("shape_accuracy", dict(not_measured))
    result["samples"][split] = first
    rows.samples.append((split, prompt_cell, str(first["images"]), fmt_accuracy(first["color_accuracy"]),
                         _shape_cell(first, judge), fmt_template_shape(first, templates)))
    grid = f"dalle_samples_{split}.png"
    plot_samples(samples, "first", ctx.out / grid)
    samples_section.figure(grid, f"{split} prompts: the dataset image, then the first {k} samples "
                           "(titles: dominant colour" + (", judge's icon)" if judge else ")"))
    # the judge and the matcher on the dataset's own images: once per data split (a reworded split's
    # images are its data split's)
    references = [(p, im) for p in prompts if (im := load_reference(p)) is not None] if split in DATA_SPLITS else []
    if judge is not None and references:
        judged = [judge.predict([im], p.color)[0] for p, im in references]
        rows.judge.append((split, M.accuracy(judged, [p.icon for p, _ in references])))
    if matcher is not None and references:
        matched = matcher.predict([im for _, im in references])
        rows.matcher.append((split, M.accuracy(matched, [p.icon for p, _ in references])))
    if scorers.reranker is None:
        return
    best = summarise(samples, "best")
    best.setdefault("shape_accuracy", dict(not_measured))
    result["reranking"][split] = {"without": first, "with": best}
    for name, entry in (("first k", first), ("best k by CLIP", best)):
        rows.rerank.append((split, name, str(entry["images"]), fmt_accuracy(entry["color_accuracy"]),
                            _shape_cell(entry, judge), fmt_template_shape(entry, templates),
                            fmt(entry.get("clip_score"), 3), fmt(entry.get("judge_clip_score"), 3)))
    grid = f"dalle_reranked_{split}.png"
    plot_samples(samples, "best", ctx.out / grid)
    samples_section.figure(grid, f"{split} prompts after reranking: best {k} of {generated} by CLIP score.")


def _samples_header(ctx: EvalContext, scorers: Scorers, rows: _Rows,
                    calibration: dict[str, M.Accuracy]) -> list[Any]:
    """The blocks above the sample grids: settings, the table, and how each figure is measured."""
    options, judge, matcher = ctx.options, scorers.judge, scorers.matcher
    settings = [f"{name.replace('_', '-')} {'off' if value is None else value}"
                for name, value in options.sampling.public().items() if not isinstance(value, bool)]
    sampling = (f"{', '.join(settings)}, seed {options.seed}, prompt words no training caption had "
                f"{'kept' if options.sampling.unseen_words == 'keep' else 'left out'}")
    header: list[Any] = [
        f"Sampling: {sampling}.",
        _samples_table(rows.samples, options.samples_per_prompt),
        "Colour accuracy: the dominant non-background colour of each image (each pixel is explained as a "
        "palette colour painted over the white background; near-white pixels and the anti-aliased fringe do "
        "not vote) must be the prompt's colour word; any image with ink gets some palette colour, so chance is "
        f"1 in {len(ctx.palette)}. The same classifier on the dataset's own images: "
        + "; ".join(f"{s}: {a}" for s, a in calibration.items()) + ".",
        f"Shape judge: {scorers.judge_info['how']}. It ranks all {len(ctx.icons)} icon names, so chance is 1 in "
        f"{len(ctx.icons)}." if judge is not None
        else f"Shape accuracy: **not measured**: {scorers.judge_info['how']}.",
    ]
    if rows.judge:
        header.append("Judge calibration (the judge on the dataset's own image of each prompt): "
                      + "; ".join(f"{s}: {a}" for s, a in rows.judge) + ".")
    if matcher is not None:
        header.append(
            f"Shape (template): no model involved; the icon among all {len(matcher.icons)} whose dataset image has "
            "the most overlapping ink mask (intersection over union; masks ignore colour, so a held-out pair is "
            "matched against the icon drawn in another colour). It rewards drawing the icon where and as large as "
            "the dataset does. On the dataset's own image of each prompt: "
            + ("; ".join(f"{s}: {a}" for s, a in rows.matcher) or "n/a") + ". "
            f"Top-1 must beat every one of the {len(matcher.icons)} templates, near-duplicate icons included, so "
            f"it stays near 0 for small models; top-{SHAPE_TOP_K}: the prompted icon's template is among the "
            f"{SHAPE_TOP_K} that overlap most; median rank: of the prompted icon's template among all "
            f"{len(matcher.icons)} (1 = best; a template that overlaps as much counts as ranked above it, so an "
            "image with no ink ranks last); IoU: the mean overlap with the prompted icon's template, then the "
            "same mean with the icon of the next prompt of the split that asks for another icon (name-blind: "
            "what a model that ignores "
            "the icon's name would get). IoU above the name-blind figure means shapes follow the prompt.")
    return header


def color_calibration(split_images: Callable[[str], LoadedImages], palette: dict[str, str]) -> dict[str, M.Accuracy]:
    """The colour classifier's accuracy on the dataset's own labelled images of the prompt splits."""
    out = {}
    for split in DATA_SPLITS:
        loaded = split_images(split)
        pairs = [(im, r.labels["color"]) for im, r in zip(loaded.images, loaded.records)
                 if r.labels.get("color") in palette]
        out[split] = M.color_accuracy([im for im, _ in pairs], [c for _, c in pairs], palette)[0]
    return out


def _has_labels(by_split: dict[str, list[Record]]) -> bool:
    return any("icon" in r.labels and "color" in r.labels for records in by_split.values() for r in records)


def _shape_cell(entry: dict[str, Any], judge: Judge | None) -> str:
    if judge is None:
        return "not measured"
    text = "top-1 " + fmt_accuracy(entry.get("shape_accuracy"))
    if "shape_judge_top10" in entry:
        text += (f", top-10 {fmt_accuracy(entry['shape_judge_top10'])}, "
                 f"median rank {entry['shape_judge_median_rank']:g} of {len(judge.icons)}")
    return text


def fmt_template_shape(entry: dict[str, Any], templates: int | None = None) -> str:
    """The template figures of a summarise() entry in one cell: "top-1 0/64, top-10 5/64, median rank 812
    of 7188, IoU 0.41 vs 0.27 name-blind"; n/a when the matcher did not run."""
    top1 = entry.get("shape_match_accuracy")
    if not top1:
        return "n/a"
    parts = [f"top-1 {top1['correct']}/{top1['count']}"]
    if "shape_match_top10" in entry:
        top = entry["shape_match_top10"]
        parts.append(f"top-{SHAPE_TOP_K} {top['correct']}/{top['count']}")
    if "shape_median_rank" in entry:
        parts.append(f"median rank {entry['shape_median_rank']:g}" + (f" of {templates}" if templates else ""))
    if "shape_iou" in entry:
        blind = entry.get("shape_iou_name_blind")
        parts.append(f"IoU {entry['shape_iou']:.2f}" + (f" vs {blind:.2f} name-blind" if blind is not None else ""))
    return ", ".join(parts)


def _samples_table(rows: list[tuple[str, ...]], k: int):
    return Table(("prompts from", "prompts", "images", "colour accuracy", "shape (judge CLIP)", "shape (template)"),
                 tuple(rows),
                 caption=f"First {k} samples per prompt, no reranking. Held-out prompts are (icon, colour) "
                 "pairs the models never saw in training; heldout_reworded asks for the same pairs in phrasings "
                 "that no training caption uses (" + "; ".join(f"\"{p}\"" for p in UNSEEN_PHRASINGS) + ").")


def _fill_rerank_section(section: Section, rows: list[tuple[str, ...]], reranking: bool, generated: int,
                         k: int) -> None:
    if not reranking:
        section.text("Not measured: no --clip given to rerank with.")
        return
    section.text(f"{generated} images per prompt; *first k* keeps the first {k}, *best k by CLIP* keeps the {k} "
                 "that the reranking CLIP scores highest. CLIP score: the reranking CLIP's cosine similarity of "
                 "image and prompt (it is what reranking maximises, so it rises by construction); judge score: "
                 "the same by the independent judge, when there is one.")
    if not rows:
        section.text("No prompt could be sampled, so there is nothing to compare.")
        return
    section.table(("prompts from", "kept", "images", "colour accuracy", "shape (judge CLIP)", "shape (template)",
                   "CLIP score", "judge score"), rows)
