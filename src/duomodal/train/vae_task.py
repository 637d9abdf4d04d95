"""Training the discrete VAE: its run config and its ``TrainTask`` for the one training loop."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import default_collate

from duomodal.config import to_dict
from duomodal.data.dataset import CaptionedImageDataset, DataConfig, open_split
from duomodal.data.images import save_grid
from duomodal.data.records import filter_split, load_records
from duomodal.data.stream import ShardStream, training_stream
from duomodal.metrics import codebook_usage
from duomodal.models.vae import KIND, DiscreteVAE, VAEConfig
from duomodal.train.recipe import TrainConfig
from duomodal.train.schedules import cosine_anneal, cosine_warmup_weight

SAMPLE_COUNT = 8  # originals (top row) above their reconstructions (bottom row)


@dataclass(frozen=True)
class VAERunConfig:
    model: VAEConfig = field(default_factory=VAEConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def __post_init__(self) -> None:
        if self.data.image_size != self.model.image_size:
            raise ValueError(
                f"data.image_size ({self.data.image_size}) must equal model.image_size "
                f"({self.model.image_size}); set both, e.g. --set model.image_size=64 --set data.image_size=64"
            )


class VAETask:
    """Reconstruct images through the codebook; validation reports MSE, PSNR, codebook use."""

    kind = KIND

    def __init__(self, config: VAERunConfig, data_dir: str | os.PathLike):
        self.config = config
        self.data_dir = str(data_dir)  # a folder or a shard spec (a URL is no path)
        self._sample_images: torch.Tensor | None = None
        self._datasets: tuple[CaptionedImageDataset | ShardStream, CaptionedImageDataset | None] | None = None

    def model_config(self) -> dict[str, Any]:
        return to_dict(self.config.model)

    def build_model(self) -> DiscreteVAE:
        return DiscreteVAE(self.config.model)

    def datasets(self) -> tuple[CaptionedImageDataset | ShardStream, CaptionedImageDataset | None]:
        if self._datasets is None:
            data = self.config.data
            records = load_records(self.data_dir, data.val_fraction)
            train = training_stream(self.data_dir, len(filter_split(records, "train")), data.image_size,
                                    background=data.background_rgb, val_fraction=data.val_fraction)
            if train is None:
                train = open_split(self.data_dir, data, "train", records=records)
            val = open_split(self.data_dir, data, "val", records=records)
            if len(train) == 0:
                raise ValueError(f"{self.data_dir} has no training images (found {len(records)} captioned images)")
            if len(val) == 0:
                # tiny folders: validate on (the first images of) the training split rather than on nothing
                val = CaptionedImageDataset(filter_split(records, "train")[:64], data.image_size,
                                            background=data.background_rgb)
            self._datasets = (train, val)
        return self._datasets

    def collate(self, items: list[dict[str, Any]]) -> torch.Tensor:
        return default_collate([item["image"] for item in items])  # (B, 3, S, S)

    def schedule(self, step: int) -> tuple[float, float]:
        """(Gumbel temperature, KL weight) at optimizer step `step`."""
        m = self.config.model
        temperature = cosine_anneal(step, m.temperature_start, m.temperature_end, m.temperature_anneal_steps)
        return temperature, cosine_warmup_weight(step, m.kl_weight, m.kl_warmup_steps)

    def loss(self, model: torch.nn.Module, batch: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        temperature, kl_weight = self.schedule(step)
        out = model(batch, temperature=temperature, kl_weight=kl_weight)
        figures = {
            "recon_loss": float(out.recon_loss.detach()),
            "quant_loss": float(out.quant_loss.detach()),
            "perplexity": float(out.perplexity.detach()),
        }
        if self.config.model.quantizer == "gumbel":
            figures["temperature"] = temperature
        return out.loss, figures

    def validate(self, model: torch.nn.Module, batches: Any) -> dict[str, float]:
        vae: DiscreteVAE = model  # type: ignore[assignment]
        squared, pixels, loss_sum, n_batches = 0.0, 0, 0.0, 0
        counts = torch.zeros(vae.codebook_size, dtype=torch.long)
        psnr_sum, images = 0.0, 0
        for batch in batches:
            out = vae(batch)
            recon = out.recon.float().clamp(0, 1)
            per_image = (recon - batch.float()).pow(2).flatten(1).mean(1)  # (B,)
            squared += float(per_image.sum()) * recon[0].numel()
            pixels += recon.numel()
            psnr_sum += float((-10 * torch.log10(per_image.clamp(min=1e-10))).sum())
            images += batch.shape[0]
            loss_sum += float(out.loss)
            n_batches += 1
            counts += torch.bincount(out.tokens.reshape(-1).cpu(), minlength=vae.codebook_size)
        if not images:
            return {}
        mse = squared / pixels
        usage = codebook_usage(counts)
        return {
            "loss": loss_sum / n_batches,
            "mse": mse,
            "psnr": 10 * math.log10(1 / max(mse, 1e-10)),
            "psnr_per_image": psnr_sum / images,
            "codebook_used": usage.fraction,
            "perplexity": usage.perplexity,
        }

    def _samples(self) -> torch.Tensor:
        if self._sample_images is None:
            train, val = self.datasets()
            source = val if val is not None and len(val) else train
            picked = []
            for i in range(len(source)):
                item = source[i]
                if item is not None:
                    picked.append(item["image"])
                if len(picked) == SAMPLE_COUNT:
                    break
            self._sample_images = torch.stack(picked)  # (N, 3, S, S)
        return self._sample_images

    def write_samples(self, model: torch.nn.Module, path: Path, step: int) -> None:
        vae: DiscreteVAE = model  # type: ignore[assignment]
        images = self._samples()
        param = next(vae.parameters())
        recon = vae.decode(vae.encode(images.to(param.device)))
        save_grid(torch.cat([images, recon.float().cpu()]), path, nrow=len(images))

    def save_extras(self, directory: Path) -> None:
        pass
