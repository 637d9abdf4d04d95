"""``ClipEmbedder``: images and texts into one normalised space, in batches, at a chosen precision."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from duomodal.device import precision_dtype, resolve_device, resolve_precision
from duomodal.models.clip.config import LOGIT_SCALE_MAX
from duomodal.models.clip.model import ContrastiveClip
from duomodal.models.clip.preprocess import TextEncoder


class ClipEmbedder:
    """Embeds images and texts into one normalised space; scores image-text pairs (a reranking Scorer)."""

    def __init__(
        self,
        model: ContrastiveClip,
        encode_texts: TextEncoder,
        preprocess_images: Callable[[list[Image.Image]], torch.Tensor],
        model_id: str,
        device: torch.device | str | None = None,
        batch_size: int = 64,
        precision: str = "auto",
    ):
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)  # "auto": from the hardware
        self.model = model.to(self.device).eval()
        self.encode_texts = encode_texts
        self.preprocess_images = preprocess_images
        self.model_id = model_id
        self.batch_size = batch_size

    @property
    def dim(self) -> int:
        return self.model.embed_dim

    @property
    def logit_scale(self) -> float:
        """exp of the learned (clamped) log temperature: multiply cosines by it before a softmax."""
        return float(self.model.clip.logit_scale.detach().clamp(0, LOGIT_SCALE_MAX).exp())

    def _autocast(self):
        if self.precision == "fp32":
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=precision_dtype(self.precision))

    @torch.inference_mode()
    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(N, D) L2-normalised float32 on the CPU."""
        chunks = [torch.zeros(0, self.dim)]
        for start in range(0, len(images), self.batch_size):
            pixels = self.preprocess_images(list(images[start : start + self.batch_size])).to(self.device)
            with self._autocast():
                features = self.model(pixel_values=pixels).image
            chunks.append(F.normalize(features.float(), dim=-1).cpu())
        return torch.cat(chunks)

    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, D) L2-normalised float32 on the CPU."""
        chunks = [torch.zeros(0, self.dim)]
        for start in range(0, len(texts), self.batch_size):
            input_ids, attention_mask = self.encode_texts(list(texts[start : start + self.batch_size]))
            input_ids = input_ids.to(self.device)
            if attention_mask is not None:
                attention_mask = attention_mask.to(self.device)
            with self._autocast():
                features = self.model(input_ids=input_ids, attention_mask=attention_mask).text
            chunks.append(F.normalize(features.float(), dim=-1).cpu())
        return torch.cat(chunks)

    def score(self, images: Sequence[Image.Image], texts: Sequence[str]) -> torch.Tensor:
        """(N,) cosine similarity of each (image, text) pair; satisfies ``duomodal.generate.Scorer``.

        A single text is broadcast over all images (the reranking case: N samples, one prompt).
        """
        if len(texts) == 1 and len(images) != 1:
            texts = list(texts) * len(images)
        if len(images) != len(texts):
            raise ValueError(f"score needs as many texts as images (or one text), got {len(images)} and {len(texts)}")
        if not images:
            return torch.zeros(0)
        image_features = self.embed_images(images)
        unique = list(dict.fromkeys(texts))
        text_features = self.embed_texts(unique)
        rows = torch.tensor([unique.index(t) for t in texts])
        return (image_features * text_features[rows]).sum(-1)
