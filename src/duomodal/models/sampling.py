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
import typing
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from duomodal.device import PRECISIONS, precision_dtype, resolve_precision
from duomodal.models.dalle import DALLE
from duomodal.models.dalle_step import StepDecoder


class GenerationError(ValueError):
    """A prompt, image, box or sampling option that cannot be used; says what to change."""


# --- the sampling contract -----------------------------------------------------------------------
# `SamplingOptions` is the one declaration of the sampling settings: each field's default, bounds
# and help live in its `Setting`. The command line (`duomodal generate|edit|eval`), the REST bodies
# and forms, the job settings the server echoes and the web page all derive their flags and fields
# from `SETTINGS`; a setting added here reaches every entry point.

SAMPLING, SEED, RUNNER = "sampling", "seed", "runner"  # who chooses a setting (see Setting.role)


@dataclass(frozen=True)
class Setting:
    """One field of `SamplingOptions`: its bounds and how the entry points offer it."""

    name: str
    kind: type  # int, float or str (the field's type, None aside)
    optional: bool  # None is allowed: the setting is off
    default: Any
    help: str
    role: str = SAMPLING  # SAMPLING: chosen per call everywhere; SEED: the call's seed; RUNNER: whoever runs it
    minimum: float | None = None
    maximum: float | None = None
    above_minimum: bool = False  # the minimum itself is refused: (minimum, maximum]
    choices: tuple[str, ...] = ()
    switch: str | None = None  # a two-choice setting offered as a yes/no of this name; yes = choices[1]
    off: int | None = None  # what the command line writes for None (top_k's 0 = every token)

    @property
    def public_name(self) -> str:
        """The name of the flag or field that offers it (`keep_unseen_words` for unseen_words)."""
        return self.switch or self.name

    def public(self, value: Any) -> Any:
        """`value` of the field as the flag or field states it (a switch: a bool)."""
        return value == self.choices[1] if self.switch else value

    def from_public(self, value: Any) -> Any:
        """The field value of a flag's or field's `value` (the inverse of `public`)."""
        if self.switch:
            return self.choices[1] if value else self.choices[0]
        return None if self.off is not None and value == self.off else value

    def bounds_text(self) -> str:
        low = "(" if self.above_minimum else "["
        return f"in {low}{_number(self.minimum)}, {_number(self.maximum)}]"

    def check(self, value: Any) -> None:
        """Raise GenerationError naming the setting, the bounds and `value` when `value` is out of them."""
        if value is None and self.optional:
            return
        if self.choices:
            if value not in self.choices:
                raise GenerationError(f"{self.name} {value!r} is not one of {', '.join(self.choices)}")
            return
        number_ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if self.kind is int and not isinstance(value, int):
            number_ok = False
        below = number_ok and (value <= self.minimum if self.above_minimum else value < self.minimum)
        if not number_ok or below or value > self.maximum:
            raise GenerationError(f"{self.name} must be {self.bounds_text()}, got {value}")


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _setting(default: Any, help: str, **bounds: Any) -> Any:
    return field(default=default, metadata={"setting": (help, bounds)})


@dataclass(frozen=True)
class SamplingOptions:
    """How images are sampled; image i of a call is drawn from seed + i alone.

    The defaults are every entry point's defaults: the 64 likeliest image tokens and classifier-free
    guidance 3 drew the prompted icon's shape more often than plain sampling (docs/dalle.md);
    top_k None with guidance 1 is plain sampling."""

    temperature: float = _setting(1.0, "softmax temperature; 0 = greedy", minimum=0, maximum=5)
    top_k: int | None = _setting(64, "sample among the k likeliest image tokens; none (0 on the command line) "
                                 "= every token", minimum=1, maximum=65536, off=0)
    top_p: float | None = _setting(None, "nucleus sampling: sample among the likeliest tokens holding this much "
                                   "probability; none = off", minimum=0, maximum=1, above_minimum=True)
    min_p: float | None = _setting(None, "min-p sampling: keep the tokens at least this fraction as likely as the "
                                   "likeliest; none = off", minimum=0, maximum=1)
    guidance: float = _setting(3.0, "classifier-free guidance scale; 1 = off, higher follows the prompt more "
                               "closely until the images degrade", minimum=0, maximum=20)
    unseen_words: str = _setting("drop", "condition on prompt words no training caption had too (by default they "
                                 "are left out: the model never learnt them)", choices=("drop", "keep"),
                                 switch="keep_unseen_words")
    seed: int = _setting(0, "image i uses seed + i", role=SEED, minimum=0, maximum=2**31 - 1)
    batch_size: int = _setting(16, "images sampled at once", role=RUNNER, minimum=1, maximum=512)
    precision: str = _setting("auto", "auto (from the hardware: duomodal.device), fp32, bf16 or fp16 (CUDA)",
                              role=RUNNER, choices=PRECISIONS)

    def __post_init__(self) -> None:
        for setting in SETTINGS:
            setting.check(getattr(self, setting.name))

    def public(self, role: str = SAMPLING) -> dict[str, Any]:
        """The settings of `role` under their flag and field names (for records and echoes)."""
        return {s.public_name: s.public(getattr(self, s.name)) for s in SETTINGS if s.role == role}


def _settings() -> tuple[Setting, ...]:
    hints = typing.get_type_hints(SamplingOptions)
    settings = []
    for f in fields(SamplingOptions):
        help, bounds = f.metadata["setting"]
        types = typing.get_args(hints[f.name]) or (hints[f.name],)
        kind = next(t for t in types if t is not type(None))
        settings.append(Setting(f.name, kind, type(None) in types, f.default, help, **bounds))
    return tuple(settings)


SETTINGS = _settings()
SETTING = {s.name: s for s in SETTINGS}


def sampling_settings(*roles: str) -> tuple[Setting, ...]:
    """The settings of these roles (default: those chosen per call), in declaration order."""
    return tuple(s for s in SETTINGS if s.role in (roles or (SAMPLING,)))


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


def choose_tokens(logits: torch.Tensor, uniforms: torch.Tensor, options: SamplingOptions) -> torch.Tensor:
    """Pick one token per row of `logits` (B, V) with `uniforms` (B,) by inverse CDF, under the
    temperature, top-k, top-p and min-p of `options`; temperature 0 = argmax.

    With top-k or top-p the candidates are ranked likeliest first and the CDF runs over that ranking
    (over the k kept tokens only, with top-k), so a step costs the same whatever the vocabulary size."""
    if options.temperature == 0:
        return logits.argmax(dim=-1)
    top_k, top_p = options.top_k, options.top_p
    logits = logits.float() / options.temperature
    order = None  # candidate -> token id, when the candidates are ranked
    if top_k is not None and top_k < logits.shape[-1]:
        logits, order = torch.topk(logits, top_k, dim=-1)  # (B, k), likeliest first
    elif top_p is not None and top_p < 1:
        logits, order = logits.sort(dim=-1, descending=True)
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1:
        before = probs.cumsum(dim=-1) - probs  # mass of the candidates ranked above
        probs = probs.masked_fill(before >= top_p, 0.0)  # the first candidate always stays
    if options.min_p:
        floor = options.min_p * probs.max(dim=-1, keepdim=True).values  # (B, 1); the likeliest always stays
        probs = probs.masked_fill(probs < floor, 0.0)
    cdf = probs.double().cumsum(dim=-1)
    target = (uniforms.to(cdf.device) * cdf[:, -1]).unsqueeze(-1)  # (B, 1)
    picks = torch.searchsorted(cdf, target, right=True).clamp_(max=cdf.shape[-1] - 1)  # (B, 1)
    return (picks if order is None else order.gather(-1, picks)).squeeze(-1)


@dataclass
class _Batch:
    """What one call of `sample_image_tokens` samples: conditional (and, with guidance, empty-caption)
    text rows, the tokens so far and the positions left to sample."""

    text: torch.Tensor  # (B, T), or (2B, T): conditional rows, then empty-caption rows
    tokens: torch.Tensor  # (B, N)
    free_positions: list[int]

    def both(self, chunk: torch.Tensor) -> torch.Tensor:
        """`chunk` (B, ...) for every text row: repeated for the empty-caption rows."""
        return chunk if self.text.shape[0] == chunk.shape[0] else torch.cat([chunk, chunk])


def _batch(model: DALLE, text: torch.Tensor, options: SamplingOptions, uniforms: torch.Tensor | None,
           empty_text: torch.Tensor | None, fixed: torch.Tensor | None,
           fixed_mask: torch.Tensor | None) -> tuple[_Batch, torch.Tensor]:
    """The batch to sample and its uniforms (B, N), after checking the arguments fit together."""
    N, B = model.config.image_token_count, text.shape[0]
    device = model.image_head.weight.device
    if options.guidance != 1.0 and empty_text is None:
        raise GenerationError("classifier-free guidance needs the empty caption (empty_text)")
    if uniforms is None:
        if options.temperature != 0:
            raise GenerationError("sampling with temperature > 0 needs uniforms (see row_uniforms)")
        uniforms = torch.zeros(B, N, dtype=torch.float64)
    if uniforms.shape != (B, N):
        raise GenerationError(f"uniforms must have shape ({B}, {N}), got {tuple(uniforms.shape)}")
    text = text.to(device)
    if empty_text is not None:
        text = torch.cat([text, empty_text.to(device)[None, :].expand(B, -1)])  # (2B, T) cond + uncond
    tokens = torch.zeros(B, N, dtype=torch.long, device=device) if fixed is None else fixed.to(device).clone()
    free = torch.ones(N, dtype=torch.bool) if fixed_mask is None else ~fixed_mask.cpu()
    return _Batch(text, tokens, free.nonzero().flatten().tolist()), uniforms


@torch.inference_mode()
def sample_image_tokens(
    model: DALLE,
    text: torch.Tensor,
    options: SamplingOptions,
    uniforms: torch.Tensor | None = None,
    *,
    empty_text: torch.Tensor | None = None,
    fixed: torch.Tensor | None = None,
    fixed_mask: torch.Tensor | None = None,
    use_cache: bool = True,
    row_done: Callable[[torch.Tensor, int], None] | None = None,
) -> torch.Tensor:
    """Image tokens (B, N) for captions `text` (B, T) (tokenizer ids), sampled as `options` say
    (its temperature, top-k, top-p, guidance and precision; the seeds are in `uniforms`).

    uniforms (B, N): the random numbers of each row (`row_uniforms`); not needed when temperature is 0.
    empty_text (T,): the empty caption, needed for guidance other than 1: the batch runs conditional
    and empty-caption rows together and samples from ``uncond + guidance * (cond - uncond)``.
    fixed (B, N) with fixed_mask (N,) bool: positions taken from `fixed` instead of sampled.
    use_cache=False recomputes the whole prefix every step (the slow twin, for tests and benchmarks).
    row_done(tokens (B, N), rows): called each time sampling moves on from a token row with free
    positions (not after the last one), with the tokens so far (free positions not yet sampled hold
    `fixed`, or 0) and the number of rows before the next free position; for previews and for
    stopping early (an exception it raises ends the sampling).
    """
    batch, uniforms = _batch(model, text, options, uniforms, empty_text, fixed, fixed_mask)
    tokens, free_positions, B = batch.tokens, batch.free_positions, text.shape[0]
    if not free_positions:
        return tokens
    grid, device = model.config.image_grid_size, batch.tokens.device
    original, was_training = model, model.training
    model.eval()
    model = inference_twin(model, inference_dtype(device, options.precision))
    # `precision` decides the dtype: a caller's autocast (the training loop writing sample grids) must not
    with torch.autocast(device.type, enabled=False):
        try:
            first = free_positions[0]
            if use_cache:
                decoder = StepDecoder(model, batch.text.shape[0])
                logits = model.forward_cached(torch.cat([batch.text, batch.both(tokens[:, :first])], dim=1),
                                              decoder.cache)
            else:
                logits = model(batch.text, batch.both(tokens[:, :first]))[1][:, -1]
            for i, k in enumerate(free_positions):
                logits = logits.float()
                if batch.text.shape[0] != B:
                    cond, uncond = logits[:B], logits[B:]
                    logits = uncond + options.guidance * (cond - uncond)
                tokens[:, k] = choose_tokens(logits, uniforms[:, k], options)
                if i + 1 == len(free_positions):
                    break
                upto = free_positions[i + 1]
                if row_done is not None and upto // grid != k // grid:
                    row_done(tokens, k // grid + 1)
                if use_cache and upto == k + 1:  # one new token: the decoder's fast step
                    logits = decoder.step(batch.both(tokens[:, k]))
                elif use_cache:  # the new token and the run of fixed tokens after it
                    logits = model.forward_cached(batch.both(tokens[:, k:upto]), decoder.cache)
                else:
                    logits = model(batch.text, batch.both(tokens[:, :upto]))[1][:, -1]
        finally:
            original.train(was_training)
    return tokens
