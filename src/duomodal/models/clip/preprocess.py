"""Images and texts to the CLIP's inputs: normalised pixels, token ids without trailing padding."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from PIL import Image

from duomodal.data.images import to_tensor
from duomodal.models.clip.config import ClipConfig
from duomodal.text.tokenizer import Tokenizer


def normalize_pixels(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> normalised by per-channel mean and std."""
    mean_t = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images - mean_t) / std_t


def duomodal_image_preprocessor(config: ClipConfig) -> Callable[[list[Image.Image]], torch.Tensor]:
    def preprocess(images: list[Image.Image]) -> torch.Tensor:
        pixels = torch.stack([to_tensor(image.convert("RGB"), config.image_size) for image in images])
        return normalize_pixels(pixels, config.image_mean, config.image_std)

    return preprocess


def trim_padding(input_ids: torch.Tensor, pad_id: int = 0) -> torch.Tensor:
    """Drop the columns after the longest text's EOS: with causal attention and absolute positions the
    pooled EOS state is unchanged, and short prompts embed several times faster."""
    used = (input_ids != pad_id).any(0).nonzero()
    return input_ids[:, : int(used.max()) + 1] if used.numel() else input_ids


TextEncoder = Callable[[list[str]], tuple[torch.Tensor, "torch.Tensor | None"]]


def duomodal_text_encoder(tokenizer: Tokenizer, context_length: int) -> TextEncoder:
    """Texts -> (input_ids (B, T), None); long texts are truncated (EOS kept)."""

    def encode(texts: list[str]) -> tuple[torch.Tensor, None]:
        return trim_padding(tokenizer.encode_batch(texts, context_length, truncate=True)), None

    return encode
