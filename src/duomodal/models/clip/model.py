"""The CLIP module: a transformers ``CLIPModel`` whose forward gives normalised features."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from duomodal.device import attention_kernel
from duomodal.models.clip.config import LOGIT_SCALE_MAX, ClipConfig, hf_config


@dataclass
class ClipFeatures:
    """L2-normalised features of whichever inputs were given, exp(clamped logit scale) and, for a model
    trained with the sigmoid loss, its logit bias."""

    image: torch.Tensor | None  # (B, D)
    text: torch.Tensor | None  # (B, D)
    logit_scale: torch.Tensor  # () scalar, the inverse temperature
    logit_bias: torch.Tensor | None = None  # () scalar (sigmoid loss only)


class ContrastiveClip(nn.Module):
    """A ``transformers.CLIPModel`` whose forward gives normalised features for the contrastive loss.

    Calling the module (rather than reaching into ``.clip``) keeps DDP's hooks in the path.
    """

    def __init__(self, clip: nn.Module, logit_bias: float | None = None, attention: str = "auto"):
        super().__init__()
        self.clip = clip
        self.attention = attention  # "auto", "sdpa" or "eager": resolved per forward from the inputs' device
        # SigLIP's learned bias (a sigmoid-loss model only; pretrained CLIPs and softmax models have none)
        self.logit_bias = None if logit_bias is None else nn.Parameter(torch.tensor(float(logit_bias)))

    @classmethod
    def from_config(cls, config: ClipConfig) -> ContrastiveClip:
        # transformers loads here, when a CLIP is built or loaded: importing it takes seconds that the modules
        # importing this one (DALL-E sampling, the index, the server's start) do not need
        from transformers import CLIPModel

        hf = hf_config(config)
        hf._attn_implementation = "eager" if config.attention == "auto" else config.attention  # sub-configs too
        return cls(CLIPModel(hf), config.logit_bias_init if config.loss == "sigmoid" else None, config.attention)

    @property
    def embed_dim(self) -> int:
        return int(self.clip.config.projection_dim)

    def hidden_matrices(self) -> list[nn.Parameter]:
        """The 2-D weights inside both towers' transformer layers (attention and MLP), the ones
        ``train.optimizer=muon`` gives to Muon; embeddings, projections and norms stay with AdamW."""
        matrices = []
        for tower in (self.clip.text_model, self.clip.vision_model):
            for layer in tower.encoder.layers:
                matrices += [p for p in layer.parameters() if p.ndim == 2]
        return matrices

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,  # (B, 3, S, S) normalised
        input_ids: torch.Tensor | None = None,  # (B, T)
        attention_mask: torch.Tensor | None = None,  # (B, T)
    ) -> ClipFeatures:
        if pixel_values is None and input_ids is None:
            raise ValueError("ContrastiveClip needs pixel_values, input_ids or both")
        device = (pixel_values if pixel_values is not None else input_ids).device
        kernel = attention_kernel(self.attention, device)
        if self.clip.config._attn_implementation != kernel:
            self.clip.config._attn_implementation = kernel  # both towers' configs too
        image = text = None
        if pixel_values is not None:
            image = F.normalize(self.clip.get_image_features(pixel_values=pixel_values).pooler_output, dim=-1)
        if input_ids is not None:
            out = self.clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
            text = F.normalize(out.pooler_output, dim=-1)
        if self.training:
            with torch.no_grad():  # as open_clip after each step: the stored value never passes ln 100
                self.clip.logit_scale.clamp_(0, LOGIT_SCALE_MAX)
        logit_scale = self.clip.logit_scale.clamp(0, LOGIT_SCALE_MAX).exp()
        return ClipFeatures(image=image, text=text, logit_scale=logit_scale, logit_bias=self.logit_bias)
