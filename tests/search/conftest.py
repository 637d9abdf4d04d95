"""A small deterministic stand-in for CLIP: colour features for images, colour words + hashed words for text."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

# axes 0-3: the four colours of the shape fixture; 4: white; 5-16: mean RGB of each image quadrant;
# 17-23: other words of a text, hashed
COLOR_RGB = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (30, 60, 220), "yellow": (235, 200, 20)}
DIM = 24
_WORD_AXES = range(17, DIM)


class FakeEmbedder:
    """Images -> fraction of pixels near each fixture colour, white, quadrant colours; texts ->
    colour words on the same axes, other words hashed onto their own axes. Normalised, deterministic."""

    def __init__(self, model_id: str = "fake-colour-v1", dim: int = DIM):
        self.model_id = model_id
        self.dim = dim
        self.images_embedded = 0

    def embed_images(self, images) -> torch.Tensor:
        out = np.zeros((len(images), self.dim), dtype=np.float32)
        for i, image in enumerate(images):
            array = np.asarray(image.convert("RGB").resize((16, 16)), dtype=np.float32)
            pixels = array.reshape(-1, 3)
            for j, rgb in enumerate(COLOR_RGB.values()):
                out[i, j] = (np.abs(pixels - rgb).sum(1) < 60).mean()
            out[i, 4] = 0.2 * (pixels.min(1) > 200).mean()
            quadrants = [array[:8, :8], array[:8, 8:], array[8:, :8], array[8:, 8:]]
            out[i, 5:17] = 0.1 * np.concatenate([q.reshape(-1, 3).mean(0) / 255 for q in quadrants])
        self.images_embedded += len(images)
        return torch.nn.functional.normalize(torch.from_numpy(out), dim=-1)

    def embed_texts(self, texts) -> torch.Tensor:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        names = list(COLOR_RGB)
        for i, text in enumerate(texts):
            for word in text.lower().split():
                if word in names:
                    out[i, names.index(word)] += 1.0
                else:
                    h = int(hashlib.sha256(word.encode()).hexdigest(), 16)
                    out[i, _WORD_AXES[h % len(_WORD_AXES)]] += 0.3
        return torch.nn.functional.normalize(torch.from_numpy(out), dim=-1)


@pytest.fixture
def fake_embedder() -> FakeEmbedder:
    return FakeEmbedder()
