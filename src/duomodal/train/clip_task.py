"""Training CLIP from scratch: the contrastive loss, the cross-rank gather, and the TrainTask.

Under torchrun each rank embeds its share of the batch; the image and text features of every rank
are gathered so that each rank computes the loss over the global batch (all N x N pairs as
negatives). The gather's backward sums the gradients of the gathered tensor over ranks and hands
each rank the slice of its own features, so after DDP averages the parameter gradients they equal
those of one process on the whole global batch.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import Dataset, default_collate

from duomodal.classify import TEMPLATE_SETS, clip_figures, label_classes_of
from duomodal.config import ConfigError, to_dict
from duomodal.data.captions import CaptionAugmentConfig, augment_caption, insert_noise_tokens
from duomodal.data.dataset import CaptionedImageDataset, DataConfig
from duomodal.data.records import Record, filter_split, load_records
from duomodal.data.stream import training_stream
from duomodal.files import atomic_write_bytes
from duomodal.models.clip import ClipConfig, ClipFeatures, ContrastiveClip, normalize_pixels, trim_padding
from duomodal.text.tokenizer import SPECIAL_TOKENS, Tokenizer
from duomodal.train.batches import grouped_order
from duomodal.train.distributed import train_tokenizer
from duomodal.train.recipe import TrainConfig

# --- loss ------------------------------------------------------------------------------------------


def contrastive_loss(
    image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """Symmetric InfoNCE over normalised (N, D) pairs: mean of image->text and text->image cross-entropy."""
    logits_per_image = logit_scale * image_features @ text_features.T  # (N, N)
    targets = torch.arange(image_features.shape[0], device=image_features.device)
    return (F.cross_entropy(logits_per_image, targets) + F.cross_entropy(logits_per_image.T, targets)) / 2


def sigmoid_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                 logit_bias: torch.Tensor) -> torch.Tensor:
    """SigLIP's loss over normalised (N, D) pairs: every (image, text) pair is a binary match (the
    diagonal) or non-match, -log sigmoid(+-(scale * cosine + bias)) summed over texts, averaged over images."""
    logits = logit_scale * image_features @ text_features.T + logit_bias  # (N, N)
    signs = 2 * torch.eye(logits.shape[0], device=logits.device, dtype=logits.dtype) - 1  # +1 diagonal, -1 elsewhere
    return -F.logsigmoid(signs * logits).sum() / logits.shape[0]


def pair_loss(image_features: torch.Tensor, text_features: torch.Tensor, out: ClipFeatures) -> torch.Tensor:
    """The model's own loss: sigmoid when it has a logit bias, else softmax."""
    if out.logit_bias is None:
        return contrastive_loss(image_features, text_features, out.logit_scale.float())
    return sigmoid_loss(image_features, text_features, out.logit_scale.float(), out.logit_bias.float())


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 (ranks may hold different row counts); backward all-reduces and slices."""

    @staticmethod
    def forward(ctx, local: torch.Tensor) -> torch.Tensor:  # (b, D) -> (sum b, D)
        world = dist.get_world_size()
        rows = torch.tensor([local.shape[0]], device=local.device, dtype=torch.long)
        all_rows = [torch.zeros_like(rows) for _ in range(world)]
        dist.all_gather(all_rows, rows)
        sizes = [int(r.item()) for r in all_rows]
        padded = local.new_zeros((max(sizes), *local.shape[1:]))
        padded[: local.shape[0]] = local
        parts = [torch.zeros_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded.contiguous())
        ctx.sizes = sizes
        ctx.rank = dist.get_rank()
        return torch.cat([part[:size] for part, size in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]]


def gather_features(
    image_features: torch.Tensor, text_features: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch's features on every rank (rank order), differentiable w.r.t. the local ones.

    Outside torch.distributed (or with one process) the inputs come back unchanged.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return image_features, text_features
    return _GatherWithGrad.apply(image_features), _GatherWithGrad.apply(text_features)


# --- configs ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AugmentConfig:
    # Random resized crop: keep a square crop of this fraction of the area or more, resized back.
    # 1.0 = off. Square crops only: an aspect change would distort icons and glyphs.
    crop_scale_min: float = 1.0
    # Off by default: icons and text are orientation-sensitive ("arrow-left" is not "arrow-right").
    horizontal_flip: bool = False
    # There is deliberately no colour jitter: colour is a label in the icon data.

    def __post_init__(self) -> None:
        if not 0.1 <= self.crop_scale_min <= 1.0:
            raise ConfigError(f"augment.crop_scale_min must be in [0.1, 1.0], got {self.crop_scale_min}")


@dataclass(frozen=True)
class BatchConfig:
    # A manifest label field (e.g. "color"): about `group_fraction` of the batches are drawn from one value
    # of it, so that their negatives share it and differ in everything else (hard negatives: same colour,
    # other icons). "" = off: every batch a random draw.
    group_field: str = ""
    group_fraction: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 <= self.group_fraction <= 1.0:
            raise ConfigError(f"batches.group_fraction must be in [0, 1], got {self.group_fraction}")


@dataclass(frozen=True)
class ClipRunConfig:
    model: ClipConfig = field(default_factory=ClipConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    captions: CaptionAugmentConfig = field(default_factory=CaptionAugmentConfig)  # training captions reworded
    batches: BatchConfig = field(default_factory=BatchConfig)
    zero_shot_templates: str = "icon"  # built-in template set for zero-shot validation on label fields

    def __post_init__(self) -> None:
        if self.data.image_size != self.model.image_size:
            raise ConfigError(
                f"data.image_size {self.data.image_size} differs from model.image_size {self.model.image_size}; "
                f"set both (e.g. --set data.image_size={self.model.image_size})"
            )
        if self.zero_shot_templates not in TEMPLATE_SETS:
            raise ConfigError(
                f"zero_shot_templates {self.zero_shot_templates!r} is not one of {', '.join(sorted(TEMPLATE_SETS))}"
            )


# --- augmentation ----------------------------------------------------------------------------------


def augment_image(image: torch.Tensor, augment: AugmentConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """(3, S, S) in [0, 1] -> a random square crop of >= crop_scale_min of the area, resized to S; optional flip."""
    size = image.shape[-1]
    if augment.crop_scale_min < 1.0:
        scale = augment.crop_scale_min + (1 - augment.crop_scale_min) * torch.rand((), generator=generator).item()
        side = max(1, min(size, round(size * scale**0.5)))
        if side < size:
            top = int(torch.randint(0, size - side + 1, (), generator=generator))
            left = int(torch.randint(0, size - side + 1, (), generator=generator))
            crop = image[:, top : top + side, left : left + side]
            image = F.interpolate(crop[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
            image = image.clamp(0, 1)
    if augment.horizontal_flip and torch.rand((), generator=generator).item() < 0.5:
        image = image.flip(-1)
    return image


class AugmentItem:
    """Applies `augment_image` to the "image" of an item (the streamed twin of AugmentedDataset)."""

    def __init__(self, augment: AugmentConfig):
        self.augment = augment

    def __call__(self, item: dict[str, Any]) -> dict[str, Any]:
        return {**item, "image": augment_image(item["image"], self.augment)}


class AugmentedDataset(Dataset):
    """Applies `augment_image` to the "image" of each (non-None) item of a dataset."""

    def __init__(self, dataset: Dataset, augment: AugmentConfig):
        self.dataset = dataset
        self.augment = augment

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        item = self.dataset[index]
        if item is None:
            return None
        return {**item, "image": augment_image(item["image"], self.augment)}


# --- the task --------------------------------------------------------------------------------------


class ClipTask:
    """The TrainTask for CLIP on a captioned-image dataset (see ``duomodal.train.task``)."""

    kind = "clip"

    def __init__(self, config: ClipRunConfig, data_root: str | Path, tokenizer: Tokenizer | None = None):
        self.data_root = str(data_root)  # a folder or a shard spec (a URL is no path)
        self.records = load_records(self.data_root, val_fraction=config.data.val_fraction)
        self.train_records = filter_split(self.records, "train")
        self.val_records = filter_split(self.records, "val")
        if not self.train_records:
            raise ValueError(f"{self.data_root} has no training images (every record is in val or heldout)")
        if tokenizer is None:
            tokenizer = train_tokenizer([c for r in self.train_records for c in r.captions], config.model.vocab_size)
        if tokenizer.vocab_size > config.model.vocab_size:
            raise ConfigError(
                f"the tokenizer has {tokenizer.vocab_size} tokens, more than model.vocab_size {config.model.vocab_size}"
            )
        self.tokenizer = tokenizer
        self.config = replace(config, model=replace(config.model, vocab_size=tokenizer.vocab_size))
        self._check_caption_lengths()
        # Zero-shot label fields: every manifest field with at least two values across the dataset.
        self.label_classes = label_classes_of(self.records)
        group = self.config.batches.group_field
        if group and group not in self.label_classes:
            known = ", ".join(sorted(self.label_classes)) or "none"
            raise ConfigError(f"batches.group_field {group!r} is not a label field of {self.data_root} with two "
                              f"values or more; label fields: {known}")

    def _check_caption_lengths(self) -> None:
        context = self.config.model.context_length
        captions = [caption for record in self.records for caption in record.captions]
        # one batch call (the tokenizer encodes it in parallel): caption by caption cost ~6 s on 345k captions
        lengths = [len(e.ids) + 2 for e in self.tokenizer.hf.encode_batch(captions)] if captions else [0]
        longest = max(lengths)
        worst = captions[lengths.index(longest)] if captions else ""
        if longest > context:
            raise ConfigError(
                f"caption {worst!r} is {longest} tokens with BOS/EOS, longer than model.context_length {context}; "
                f"set model.context_length={longest} (or shorten the caption)"
            )

    # -- TrainTask protocol --

    def model_config(self) -> dict[str, Any]:
        return to_dict(self.config.model)

    def build_model(self) -> torch.nn.Module:
        return ContrastiveClip.from_config(self.config.model)

    def _tokenize(self, text: str) -> torch.Tensor:
        return torch.tensor(self.tokenizer.encode(text, self.config.model.context_length), dtype=torch.long)

    def _tokenize_augmented(self, text: str) -> torch.Tensor:
        """A training caption reworded by the caption augmentation (the loop seeds each item's draws)."""
        captions = self.config.captions
        ids = self._tokenize(augment_caption(text, captions) if captions.rewrites_text else text)
        if captions.noise_tokens:
            length = int((ids != self.tokenizer.pad_id).sum())
            ids, _ = insert_noise_tokens(ids, length, len(SPECIAL_TOKENS), self.tokenizer.vocab_size,
                                         captions.noise_tokens)
        return ids

    def _dataset(self, records: list[Record], memory_cache_mb: int = 0, augment: bool = False) -> CaptionedImageDataset:
        return CaptionedImageDataset(
            records,
            self.config.model.image_size,
            tokenize=self._tokenize_augmented if augment and self.config.captions.enabled else self._tokenize,
            background=self.config.data.background_rgb,
            memory_cache_mb=memory_cache_mb,
        )

    def datasets(self) -> tuple[Dataset, Dataset | None]:
        augment = self.config.augment.crop_scale_min < 1.0 or self.config.augment.horizontal_flip
        tokenize = self._tokenize_augmented if self.config.captions.enabled else self._tokenize
        train = training_stream(
            self.data_root, len(self.train_records), self.config.model.image_size, tokenize,
            self.config.data.background_rgb, self.config.data.val_fraction,
            AugmentItem(self.config.augment) if augment else None,
        )
        if train is None:
            train = self._dataset(self.train_records, self.config.data.memory_cache_mb, augment=True)
            if augment:
                train = AugmentedDataset(train, self.config.augment)
        val = self._dataset(self.val_records, self.config.data.memory_cache_mb) if self.val_records else None
        return train, val

    def order_epoch(self, indices: list[int], micro_batch: int, generator: torch.Generator) -> list[int]:
        """The training loop's hook: an epoch's shuffled share of the training items, arranged into batches."""
        field_name = self.config.batches.group_field
        if not field_name:
            return indices
        groups = [record.labels.get(field_name) for record in self.train_records]
        return grouped_order(indices, groups, micro_batch, self.config.batches.group_fraction, generator)

    def collate(self, items: list[Any]) -> dict[str, Any]:
        batch = default_collate(items)
        batch["tokens"] = trim_padding(batch["tokens"])  # (B, longest caption in the batch)
        batch["pixel_values"] = normalize_pixels(batch.pop("image"), self.config.model.image_mean, self.config.model.image_std)
        return batch

    def loss(self, model: torch.nn.Module, batch: dict[str, Any], step: int) -> tuple[torch.Tensor, dict[str, float]]:
        device = next(model.parameters()).device
        out = model(pixel_values=batch["pixel_values"].to(device), input_ids=batch["tokens"].to(device))
        image, text = gather_features(out.image.float(), out.text.float())
        loss = pair_loss(image, text, out)
        with torch.no_grad():
            logits = image @ text.T
            targets = torch.arange(logits.shape[0], device=logits.device)
            batch_accuracy = (logits.argmax(1) == targets).float().mean().item()
        return loss, {"logit_scale": out.logit_scale.item(), "batch_i2t_acc": batch_accuracy}

    def _embed_texts(self, model: torch.nn.Module, texts: list[str], batch_size: int = 1024) -> torch.Tensor:
        device = next(model.parameters()).device
        parts = []
        for start in range(0, len(texts), batch_size):
            chunk = texts[start : start + batch_size]
            ids = trim_padding(self.tokenizer.encode_batch(chunk, self.config.model.context_length, truncate=True))
            parts.append(model(input_ids=ids.to(device)).text.float())
        return torch.cat(parts)

    def validate(self, model: torch.nn.Module, batches: Iterable[dict[str, Any]]) -> dict[str, float]:
        """Mean contrastive loss per batch, recall@1/5/10 both ways on the whole split, zero-shot accuracy per label field."""
        device = next(model.parameters()).device
        image_parts, text_parts, captions, indices, losses = [], [], [], [], []
        for batch in batches:
            out = model(pixel_values=batch["pixel_values"].to(device), input_ids=batch["tokens"].to(device))
            image_parts.append(out.image.float())
            text_parts.append(out.text.float())
            losses.append(pair_loss(out.image.float(), out.text.float(), out).item())
            captions.extend(batch["caption"])
            indices.extend(int(i) for i in batch["index"])
        if not image_parts:
            return {}
        figures = {"loss": sum(losses) / len(losses)}
        with torch.autocast("cpu", enabled=False):  # similarities and rankings in fp32, even under bf16 training
            figures.update(clip_figures(
                torch.cat(image_parts).cpu(), torch.cat(text_parts).cpu(), captions,
                [self.val_records[i].labels for i in indices], self.label_classes,
                lambda texts: self._embed_texts(model, texts).cpu(), TEMPLATE_SETS[self.config.zero_shot_templates],
            ))
        return figures

    def write_samples(self, model: torch.nn.Module, path: Path, step: int) -> None:
        """A heat map of image-caption cosine similarity for up to 12 validation (else training) items."""
        # matplotlib loads here, when a figure is drawn: importing it costs a second that the rest does not need
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # after choosing the Agg backend, lazily as above

        records = (self.val_records or self.train_records)[:12]
        dataset = self._dataset(records)
        items = [item for item in (dataset[i] for i in range(len(records))) if item is not None]
        if not items:
            return
        batch = self.collate(items)
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        with torch.no_grad():
            out = model(pixel_values=batch["pixel_values"].to(device), input_ids=batch["tokens"].to(device))
            similarity = (out.text.float() @ out.image.float().T).float().cpu()  # (texts, images), fp32 under autocast
        model.train(was_training)
        n = similarity.shape[0]
        fig, ax = plt.subplots(figsize=(2 + 0.5 * n, 1 + 0.5 * n))
        ax.imshow(similarity.numpy(), cmap="viridis", vmin=-1, vmax=1)
        ax.set_yticks(range(n), labels=[c[:40] for c in batch["caption"]], fontsize=7)
        ax.set_xticks(range(n), labels=[str(i) for i in range(n)], fontsize=7)
        ax.set_xlabel("image")
        ax.set_title(f"cosine similarity, step {step}")
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=100)
        plt.close(fig)
        atomic_write_bytes(path, buffer.getvalue())

    def save_extras(self, directory: Path) -> None:
        self.tokenizer.save(Path(directory) / "tokenizer.json")
