"""DALL-E: a decoder-only transformer over one stream of [text tokens ; image tokens].

The text is the caption encoded by the duomodal tokenizer (``[BOS] words [EOS] [PAD]...``, a fixed
``text_seq_len``); every [PAD] is replaced by a padding token of its own position, as in the DALL-E
paper, so "no word here" at position 7 is a different symbol from "no word here" at position 8.
The image is the grid of codebook indices of a frozen discrete VAE, in raster order.

The model reads ``text + image[:-1]`` (``L = text_seq_len + image_token_count - 1`` positions) and
predicts the next token everywhere. Text positions have a head over the text vocabulary only and image
positions a head over the image codebook only: the logits are restricted by position type by
construction. Attention per layer is one of ``full`` (causal), ``axial_row``, ``axial_col`` or
``conv_like``: boolean masks given to ``scaled_dot_product_attention``, in which an image token always
sees every text token and, among the image tokens before it, only those of its pattern.

Sampling runs one new token per step through a ``KVCache`` (``forward_cached`` here, ``StepDecoder`` in
``models/dalle_step.py`` for single tokens); ``models/sampling.py`` holds the sampler itself.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from duomodal.config import ConfigError, from_dict
from duomodal.device import ATTENTION_KERNELS, attention_kernel
from duomodal.files import file_sha256, load_json
from duomodal.modelfile import (
    TOKENIZER_FILE,
    WEIGHTS_FILE,
    ModelFileError,
    load_state_dict_strict,
    load_weights,
    read_config,
)
from duomodal.models.dalle_attention import ATTENTION_TYPES, KVCache, attend, attention_mask
from duomodal.models.vae import DiscreteVAE, load_vae
from duomodal.text.tokenizer import Tokenizer

MLP_TYPES = ("gelu", "relu2")
PROJ_INITS = ("scaled", "zero")
VAE_SUBDIR = "vae"  # a run directory keeps a copy of its VAE here, so it stays usable when moved
CAPTION_WORDS_FILE = "caption_words.json"  # the words of the training captions (to flag unseen prompt words)
_WORD = re.compile(r"\w+")


def words_of(normalized_text: str) -> list[str]:
    """The words of a (tokenizer-normalised) caption, without punctuation."""
    return _WORD.findall(normalized_text)


@dataclass(frozen=True)
class DALLEConfig:
    text_seq_len: int = 32  # caption context, [BOS] and [EOS] included
    text_vocab_size: int = 1024  # tokenizer vocabulary (the trainer sets it to the trained tokenizer's size)
    text_pad_id: int = 0  # the tokenizer's [PAD] id, replaced by one padding token per position
    image_vocab_size: int = 0  # VAE codebook size (0: not resolved yet; the trainer takes it from the VAE)
    image_grid_size: int = 0  # VAE token grid side (0: from the VAE)
    image_size: int = 0  # VAE image side in pixels (0: from the VAE)
    n_layer: int = 4
    n_head: int = 8
    n_embd: int = 256
    attention_types: tuple[str, ...] = ("full",)  # cycled over the layers
    conv_kernel_size: int = 5  # neighbourhood side of conv_like attention, odd
    dropout: float = 0.0
    mlp: str = "gelu"  # the block's MLP activation: "gelu" (tanh approximation) or "relu2" (ReLU squared)
    qk_norm: bool = False  # RMS-normalise each head's queries and keys before attention
    # how attention is computed (the same function either way): "sdpa" (torch's fused kernel), "eager"
    # (explicit matmuls) or "auto", the faster one for the inputs' device (duomodal.device.attention_kernel)
    attention: str = "auto"
    proj_init: str = "scaled"  # output projections of attention and MLP: "scaled" (GPT-2) or "zero"
    text_loss_weight: float = 1.0  # the paper weighs text:image losses 1:7
    image_loss_weight: float = 7.0
    caption_dropout: float = 0.1  # probability of training on the empty caption (classifier-free guidance)
    vae_dir: str = ""  # the VAE this model was trained on (a copy lives in RUN_DIR/vae)
    vae_id: str = ""  # sha256 of that VAE's weights file

    def __post_init__(self) -> None:
        if self.text_seq_len < 2:
            raise ConfigError(f"model.text_seq_len must be at least 2 (BOS and EOS), got {self.text_seq_len}")
        if self.text_vocab_size < 5:
            raise ConfigError(f"model.text_vocab_size must be at least 5, got {self.text_vocab_size}")
        if not 0 <= self.text_pad_id < self.text_vocab_size:
            raise ConfigError(f"model.text_pad_id {self.text_pad_id} is outside the text vocabulary")
        for name in ("image_vocab_size", "image_grid_size", "image_size"):
            if getattr(self, name) < 0:
                raise ConfigError(f"model.{name} must be >= 0 (0: from the VAE), got {getattr(self, name)}")
        for name in ("n_layer", "n_head", "n_embd"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be at least 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ConfigError(f"model.n_embd {self.n_embd} must be a multiple of model.n_head {self.n_head}")
        if not self.attention_types:
            raise ConfigError(f"model.attention_types must name at least one of {', '.join(ATTENTION_TYPES)}")
        for kind in self.attention_types:
            if kind not in ATTENTION_TYPES:
                raise ConfigError(f"model.attention_types: {kind!r} is not one of {', '.join(ATTENTION_TYPES)}")
        if self.conv_kernel_size < 1 or self.conv_kernel_size % 2 == 0:
            raise ConfigError(f"model.conv_kernel_size must be odd and positive, got {self.conv_kernel_size}")
        if self.attention not in ATTENTION_KERNELS:
            raise ConfigError(f"model.attention: {self.attention!r} is not one of {', '.join(ATTENTION_KERNELS)}")
        if self.mlp not in MLP_TYPES:
            raise ConfigError(f"model.mlp: {self.mlp!r} is not one of {', '.join(MLP_TYPES)}")
        if self.proj_init not in PROJ_INITS:
            raise ConfigError(f"model.proj_init: {self.proj_init!r} is not one of {', '.join(PROJ_INITS)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise ConfigError(f"model.caption_dropout must be in [0, 1], got {self.caption_dropout}")
        if self.text_loss_weight < 0 or self.image_loss_weight < 0 or self.text_loss_weight + self.image_loss_weight == 0:
            raise ConfigError(
                f"model.text_loss_weight ({self.text_loss_weight}) and model.image_loss_weight "
                f"({self.image_loss_weight}) must be >= 0 and not both 0"
            )

    @property
    def image_token_count(self) -> int:
        return self.image_grid_size * self.image_grid_size

    @property
    def seq_len(self) -> int:
        """Positions the model reads: the text and all image tokens but the last."""
        return self.text_seq_len + self.image_token_count - 1

    @property
    def text_token_count(self) -> int:
        """Text embedding rows: the tokenizer's vocabulary plus one padding token per position."""
        return self.text_vocab_size + self.text_seq_len

    def layer_attention(self, layer: int) -> str:
        return self.attention_types[layer % len(self.attention_types)]


# --- padding and loss ---------------------------------------------------------------------------


def text_ids_with_padding(text: torch.Tensor, pad_id: int, vocab_size: int) -> torch.Tensor:
    """Replace [PAD] at position p by the padding token ``vocab_size + p``. text: (B, T) -> (B, T)."""
    positions = torch.arange(text.shape[1], device=text.device)
    return torch.where(text == pad_id, vocab_size + positions, text)


def drop_captions(text: torch.Tensor, empty_text: torch.Tensor, probability: float) -> torch.Tensor:
    """Replace each row of `text` (B, T) by `empty_text` (T,) with `probability` (torch's RNG)."""
    if probability <= 0:
        return text
    drop = torch.rand(text.shape[0], device=text.device) < probability  # (B,)
    return torch.where(drop[:, None], empty_text.to(text.device)[None, :], text)


def weighted_loss(
    text_logits: torch.Tensor,
    image_logits: torch.Tensor,
    text_targets: torch.Tensor,
    image_targets: torch.Tensor,
    text_weight: float,
    image_weight: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weighted loss, text cross-entropy, image cross-entropy), all in nats per token."""
    text_ce = F.cross_entropy(text_logits.float().flatten(0, 1), text_targets.flatten())
    image_ce = F.cross_entropy(image_logits.float().flatten(0, 1), image_targets.flatten())
    loss = (text_weight * text_ce + image_weight * image_ce) / (text_weight + image_weight)
    return loss, text_ce, image_ce


# --- modules -------------------------------------------------------------------------------------


class SelfAttention(nn.Module):
    def __init__(self, config: DALLEConfig):
        super().__init__()
        self.n_head = config.n_head
        self.qk_norm = config.qk_norm
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.proj = nn.Linear(config.n_embd, config.n_embd)
        self.dropout = config.dropout
        self.attention = config.attention

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, is_causal: bool,
                cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        B, L, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q = q.view(B, L, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, L, hs)
        k = k.view(B, L, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, L, hs)
        v = v.view(B, L, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, L, hs)
        if self.qk_norm:
            q, k = F.rms_norm(q, (q.shape[-1],)), F.rms_norm(k, (k.shape[-1],))
        if cache is not None:
            k, v = cache.write(layer, k, v)  # (B, nh, length + L, hs)
            if k.dtype != q.dtype:
                k, v = k.to(q.dtype), v.to(q.dtype)
        kernel = attention_kernel(self.attention, x.device)
        y = attend(q, k, v, mask, is_causal, self.dropout if self.training else 0.0, kernel)  # (B, nh, L, hs)
        return self.proj(y.transpose(1, 2).reshape(B, L, C))


class ReLUSquared(nn.Module):
    """relu(x)**2: as cheap as ReLU, and small models learn faster with it than with GELU (modded-nanogpt)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x).square()


class Block(nn.Module):
    def __init__(self, config: DALLEConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = SelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = nn.Sequential(
            nn.Linear(config.n_embd, 4 * config.n_embd),
            nn.GELU(approximate="tanh") if config.mlp == "gelu" else ReLUSquared(),
            nn.Linear(4 * config.n_embd, config.n_embd),
            nn.Dropout(config.dropout),
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, is_causal: bool,
                cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), mask, is_causal, cache, layer)
        return x + self.mlp(self.ln_2(x))


# --- the model -----------------------------------------------------------------------------------


class DALLE(nn.Module):
    def __init__(self, config: DALLEConfig):
        super().__init__()
        for name in ("image_vocab_size", "image_grid_size", "image_size"):
            if getattr(config, name) < 1:
                raise ConfigError(f"model.{name} is {getattr(config, name)}; resolve it from the VAE first")
        self.config = config
        C = config.n_embd
        self.text_embedding = nn.Embedding(config.text_token_count, C)
        self.image_embedding = nn.Embedding(config.image_vocab_size, C)
        self.text_position = nn.Parameter(torch.zeros(config.text_seq_len, C))
        self.image_row = nn.Parameter(torch.zeros(config.image_grid_size, C))
        self.image_col = nn.Parameter(torch.zeros(config.image_grid_size, C))
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(C)
        self.text_head = nn.Linear(C, config.text_token_count, bias=False)
        self.image_head = nn.Linear(C, config.image_vocab_size, bias=False)
        for kind in sorted(set(config.attention_types)):
            mask = attention_mask(kind, config.text_seq_len, config.image_grid_size, config.conv_kernel_size)
            self.register_buffer(f"mask_{kind}", mask, persistent=False)
        if "full" not in config.attention_types:
            full = attention_mask("full", config.text_seq_len, config.image_grid_size)
            self.register_buffer("mask_full", full, persistent=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("attn.proj.weight") or name.endswith("mlp.2.weight"):
                if config.proj_init == "zero":  # each block starts as the identity
                    nn.init.zeros_(p)
                else:
                    nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        for p in (self.text_position, self.image_row, self.image_col):
            nn.init.normal_(p, mean=0.0, std=0.02)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def hidden_matrices(self) -> list[nn.Parameter]:
        """The weight matrices inside the blocks (attention and MLP), as opposed to embeddings, heads,
        norms and biases: the parameters an optimizer such as Muon treats as linear maps."""
        return [m.weight for block in self.blocks for m in block.modules() if isinstance(m, nn.Linear)]

    def embedding_parameters(self) -> list[nn.Parameter]:
        """Token and position embeddings: the parameters `train.embed_lr_scale` applies to."""
        return [self.text_embedding.weight, self.image_embedding.weight, self.text_position, self.image_row,
                self.image_col]

    def text_ids(self, text: torch.Tensor) -> torch.Tensor:
        """Tokenizer ids (B, T) -> embedding ids with per-position padding tokens (B, T)."""
        return text_ids_with_padding(text, self.config.text_pad_id, self.config.text_vocab_size)

    def _embed(self, tokens: torch.Tensor, start: int) -> torch.Tensor:
        """Tokens (B, m) at stream positions [start, start + m) -> embeddings (B, m, C).

        Text tokens here are embedding ids (padding already replaced), image tokens codebook indices.
        """
        T, G = self.config.text_seq_len, self.config.image_grid_size
        m = tokens.shape[1]
        text_count = max(0, min(T, start + m) - start)
        parts = []
        if text_count:
            text = tokens[:, :text_count]
            parts.append(self.text_embedding(text) + self.text_position[start : start + text_count])
        if text_count < m:
            first = start + text_count - T  # image index of the first image token in the chunk
            index = torch.arange(first, first + m - text_count, device=tokens.device)
            position = self.image_row[index // G] + self.image_col[index % G]  # (m_img, C)
            parts.append(self.image_embedding(tokens[:, text_count:]) + position)
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def _layer_mask(self, layer: int, start: int, m: int) -> tuple[torch.Tensor | None, bool]:
        """(mask, is_causal) for queries at [start, start + m) over keys [0, start + m)."""
        kind = self.config.layer_attention(layer)
        if kind == "full":
            if start == 0:
                return None, True
            if m == 1:
                return None, False  # one new token sees everything before it
        mask: torch.Tensor = getattr(self, f"mask_{kind}")
        return mask[start : start + m, : start + m], False

    def forward(self, text: torch.Tensor, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """text (B, T) tokenizer ids, image (B, n) codebook indices with n < image_token_count.

        Returns (text_logits (B, T - 1, text_token_count) predicting text tokens 1..T-1,
        image_logits (B, n + 1, image_vocab_size) predicting image tokens 0..n).
        For training pass ``image[:, :-1]``.
        """
        T = self.config.text_seq_len
        if text.shape[1] != T:
            raise ValueError(f"text has {text.shape[1]} tokens; the model takes text_seq_len={T}")
        if image.shape[1] >= self.config.image_token_count:
            raise ValueError(
                f"image has {image.shape[1]} tokens; pass at most {self.config.image_token_count - 1} "
                "(the last image token is only predicted, never read)"
            )
        tokens = torch.cat([self.text_ids(text), image], dim=1)  # (B, T + n)
        x = self.drop(self._embed(tokens, 0))
        for layer, block in enumerate(self.blocks):
            mask, is_causal = self._layer_mask(layer, 0, tokens.shape[1])
            x = block(x, mask, is_causal)
        x = self.ln_f(x)
        return self.text_head(x[:, : T - 1]), self.image_head(x[:, T - 1 :])

    def new_cache(self, batch_size: int, dtype: torch.dtype | None = None) -> KVCache:
        c = self.config
        weight = self.image_head.weight
        return KVCache(c.n_layer, batch_size, c.n_head, c.seq_len, c.n_embd // c.n_head, weight.device,
                       dtype or weight.dtype)

    def forward_cached(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Run the next chunk of the stream, tokens (B, m) at positions [cache.length, cache.length + m),
        through the network, storing its keys and values. Text tokens are tokenizer ids.

        Returns the image logits (B, image_vocab_size) of the chunk's last position, i.e. the
        distribution of the image token that follows (meaningful once the whole text is in).
        """
        start, m = cache.length, tokens.shape[1]
        T = self.config.text_seq_len
        if start < T:
            text_count = min(T, start + m) - start
            positions = torch.arange(start, start + text_count, device=tokens.device)
            text = tokens[:, :text_count]
            text = torch.where(text == self.config.text_pad_id, self.config.text_vocab_size + positions, text)
            tokens = torch.cat([text, tokens[:, text_count:]], dim=1)
        x = self._embed(tokens, start)
        for layer, block in enumerate(self.blocks):
            mask, is_causal = self._layer_mask(layer, start, m)
            x = block(x, mask, is_causal, cache, layer)
        cache.length = start + m
        return self.image_head(self.ln_f(x[:, -1]))


# --- loading -------------------------------------------------------------------------------------


def vae_identity(vae_dir: str | os.PathLike) -> str:
    """sha256 of a VAE directory's weights: the identity that token caches and models are keyed by."""
    path = Path(vae_dir) / WEIGHTS_FILE
    if not path.is_file():
        raise ModelFileError(f"{vae_dir} has no {WEIGHTS_FILE}; pass a trained VAE directory")
    return file_sha256(path)


@dataclass(frozen=True)
class DalleRun:
    """A trained DALL-E with what generation needs beside it: the frozen VAE whose tokens it draws, the
    tokenizer of its captions and the words those captions used (None when the run did not record them)."""

    model: DALLE
    vae: DiscreteVAE
    tokenizer: Tokenizer
    caption_words: frozenset[str] | None = None

    @property
    def config(self) -> DALLEConfig:
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self.model.image_head.weight.device


def load_dalle(run_dir: str | os.PathLike, device: torch.device | str | None = None) -> DalleRun:
    """A trained DALL-E from a run (or model) directory, in eval mode, with its VAE and tokenizer."""
    run_dir = Path(run_dir)
    config = from_dict(DALLEConfig, read_config(run_dir, kind="dalle"), "model")
    model = DALLE(config)
    load_state_dict_strict(model, load_weights(run_dir), str(run_dir / WEIGHTS_FILE))
    vae_dir = run_dir / VAE_SUBDIR
    if not (vae_dir / WEIGHTS_FILE).is_file():
        vae_dir = Path(config.vae_dir)
        if not config.vae_dir or not (vae_dir / WEIGHTS_FILE).is_file():
            raise ModelFileError(f"{run_dir} has no {VAE_SUBDIR}/ and its VAE {config.vae_dir!r} is gone")
    if config.vae_id and vae_identity(vae_dir) != config.vae_id:
        raise ModelFileError(f"the VAE at {vae_dir} is not the one {run_dir} was trained with (weights differ)")
    vae = load_vae(vae_dir, device=device)
    tokenizer_path = run_dir / TOKENIZER_FILE
    if not tokenizer_path.is_file():
        raise ModelFileError(f"{run_dir} has no {TOKENIZER_FILE}")
    tokenizer = Tokenizer.load(tokenizer_path)
    if tokenizer.vocab_size != config.text_vocab_size:
        raise ModelFileError(
            f"{tokenizer_path} has {tokenizer.vocab_size} tokens, the model expects {config.text_vocab_size}"
        )
    words_path = run_dir / CAPTION_WORDS_FILE
    caption_words = frozenset(load_json(words_path)) if words_path.is_file() else None
    if device is not None:
        model.to(device)
    return DalleRun(model.eval(), vae, tokenizer, caption_words)
