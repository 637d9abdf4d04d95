"""Zero-shot classification with CLIP, and the figures CLIP is judged by (computed by
``duomodal.metrics``).

Each label becomes a text classifier by prompt ensembling (CLIP paper, section 3.1.4): the label
is put into several templates ("a {} icon", "an icon of {}"), each prompt is embedded and
normalised, the embeddings are averaged and normalised again. An image's class probabilities are
``softmax(logit_scale * cosine(image, class))``.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from duomodal import metrics as M
from duomodal.data.dataset import load_record_image
from duomodal.data.images import ImageError, is_image_path, load_image
from duomodal.data.record_types import caption_key
from duomodal.data.records import load_records
from duomodal.files import atomic_write_bytes, atomic_write_text

# Built-in template sets. "{}" is replaced by the label with '-' and '_' read as spaces.
TEMPLATE_SETS: dict[str, tuple[str, ...]] = {
    "plain": ("{}",),
    "icon": ("a {} icon", "{} icon", "an icon of {}", "a {} symbol"),
    "color": ("a {} icon", "{} icon", "an icon in {}", "something {}"),
    # wordings that the icon captions and their augmentation never use: does a model follow a user's words?
    "unseen": ("{} clipart", "a {} graphic", "a sketch of {}", "picture showing {}"),
    "photo": (
        "a photo of a {}.",
        "a blurry photo of a {}.",
        "a photo of the large {}.",
        "a photo of the small {}.",
        "a close-up photo of a {}.",
        "a bright photo of a {}.",
        "a cropped photo of a {}.",
        "a drawing of a {}.",
        "art of the {}.",
        "a rendering of a {}.",
    ),
}


class ClassifyError(ValueError):
    """Bad labels or templates for zero-shot classification."""


def label_text(label: str) -> str:
    """How a label reads in a prompt: 'heart-outline' -> 'heart outline', 'sports_car' -> 'sports car'."""
    return " ".join(label.replace("-", " ").replace("_", " ").split())


def resolve_templates(templates: Sequence[str] = (), template_set: str | None = None) -> tuple[str, ...]:
    """Templates given one by one, plus a built-in set; each must contain exactly one '{}'."""
    chosen: list[str] = list(templates)
    if template_set is not None:
        if template_set not in TEMPLATE_SETS:
            raise ClassifyError(f"unknown template set {template_set!r}; sets: {', '.join(sorted(TEMPLATE_SETS))}")
        chosen.extend(TEMPLATE_SETS[template_set])
    if not chosen:
        chosen = list(TEMPLATE_SETS["plain"])
    for template in chosen:
        if template.count("{}") != 1:
            raise ClassifyError(f"template {template!r} must contain '{{}}' exactly once (where the label goes)")
    return tuple(dict.fromkeys(chosen))


def parse_labels(labels: Sequence[str]) -> list[str]:
    """Strip, drop empties, refuse duplicates and an empty list."""
    cleaned = [label.strip() for label in labels if label.strip()]
    if len(cleaned) < 2:
        raise ClassifyError(f"zero-shot classification needs at least 2 labels, got {cleaned!r}")
    seen: set[str] = set()
    for label in cleaned:
        if label in seen:
            raise ClassifyError(f"label {label!r} is given twice")
        seen.add(label)
    return cleaned


def class_text_features(
    embed_texts: Callable[[list[str]], torch.Tensor], labels: Sequence[str], templates: Sequence[str]
) -> torch.Tensor:
    """(C, D) normalised, the prompt-ensembled text embedding of each label."""
    prompts = [template.format(label_text(label)) for label in labels for template in templates]
    features = F.normalize(embed_texts(prompts).float(), dim=-1)  # (C * K, D)
    features = features.view(len(labels), len(templates), -1).mean(1)  # (C, D)
    return F.normalize(features, dim=-1)


def zero_shot_probabilities(
    image_features: torch.Tensor, class_features: torch.Tensor, logit_scale: float
) -> torch.Tensor:
    """(N, C) class probabilities of normalised image features."""
    logits = logit_scale * image_features.float() @ class_features.float().T  # (N, C)
    return logits.softmax(dim=-1)


ZERO_SHOT_TOP_K = 10  # a label field with more classes than this also reports top-10 accuracy


def zero_shot_label_figures(
    image_features: torch.Tensor,
    true_labels: Sequence[str | None],
    classes: Sequence[str],
    embed_texts: Callable[[list[str]], torch.Tensor],
    templates: Sequence[str],
) -> tuple[float, float | None] | None:
    """(top-1, top-10) accuracy of zero-shot classification over `classes` for the rows whose label is a
    class, every class prompt-ensembled over all `templates`; top-10 is None with 10 classes or fewer.

    None when no row has such a label.
    """
    rows = [row for row, label in enumerate(true_labels) if label is not None and label in classes]
    if not rows:
        return None
    class_features = class_text_features(embed_texts, classes, templates).to(image_features.device)  # (C, D)
    index_of = {label: i for i, label in enumerate(classes)}
    labels = [index_of[true_labels[row]] for row in rows]
    top1 = M.zero_shot_accuracy(image_features[rows], class_features, labels).value
    if len(classes) <= ZERO_SHOT_TOP_K:
        return top1, None
    return top1, M.zero_shot_accuracy(image_features[rows], class_features, labels, k=ZERO_SHOT_TOP_K).value


def clip_figures(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    captions: Sequence[str],
    labels: Sequence[dict[str, str]],
    label_classes: dict[str, list[str]],
    embed_texts: Callable[[list[str]], torch.Tensor],
    templates: Sequence[str],
) -> dict[str, float]:
    """Retrieval recall and zero-shot accuracy of N images paired with N captions.

    image_features and text_features: (N, D) normalised, row i of each a pair; `captions` the texts,
    `labels` each image's manifest labels. Gives ``text_to_image_recall@k`` and
    ``image_to_text_recall@k`` (k = 1, 5, 10; a hit is any item whose caption reads the same) and
    ``zero_shot_<field>`` (top-1; and ``zero_shot_<field>_top10`` for fields of more than 10 classes)
    for each field of `label_classes` that some image has among its classes.
    """
    similarity = text_features.float() @ image_features.float().T  # (N texts, N images)
    relevant = M.same_key([caption_key(c) for c in captions])
    figures = {name: recall.value for name, recall in M.retrieval_recall(similarity, relevant).items()}
    for name, classes in label_classes.items():
        accuracies = zero_shot_label_figures(
            image_features, [record_labels.get(name) for record_labels in labels], classes, embed_texts, templates
        )
        if accuracies is None:
            continue
        figures[f"zero_shot_{name}"] = accuracies[0]
        if accuracies[1] is not None:
            figures[f"zero_shot_{name}_top{ZERO_SHOT_TOP_K}"] = accuracies[1]
    return figures


def save_confusion_png(matrix: torch.Tensor, labels: Sequence[str], path: str | os.PathLike, title: str = "") -> None:
    """A labelled heat map of a confusion matrix (rows: true, columns: predicted), written atomically."""
    # matplotlib loads here, when a figure is drawn: importing it costs a second that classifying does not need
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after choosing the Agg backend, lazily as above

    n = len(labels)
    side = max(4.0, 0.45 * n + 2.0)
    fig, ax = plt.subplots(figsize=(side, side))
    ax.imshow(matrix.numpy(), cmap="Blues")
    ax.set_xticks(range(n), labels=list(labels), rotation=90)
    ax.set_yticks(range(n), labels=list(labels))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title)
    if n <= 30:
        peak = int(matrix.max()) if matrix.numel() else 0
        for t in range(n):
            for p in range(n):
                value = int(matrix[t, p])
                if value:
                    color = "white" if value > peak / 2 else "black"
                    ax.text(p, t, str(value), ha="center", va="center", color=color, fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


@dataclass
class Prediction:
    path: str
    top: list[tuple[str, float]]  # (label, probability), best first
    true_label: str | None


def write_predictions_csv(predictions: Sequence[Prediction], path: str | os.PathLike) -> None:
    """One row per image: path, true label (if known), then label_1, prob_1, ... label_k, prob_k."""
    top_k = max((len(p.top) for p in predictions), default=0)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    header = ["path", "true_label"]
    for i in range(1, top_k + 1):
        header += [f"label_{i}", f"prob_{i}"]
    writer.writerow(header)
    for prediction in predictions:
        row = [prediction.path, prediction.true_label or ""]
        for label, probability in prediction.top:
            row += [label, f"{probability:.6f}"]
        writer.writerow(row)
    atomic_write_text(Path(path), buffer.getvalue())


# --- classifying image files -----------------------------------------------------------------------


@dataclass
class ClassifyResult:
    labels: list[str]
    predictions: list[Prediction]
    skipped: list[tuple[str, str]]  # (path, reason) of images that could not be read
    accuracy: float | None  # over the images whose true label is known and among the labels
    confusion: torch.Tensor | None  # (C, C) over the same images


def find_images(inputs: Sequence[str | os.PathLike], label_field: str | None = None) -> list[tuple[Path, str | None]]:
    """Image files to classify, each with its true label when known.

    A directory is scanned recursively; an image's true label is the name of its sub-folder
    directly below that directory. With `label_field`, a directory is read as a duomodal dataset
    and the label is that manifest field of each record instead.
    """
    found: list[tuple[Path, str | None]] = []
    for item in inputs:
        path = Path(item)
        if not path.exists():
            raise ClassifyError(f"{path} does not exist")
        if path.is_file():
            if label_field is not None:
                raise ClassifyError(f"--label-field needs a dataset directory, got the file {path}")
            found.append((path, None))
            continue
        if label_field is not None:
            records = load_records(path)
            with_field = [r for r in records if label_field in r.labels]
            if not with_field:
                fields = sorted({k for r in records for k in r.labels})
                raise ClassifyError(
                    f"no image in {path} has the label field {label_field!r}; fields: {', '.join(fields) or 'none'}"
                )
            found.extend((r.path, r.labels[label_field]) for r in with_field)
            continue
        for file in sorted(p for p in path.rglob("*") if p.is_file() and is_image_path(p)):
            relative = file.relative_to(path)
            found.append((file, relative.parts[0] if len(relative.parts) > 1 else None))
    if not found:
        raise ClassifyError(f"no images found in {', '.join(str(i) for i in inputs)}")
    return found


def classify_images(
    embedder,
    images: Sequence[tuple[Path, str | None]],
    labels: Sequence[str],
    templates: Sequence[str],
    top_k: int = 5,
    batch_size: int = 64,
    on_skip: Callable[[str, str], None] | None = None,
    progress: Callable[[int], None] | None = None,
) -> ClassifyResult:
    """Zero-shot classify image files with a ``ClipEmbedder``; unreadable files are skipped and counted."""
    if top_k < 1:
        raise ClassifyError(f"top_k must be at least 1, got {top_k}")
    labels = list(labels)
    class_features = class_text_features(embedder.embed_texts, labels, templates)  # (C, D)
    index_of = {label: i for i, label in enumerate(labels)}
    predictions: list[Prediction] = []
    skipped: list[tuple[str, str]] = []
    predicted_ids: list[int] = []
    true_ids: list[int] = []
    for start in range(0, len(images), batch_size):
        loaded = []
        for path, true_label in images[start : start + batch_size]:
            try:
                loaded.append((path, true_label, load_image(path)))
            except (ImageError, OSError) as e:
                skipped.append((str(path), str(e)))
                if on_skip is not None:
                    on_skip(str(path), str(e))
        if loaded:
            features = embedder.embed_images([image for _, _, image in loaded])
            probabilities = zero_shot_probabilities(features, class_features, embedder.logit_scale)  # (B, C)
            top = probabilities.topk(min(top_k, len(labels)), dim=-1)
            for (path, true_label, _), values, ids in zip(loaded, top.values.tolist(), top.indices.tolist()):
                predictions.append(Prediction(str(path), [(labels[i], p) for i, p in zip(ids, values)], true_label))
                if true_label is not None and true_label in index_of:
                    predicted_ids.append(ids[0])
                    true_ids.append(index_of[true_label])
        if progress is not None:
            progress(len(images[start : start + batch_size]))
    if true_ids:
        return ClassifyResult(
            labels, predictions, skipped, M.accuracy(predicted_ids, true_ids).value,
            M.confusion_matrix(predicted_ids, true_ids, len(labels)),
        )
    return ClassifyResult(labels, predictions, skipped, None, None)


def evaluate_records(
    embedder,
    records: Sequence,
    label_classes: dict[str, list[str]],
    template_sets: dict[str, Sequence[str]],
    batch_size: int = 64,
    on_skip: Callable[[str, str], None] | None = None,
) -> dict[str, float]:
    """Retrieval recall@1/5/10 (first caption of each record) and zero-shot accuracy per label field.

    `records` are ``duomodal.data.records.Record``s (e.g. one split); `label_classes` maps each label
    field to its classes (all values in the dataset, so held-out combinations compete with all).
    Zero-shot figures come once per template set of `template_sets` (name -> templates): the first
    set's as ``zero_shot_<field>``, every other set's as ``<set>/zero_shot_<field>``.
    """
    if not template_sets:
        raise ClassifyError("evaluate_records needs at least one template set")
    image_parts, kept = [], []
    skipped = 0
    for start in range(0, len(records), batch_size):
        images = []
        for record in records[start : start + batch_size]:
            try:
                images.append(load_record_image(record))
                kept.append(record)
            except (ImageError, OSError) as e:
                skipped += 1
                if on_skip is not None:
                    on_skip(record.location, str(e))
        if images:
            image_parts.append(embedder.embed_images(images))
    if not kept:
        raise ClassifyError("none of the images could be read")
    image_features = torch.cat(image_parts)
    captions = [record.captions[0] for record in kept]
    text_features = embedder.embed_texts(captions)
    figures: dict[str, float] = {"count": float(len(kept)), "skipped": float(skipped)}
    for position, (set_name, templates) in enumerate(template_sets.items()):
        part = clip_figures(image_features, text_features, captions, [record.labels for record in kept],
                            label_classes, embedder.embed_texts, templates)
        if position == 0:
            figures.update(part)
        else:
            figures.update({f"{set_name}/{k}": v for k, v in part.items() if k.startswith("zero_shot_")})
    return figures


def label_classes_of(records: Sequence) -> dict[str, list[str]]:
    """Each label field with at least two values among `records`, and its sorted values."""
    values: dict[str, set[str]] = {}
    for record in records:
        for name, value in record.labels.items():
            values.setdefault(name, set()).add(value)
    return {name: sorted(v) for name, v in sorted(values.items()) if len(v) >= 2}
