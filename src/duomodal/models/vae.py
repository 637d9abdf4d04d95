"""Discrete VAE: a conv encoder, a quantizer onto a fixed codebook, a conv decoder.

An image (B, 3, H, W) in [0, 1] becomes a grid of tokens (B, h, w) with h = H / 2**n_downsample,
each an index into a codebook of `codebook_size` entries; DALL-E is trained on those tokens.

Two quantizers (``quantizer=``):
- ``"gumbel"`` (the DALL-E paper): the encoder gives logits over the codebook; training samples a
  Gumbel-softmax relaxation at a temperature the trainer anneals, plus a KL term to the uniform
  prior; ``straight_through`` uses hard one-hot samples with soft gradients.
- ``"vq"`` (VQ-VAE): nearest codebook entry, codebook updated by exponential moving averages,
  codes unused for a while restarted from encoder outputs of the current batch, and a commitment
  loss. Under DDP the moving-average statistics are summed over processes so that every process
  keeps the same codebook.

The encoder starts with a space-to-depth step and the decoder ends with depth-to-space (pixel
shuffle), so that the convolutions run at half the image resolution or less: that is what keeps
the model fast on a CPU.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from duomodal.config import from_dict, to_dict
from duomodal.modelfile import load_state_dict_strict, load_weights, read_config

KIND = "vae"


@dataclass(frozen=True)
class VAEConfig:
    image_size: int = 32  # side of the square input images, pixels
    n_downsample: int = 2  # stride-2 stages; the token grid side is image_size / 2**n_downsample
    width: int = 64  # channels of the first stage; each further stage doubles them, up to max_width
    max_width: int = 256  # channel cap of the deepest stages
    res_blocks: int = 1  # residual blocks at the grid resolution, in the encoder and in the decoder
    codebook_size: int = 512  # number of discrete codes
    codebook_dim: int = 64  # size of one codebook vector
    quantizer: Literal["gumbel", "vq"] = "vq"
    # gumbel: temperature cosine-annealed from start to end over anneal_steps optimizer steps
    temperature_start: float = 1.0
    temperature_end: float = 1.0 / 16
    temperature_anneal_steps: int = 5000
    kl_weight: float = 1e-3  # weight of KL(q || uniform), reached after kl_warmup_steps (cosine)
    kl_warmup_steps: int = 1000
    straight_through: bool = False  # hard one-hot samples in the forward pass, soft gradients
    # vq: exponential-moving-average codebook with dead-code restart
    commitment: float = 0.25  # weight of ||z - sg(e)||^2
    ema_decay: float = 0.99  # decay of the codebook moving averages
    restart_threshold: float = 1.0  # restart codes whose moving-average use per batch falls below this; 0 = off

    def __post_init__(self) -> None:
        if self.n_downsample < 1:
            raise ValueError(f"n_downsample must be >= 1, got {self.n_downsample}")
        if self.image_size < 2**self.n_downsample or self.image_size % 2**self.n_downsample:
            raise ValueError(
                f"image_size {self.image_size} must be a multiple of 2**n_downsample = {2**self.n_downsample}"
            )
        for name in ("width", "max_width", "codebook_size", "codebook_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.codebook_size < 2:
            raise ValueError(f"codebook_size must be >= 2, got {self.codebook_size}")
        if self.res_blocks < 0:
            raise ValueError(f"res_blocks must be >= 0, got {self.res_blocks}")
        if self.quantizer not in ("gumbel", "vq"):
            raise ValueError(f"quantizer must be 'gumbel' or 'vq', got {self.quantizer!r}")
        if not (0 < self.temperature_end <= self.temperature_start):
            raise ValueError(
                f"need 0 < temperature_end <= temperature_start, got {self.temperature_end} and "
                f"{self.temperature_start}"
            )
        if not (0.0 <= self.ema_decay < 1.0):
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.kl_weight < 0 or self.commitment < 0 or self.restart_threshold < 0:
            raise ValueError("kl_weight, commitment and restart_threshold must be >= 0")

    @property
    def grid_size(self) -> int:
        return self.image_size // 2**self.n_downsample

    def stage_widths(self) -> list[int]:
        return [min(self.width * 2**i, self.max_width) for i in range(self.n_downsample)]


@dataclass
class VAEOutput:
    recon: torch.Tensor  # (B, 3, H, W) reconstruction, [0, 1] up to the decoder's overshoot
    loss: torch.Tensor  # scalar: recon_loss + quantizer loss
    recon_loss: torch.Tensor  # scalar MSE in [0, 1] pixel units
    quant_loss: torch.Tensor  # scalar: weighted KL (gumbel) or commitment (vq)
    tokens: torch.Tensor  # (B, h, w) chosen codes
    perplexity: torch.Tensor  # scalar: exp(entropy) of code use in this batch


# --- small modules -------------------------------------------------------------------------------


class ResBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class Encoder(nn.Module):
    """(B, 3, H, W) in [-1, 1] -> (B, out_channels, h, w)."""

    def __init__(self, config: VAEConfig, out_channels: int):
        super().__init__()
        widths = config.stage_widths()
        # space-to-depth does the first halving; each further stage is a 4x4 stride-2 conv
        self.stem = nn.Conv2d(3 * 4, widths[0], 3, padding=1)
        self.downs = nn.ModuleList(
            nn.Conv2d(widths[i - 1], widths[i], 4, stride=2, padding=1) for i in range(1, len(widths))
        )
        self.blocks = nn.Sequential(*[ResBlock(widths[-1]) for _ in range(config.res_blocks)])
        self.out = nn.Conv2d(widths[-1], out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(F.pixel_unshuffle(x, 2)))  # (B, w0, H/2, W/2)
        for down in self.downs:
            x = F.relu(down(x))
        x = self.blocks(x)
        return self.out(F.relu(x))  # (B, out, h, w)


class Decoder(nn.Module):
    """(B, codebook_dim, h, w) -> (B, 3, H, W), roughly [-1, 1]."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        widths = config.stage_widths()
        self.inp = nn.Conv2d(config.codebook_dim, widths[-1], 3, padding=1)
        self.blocks = nn.Sequential(*[ResBlock(widths[-1]) for _ in range(config.res_blocks)])
        self.ups = nn.ModuleList(
            nn.ConvTranspose2d(widths[i], widths[i - 1], 4, stride=2, padding=1)
            for i in range(len(widths) - 1, 0, -1)
        )
        self.out = nn.Conv2d(widths[0], 3 * 4, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.inp(z))
        for up in self.ups:
            x = up(F.relu(x))
        return F.pixel_shuffle(self.out(F.relu(x)), 2)  # (B, 3, H, W)


def _perplexity(counts: torch.Tensor) -> torch.Tensor:
    probs = counts.float() / counts.sum().clamp(min=1)
    return torch.exp(-(probs * torch.log(probs.clamp(min=1e-10))).sum())


class GumbelQuantizer(nn.Module):
    """Logits over the codebook -> a relaxed one-hot mix of codebook vectors."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.codebook_size = config.codebook_size
        self.straight_through = config.straight_through
        self.codebook = nn.Embedding(config.codebook_size, config.codebook_dim)

    def tokens(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.argmax(dim=1)  # (B, h, w)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.codebook(tokens).permute(0, 3, 1, 2)  # (B, D, h, w)

    def forward(
        self, logits: torch.Tensor, temperature: float, kl_weight: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = logits.float()  # (B, K, h, w)
        if self.training:
            one_hot = F.gumbel_softmax(logits, tau=temperature, hard=self.straight_through, dim=1)
        else:
            one_hot = F.one_hot(logits.argmax(dim=1), self.codebook_size).permute(0, 3, 1, 2).float()
        z = torch.einsum("bkhw,kd->bdhw", one_hot, self.codebook.weight.float())  # (B, D, h, w)
        log_q = F.log_softmax(logits, dim=1)
        # KL(q || uniform) = sum q log q + log K, averaged over positions
        kl = (log_q.exp() * log_q).sum(dim=1).mean() + math.log(self.codebook_size)
        return z, kl_weight * kl, logits.argmax(dim=1)


class VQQuantizer(nn.Module):
    """Nearest-neighbour quantizer with an EMA codebook and dead-code restart."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        K, D = config.codebook_size, config.codebook_dim
        self.codebook_size = K
        self.commitment = config.commitment
        self.decay = config.ema_decay
        self.restart_threshold = config.restart_threshold
        self.register_buffer("codebook", torch.randn(K, D))
        self.register_buffer("cluster_size", torch.zeros(K))
        self.register_buffer("embed_sum", torch.randn(K, D))
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))

    def tokens(self, z: torch.Tensor) -> torch.Tensor:
        B, D, h, w = z.shape
        with torch.autocast(device_type=z.device.type, enabled=False):  # distances need fp32
            flat = z.float().permute(0, 2, 3, 1).reshape(-1, D)  # (N, D)
            distances = (
                flat.pow(2).sum(1, keepdim=True) - 2 * flat @ self.codebook.t() + self.codebook.pow(2).sum(1)
            )  # (N, K)
            return distances.argmin(dim=1).view(B, h, w)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.embedding(tokens, self.codebook).permute(0, 3, 1, 2)  # (B, D, h, w)

    @torch.no_grad()
    def _initialise(self, flat: torch.Tensor) -> None:
        """First training batch: spread the codes over this batch's encoder outputs."""
        pool = _gather_rows(flat)
        weight = max(self.restart_threshold, 1.0)
        self.codebook.copy_(_farthest_points(pool, self.codebook_size, pool.mean(0, keepdim=True)))
        self.cluster_size.fill_(weight)
        self.embed_sum.copy_(self.codebook * weight)
        self.initialised.fill_(True)

    @torch.no_grad()
    def _update(self, flat: torch.Tensor, tokens: torch.Tensor) -> None:
        K = self.codebook_size
        one_hot = F.one_hot(tokens, K).type(flat.dtype)  # (N, K)
        counts = one_hot.sum(0)  # (K,)
        sums = one_hot.t() @ flat  # (K, D)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + 1e-5) / (n + K * 1e-5) * n  # Laplace smoothing
        self.codebook.copy_(self.embed_sum / smoothed[:, None])
        if self.restart_threshold > 0:
            dead = self.cluster_size < self.restart_threshold  # (K,), the same on every rank
            n_dead = int(dead.sum())
            if n_dead:
                # restart dead codes at the encoder outputs worst served by the live codes
                fresh = _farthest_points(_gather_rows(flat), n_dead, self.codebook[~dead])
                weight = self.restart_threshold  # it must win at least some use at once
                self.codebook[dead] = fresh
                self.cluster_size[dead] = weight
                self.embed_sum[dead] = fresh * weight

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with torch.autocast(device_type=z.device.type, enabled=False):  # codebook statistics in fp32
            return self._quantize(z.float())

    def _quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, D, h, w = z.shape
        flat = z.detach().permute(0, 2, 3, 1).reshape(-1, D)  # (N, D)
        if self.training and not bool(self.initialised):
            self._initialise(flat)
        tokens = self.tokens(z)  # (B, h, w)
        quantized = self.embed(tokens)  # (B, D, h, w), before this batch's codebook update
        if self.training:
            self._update(flat, tokens.view(-1))
        commitment = self.commitment * F.mse_loss(z, quantized)
        quantized = z + (quantized - z).detach()  # straight-through gradient to the encoder
        return quantized, commitment, tokens


def _gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """Every process's rows (N_i, D), concatenated in rank order; `rows` itself without DDP."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return rows
    sizes = [torch.zeros(1, dtype=torch.long, device=rows.device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([rows.shape[0]], device=rows.device))
    longest = int(max(int(s) for s in sizes))
    padded = torch.zeros(longest, rows.shape[1], dtype=rows.dtype, device=rows.device)
    padded[: rows.shape[0]] = rows
    gathered = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(gathered, padded)
    return torch.cat([g[: int(s)] for g, s in zip(gathered, sizes)])


def _farthest_points(pool: torch.Tensor, n: int, taken: torch.Tensor) -> torch.Tensor:
    """`n` rows of `pool` (N, D) chosen greedily, each the farthest from `taken` (M, D) and the
    rows already chosen. Deterministic and independent of the row order (up to exact ties), so
    1 process and N processes with the same global batch choose alike."""
    if taken.shape[0]:
        nearest = torch.cdist(pool, taken).pow(2).min(dim=1).values  # (N,)
    else:
        nearest = torch.full((pool.shape[0],), float("inf"), device=pool.device)
    chosen = []
    for _ in range(n):
        j = int(nearest.argmax())
        chosen.append(pool[j])
        nearest = torch.minimum(nearest, (pool - pool[j]).pow(2).sum(1))
    return torch.stack(chosen)


# --- the model -----------------------------------------------------------------------------------


class DiscreteVAE(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        if config.quantizer == "gumbel":
            self.encoder = Encoder(config, config.codebook_size)
            self.quantizer: GumbelQuantizer | VQQuantizer = GumbelQuantizer(config)
        else:
            self.encoder = Encoder(config, config.codebook_dim)
            self.quantizer = VQQuantizer(config)
        self.decoder = Decoder(config)

    @property
    def grid_size(self) -> int:
        return self.config.grid_size

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    @property
    def image_size(self) -> int:
        return self.config.image_size

    def _check_images(self, images: torch.Tensor) -> None:
        S = self.config.image_size
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[2] != S or images.shape[3] != S:
            raise ValueError(f"expected images of shape (B, 3, {S}, {S}), got {tuple(images.shape)}")

    def forward(self, images: torch.Tensor, temperature: float = 1.0, kl_weight: float = 0.0) -> VAEOutput:
        """Reconstruct `images` (B, 3, H, W) in [0, 1]; `temperature` and `kl_weight` only
        matter to the gumbel quantizer (the trainer anneals them)."""
        self._check_images(images)
        encoded = self.encoder(images * 2 - 1)  # (B, K or D, h, w)
        if isinstance(self.quantizer, GumbelQuantizer):
            z, quant_loss, tokens = self.quantizer(encoded, temperature, kl_weight)
        else:
            z, quant_loss, tokens = self.quantizer(encoded)
        recon = self.decoder(z.to(encoded.dtype)) * 0.5 + 0.5  # (B, 3, H, W)
        recon_loss = F.mse_loss(recon.float(), images.float())
        counts = torch.bincount(tokens.reshape(-1), minlength=self.config.codebook_size)
        return VAEOutput(
            recon=recon,
            loss=recon_loss + quant_loss,
            recon_loss=recon_loss,
            quant_loss=quant_loss,
            tokens=tokens,
            perplexity=_perplexity(counts),
        )

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> LongTensor (B, h, w) of codes (argmax, no noise)."""
        self._check_images(images)
        param = next(self.parameters())
        encoded = self.encoder(images.to(device=param.device, dtype=param.dtype) * 2 - 1)
        return self.quantizer.tokens(encoded)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """LongTensor (B, h, w) of codes -> images (B, 3, H, W) in [0, 1]."""
        g = self.config.grid_size
        if tokens.ndim == 2 and tokens.shape[1] == g * g:
            tokens = tokens.view(-1, g, g)
        if tokens.ndim != 3 or tokens.shape[1:] != (g, g):
            raise ValueError(f"expected tokens of shape (B, {g}, {g}), got {tuple(tokens.shape)}")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.config.codebook_size):
            raise ValueError(f"token ids must be in [0, {self.config.codebook_size}), got {int(tokens.max())}")
        param = next(self.parameters())
        z = self.quantizer.embed(tokens.to(param.device)).to(param.dtype)
        return (self.decoder(z) * 0.5 + 0.5).clamp(0, 1)


def vae_config_dict(config: VAEConfig) -> dict:
    return to_dict(config)


def load_vae(directory: str | os.PathLike, device: str | torch.device | None = None) -> DiscreteVAE:
    """The VAE saved in a duomodal model or run directory, in eval mode."""
    directory = Path(directory)
    config = from_dict(VAEConfig, read_config(directory, kind=KIND), "vae config")
    model = DiscreteVAE(config)
    load_state_dict_strict(model, load_weights(directory), str(directory))
    return model.to(device or "cpu").eval()
