"""Pure metric functions: tensors, arrays and images in, numbers out. No models, no files.

Every accuracy is an ``Accuracy`` (correct, total), so that a figure never travels without its
sample count.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from duomodal.data.images import parse_color


class MetricError(ValueError):
    """Inputs a metric cannot be computed from (empty, mismatched shapes, bad values)."""


@dataclass(frozen=True)
class Accuracy:
    correct: int  # how many were right
    total: int  # how many were measured

    @property
    def value(self) -> float | None:
        """correct / total, or None when nothing was measured."""
        return self.correct / self.total if self.total else None

    def to_dict(self) -> dict[str, float | int | None]:
        return {"accuracy": self.value, "correct": self.correct, "count": self.total}

    def __str__(self) -> str:
        if not self.total:
            return "n/a (0 samples)"
        return f"{100 * self.value:.1f}% ({self.correct}/{self.total})"


# --- reconstruction ------------------------------------------------------------------------------


def _check_pair(reference: torch.Tensor, reconstruction: torch.Tensor) -> None:
    if reference.shape != reconstruction.shape:
        raise MetricError(
            f"reference and reconstruction differ in shape: {tuple(reference.shape)} vs "
            f"{tuple(reconstruction.shape)}"
        )
    if reference.numel() == 0:
        raise MetricError("cannot compare empty tensors")


def mse(reference: torch.Tensor, reconstruction: torch.Tensor) -> float:
    """Mean squared error over every element."""
    _check_pair(reference, reconstruction)
    return float(((reference.double() - reconstruction.double()) ** 2).mean())


def psnr(reference: torch.Tensor, reconstruction: torch.Tensor, max_value: float = 1.0,
         min_mse: float = 1e-10) -> float:
    """Peak signal-to-noise ratio in dB of the whole tensor pair: 10 log10(max^2 / MSE).

    The MSE is floored at `min_mse` so identical inputs give a finite figure (100 dB for max 1).
    """
    return 10.0 * math.log10(max_value**2 / max(mse(reference, reconstruction), min_mse))


def batch_psnr(reference: torch.Tensor, reconstruction: torch.Tensor, max_value: float = 1.0,
               min_mse: float = 1e-10) -> torch.Tensor:
    """Per-image PSNR (B,) in dB of two (B, C, H, W) batches."""
    _check_pair(reference, reconstruction)
    if reference.dim() != 4:
        raise MetricError(f"expected (B, C, H, W) batches, got shape {tuple(reference.shape)}")
    per_image = ((reference.double() - reconstruction.double()) ** 2).flatten(1).mean(1)  # (B,)
    return 10.0 * torch.log10(max_value**2 / per_image.clamp_min(min_mse))


# --- codebook ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CodebookUsage:
    used: int  # codes that occur at least once
    size: int  # codebook size
    token_count: int  # tokens counted
    perplexity: float  # exp(entropy of the code distribution): the effective number of codes

    @property
    def fraction(self) -> float:
        return self.used / self.size

    def to_dict(self) -> dict[str, float | int]:
        return {"used": self.used, "size": self.size, "fraction": self.fraction,
                "perplexity": self.perplexity, "token_count": self.token_count}


def token_counts(tokens: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """How often each code occurs in `tokens` (any shape): LongTensor (codebook_size,)."""
    flat = tokens.reshape(-1).long()
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= codebook_size):
        raise MetricError(
            f"token ids must lie in [0, {codebook_size}); got min {int(flat.min())}, max {int(flat.max())}"
        )
    return torch.bincount(flat.cpu(), minlength=codebook_size)


def codebook_usage(counts: torch.Tensor) -> CodebookUsage:
    """Usage and perplexity of a codebook from its per-code counts (K,)."""
    counts = torch.as_tensor(counts).reshape(-1).double()
    if counts.numel() == 0:
        raise MetricError("codebook counts are empty")
    if bool((counts < 0).any()):
        raise MetricError("codebook counts must not be negative")
    total = float(counts.sum())
    if total == 0:
        raise MetricError("no tokens were counted; encode at least one image")
    p = counts[counts > 0] / total
    entropy = float(-(p * p.log()).sum())
    return CodebookUsage(used=int((counts > 0).sum()), size=counts.numel(),
                         token_count=int(round(total)), perplexity=math.exp(entropy))


# --- language-model figures ------------------------------------------------------------------------


def bits_per_token(mean_cross_entropy_nats: float) -> float:
    """Mean cross-entropy in nats per token -> bits per token."""
    if not math.isfinite(mean_cross_entropy_nats) or mean_cross_entropy_nats < 0:
        raise MetricError(f"mean cross-entropy must be a finite number >= 0 nats, got {mean_cross_entropy_nats}")
    return mean_cross_entropy_nats / math.log(2)


def mean_score(scores: Sequence[float] | torch.Tensor) -> float:
    """Mean of scores (e.g. CLIP cosine similarities)."""
    values = torch.as_tensor(scores, dtype=torch.float64).reshape(-1)
    if values.numel() == 0:
        raise MetricError("no scores to average")
    return float(values.mean())


# --- colour --------------------------------------------------------------------------------------


def _rgb(value: str | Sequence[int], what: str) -> tuple[int, int, int]:
    """``parse_color`` with its ValueError raised as a MetricError."""
    try:
        return parse_color(value, what)
    except ValueError as e:
        raise MetricError(str(e)) from None


def dominant_color(
    image: Image.Image | np.ndarray,
    palette: Mapping[str, str | Sequence[int]],
    background: str | Sequence[int] = (255, 255, 255),
    min_coverage: float = 0.5,
) -> str | None:
    """The palette name of the dominant non-background colour of an image, or None if it is blank.

    Each pixel is explained as a palette colour painted over the background with some coverage
    ``a``: pixel = a * colour + (1 - a) * background. The colour whose line through the background
    passes closest to the pixel wins that pixel. Anti-aliased fringe pixels lie on the same line as
    the shape they border, so they are not mistaken for a paler palette colour; pixels with coverage
    below `min_coverage` (near-background and the faint outer fringe) do not vote. The most frequent
    colour among the voting pixels is the answer.
    Palette colours equal to the background cannot be told from it and never win.
    """
    if not palette:
        raise MetricError("the palette is empty; pass at least one colour")
    if isinstance(image, Image.Image):
        pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    else:
        pixels = np.asarray(image, dtype=np.float64)
        if pixels.ndim != 3 or pixels.shape[-1] != 3:
            raise MetricError(f"expected an (H, W, 3) array of 0..255 values, got shape {pixels.shape}")
    names = [n for n in palette]
    colors = np.array([_rgb(palette[n], "palette colour") for n in names], dtype=np.float64)  # (K, 3)
    bg = np.array(_rgb(background, "background colour"), dtype=np.float64)  # (3,)
    directions = colors - bg  # (K, 3)
    length2 = (directions**2).sum(1)  # (K,)
    usable = length2 > 1e-6
    if not usable.any():
        raise MetricError("every palette colour equals the background colour")
    directions, length2 = directions[usable], length2[usable]
    names = [n for n, ok in zip(names, usable) if ok]

    offsets = pixels.reshape(-1, 3) - bg  # (M, 3)
    coverage = np.clip(offsets @ directions.T / length2, 0.0, 1.0)  # (M, K)
    fitted = coverage[:, :, None] * directions[None]  # (M, K, 3)
    residual = np.linalg.norm(offsets[:, None, :] - fitted, axis=2)  # (M, K)
    best = residual.argmin(1)  # (M,)
    best_coverage = coverage[np.arange(len(best)), best]  # (M,)
    votes = np.bincount(best[best_coverage >= min_coverage], minlength=len(names))
    if votes.sum() == 0:
        return None
    return names[int(votes.argmax())]


def accuracy(predicted: Sequence[object], expected: Sequence[object]) -> Accuracy:
    """How many predictions equal their expected label (None never matches)."""
    if len(predicted) != len(expected):
        raise MetricError(f"{len(predicted)} predictions but {len(expected)} expected labels")
    correct = sum(1 for p, e in zip(predicted, expected) if p is not None and p == e)
    return Accuracy(correct=correct, total=len(expected))


def color_accuracy(
    images: Sequence[Image.Image],
    expected_colors: Sequence[str],
    palette: Mapping[str, str | Sequence[int]],
    background: str | Sequence[int] = (255, 255, 255),
) -> tuple[Accuracy, list[str | None]]:
    """Does each image's dominant colour match its expected colour name? -> (accuracy, predictions)."""
    if len(images) != len(expected_colors):
        raise MetricError(f"{len(images)} images but {len(expected_colors)} expected colours")
    unknown = sorted({c for c in expected_colors if c not in palette})
    if unknown:
        raise MetricError(f"colour(s) {', '.join(unknown)} are not in the palette ({', '.join(palette)})")
    predicted = [dominant_color(im, palette, background) for im in images]
    return accuracy(predicted, expected_colors), predicted


# --- shape by template ----------------------------------------------------------------------------


def ink_mask(image: Image.Image | np.ndarray, background: str | Sequence[int] = (255, 255, 255),
             threshold: float = 96.0) -> np.ndarray:
    """(H, W) bool: pixels whose largest channel difference from the background is at least `threshold`
    (0..255). Colour-blind, so one icon's mask is the same in every colour of a palette."""
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float64)
    if pixels.ndim != 3 or pixels.shape[-1] != 3:
        raise MetricError(f"expected an (H, W, 3) array of 0..255 values, got shape {pixels.shape}")
    bg = np.array(_rgb(background, "background colour"), dtype=np.float64)
    return np.abs(pixels - bg).max(axis=2) >= threshold


def mask_iou(masks: np.ndarray, templates: np.ndarray) -> np.ndarray:
    """Intersection over union of (N, H, W) masks against (C, H, W) templates: (N, C). Two empty masks: 0."""
    masks = np.asarray(masks, dtype=bool)
    templates = np.asarray(templates, dtype=bool)
    if masks.ndim != 3 or templates.ndim != 3 or masks.shape[1:] != templates.shape[1:]:
        raise MetricError(f"masks {masks.shape} and templates {templates.shape} must be (N, H, W) and (C, H, W)")
    pixels = masks.shape[1] * masks.shape[2]
    a = masks.reshape(len(masks), pixels).astype(np.float64)  # (N, P)
    b = templates.reshape(len(templates), pixels).astype(np.float64)  # (C, P)
    intersection = a @ b.T  # (N, C)
    union = a.sum(1)[:, None] + b.sum(1)[None, :] - intersection
    return np.divide(intersection, union, out=np.zeros_like(intersection), where=union > 0)


def nearest_template(masks: np.ndarray, templates: np.ndarray) -> np.ndarray:
    """Index of the template with the highest IoU for each mask (N,); -1 for a blank mask."""
    iou = mask_iou(masks, templates)
    best = iou.argmax(1) if iou.shape[1] else np.zeros(len(iou), dtype=np.int64)
    blank = ~np.asarray(masks, dtype=bool).any(axis=(1, 2))
    return np.where(blank, -1, best)


def template_ranks(masks: np.ndarray, templates: np.ndarray,
                   wanted: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """How well each mask picks out its wanted template among all: (ranks (N,) int, IoU with the wanted (N,)).

    masks (N, H, W), templates (C, H, W), wanted (N,) indices into templates. Rank 1 is best; ties count
    against the wanted template: rank = the number of templates whose IoU is at least the wanted one's
    (itself included). So a mask that shares no ink with the wanted template (a blank one included) ranks
    last (C), and a mask equal to a template that another template duplicates ranks 2, not 1.
    """
    wanted = np.asarray(wanted, dtype=np.int64).reshape(-1)
    iou = mask_iou(masks, templates)  # (N, C)
    if len(wanted) != len(iou):
        raise MetricError(f"{len(iou)} masks but {len(wanted)} wanted templates")
    if iou.shape[1] == 0:
        raise MetricError("there are no templates to rank")
    if len(wanted) and (int(wanted.min()) < 0 or int(wanted.max()) >= iou.shape[1]):
        raise MetricError(f"wanted template indices must lie in [0, {iou.shape[1]}), got {wanted.tolist()[:10]}")
    target = iou[np.arange(len(iou)), wanted]  # (N,)
    ranks = (iou >= target[:, None]).sum(1)  # (N,)
    return ranks.astype(np.int64), target


# --- retrieval and zero-shot -----------------------------------------------------------------------


def recall_at_k(similarity: torch.Tensor, relevant: torch.Tensor, k: int) -> Accuracy:
    """Share of queries with at least one relevant item among their k most similar items.

    similarity: (Q, N) query-by-item scores; relevant: (Q, N) bool, True where the item answers the
    query. For image->text recall pass both matrices transposed. k larger than N counts all items.
    """
    similarity = torch.as_tensor(similarity)
    relevant = torch.as_tensor(relevant, dtype=torch.bool, device=similarity.device)
    if similarity.dim() != 2 or similarity.shape != relevant.shape:
        raise MetricError(
            f"similarity {tuple(similarity.shape)} and relevant {tuple(relevant.shape)} must be the same (Q, N) shape"
        )
    if k < 1:
        raise MetricError(f"k must be >= 1, got {k}")
    no_answer = (~relevant.any(1)).nonzero().flatten().tolist()
    if no_answer:
        raise MetricError(f"queries {no_answer[:10]} have no relevant item; every query needs one")
    if similarity.shape[0] == 0:
        return Accuracy(0, 0)
    top = similarity.topk(min(k, similarity.shape[1]), dim=1).indices  # (Q, k)
    hits = relevant.gather(1, top).any(1)  # (Q,)
    return Accuracy(correct=int(hits.sum()), total=int(hits.numel()))


RECALL_KS = (1, 5, 10)


def retrieval_recall(similarity: torch.Tensor, relevant: torch.Tensor,
                     ks: Sequence[int] = RECALL_KS) -> dict[str, Accuracy]:
    """``text_to_image_recall@k`` and ``image_to_text_recall@k`` for each k.

    similarity: (T, I) text-by-image scores; relevant: (T, I) bool, True where the image answers the
    text (image->text recall reads both transposed: the texts that answer each image).
    """
    figures = {}
    for k in ks:
        figures[f"text_to_image_recall@{k}"] = recall_at_k(similarity, relevant, k)
        figures[f"image_to_text_recall@{k}"] = recall_at_k(similarity.T, relevant.T, k)
    return figures


def same_key(keys: Sequence[str]) -> torch.Tensor:
    """(N, N) bool, True where items i and j have the same key: the relevance of a paired set in which
    a pair's text also answers every image whose text reads the same (duplicate captions are no misses)."""
    codes = {key: i for i, key in enumerate(dict.fromkeys(keys))}
    ids = torch.tensor([codes[key] for key in keys], dtype=torch.long)
    return ids[:, None] == ids[None, :]


def _class_similarity(image_embeddings: torch.Tensor, class_embeddings: torch.Tensor) -> torch.Tensor:
    """(N, C) image-by-class similarity, after checking the shapes."""
    if image_embeddings.dim() != 2 or class_embeddings.dim() != 2 or \
            image_embeddings.shape[1] != class_embeddings.shape[1]:
        raise MetricError(
            f"image embeddings {tuple(image_embeddings.shape)} and class embeddings "
            f"{tuple(class_embeddings.shape)} must be (N, D) and (C, D)"
        )
    if class_embeddings.shape[0] == 0:
        raise MetricError("there are no classes to choose from")
    return image_embeddings.float() @ class_embeddings.float().T


def zero_shot_predictions(image_embeddings: torch.Tensor, class_embeddings: torch.Tensor) -> torch.Tensor:
    """Index of the most similar class embedding for each image: (N,)."""
    return _class_similarity(image_embeddings, class_embeddings).argmax(1)


def zero_shot_accuracy(image_embeddings: torch.Tensor, class_embeddings: torch.Tensor,
                       labels: Sequence[int] | torch.Tensor, k: int = 1) -> Accuracy:
    """Is each image's label (an index into classes) among its k most similar class embeddings?"""
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    if labels.numel() != image_embeddings.shape[0]:
        raise MetricError(f"{image_embeddings.shape[0]} images but {labels.numel()} labels")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= class_embeddings.shape[0]):
        raise MetricError(f"labels must lie in [0, {class_embeddings.shape[0]}), got {labels.tolist()[:10]}")
    if k < 1:
        raise MetricError(f"k must be >= 1, got {k}")
    similarity = _class_similarity(image_embeddings, class_embeddings)  # (N, C)
    top = similarity.topk(min(k, similarity.shape[1]), dim=1).indices  # (N, k); k = 1: the argmax
    hits = (top == labels.to(top.device)[:, None]).any(1)
    return Accuracy(correct=int(hits.sum()), total=int(labels.numel()))


# --- classification --------------------------------------------------------------------------------


def confusion_matrix(predicted: Sequence[int] | torch.Tensor, true: Sequence[int] | torch.Tensor,
                     num_classes: int) -> torch.Tensor:
    """(C, C) LongTensor of counts; row = true class, column = predicted class."""
    predicted = torch.as_tensor(predicted, dtype=torch.long).reshape(-1)
    true = torch.as_tensor(true, dtype=torch.long).reshape(-1)
    if predicted.numel() != true.numel():
        raise MetricError(f"{predicted.numel()} predictions but {true.numel()} true classes")
    if num_classes < 1:
        raise MetricError(f"num_classes must be >= 1, got {num_classes}")
    both = torch.cat([predicted, true])
    if both.numel() and (int(both.min()) < 0 or int(both.max()) >= num_classes):
        raise MetricError(f"class indices must lie in [0, {num_classes}), got {both.unique().tolist()[:10]}")
    counts = torch.bincount(true * num_classes + predicted, minlength=num_classes * num_classes)
    return counts.view(num_classes, num_classes)
