"""Training DALL-E: its run config, the on-disk cache of VAE tokens, and its ``TrainTask``.

The frozen VAE encodes every image of the dataset once; the tokens are cached in a safetensors file
named by a hash of the VAE's weights and of the image files (paths, sizes, modification times), so
a changed VAE or a changed dataset gets a fresh cache and training never reruns the encoder per epoch.
Captions are tokenized once too (a BPE tokenizer trained on the training captions, saved beside the
weights); each training item picks one of its image's captions that fits the context.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save
from torch.utils.data import Dataset, default_collate
from tqdm import tqdm

from duomodal.config import to_dict
from duomodal.data.captions import CaptionAugmentConfig, augment_caption, insert_noise_tokens
from duomodal.data.dataset import DataConfig
from duomodal.data.dataset import load_record_image
from duomodal.data.images import ImageError, save_grid, to_tensor
from duomodal.data.records import Record, load_records
from duomodal.files import atomic_write_bytes, save_json
from duomodal.modelfile import CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE
from duomodal.models.dalle import (CAPTION_WORDS_FILE, DALLE, VAE_SUBDIR, DALLEConfig, drop_captions,
                                   text_ids_with_padding, vae_identity, weighted_loss, words_of)
from duomodal.models.sampling import SamplingOptions, row_uniforms, sample_image_tokens
from duomodal.models.vae import load_vae
from duomodal.text.tokenizer import SPECIAL_TOKENS, Tokenizer
from duomodal.train.distributed import train_tokenizer
from duomodal.train.recipe import TrainConfig

log = logging.getLogger(__name__)

KIND = "dalle"
SPLIT_IDS = {"val": 0, "heldout": 1}
CACHE_VERSION = 1


@dataclass(frozen=True)
class SampleConfig:
    prompts: tuple[str, ...] = ()  # fixed prompts for the sample grids; empty: taken from val and heldout
    prompt_count: int = 8  # prompts taken from the data when `prompts` is empty (half val, half heldout)
    per_prompt: int = 6  # samples per prompt (one row each, after the real image when there is one)
    # sampled as every entry point samples by default (SamplingOptions)
    temperature: float = SamplingOptions.temperature
    top_k: int = SamplingOptions.top_k  # 0 = off
    guidance: float = SamplingOptions.guidance

    def __post_init__(self) -> None:
        if self.prompt_count < 1 or self.per_prompt < 1:
            raise ValueError(f"samples.prompt_count and samples.per_prompt must be >= 1, got "
                             f"{self.prompt_count} and {self.per_prompt}")
        if self.top_k < 0:
            raise ValueError(f"samples.top_k must be >= 0 (0 = off), got {self.top_k}")
        self.options()  # the sampling settings' own bounds

    def options(self) -> SamplingOptions:
        return SamplingOptions(temperature=self.temperature, top_k=self.top_k or None, guidance=self.guidance)


@dataclass(frozen=True)
class DALLERunConfig:
    model: DALLEConfig = field(default_factory=DALLEConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)  # data.image_size is taken from the VAE
    samples: SampleConfig = field(default_factory=SampleConfig)
    captions: CaptionAugmentConfig = field(default_factory=CaptionAugmentConfig)  # training captions' augmentation
    vae: str = ""  # the trained VAE directory (--vae)
    token_cache: str = ""  # folder of cached VAE tokens; "" = $XDG_CACHE_HOME/duomodal/dalle-tokens


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "duomodal" / "dalle-tokens"


# --- the token cache -----------------------------------------------------------------------------


def dataset_fingerprint(records: list[Record], vae_id: str, image_size: int, background: str) -> str:
    """sha256 over the VAE identity, the preprocessing and each image file's path, size and mtime."""
    digest = hashlib.sha256()
    digest.update(json.dumps({"version": CACHE_VERSION, "vae": vae_id, "image_size": image_size,
                              "background": background}).encode())
    for record in records:
        stat = record.path.stat() if record.path.exists() else None
        entry = [record.location, stat.st_size if stat else -1, stat.st_mtime_ns if stat else -1]
        digest.update(json.dumps(entry).encode())
    return digest.hexdigest()


@dataclass
class TokenTable:
    tokens: torch.Tensor  # (M, N) int16/int32 image tokens of each record, raster order
    readable: torch.Tensor  # (M,) bool: False where the image could not be read
    path: Path  # the cache file
    reused: bool  # True when read from the cache, False when encoded now


def encode_images(records: list[Record], vae: Any, vae_id: str, data: DataConfig, cache_dir: Path,
                  batch_size: int = 256, show_progress: bool = True) -> TokenTable:
    """VAE tokens of every record's image, from the cache when its key matches, else encoded and cached.

    Unreadable images are skipped with one log line each and marked unreadable (the dataset then
    yields None for them and the training loop counts them). A thread decodes the next batch while the
    VAE encodes this one (decoding and the encoder's kernels both leave the GIL)."""
    key = dataset_fingerprint(records, vae_id, data.image_size, data.background)
    path = Path(cache_dir) / f"tokens-{key[:32]}.safetensors"
    if path.is_file():
        try:
            stored = load_file(str(path))
            if stored["tokens"].shape[0] == len(records):
                return TokenTable(stored["tokens"], stored["readable"].bool(), path, True)
        except Exception as e:  # a damaged cache file is rebuilt, not trusted
            log.warning("rebuilding the token cache %s: %s", path, e)
    S, G = data.image_size, vae.grid_size
    dtype = torch.int16 if vae.codebook_size <= 32767 else torch.int32
    tokens = torch.zeros(len(records), G * G, dtype=dtype)
    readable = torch.ones(len(records), dtype=torch.bool)

    def load(start: int) -> tuple[list[torch.Tensor], list[int]]:
        """The pixels of the readable images of the batch at `start`, and their rows."""
        pixels, rows = [], []
        for row in range(start, min(start + batch_size, len(records))):
            try:
                image = load_record_image(records[row], data.background_rgb, draft_size=S)
            except ImageError as e:
                log.warning("skipping %s", e)
                readable[row] = False
                continue
            pixels.append(to_tensor(image, S))
            rows.append(row)
        return pixels, rows

    starts = range(0, len(records), batch_size)
    bar = tqdm(total=len(records), desc="encode images with the VAE", unit="img", disable=not show_progress)
    with ThreadPoolExecutor(max_workers=1) as decoder:
        pending = decoder.submit(load, starts[0]) if starts else None
        for number, start in enumerate(starts):
            pixels, rows = pending.result()
            if number + 1 < len(starts):
                pending = decoder.submit(load, starts[number + 1])
            if pixels:
                codes = vae.encode(torch.stack(pixels)).flatten(1).cpu()  # (b, N)
                tokens[rows] = codes.to(dtype)
            bar.update(min(batch_size, len(records) - start))
    bar.close()
    skipped = int((~readable).sum())
    if skipped:
        log.warning("%d of %d images could not be read and are left out", skipped, len(records))
    meta = {"key": key, "vae": vae_id, "images": str(len(records)), "skipped": str(skipped)}
    atomic_write_bytes(path, save({"tokens": tokens, "readable": readable.to(torch.uint8)}, metadata=meta))
    return TokenTable(tokens, readable, path, False)


# --- captions ------------------------------------------------------------------------------------


class CaptionTable:
    """Every caption of every record, encoded once: ``tokens[offsets[i]:offsets[i + 1]]`` are record i's,
    ``texts`` the same captions as words (for augmentation)."""

    def __init__(self, records: list[Record], tokenizer: Tokenizer, context: int):
        rows: list[list[int]] = []
        self.texts: list[str] = []
        offsets = [0]
        self.truncated = 0
        self.tokenizer, self.context = tokenizer, context
        # one batch call for all captions (the tokenizer runs it in parallel), then split per record
        flat = tokenizer.hf.encode_batch([c for record in records for c in record.captions])
        start = 0
        for record in records:
            count = len(record.captions)
            encoded = [[tokenizer.bos_id, *e.ids, tokenizer.eos_id] for e in flat[start : start + count]]
            start += count
            fitting = [(ids, c) for ids, c in zip(encoded, record.captions) if len(ids) <= context]
            if not fitting:  # no caption fits: keep the shortest, cut before EOS
                shortest, caption = min(zip(encoded, record.captions), key=lambda pair: len(pair[0]))
                fitting = [(shortest[: context - 1] + [tokenizer.eos_id], caption)]
                self.truncated += 1
            rows.extend(ids + [tokenizer.pad_id] * (context - len(ids)) for ids, _ in fitting)
            self.texts.extend(caption for _, caption in fitting)
            offsets.append(len(rows))
        self.tokens = torch.tensor(rows, dtype=torch.int32).view(-1, context)  # (K, T)
        self.offsets = torch.tensor(offsets, dtype=torch.long)  # (M + 1,)

    def augmented(self, row: int, augment: CaptionAugmentConfig) -> torch.Tensor:
        """Caption `row` (T,) reworded and noised by `augment`; its plain tokens when the rewording
        does not fit the context."""
        tokenizer = self.tokenizer
        ids = self.tokens[row].long()
        if augment.rewrites_text:
            words = [tokenizer.bos_id, *tokenizer.tokens(augment_caption(self.texts[row], augment)), tokenizer.eos_id]
            if len(words) <= self.context:
                ids = torch.tensor(words + [tokenizer.pad_id] * (self.context - len(words)), dtype=torch.long)
        length = int((ids != tokenizer.pad_id).sum())
        ids, _ = insert_noise_tokens(ids, length, len(SPECIAL_TOKENS), tokenizer.vocab_size, augment.noise_tokens)
        return ids


class TokenizedCaptions(Dataset):
    """Items {"text": (T,) long, "image": (N,) long, "index", "split"}; None for unreadable images.

    Training items take a random fitting caption (torch's RNG, which the loop seeds per item), reworded
    by `augment` when given; with `rotate` the caption is chosen by index instead, the same every time
    and never augmented (validation)."""

    def __init__(self, rows: list[int], captions: CaptionTable, images: TokenTable,
                 splits: list[int] | None = None, rotate: bool = False,
                 augment: CaptionAugmentConfig | None = None):
        self.rows, self.captions, self.images, self.rotate = rows, captions, images, rotate
        self.splits = splits
        self.augment = augment if augment is not None and augment.enabled and not rotate else None

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        row = self.rows[index]
        if not bool(self.images.readable[row]):
            return None
        first, end = int(self.captions.offsets[row]), int(self.captions.offsets[row + 1])
        choice = index % (end - first) if self.rotate else int(torch.randint(end - first, ()))
        text = (self.captions.tokens[first + choice].long() if self.augment is None
                else self.captions.augmented(first + choice, self.augment))
        return {
            "text": text,
            "image": self.images.tokens[row].long(),
            "index": index,
            "split": self.splits[index] if self.splits is not None else 0,
        }


# --- the task ------------------------------------------------------------------------------------


class DALLETask:
    """Next-token prediction over [caption ; VAE tokens]; validation in bits per image token."""

    kind = KIND

    def __init__(self, config: DALLERunConfig, data_dir: str | os.PathLike, out_dir: str | os.PathLike,
                 resume: bool = False, show_progress: bool = True):
        if not config.vae:
            raise ValueError("no VAE given: pass --vae VAE_DIR (a trained `duomodal train vae` run)")
        self.data_dir, self.out_dir = Path(data_dir), Path(out_dir)
        self.vae_dir = Path(config.vae).resolve()
        self.vae = load_vae(self.vae_dir)
        self.vae_id = vae_identity(self.vae_dir)
        self.config = replace(config, data=replace(config.data, image_size=self.vae.image_size))
        self.resume = resume
        self.show_progress = show_progress
        self._prepared = False

    # preparation: tokenizer, captions, image tokens (lazily, once)

    def _prepare(self) -> None:
        if self._prepared:
            return
        config = self.config
        records = load_records(self.data_dir, config.data.val_fraction)
        train_rows = [i for i, r in enumerate(records) if r.split == "train"]
        if not train_rows:
            raise ValueError(f"{self.data_dir} has no training images (found {len(records)} captioned images)")
        saved = self.out_dir / TOKENIZER_FILE
        if self.resume and saved.is_file():
            tokenizer = Tokenizer.load(saved)
        else:
            train_captions = [c for i in train_rows for c in records[i].captions]
            tokenizer = train_tokenizer(train_captions, vocab_size=config.model.text_vocab_size)
        self.tokenizer = tokenizer
        self.caption_words = sorted({w for i in train_rows for c in records[i].captions
                                     for w in words_of(tokenizer.normalize(c))})
        m = config.model
        self.model_cfg = replace(
            m, text_vocab_size=tokenizer.vocab_size, text_pad_id=tokenizer.pad_id,
            image_vocab_size=self.vae.codebook_size, image_grid_size=self.vae.grid_size,
            image_size=self.vae.image_size, vae_dir=str(self.vae_dir), vae_id=self.vae_id,
        )
        self.captions = CaptionTable(records, tokenizer, m.text_seq_len)
        if self.captions.truncated:
            log.warning("%d images have no caption that fits text_seq_len=%d: their shortest caption is cut",
                        self.captions.truncated, m.text_seq_len)
        cache_dir = Path(config.token_cache) if config.token_cache else default_cache_dir()
        # Under torchrun rank 0 encodes and fills the cache; the other ranks then read it.
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if distributed and dist.get_rank() != 0:
            dist.barrier()
        self.images = encode_images(records, self.vae, self.vae_id, config.data, cache_dir,
                                    show_progress=self.show_progress)
        if distributed and dist.get_rank() == 0:
            dist.barrier()
        self.records = records
        self.train_rows = train_rows
        val_rows = [i for i, r in enumerate(records) if r.split == "val"]
        heldout_rows = [i for i, r in enumerate(records) if r.split == "heldout"]
        if not val_rows and not heldout_rows:
            val_rows = train_rows[:64]  # tiny folders: validate on the first training images
        interleaved: list[int] = []
        splits: list[int] = []
        for k in range(max(len(val_rows), len(heldout_rows))):
            for rows, split in ((val_rows, "val"), (heldout_rows, "heldout")):
                if k < len(rows):
                    interleaved.append(rows[k])
                    splits.append(SPLIT_IDS[split])
        self.val_rows, self.val_splits = interleaved, splits
        self.empty_text = torch.tensor(tokenizer.encode("", m.text_seq_len), dtype=torch.long)
        self._sample_plan = self._plan_samples(val_rows, heldout_rows)
        self._prepared = True

    def _plan_samples(self, val_rows: list[int], heldout_rows: list[int]) -> list[tuple[str, int | None]]:
        """(prompt, record row of its real image or None) for the sample grids."""
        s = self.config.samples
        if s.prompts:
            plan = [(p, None) for p in s.prompts]
        else:
            pools = [val_rows or self.train_rows, heldout_rows]
            half = [s.prompt_count - s.prompt_count // 2, s.prompt_count // 2] if heldout_rows else [s.prompt_count, 0]
            plan = []
            for pool, count in zip(pools, half):
                for k in range(count):
                    row = pool[(k * len(pool)) // max(count, 1)]
                    plan.append((self.records[row].captions[0], row))
        for prompt, _ in plan:
            ids = [self.tokenizer.bos_id, *self.tokenizer.tokens(prompt), self.tokenizer.eos_id]
            if len(ids) > self.model_cfg.text_seq_len:
                raise ValueError(f"sample prompt {prompt!r} is {len(ids)} tokens, longer than "
                                 f"model.text_seq_len={self.model_cfg.text_seq_len}; shorten it")
        return plan

    # the TrainTask protocol

    def model_config(self) -> dict[str, Any]:
        self._prepare()
        return to_dict(self.model_cfg)

    def build_model(self) -> DALLE:
        self._prepare()
        return DALLE(self.model_cfg)

    def datasets(self) -> tuple[Dataset, Dataset | None]:
        self._prepare()
        train = TokenizedCaptions(self.train_rows, self.captions, self.images, augment=self.config.captions)
        val = TokenizedCaptions(self.val_rows, self.captions, self.images, self.val_splits, rotate=True)
        return train, val

    def collate(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return default_collate(items)

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], step: int) -> tuple[torch.Tensor, dict[str, float]]:
        m = self.model_cfg
        text = drop_captions(batch["text"], self.empty_text, m.caption_dropout)
        image = batch["image"]
        text_logits, image_logits = model(text, image[:, :-1])
        text_targets = text_ids_with_padding(text, m.text_pad_id, m.text_vocab_size)[:, 1:]
        loss, text_ce, image_ce = weighted_loss(text_logits, image_logits, text_targets, image,
                                                m.text_loss_weight, m.image_loss_weight)
        return loss, {"text_loss": float(text_ce.detach()), "image_bits": float(image_ce.detach()) / math.log(2)}

    def validate(self, model: torch.nn.Module, batches: Any) -> dict[str, float]:
        m = self.model_cfg
        sums = {"loss": 0.0, "text": 0.0, 0: 0.0, 1: 0.0}
        counts = {"items": 0, 0: 0, 1: 0}
        for batch in batches:
            text, image, split = batch["text"], batch["image"], batch["split"]
            text_logits, image_logits = model(text, image[:, :-1])
            text_targets = text_ids_with_padding(text, m.text_pad_id, m.text_vocab_size)[:, 1:]
            loss, text_ce, _ = weighted_loss(text_logits, image_logits, text_targets, image,
                                             m.text_loss_weight, m.image_loss_weight)
            per_item = torch.nn.functional.cross_entropy(
                image_logits.float().transpose(1, 2), image, reduction="none").mean(dim=1)  # (B,)
            B = image.shape[0]
            sums["loss"] += float(loss) * B
            sums["text"] += float(text_ce) * B
            counts["items"] += B
            for split_id in (0, 1):
                chosen = split == split_id
                sums[split_id] += float(per_item[chosen].sum())
                counts[split_id] += int(chosen.sum())
        if not counts["items"]:
            return {}
        figures = {"loss": sums["loss"] / counts["items"], "text_loss": sums["text"] / counts["items"]}
        if counts[0]:
            figures["image_bits"] = sums[0] / counts[0] / math.log(2)
        if counts[1]:
            figures["heldout_image_bits"] = sums[1] / counts[1] / math.log(2)
        return figures

    def write_samples(self, model: torch.nn.Module, path: Path, step: int) -> None:
        dalle: DALLE = getattr(model, "module", model)
        s = self.config.samples
        G = self.model_cfg.image_grid_size
        device = dalle.image_head.weight.device
        self.vae.to(device)
        rows = []
        for k, (prompt, record_row) in enumerate(self._sample_plan):
            text = torch.tensor(self.tokenizer.encode(prompt, self.model_cfg.text_seq_len))
            tokens = sample_image_tokens(
                dalle, text[None].expand(s.per_prompt, -1), s.options(),
                row_uniforms([1000 * k + i for i in range(s.per_prompt)], G * G),
                empty_text=self.empty_text if s.guidance != 1.0 else None,
            )
            images = self.vae.decode(tokens.view(-1, G, G)).float().cpu()  # (P, 3, S, S)
            if record_row is not None:
                real = self.vae.decode(self.images.tokens[record_row].long().view(1, G, G).to(device)).float().cpu()
                images = torch.cat([real, images])
            rows.append(images)
        width = max(r.shape[0] for r in rows)
        padded = [torch.cat([r, torch.ones(width - r.shape[0], *r.shape[1:])]) for r in rows]
        save_grid(torch.cat(padded), path, nrow=width)
        save_json({"step": step, "prompts": [p for p, _ in self._sample_plan],
                   "first_column": "the VAE reconstruction of the prompt's own image, when it has one"},
                  path.with_suffix(".json"))

    def save_extras(self, directory: Path) -> None:
        directory = Path(directory)
        self.tokenizer.save(directory / TOKENIZER_FILE)
        save_json(self.caption_words, directory / CAPTION_WORDS_FILE)
        target = directory / VAE_SUBDIR
        if (target / WEIGHTS_FILE).is_file() and vae_identity(target) == self.vae_id:
            return
        tmp = directory / f".{VAE_SUBDIR}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            shutil.copy2(self.vae_dir / name, tmp / name)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
