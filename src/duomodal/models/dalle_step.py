"""Fast sampling steps for DALL-E: one new image token per row through the KV cache.

``StepDecoder`` runs the same network as ``DALLE.forward_cached`` with the weights laid out once for a
handful of rows; the sampler (``models/sampling.py``) uses it for every single-token step.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from duomodal.device import bf16_supported
from duomodal.models.dalle import DALLE
from duomodal.models.dalle_attention import mask_bias


def packed_linears_available(device: torch.device, dtype: torch.dtype = torch.float32) -> bool:
    """Whether oneDNN can run linears on weights of `dtype` packed once (CPU builds with mkldnn; bf16 only
    where the CPU has it natively)."""
    return (device.type == "cpu" and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and (dtype != torch.bfloat16 or bf16_supported(device)))


class StepLinear:
    """A linear layer for a few rows at a time, optionally fused with tanh-GELU or a residual add.

    On the CPU the weight is packed once into oneDNN's blocked layout for the expected number of
    rows (the ``torch.ops.mkldnn`` kernels torch.compile uses on the CPU); otherwise ``addmm`` runs
    on a transposed, contiguous copy, the faster layout for a few rows.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, rows: int, packed: bool,
                 activation: str = "none"):
        self.bias, self.packed, self.activation = bias, packed, activation
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, rows) if packed else weight.t().contiguous()

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, in) -> x W^T + b, through the activation ("none", "gelu" or "relu2"), plus `residual`
        (B, out) if given."""
        if self.packed and residual is not None and self.activation == "none":
            return torch.ops.mkldnn._linear_pointwise.binary(x, residual, self.weight, self.bias, "add")
        if self.packed:
            fused = {"none": ("none", ""), "gelu": ("gelu", "tanh"), "relu2": ("relu", "")}[self.activation]
            y = torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, fused[0], [], fused[1])
        else:
            y = x @ self.weight if self.bias is None else torch.addmm(self.bias, x, self.weight)
            if self.activation == "gelu":
                y = F.gelu(y, approximate="tanh")
            elif self.activation == "relu2":
                y = F.relu(y)
        if self.activation == "relu2":
            y = y.square()
        return y if residual is None else y + residual


class StepDecoder:
    """One image token per row per step through a DALLE and a KV cache, laid out for tiny batches.

    A sampling step multiplies a handful of rows by every weight of the network, so its cost is
    per-operator overhead and weight traffic, not arithmetic. The decoder prepares each linear once
    (`StepLinear`: packed for oneDNN on the CPU, GELU and the residual adds fused, the attention scale
    folded into the query weights), precomputes the image position embeddings and each sparse layer's
    additive mask, and runs attention for the one query as two small batched matmuls instead of
    ``scaled_dot_product_attention`` (whose CPU kernel is built for long query blocks). Prompts and runs
    of fixed tokens still go through ``DALLE.forward_cached`` on the same ``cache``; ``step`` gives the
    logits it would.
    packed: None = oneDNN packing where available; False = addmm everywhere.
    """

    def __init__(self, model: DALLE, batch_size: int, dtype: torch.dtype | None = None, packed: bool | None = None):
        c = model.config
        self.config = c
        self.cache = model.new_cache(batch_size, dtype)
        dtype = self.cache.keys.dtype
        self.packed = packed_linears_available(self.cache.keys.device, dtype) if packed is None else packed

        def linear(module: nn.Linear, activation: str = "none", scale_first: int = 0) -> StepLinear:
            """`module` as a StepLinear; its first `scale_first` outputs (the queries) scaled by 1/sqrt(hs)."""
            weight = module.weight.detach().to(dtype)
            bias = None if module.bias is None else module.bias.detach().to(dtype)
            if scale_first:
                weight = weight.clone()
                weight[:scale_first] *= self.scale
                if bias is not None:
                    bias = bias.clone()
                    bias[:scale_first] *= self.scale
            return StepLinear(weight, bias, batch_size, self.packed, activation)

        def norm(module: nn.LayerNorm) -> tuple[torch.Tensor, torch.Tensor, float]:
            return module.weight.detach().to(dtype), module.bias.detach().to(dtype), module.eps

        self.scale = 1.0 / math.sqrt(c.n_embd // c.n_head)
        # folded into the query weights, unless the queries are normalised after them (qk_norm)
        scale_first = 0 if c.qk_norm else c.n_embd
        self.layers = [
            (norm(b.ln_1), linear(b.attn.qkv, scale_first=scale_first), linear(b.attn.proj),
             norm(b.ln_2), linear(b.mlp[0], activation=c.mlp), linear(b.mlp[2]))
            for b in model.blocks
        ]
        biases = {}
        for layer in range(c.n_layer):
            kind = c.layer_attention(layer)
            if kind != "full" and kind not in biases:
                mask: torch.Tensor = getattr(model, f"mask_{kind}")
                biases[kind] = mask_bias(mask, dtype)
        self.mask_bias = [biases.get(c.layer_attention(layer)) for layer in range(c.n_layer)]
        G = c.image_grid_size
        self.embedding = model.image_embedding.weight.detach().to(dtype)
        positions = model.image_row.detach()[:, None] + model.image_col.detach()[None, :]  # (G, G, C)
        self.positions = positions.reshape(G * G, -1).to(dtype)
        self.ln_f = norm(model.ln_f)
        self.head = linear(model.image_head)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Image tokens (B,) at the cache's next position -> logits (B, image_vocab_size) of the token after."""
        cache, c = self.cache, self.config
        pos = cache.length
        index = pos - c.text_seq_len  # image index of the new token
        if not 0 <= index < c.image_token_count - 1:
            raise ValueError(f"step takes image tokens 0..{c.image_token_count - 2} after the text; the cache is at "
                             f"stream position {pos}")
        B, C, nh = tokens.shape[0], c.n_embd, c.n_head
        x = self.embedding[tokens] + self.positions[index]  # (B, C)
        for layer, (ln_1, qkv, proj, ln_2, fc, out) in enumerate(self.layers):
            q, k, v = qkv(F.layer_norm(x, (C,), *ln_1[:2], ln_1[2])).view(B, 3, nh, C // nh).unbind(1)  # (B, nh, hs)
            if c.qk_norm:
                q, k = F.rms_norm(q, (C // nh,)) * self.scale, F.rms_norm(k, (C // nh,))
            cache.keys[layer, :, :, pos] = k
            cache.values[layer, :, :, pos] = v
            keys = cache.keys[layer, :, :, : pos + 1]  # (B, nh, pos + 1, hs)
            scores = torch.matmul(q[:, :, None, :], keys.transpose(-1, -2))  # (B, nh, 1, pos + 1), q pre-scaled
            if self.mask_bias[layer] is not None:
                scores = scores + self.mask_bias[layer][pos, : pos + 1]
            y = torch.matmul(torch.softmax(scores, dim=-1), cache.values[layer, :, :, : pos + 1])  # (B, nh, 1, hs)
            x = proj(y.view(B, C), residual=x)
            x = out(fc(F.layer_norm(x, (C,), *ln_2[:2], ln_2[2])), residual=x)
        cache.length = pos + 1
        return self.head(F.layer_norm(x, (C,), *self.ln_f[:2], self.ln_f[2]))
