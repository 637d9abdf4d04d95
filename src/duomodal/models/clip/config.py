"""The CLIP's configuration: ``ClipConfig`` and the transformers ``CLIPConfig`` built from it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from duomodal.config import ConfigError
from duomodal.device import ATTENTION_KERNELS

KIND = "clip"
LOGIT_SCALE_MAX = math.log(100.0)  # open_clip clamps the learned log temperature to [0, ln 100]


@dataclass(frozen=True)
class ClipConfig:
    image_size: int = 32  # input images are resized/cropped to image_size x image_size
    patch_size: int = 4  # ViT patch side; image_size must be a multiple
    vision_width: int = 128  # ViT hidden size
    vision_layers: int = 4
    vision_heads: int = 4
    text_width: int = 128  # text transformer hidden size
    text_layers: int = 4
    text_heads: int = 4
    context_length: int = 32  # text tokens incl. BOS and EOS
    vocab_size: int = 1024  # BPE vocabulary; the trainer sets it to the trained tokenizer's size
    embed_dim: int = 128  # joint embedding size (projection_dim)
    mlp_ratio: int = 4  # MLP hidden = mlp_ratio * width
    hidden_act: Literal["quick_gelu", "gelu"] = "gelu"
    # How attention is computed (the same weights either way): "sdpa" is torch's fused kernel, "eager" plain
    # matmuls; "auto" picks the faster one for the device the inputs are on (duomodal.device.attention_kernel).
    attention: Literal["auto", "sdpa", "eager"] = "auto"
    logit_scale_init: float = math.log(1 / 0.07)  # CLIP's initial temperature 0.07 (SigLIP starts at ln 10)
    # The contrastive loss the model is trained with: "softmax" (CLIP's InfoNCE over the batch) or
    # "sigmoid" (SigLIP: each pair a binary match / no match; adds a learned logit bias to the model).
    loss: Literal["softmax", "sigmoid"] = "softmax"
    logit_bias_init: float = -10.0  # sigmoid only: the bias starts by calling every pair a non-match
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)  # per-channel normalisation of [0, 1] pixels
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)

    def __post_init__(self) -> None:
        for name in ("image_size", "patch_size", "vision_width", "vision_layers", "vision_heads", "text_width",
                     "text_layers", "text_heads", "embed_dim", "mlp_ratio"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be at least 1, got {getattr(self, name)}")
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"model.image_size {self.image_size} is not a multiple of model.patch_size {self.patch_size}"
            )
        if self.vision_width % self.vision_heads:
            raise ConfigError(
                f"model.vision_width {self.vision_width} is not a multiple of model.vision_heads {self.vision_heads}"
            )
        if self.text_width % self.text_heads:
            raise ConfigError(
                f"model.text_width {self.text_width} is not a multiple of model.text_heads {self.text_heads}"
            )
        if self.context_length < 3:
            raise ConfigError(f"model.context_length must be at least 3 (BOS, a token, EOS), got {self.context_length}")
        if self.vocab_size < 5:
            raise ConfigError(f"model.vocab_size must be at least 5, got {self.vocab_size}")
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ConfigError(
                f"model.image_mean and model.image_std need 3 values (R, G, B), got {self.image_mean}, {self.image_std}"
            )
        if self.loss not in ("softmax", "sigmoid"):
            raise ConfigError(f"model.loss must be softmax or sigmoid, got {self.loss!r}")
        if self.attention not in ATTENTION_KERNELS:
            raise ConfigError(f"model.attention must be one of {', '.join(ATTENTION_KERNELS)}, got {self.attention!r}")
        if any(s <= 0 for s in self.image_std):
            raise ConfigError(f"model.image_std values must be positive, got {self.image_std}")


def hf_config(config: ClipConfig) -> Any:
    """The transformers ``CLIPConfig`` of a duomodal ``ClipConfig``."""
    # transformers loads here, when a CLIP is built or loaded: importing it takes seconds that the modules
    # importing this one (DALL-E sampling, the index, the server's start) do not need
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config={
            "vocab_size": config.vocab_size,
            "hidden_size": config.text_width,
            "intermediate_size": config.mlp_ratio * config.text_width,
            "num_hidden_layers": config.text_layers,
            "num_attention_heads": config.text_heads,
            "max_position_embeddings": config.context_length,
            "hidden_act": config.hidden_act,
            "projection_dim": config.embed_dim,
            "pad_token_id": 0,
            "bos_token_id": 2,
            "eos_token_id": 3,
        },
        vision_config={
            "hidden_size": config.vision_width,
            "intermediate_size": config.mlp_ratio * config.vision_width,
            "num_hidden_layers": config.vision_layers,
            "num_attention_heads": config.vision_heads,
            "image_size": config.image_size,
            "patch_size": config.patch_size,
            "hidden_act": config.hidden_act,
            "projection_dim": config.embed_dim,
        },
        projection_dim=config.embed_dim,
        logit_scale_init_value=config.logit_scale_init,
    )
