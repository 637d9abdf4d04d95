"""The attention of the DALL-E transformer: which positions may see which (the masks of each attention
type), the key-value cache of cached sampling, and the two attention kernels."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

ATTENTION_TYPES = ("full", "axial_row", "axial_col", "conv_like")


def attention_mask(kind: str, text_seq_len: int, grid_size: int, conv_kernel_size: int = 5) -> torch.Tensor:
    """Boolean (S, S) mask over the whole stream, S = text_seq_len + grid_size**2; True = may attend.

    Causal everywhere. Text tokens see the text before them. An image token sees all text tokens and,
    among the image tokens up to itself: all (full), those of its row (axial_row), of its column
    (axial_col), or those within conv_kernel_size // 2 rows and columns (conv_like).
    """
    if kind not in ATTENTION_TYPES:
        raise ValueError(f"attention type {kind!r} is not one of {', '.join(ATTENTION_TYPES)}")
    S = text_seq_len + grid_size * grid_size
    pos = torch.arange(S)
    causal = pos[None, :] <= pos[:, None]  # (S, S) query i, key j
    is_image = pos >= text_seq_len
    both_image = is_image[:, None] & is_image[None, :]
    image_index = (pos - text_seq_len).clamp(min=0)
    row, col = image_index // grid_size, image_index % grid_size
    if kind == "full":
        pattern = torch.ones(S, S, dtype=torch.bool)
    elif kind == "axial_row":
        pattern = row[:, None] == row[None, :]
    elif kind == "axial_col":
        pattern = col[:, None] == col[None, :]
    else:
        radius = conv_kernel_size // 2
        pattern = ((row[:, None] - row[None, :]).abs() <= radius) & ((col[:, None] - col[None, :]).abs() <= radius)
    return causal & (~both_image | pattern)


class KVCache:
    """Keys and values of every layer for one batch, preallocated to the full stream, written in place."""

    def __init__(self, n_layer: int, batch_size: int, n_head: int, max_len: int, head_dim: int,
                 device: torch.device | str, dtype: torch.dtype):
        shape = (n_layer, batch_size, n_head, max_len, head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.length = 0  # positions written so far (the next chunk starts here)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, nh, m, hs) at positions [length, length + m); return all keys/values so far."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; cannot write up to {end}")
        self.keys[layer, :, :, self.length : end] = k
        self.values[layer, :, :, self.length : end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]


def mask_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean attention mask (True = may attend) as an additive bias: 0 where allowed, -inf elsewhere."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, is_causal: bool,
           dropout_p: float = 0.0, kernel: str = "sdpa") -> torch.Tensor:
    """Attention of q (B, nh, L, hs) over k, v (B, nh, S, hs) with a boolean mask (L, S) or the causal one.

    kernel "sdpa": ``scaled_dot_product_attention``. "eager": the scores computed explicitly, in the
    inputs' dtype (the scale applied to the queries, not the larger scores; torch's CPU softmax
    accumulates in fp32 inside the kernel) with the mask added inside the matmul; at these short
    sequences it is the faster one on a CPU, where the fused kernel's backward dominates a step
    (docs/kernels.md). Both compute the same function.
    """
    if kernel == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=dropout_p)
    L, S = q.shape[-2], k.shape[-2]
    if is_causal:
        mask = torch.ones(L, S, dtype=torch.bool, device=q.device).tril()  # as SDPA: top-left aligned
    B, nh, hs = q.shape[0], q.shape[1], q.shape[-1]
    q = (q * (1.0 / math.sqrt(hs))).reshape(B * nh, L, hs)
    k = k.transpose(-2, -1).reshape(B * nh, hs, S)
    if mask is None:
        scores = torch.bmm(q, k).view(B, nh, L, S)
    else:  # the mask as an additive bias inside the matmul: no masking pass over the scores, none in backward
        scores = torch.baddbmm(mask_bias(mask, q.dtype), q, k).view(B, nh, L, S)
    weights = F.dropout(torch.softmax(scores, dim=-1), p=dropout_p, training=dropout_p > 0)
    return weights @ v
