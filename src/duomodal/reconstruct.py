"""Images -> VAE tokens -> images: see what the codebook keeps of a picture."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from duomodal.data.images import save_grid, to_tensor
from duomodal.models.vae import DiscreteVAE

GRID_COLUMNS = 8


@dataclass
class Reconstruction:
    originals: torch.Tensor  # (N, 3, S, S) in [0, 1], resized and centre-cropped to the VAE's size
    reconstructions: torch.Tensor  # (N, 3, S, S) in [0, 1]
    tokens: torch.Tensor  # (N, h, w)
    psnr: list[float]  # per image, dB


def reconstruct(vae: DiscreteVAE, images: Sequence[Image.Image], batch_size: int = 64) -> Reconstruction:
    if not images:
        raise ValueError("reconstruct needs at least one image")
    originals = torch.stack([to_tensor(image, vae.image_size) for image in images])  # (N, 3, S, S)
    device = next(vae.parameters()).device
    tokens, recons = [], []
    for start in range(0, len(originals), batch_size):
        chunk = originals[start : start + batch_size].to(device)
        t = vae.encode(chunk)
        tokens.append(t.cpu())
        recons.append(vae.decode(t).float().cpu())
    reconstructions = torch.cat(recons)
    per_image = (reconstructions - originals).pow(2).flatten(1).mean(1).clamp(min=1e-10)  # (N,)
    return Reconstruction(originals, reconstructions, torch.cat(tokens),
                          [float(-10 * math.log10(float(v))) for v in per_image])


def save_reconstruction_grid(result: Reconstruction, path: str | os.PathLike, columns: int = GRID_COLUMNS) -> None:
    """Rows of up to `columns` originals, each row followed by the row of their reconstructions."""
    rows = []
    for start in range(0, len(result.originals), columns):
        originals = result.originals[start : start + columns]
        recons = result.reconstructions[start : start + columns]
        pad = columns - len(originals)
        if pad and len(result.originals) > columns:
            blank = torch.ones(pad, *originals.shape[1:])
            originals, recons = torch.cat([originals, blank]), torch.cat([recons, blank])
        rows += [originals, recons]
    save_grid(torch.cat(rows), path, nrow=min(columns, len(result.originals)))
