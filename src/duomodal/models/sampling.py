"""DALL-E's token sampler: the next image token, one step at a time, through the KV cache.

Used by `duomodal.generate` (text -> images, completion, region edits) and by training's sample grids.

Each image has its own seed: its random numbers are drawn up front from a generator seeded with it, and a
token is chosen by inverse-CDF lookup, so an image depends on its seed only, not on the batch it was
drawn in (up to floating-point differences between batch shapes).

Positions can be fixed to given tokens (the rest are sampled in raster order, each conditioned on all
tokens before it): keeping the first rows is the paper's image completion; keeping everything outside
a box is a region edit. Tokens after the last free position are copied and never run through the model.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from duomodal.device import PRECISIONS, precision_dtype, resolve_precision
from duomodal.models.dalle import DALLE
from duomodal.models.dalle_step import StepDecoder

MAX_BATCH_SIZE = 512
# The defaults of every user-facing sampling entry point (`duomodal generate` / `edit`, the REST API,
# generate_images / edit_image / complete_image, the training sample grids): the 64 likeliest image tokens
# and classifier-free guidance 3 drew the prompted icon's shape more often than plain sampling
# (docs/dalle.md). `--top-k 0 --guidance 1` is plain sampling.
DEFAULT_TOP_K = 64
DEFAULT_GUIDANCE = 3.0


class GenerationError(ValueError):
    """A prompt, image, box or sampling option that cannot be used; says what to change."""


def check_sampling(temperature: float, top_k: int | None, top_p: float | None, guidance: float) -> None:
    if not (temperature >= 0 and math.isfinite(temperature)):
        raise GenerationError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise GenerationError(f"top_k must be at least 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise GenerationError(f"top_p must be in (0, 1], got {top_p}")
    if not (guidance >= 0 and math.isfinite(guidance)):
        raise GenerationError(f"guidance must be >= 0 (1 = plain conditional sampling), got {guidance}")


UNSEEN_WORDS = ("drop", "keep")


@dataclass(frozen=True)
class SamplingOptions:
    """How images are sampled; image i of a call is drawn from seed + i alone."""

    temperature: float = 1.0  # 0 = greedy
    top_k: int | None = DEFAULT_TOP_K  # sample among the k likeliest tokens; None = all
    top_p: float | None = None  # nucleus sampling: the likeliest tokens holding this much mass; None = off
    guidance: float = DEFAULT_GUIDANCE  # classifier-free guidance scale; 1 = off
    seed: int = 0
    batch_size: int = 16  # images sampled together
    precision: str = "auto"  # "auto" (from the hardware: duomodal.device), "fp32", "bf16" or "fp16" (CUDA)
    unseen_words: str = "drop"  # prompt words no training caption had: "drop" from the conditioning, or "keep"

    def __post_init__(self) -> None:
        check_sampling(self.temperature, self.top_k, self.top_p, self.guidance)
        if self.unseen_words not in UNSEEN_WORDS:
            raise GenerationError(f"unseen_words {self.unseen_words!r} is not one of {', '.join(UNSEEN_WORDS)}")
        if not 1 <= self.batch_size <= MAX_BATCH_SIZE:
            raise GenerationError(f"batch_size must be between 1 and {MAX_BATCH_SIZE}, got {self.batch_size}")
        if self.precision not in PRECISIONS:
            raise GenerationError(f"precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")


def inference_dtype(device: torch.device, precision: str) -> torch.dtype:
    """The weight and activation dtype for sampling at `precision` on `device` (the hardware's rule,
    duomodal.device.resolve_precision). Raises GenerationError for a precision `device` cannot run."""
    if precision not in PRECISIONS:
        raise GenerationError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    try:
        return precision_dtype(resolve_precision(precision, device))
    except ValueError as e:
        raise GenerationError(str(e)) from None


def inference_twin(model: DALLE, dtype: torch.dtype) -> DALLE:
    """`model` itself when it already has `dtype`, else an eval copy with its weights cast to `dtype`.

    Sampling runs thousands of tiny steps: casting the weights once beats autocast, which would
    cast every weight again at every step."""
    weight = model.image_head.weight
    if weight.dtype == dtype:
        return model
    twin = DALLE(model.config).to(device=weight.device, dtype=dtype)
    twin.load_state_dict(model.state_dict())
    return twin.eval()


# --- token sampling ------------------------------------------------------------------------------


def row_uniforms(seeds: list[int], count: int) -> torch.Tensor:
    """(len(seeds), count) uniforms in [0, 1), row i from a generator seeded with seeds[i]."""
    rows = [torch.rand(count, generator=torch.Generator().manual_seed(int(seed)), dtype=torch.float64)
            for seed in seeds]
    return torch.stack(rows) if rows else torch.zeros(0, count, dtype=torch.float64)


def choose_tokens(logits: torch.Tensor, uniforms: torch.Tensor, temperature: float,
                  top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Pick one token per row of `logits` (B, V) with `uniforms` (B,) by inverse CDF; temperature 0 = argmax.

    With top-k or top-p the candidates are ranked likeliest first and the CDF runs over that ranking
    (over the k kept tokens only, with top-k), so a step costs the same whatever the vocabulary size."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    order = None  # candidate -> token id, when the candidates are ranked
    if top_k is not None and top_k < logits.shape[-1]:
        logits, order = torch.topk(logits, top_k, dim=-1)  # (B, k), likeliest first
    elif top_p is not None and top_p < 1:
        logits, order = logits.sort(dim=-1, descending=True)
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1:
        before = probs.cumsum(dim=-1) - probs  # mass of the candidates ranked above
        probs = probs.masked_fill(before >= top_p, 0.0)  # the first candidate always stays
    cdf = probs.double().cumsum(dim=-1)
    target = (uniforms.to(cdf.device) * cdf[:, -1]).unsqueeze(-1)  # (B, 1)
    picks = torch.searchsorted(cdf, target, right=True).clamp_(max=cdf.shape[-1] - 1)  # (B, 1)
    return (picks if order is None else order.gather(-1, picks)).squeeze(-1)


@torch.inference_mode()
def sample_image_tokens(
    model: DALLE,
    text: torch.Tensor,
    uniforms: torch.Tensor | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    guidance: float = 1.0,
    empty_text: torch.Tensor | None = None,
    fixed: torch.Tensor | None = None,
    fixed_mask: torch.Tensor | None = None,
    use_cache: bool = True,
    precision: str = "auto",
    row_done: Callable[[torch.Tensor, int], None] | None = None,
) -> torch.Tensor:
    """Image tokens (B, N) for captions `text` (B, T) (tokenizer ids).

    uniforms (B, N): the random numbers of each row (`row_uniforms`); not needed when temperature is 0.
    guidance: classifier-free guidance scale; with `empty_text` (T,) the batch runs conditional and
    empty-caption rows together and samples from ``uncond + guidance * (cond - uncond)``.
    fixed (B, N) with fixed_mask (N,) bool: positions taken from `fixed` instead of sampled.
    use_cache=False recomputes the whole prefix every step (the slow twin, for tests and benchmarks).
    row_done(tokens (B, N), rows): called each time sampling moves on from a token row with free
    positions (not after the last one), with the tokens so far (free positions not yet sampled hold
    `fixed`, or 0) and the number of rows before the next free position; for previews and for
    stopping early (an exception it raises ends the sampling).
    """
    check_sampling(temperature, top_k, top_p, guidance)
    config = model.config
    N, B, grid = config.image_token_count, text.shape[0], config.image_grid_size
    device = model.image_head.weight.device
    if guidance != 1.0 and empty_text is None:
        raise GenerationError("classifier-free guidance needs the empty caption (empty_text)")
    if uniforms is None:
        if temperature != 0:
            raise GenerationError("sampling with temperature > 0 needs uniforms (see row_uniforms)")
        uniforms = torch.zeros(B, N, dtype=torch.float64)
    if uniforms.shape != (B, N):
        raise GenerationError(f"uniforms must have shape ({B}, {N}), got {tuple(uniforms.shape)}")
    text = text.to(device)
    if empty_text is not None:
        text = torch.cat([text, empty_text.to(device)[None, :].expand(B, -1)])  # (2B, T) cond + uncond
    tokens = torch.zeros(B, N, dtype=torch.long, device=device) if fixed is None else fixed.to(device).clone()
    free = torch.ones(N, dtype=torch.bool) if fixed_mask is None else ~fixed_mask.cpu()
    free_positions = free.nonzero().flatten().tolist()
    if not free_positions:
        return tokens
    rows = text.shape[0]

    def both(chunk: torch.Tensor) -> torch.Tensor:
        return chunk if rows == B else torch.cat([chunk, chunk])

    original, was_training = model, model.training
    model.eval()
    model = inference_twin(model, inference_dtype(device, precision))
    # `precision` decides the dtype: a caller's autocast (the training loop writing sample grids) must not
    with torch.autocast(device.type, enabled=False):
        try:
            first = free_positions[0]
            if use_cache:
                decoder = StepDecoder(model, rows)
                logits = model.forward_cached(torch.cat([text, both(tokens[:, :first])], dim=1), decoder.cache)
            else:
                logits = model(text, both(tokens[:, :first]))[1][:, -1]
            for i, k in enumerate(free_positions):
                logits = logits.float()
                if rows != B:
                    cond, uncond = logits[:B], logits[B:]
                    logits = uncond + guidance * (cond - uncond)
                tokens[:, k] = choose_tokens(logits, uniforms[:, k], temperature, top_k, top_p)
                if i + 1 == len(free_positions):
                    break
                upto = free_positions[i + 1]
                if row_done is not None and upto // grid != k // grid:
                    row_done(tokens, k // grid + 1)
                if use_cache and upto == k + 1:  # one new token: the decoder's fast step
                    logits = decoder.step(both(tokens[:, k]))
                elif use_cache:  # the new token and the run of fixed tokens after it
                    logits = model.forward_cached(both(tokens[:, k:upto]), decoder.cache)
                else:
                    logits = model(text, both(tokens[:, :upto]))[1][:, -1]
        finally:
            original.train(was_training)
    return tokens
