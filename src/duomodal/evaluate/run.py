"""`duomodal eval`: measure the trained models on a dataset and write the report.

Each component (VAE, DALL-E, CLIP) is optional; a missing one is said so in the report and its
sections are skipped. The DALL-E part (prompt samples, colour and shape accuracy, reranking) lives
in ``samples.py``, what both share in ``context.py``; this module holds the VAE and CLIP figures,
the training curves and the assembly of the report.
"""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from duomodal import metrics as M
from duomodal.classify import TEMPLATE_SETS, class_text_features
from duomodal.data.images import to_pil, to_tensor
from duomodal.data.profile import captions_for, icon_words, read_profile
from duomodal.data.record_types import Record, caption_key
from duomodal.data.records import load_records
from duomodal.device import machine, resolve_device, resolve_precision
from duomodal.evaluate.context import EvalContext, EvalOptions, EvalResult, LoadedImages, Log
from duomodal.evaluate.report import Section, fmt, fmt_accuracy, plot_image_rows, plot_training_curves, write_report
from duomodal.evaluate.samples import evaluate_dalle, fmt_template_shape
from duomodal.models.vae import load_vae

RECALL_KS = (1, 5, 10)
EVAL_SPLITS = ("val", "heldout")


# --- data --------------------------------------------------------------------------------------


def _labelled(records: Sequence[Record], key: str) -> bool:
    return any(key in r.labels for r in records)


# --- VAE ---------------------------------------------------------------------------------------


def evaluate_vae(vae: Any, loaded: LoadedImages, batch_size: int, out: Path) -> tuple[dict[str, Any], Section]:
    """Validation PSNR, codebook usage and a reconstruction grid."""
    section = Section("VAE")
    if not loaded.images:
        section.text("No readable validation images: nothing to measure.")
        return {"skipped": "no validation images"}, section
    device = next(vae.parameters()).device
    psnrs, counts, originals, recons = [], torch.zeros(vae.codebook_size, dtype=torch.long), [], []
    batches = range(0, len(loaded.images), batch_size)
    for start in tqdm(batches, desc="VAE reconstructions", file=sys.stderr, leave=False):
        pixels = torch.stack([to_tensor(im, vae.image_size) for im in loaded.images[start : start + batch_size]])
        tokens = vae.encode(pixels.to(device))  # (B, h, w)
        recon = vae.decode(tokens).float().cpu()  # (B, 3, H, W)
        psnrs.append(M.batch_psnr(pixels, recon))
        counts += M.token_counts(tokens, vae.codebook_size)
        if len(originals) < 8:
            originals += [to_pil(p) for p in pixels[: 8 - len(originals)]]
            recons += [to_pil(r) for r in recon[: 8 - len(recons)]]
    per_image = torch.cat(psnrs)
    usage = M.codebook_usage(counts)
    grid = "vae_reconstructions.png"
    plot_image_rows([("original", originals), ("reconstruction", recons)], out / grid)
    result = {
        "images": len(loaded.images),
        "psnr_db": float(per_image.mean()),
        "psnr_db_min": float(per_image.min()),
        "codebook": usage.to_dict(),
        "grid_size": vae.grid_size,
        "image_size": vae.image_size,
    }
    section.text(
        f"Validation images: **{len(loaded.images)}** at {vae.image_size}x{vae.image_size} px, "
        f"{vae.grid_size}x{vae.grid_size} tokens each, codebook of {vae.codebook_size}."
    )
    section.table(
        ("figure", "value"),
        [
            ("PSNR (mean over images)", fmt(result["psnr_db"], 2, " dB")),
            ("PSNR (worst image)", fmt(result["psnr_db_min"], 2, " dB")),
            ("codes used", f"{usage.used} / {usage.size} ({100 * usage.fraction:.1f}%)"),
            ("code perplexity", f"{usage.perplexity:.1f} (over {usage.token_count} tokens)"),
        ],
    )
    section.figure(grid, "Validation images (top) and their reconstructions (bottom).")
    return result, section


# --- CLIP --------------------------------------------------------------------------------------


def relevance_matrix(records: Sequence[Record]) -> torch.Tensor:
    """(N texts, N images): text i (the first caption of record i) answers image j when j has that caption."""
    keys = [{caption_key(c) for c in r.captions} for r in records]
    texts = [caption_key(r.captions[0]) for r in records]
    return torch.tensor([[text in image_keys for image_keys in keys] for text in texts], dtype=torch.bool)


def color_class_texts(color: str, icons: Sequence[str]) -> list[str]:
    """Prompts for one colour: the dataset's first caption template over the given icons, or a plain
    "a {colour} icon" when the data has no icon names."""
    if not icons:
        return [f"a {color} icon"]
    return [captions_for(icon, color)[0] for icon in icons]


def class_embeddings(embed_texts: Callable[[list[str]], torch.Tensor], prompt_sets: Sequence[list[str]]) -> torch.Tensor:
    """(C, D): for each class, the normalised mean of its prompts' embeddings (prompt ensembling)."""
    flat = [p for prompts in prompt_sets for p in prompts]
    embedded = torch.nn.functional.normalize(embed_texts(flat).float(), dim=-1)
    rows, start = [], 0
    for prompts in prompt_sets:
        rows.append(embedded[start : start + len(prompts)].mean(0))
        start += len(prompts)
    return torch.nn.functional.normalize(torch.stack(rows), dim=-1)


def evaluate_clip_split(clip: Any, loaded: LoadedImages, palette: dict[str, str], icons: list[str],
                        seed: int, icon_classes: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """Recall@k both ways, zero-shot colour and icon accuracy (with the captions' wording and with wordings
    they never use), and name search on one split. `icon_classes` keeps the icon names' text embeddings
    (thousands of prompts) between the splits of one evaluation: the same `clip` and `icons` each call."""
    records = loaded.records
    result: dict[str, Any] = {"images": len(records)}
    if not records:
        return result
    image_features = clip.embed_images(loaded.images)  # (N, D)
    text_features = clip.embed_texts([r.captions[0] for r in records])  # (N, D)
    similarity = text_features.float() @ image_features.float().T  # (N texts, N images)
    relevant = relevance_matrix(records)
    for k in RECALL_KS:
        result[f"text_to_image_recall@{k}"] = M.recall_at_k(similarity, relevant, k).to_dict()
        result[f"image_to_text_recall@{k}"] = M.recall_at_k(similarity.T, relevant.T, k).to_dict()
    ensemble_icons = sample_strings(icons, 32, seed)
    colored = [i for i, r in enumerate(records) if r.labels.get("color") in palette]
    if colored:
        colors = list(palette)
        labels = [colors.index(records[i].labels["color"]) for i in colored]
        classes = class_embeddings(clip.embed_texts, [color_class_texts(c, ensemble_icons) for c in colors])
        result["zero_shot_color"] = M.zero_shot_accuracy(image_features[colored], classes, labels).to_dict()
        result["zero_shot_color"]["classes"] = len(colors)
        unseen = class_text_features(clip.embed_texts, colors, TEMPLATE_SETS["unseen"])
        result["zero_shot_color_unseen"] = M.zero_shot_accuracy(image_features[colored], unseen, labels).to_dict()
    # zero-shot icon: every icon name of the dataset competes (held-out images are of icons seen in other
    # colours), each name prompt-ensembled over the icon templates, and over wordings never trained on
    icon_index = {icon: i for i, icon in enumerate(icons)}
    with_icon = [i for i, r in enumerate(records) if r.labels.get("icon") in icon_index]
    if with_icon and len(icons) > 1:
        labels = [icon_index[records[i].labels["icon"]] for i in with_icon]
        icon_classes = {} if icon_classes is None else icon_classes
        for suffix, templates in (("", TEMPLATE_SETS["icon"]), ("_unseen", TEMPLATE_SETS["unseen"])):
            if suffix not in icon_classes:
                icon_classes[suffix] = class_text_features(clip.embed_texts, icons, templates)
            classes = icon_classes[suffix]
            result[f"zero_shot_icon{suffix}"] = M.zero_shot_accuracy(image_features[with_icon], classes, labels).to_dict()
            result[f"zero_shot_icon{suffix}"]["classes"] = len(icons)
            result[f"zero_shot_icon{suffix}_top10"] = M.zero_shot_accuracy(
                image_features[with_icon], classes, labels, k=10).to_dict()
        result["name_search_top10"] = name_search(clip, image_features, records)
    return result


def name_search(clip: Any, image_features: torch.Tensor, records: Sequence[Record], k: int = 10) -> dict[str, Any]:
    """A user types an icon's name ("heart outline") into the search over these images: is an image of
    that icon, in any colour, among the k most similar? One query per icon name of the images."""
    names = sorted({r.labels["icon"] for r in records if r.labels.get("icon")})
    queries = clip.embed_texts([icon_words(name) for name in names])  # (Q, D)
    query_of = {name: q for q, name in enumerate(names)}
    image_query = torch.tensor([query_of.get(r.labels.get("icon"), -1) for r in records])  # (N,)
    relevant = image_query[None, :] == torch.arange(len(names))[:, None]  # (Q, N)
    similarity = queries.float() @ image_features.float().T  # (Q, N)
    return {**M.recall_at_k(similarity, relevant, k).to_dict(), "images": len(records)}


def sample_strings(items: Sequence[str], limit: int, seed: int) -> list[str]:
    items = sorted(items)
    if len(items) <= limit:
        return items
    return sorted(random.Random(seed).sample(items, limit))


def clip_section(results: dict[str, dict[str, Any]], clip_path: Path, model_id: str) -> Section:
    section = Section("CLIP")
    section.text(f"`{clip_path}` (model id `{model_id}`). Each image is paired with its first caption.")
    rows = []
    for split, r in results.items():
        if not r.get("images"):
            rows.append((split, "0", *(["n/a"] * 6)))
            continue
        rows.append((
            split, str(r["images"]),
            *(fmt_accuracy(r.get(f"text_to_image_recall@{k}")) for k in RECALL_KS),
            *(fmt_accuracy(r.get(f"image_to_text_recall@{k}")) for k in RECALL_KS),
        ))
    section.table(("split", "images", "T→I R@1", "T→I R@5", "T→I R@10", "I→T R@1", "I→T R@5", "I→T R@10"), rows,
                  caption="Recall@k: share of queries whose match is among their k most similar items, searched "
                  "among the split's evaluated images (or their captions) only, so a larger split is a harder search.")
    names = {"zero_shot_color": "zero-shot colour", "zero_shot_color_unseen": "zero-shot colour, unseen wording",
             "zero_shot_icon": "zero-shot icon top-1", "zero_shot_icon_top10": "zero-shot icon top-10",
             "zero_shot_icon_unseen": "zero-shot icon top-1, unseen wording",
             "zero_shot_icon_unseen_top10": "zero-shot icon top-10, unseen wording",
             "name_search_top10": "name search: the icon in the top 10"}
    shown = [split for split, r in results.items() if r.get("images")]
    rows = [(label, *(fmt_accuracy(results[split].get(key)) for split in shown))
            for key, label in names.items() if any(key in results[split] for split in shown)]
    if rows:
        classes = next((results[s]["zero_shot_icon"]["classes"] for s in shown if "zero_shot_icon" in results[s]), None)
        section.table(("figure", *shown), rows)
        section.text(
            "Zero-shot colour: each palette colour becomes a text classifier, the mean embedding of the "
            "dataset's first caption template over up to 32 icon names (\"a red heart icon\", \"a red star icon\"...); "
            "with unseen wording, the mean over templates no caption uses (\"red clipart\", \"a red graphic\"...). "
            + (f"Zero-shot icon: all {classes} icon names of the dataset compete, each the mean embedding of "
               "the icon templates (\"a heart icon\", \"an icon of heart\"...) or of the unseen ones; top-10 counts "
               "the image's icon among the 10 most similar names. " if classes else "")
            + "Name search: each icon name of the split typed as a query (\"heart outline\") against the split's "
            "images; a hit when an image of that icon, in any colour, is in the top 10."
        )
    return section


# --- training curves ------------------------------------------------------------------------------


def curves_section(runs: dict[str, Path | None], out: Path) -> tuple[dict[str, Any], Section]:
    section = Section("Training curves")
    result: dict[str, Any] = {}
    for name, run_dir in runs.items():
        if run_dir is None:
            continue
        log_path = Path(run_dir) / "metrics.jsonl"
        if not log_path.is_file():
            section.text(f"{name}: no `metrics.jsonl` in `{run_dir}` (not a training run directory).")
            result[name] = {"skipped": f"no metrics.jsonl in {run_dir}"}
            continue
        file = f"curves_{name.lower().replace(' ', '_').replace('-', '_')}.png"
        drawn = plot_training_curves(log_path, out / file, f"{name}: {Path(run_dir).name}")
        if not drawn:
            section.text(f"{name}: `{log_path}` holds no numeric series.")
            result[name] = {"skipped": f"{log_path} holds no numeric series"}
            continue
        section.figure(file, f"{name} training run `{run_dir}`: {', '.join(drawn)}.")
        result[name] = {"figure": file, "series": drawn}
    if not section.blocks:
        section.text("No runs given.")
    return result, section


# --- headline ------------------------------------------------------------------------------------


def headline(metrics: dict[str, Any]) -> list[tuple[str, str]]:
    """The few figures a reader wants first, as (what, value) rows; only those that were measured."""
    rows: list[tuple[str, str]] = []
    if "machine" in metrics:
        m = metrics["machine"]
        rows.append(("machine", f"{m['cpu']}, {m['isa']}, {m['threads']} threads{', ' + m['gpu'] if m['gpu'] else ''}"))
    trained = [f"{name} {r['step']} steps ({r['precision']})" for name, r in metrics.get("training", {}).items() if r]
    if trained:
        rows.append(("training", ", ".join(trained)))
    vae = metrics.get("vae", {})
    if "psnr_db" in vae:
        codebook = vae["codebook"]
        rows.append(("VAE val PSNR", f"{fmt(vae['psnr_db'], 2, ' dB')} ({vae['images']} images)"))
        rows.append(("VAE codes used", f"{codebook['used']} / {codebook['size']} "
                                       f"(perplexity {codebook['perplexity']:.1f})"))
    dalle = metrics.get("dalle", {})
    bits = {s: e["bits"] for s, e in dalle.get("bits_per_image_token", {}).items() if e.get("bits") is not None}
    if bits:
        rows.append(("DALL-E bits / image token", ", ".join(f"{s} {b:.3f}" for s, b in bits.items())))
    samples = dalle.get("samples", {})
    templates = dalle.get("template_matcher", {}).get("icons")
    for split, entry in (samples.items() if isinstance(samples, dict) else []):
        if isinstance(entry, dict) and "color_accuracy" in entry:
            rows.append((f"DALL-E {split} prompts", _accuracies(entry, templates)))
    for split, entry in dalle.get("reranking", {}).items():
        rows.append((f"DALL-E {split} prompts, reranked", _accuracies(entry["with"], templates)))
    clip = metrics.get("clip", {})
    for split in EVAL_SPLITS:
        entry = clip.get(split, {})
        if entry.get("images"):
            text = (f"text->image R@1 {fmt_accuracy(entry.get('text_to_image_recall@1'))}, "
                    f"zero-shot colour {fmt_accuracy(entry.get('zero_shot_color'))}")
            if "zero_shot_icon_top10" in entry:
                text += (f", zero-shot icon top-10 {fmt_accuracy(entry['zero_shot_icon_top10'])}, "
                         f"name search top-10 {fmt_accuracy(entry.get('name_search_top10'))}")
            rows.append((f"CLIP {split}", text))
    return rows


def _accuracies(entry: dict[str, Any], templates: int | None) -> str:
    text = f"colour {fmt_accuracy(entry['color_accuracy'])}"
    if entry.get("shape_accuracy", {}).get("accuracy") is not None:
        text += f", shape (judge CLIP) {fmt_accuracy(entry['shape_accuracy'])}"
    if "shape_match_accuracy" in entry:
        text += f", shape (template) {fmt_template_shape(entry, templates)}"
    return text


# --- the whole evaluation --------------------------------------------------------------------------


def run_evaluation(options: EvalOptions, log: Log | None = None) -> EvalResult:
    """Measure every given component on the dataset and write report.md, report.html, metrics.json."""
    records = load_records(options.data, options.val_fraction)
    ctx = EvalContext(
        options=options,
        device=resolve_device(options.device),
        by_split={s: [r for r in records if r.split == s] for s in ("train", "val", "heldout")},
        palette=read_profile(options.data).palette,
        icons=sorted({r.labels["icon"] for r in records if "icon" in r.labels}),
        out=Path(options.out),
        log=log or (lambda message: None),
    )
    ctx.out.mkdir(parents=True, exist_ok=True)
    metrics = _data_and_settings(ctx, records)
    components = {"VAE": options.vae, "DALL-E": options.dalle, "CLIP": options.clip, "judge CLIP": options.judge_clip}
    metrics["machine"] = machine()
    metrics["training"] = {name: _training_result(path) for name, path in components.items() if path is not None}
    overview = _overview(metrics, components, options.max_images)
    sections = [overview]
    metrics["vae"] = _vae_part(ctx, sections)
    if options.dalle is not None:
        metrics["dalle"], dalle_sections = evaluate_dalle(ctx)
        sections += dalle_sections
    else:
        metrics["dalle"] = {"skipped": "no --dalle given"}
    metrics["clip"] = _clip_part(ctx, sections)
    summary = headline(metrics)
    if summary:
        section = Section("Summary")
        section.table(("", "figure"), summary)
        sections.insert(1, section)
    metrics["curves"], section = curves_section(components, ctx.out)
    sections.append(section)
    metrics["skipped_images"] = ctx.skipped
    if ctx.skipped:
        overview.text(f"{len(ctx.skipped)} unreadable image(s) were skipped (listed in metrics.json).")
    paths = write_report(ctx.out, "duomodal evaluation report", sections, metrics)
    return EvalResult(metrics, paths)


def _data_and_settings(ctx: EvalContext, records: Sequence[Record]) -> dict[str, Any]:
    options = ctx.options
    return {
        "data": {
            "root": str(Path(options.data).absolute()),
            "counts": {s: len(v) for s, v in ctx.by_split.items()},
            "icons": len(ctx.icons),
            "palette": ctx.palette,
            "has_color_labels": _labelled(records, "color"),
        },
        "settings": {
            "prompts_per_split": options.prompts, "samples_per_prompt": options.samples_per_prompt,
            "rerank_from": options.rerank_from, "seed": options.seed, "max_images": options.max_images,
            "device": str(ctx.device), **options.sampling.public(),
            "precision": resolve_precision(options.precision, ctx.device),
        },
    }


def _overview(metrics: dict[str, Any], components: dict[str, Path | None], max_images: int) -> Section:
    data, counts = metrics["data"], metrics["data"]["counts"]
    overview = Section("Overview")
    overview.text(
        f"Dataset `{data['root']}`: {sum(counts.values())} captioned images (train {counts['train']}, "
        f"val {counts['val']}, held-out {counts['heldout']}), {data['icons']} icon names, palette of "
        f"{len(data['palette'])} colours. Figures on a split use at most {max_images} of its images."
    )
    overview.table(("component", "directory"), [(k, f"`{v}`" if v else "not given: its sections are skipped")
                                               for k, v in components.items()])
    m = metrics["machine"]
    overview.text(
        f"Machine: {m['cpu']}, ISA {m['isa']} ({'native' if m['cpu_native_bf16'] else 'no native'} bf16), "
        f"{m['threads']} threads, {'GPU ' + m['gpu'] if m['gpu'] else 'no GPU'}; this report computed in "
        f"{metrics['settings']['precision']} on {metrics['settings']['device']} ({m['attention']} attention)."
    )
    trained = [(name, r["step"], r["precision"], f"{r['train_s']:.0f} s",
                f"{r['plan']['minutes']:g} minutes" if r.get("plan") else "steps as configured")
               for name, r in metrics["training"].items() if r]
    if trained:
        overview.table(("component", "steps reached", "precision", "training time", "budget"), trained,
                       "How each model was trained (its run's result.json)")
    return overview


def _training_result(path: Path) -> dict[str, Any] | None:
    """What a training run's result.json says of how it trained (None for a model directory without one)."""
    result_path = Path(path) / "result.json"
    if not result_path.is_file():
        return None
    result = json.loads(result_path.read_text(encoding="utf-8"))
    return {key: result.get(key) for key in ("step", "precision", "train_s", "items_per_s", "world_size", "plan")}


def _vae_part(ctx: EvalContext, sections: list[Section]) -> dict[str, Any]:
    if ctx.options.vae is None:
        return {"skipped": "no --vae given"}

    vae = load_vae(ctx.options.vae, device=ctx.device)
    result, section = evaluate_vae(vae, ctx.split_images("val"), ctx.options.batch_size, ctx.out)
    sections.append(section)
    return {**result, "path": str(ctx.options.vae)}


def _clip_part(ctx: EvalContext, sections: list[Section]) -> dict[str, Any]:
    options = ctx.options
    if options.clip is None:
        return {"skipped": "no --clip given"}
    clip = ctx.clip(options.clip)
    results: dict[str, Any] = {}
    icon_classes: dict[str, torch.Tensor] = {}  # the splits' icon names are the same prompts: embedded once
    for split in tqdm(EVAL_SPLITS, desc="CLIP figures", file=sys.stderr, leave=False):
        results[split] = evaluate_clip_split(clip, ctx.split_images(split), ctx.palette, ctx.icons, options.seed,
                                             icon_classes)
    sections.append(clip_section(results, options.clip, clip.model_id))
    return {"path": str(options.clip), "model_id": clip.model_id, **results}
