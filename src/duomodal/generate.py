"""Text -> images with a trained DALL-E: sampling, classifier-free guidance, reranking, completion, edits.

The sampler (`sample_image_tokens`) runs one new token per step through the model's KV cache. Each
image has its own seed: its random numbers are drawn up front from a generator seeded with it, and a
token is chosen by inverse-CDF lookup, so an image depends on its seed only, not on the batch it was
drawn in (up to floating-point differences between batch shapes).

Positions can be fixed to given tokens (the rest are sampled in raster order, each conditioned on all
tokens before it): keeping the first rows is the paper's image completion; keeping everything outside
a box is a region edit. Tokens after the last free position are copied and never run through the model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
from PIL import Image

from duomodal.config import DEFAULT_GUIDANCE, DEFAULT_TOP_K
from duomodal.models.dalle import DALLE, words_of
from duomodal.models.dalle_step import StepDecoder

MAX_NUM = 1024  # images one call may generate
MAX_BATCH_SIZE = 512
PRECISIONS = ("auto", "fp32", "bf16")


class GenerationError(ValueError):
    """A prompt, image, box or sampling option that cannot be used; says what to change."""


class Scorer(Protocol):
    def score(self, images: list[Image.Image], texts: list[str]) -> torch.Tensor:
        """Similarity of each (image, text) pair, (N,); higher is better."""
        ...


@dataclass
class GenerationResult:
    prompt: str
    images: list[Image.Image]  # kept images, best first when scored
    seeds: list[int]  # seed of each kept image: the same seed alone reproduces it
    indices: list[int]  # position of each kept image among all generated
    scores: list[float] | None  # scorer's score of each kept image (None without a scorer)
    score_kind: str | None = None  # what the scores are ("scorer", "fit": mean log-likelihood of kept tokens)


# --- precision -----------------------------------------------------------------------------------


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def inference_dtype(device: torch.device, precision: str) -> torch.dtype:
    """The weight and activation dtype for sampling at `precision` on `device`."""
    if precision not in PRECISIONS:
        raise GenerationError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision == "bf16" and not bf16_supported(device):
        raise GenerationError(f"bf16 is not supported on {device}; use precision 'fp32' or 'auto'")
    # auto: bf16 on CUDA only; on this project's CPU, fp32 sampled faster at small batches
    # (benchmarks/generate.py prints both)
    if precision == "bf16" or (precision == "auto" and device.type == "cuda" and bf16_supported(device)):
        return torch.bfloat16
    return torch.float32


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


def check_sampling(temperature: float, top_k: int | None, top_p: float | None, guidance: float) -> None:
    if not (temperature >= 0 and math.isfinite(temperature)):
        raise GenerationError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise GenerationError(f"top_k must be at least 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise GenerationError(f"top_p must be in (0, 1], got {top_p}")
    if not (guidance >= 0 and math.isfinite(guidance)):
        raise GenerationError(f"guidance must be >= 0 (1 = plain conditional sampling), got {guidance}")


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
) -> torch.Tensor:
    """Image tokens (B, N) for captions `text` (B, T) (tokenizer ids).

    uniforms (B, N): the random numbers of each row (`row_uniforms`); not needed when temperature is 0.
    guidance: classifier-free guidance scale; with `empty_text` (T,) the batch runs conditional and
    empty-caption rows together and samples from ``uncond + guidance * (cond - uncond)``.
    fixed (B, N) with fixed_mask (N,) bool: positions taken from `fixed` instead of sampled.
    use_cache=False recomputes the whole prefix every step (the slow twin, for tests and benchmarks).
    """
    check_sampling(temperature, top_k, top_p, guidance)
    config = model.config
    N, B = config.image_token_count, text.shape[0]
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
                if use_cache and upto == k + 1:  # one new token: the decoder's fast step
                    logits = decoder.step(both(tokens[:, k]))
                elif use_cache:  # the new token and the run of fixed tokens after it
                    logits = model.forward_cached(both(tokens[:, k:upto]), decoder.cache)
                else:
                    logits = model(text, both(tokens[:, :upto]))[1][:, -1]
        finally:
            original.train(was_training)
    return tokens


def _chunks(total: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, total, size):
        yield start, min(total, start + size)


# --- prompts and images --------------------------------------------------------------------------


def encode_prompt(model: DALLE, prompt: str) -> torch.Tensor:
    """The prompt as tokenizer ids (T,); clear errors for unseen characters or a prompt too long."""
    tokenizer = _need(model, "tokenizer")
    unknown = tokenizer.unknown_words(prompt)
    if unknown:
        raise GenerationError(
            f"prompt {prompt!r} has characters this model's tokenizer never saw, in: {', '.join(unknown)}; "
            "rephrase with the words of the training captions"
        )
    T = model.config.text_seq_len
    ids = [tokenizer.bos_id, *tokenizer.tokens(prompt), tokenizer.eos_id]
    if len(ids) > T:
        raise GenerationError(
            f"prompt {prompt!r} is {len(ids)} tokens with BOS/EOS; this model reads at most {T}: shorten it"
        )
    return torch.tensor(ids + [tokenizer.pad_id] * (T - len(ids)), dtype=torch.long)


def unseen_words(model: DALLE, prompt: str) -> list[str]:
    """Words of the prompt that no training caption had (the model has not learnt them)."""
    words = model.__dict__.get("caption_words")
    if not words:
        return []
    tokenizer = _need(model, "tokenizer")
    return [w for w in dict.fromkeys(words_of(tokenizer.normalize(prompt))) if w not in words]


def _need(model: DALLE, what: str):
    value = model.__dict__.get(what)
    if value is None:
        raise GenerationError(f"the model has no {what}; load it with load_dalle(run_dir)")
    return value


def _decode(model: DALLE, tokens: torch.Tensor) -> list[Image.Image]:
    from duomodal.data.images import to_pil

    vae = _need(model, "vae")
    G = model.config.image_grid_size
    images = vae.decode(tokens.view(-1, G, G)).float().cpu()  # (B, 3, H, W)
    return [to_pil(image) for image in images]


def check_counts(num: int, keep: int | None, batch_size: int) -> int:
    """The number of images to keep; clear errors for counts out of range."""
    if not 1 <= num <= MAX_NUM:
        raise GenerationError(f"num must be between 1 and {MAX_NUM}, got {num}")
    if keep is None:
        keep = num
    if not 1 <= keep <= num:
        raise GenerationError(f"keep must be between 1 and num ({num}), got {keep}")
    if not 1 <= batch_size <= MAX_BATCH_SIZE:
        raise GenerationError(f"batch_size must be between 1 and {MAX_BATCH_SIZE}, got {batch_size}")
    return keep


def _select(images: list[Image.Image], seeds: list[int], prompt: str, keep: int,
            scores: torch.Tensor | None, score_kind: str | None) -> GenerationResult:
    if scores is None:
        order = list(range(keep))
        kept_scores = None
    else:
        scores = scores.detach().float().cpu().flatten()
        if scores.shape[0] != len(images):
            raise GenerationError(f"the scorer returned {scores.shape[0]} scores for {len(images)} images")
        order = sorted(range(len(images)), key=lambda i: -float(scores[i]))[:keep]
        kept_scores = [float(scores[i]) for i in order]
    return GenerationResult(
        prompt=prompt,
        images=[images[i] for i in order],
        seeds=[seeds[i] for i in order],
        indices=order,
        scores=kept_scores,
        score_kind=score_kind if scores is not None else None,
    )


def generate_images(
    dalle: DALLE,
    prompt: str,
    num: int = 16,
    keep: int | None = None,
    scorer: Scorer | None = None,
    temperature: float = 1.0,
    top_k: int | None = DEFAULT_TOP_K,
    top_p: float | None = None,
    guidance: float = DEFAULT_GUIDANCE,
    seed: int = 0,
    batch_size: int = 16,
    progress: Callable[[int, int], None] | None = None,
    precision: str = "auto",
) -> GenerationResult:
    """Generate `num` images for `prompt` (image i from seed + i); keep the `keep` best by `scorer`
    (or the first `keep` without one). `progress(done, num)` is called after each batch."""
    keep = check_counts(num, keep, batch_size)
    check_sampling(temperature, top_k, top_p, guidance)
    text = encode_prompt(dalle, prompt)
    empty = encode_prompt(dalle, "") if guidance != 1.0 else None
    seeds = [seed + i for i in range(num)]
    images: list[Image.Image] = []
    for start, end in _chunks(num, batch_size):
        tokens = sample_image_tokens(
            dalle, text[None, :].expand(end - start, -1), row_uniforms(seeds[start:end], dalle.config.image_token_count),
            temperature, top_k, top_p, guidance, empty, precision=precision,
        )
        images.extend(_decode(dalle, tokens))
        if progress is not None:
            progress(end, num)
    scores = scorer.score(images, [prompt] * num) if scorer is not None else None
    return _select(images, seeds, prompt, keep, scores, "scorer")


def _image_tokens(dalle: DALLE, image: Image.Image) -> torch.Tensor:
    """(N,) VAE tokens of `image`, which must be the model's image size."""
    from duomodal.data.images import to_rgb, to_tensor

    S = dalle.config.image_size
    if image.size != (S, S):
        raise GenerationError(
            f"the image is {image.size[0]}x{image.size[1]} pixels; this model works on {S}x{S} images: "
            f"resize it to {S}x{S} first"
        )
    vae = _need(dalle, "vae")
    pixels = to_tensor(to_rgb(image), S)[None]  # (1, 3, S, S)
    return vae.encode(pixels).flatten().cpu()


def box_to_token_mask(box: tuple[int, int, int, int], image_size: int, grid_size: int) -> torch.Tensor:
    """(grid, grid) bool: the tokens whose cells overlap the pixel box (x0, y0, x1, y1), x1/y1 exclusive."""
    x0, y0, x1, y1 = box
    if not (0 <= x0 < x1 <= image_size and 0 <= y0 < y1 <= image_size):
        raise GenerationError(
            f"box {x0},{y0},{x1},{y1} must satisfy 0 <= x0 < x1 <= {image_size} and 0 <= y0 < y1 <= {image_size} "
            "(pixels; x1 and y1 exclusive)"
        )
    cell = image_size / grid_size
    c0, c1 = int(x0 // cell), int(math.ceil(x1 / cell))
    r0, r1 = int(y0 // cell), int(math.ceil(y1 / cell))
    mask = torch.zeros(grid_size, grid_size, dtype=torch.bool)
    mask[r0:r1, c0:c1] = True
    return mask


@torch.inference_mode()
def fixed_token_fit(dalle: DALLE, text: torch.Tensor, tokens: torch.Tensor, after: int,
                    fixed_mask: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """Mean log-likelihood (B,) of the fixed tokens after position `after`, given everything before them:
    how well sampled tokens fit the unchanged part of the image that follows them."""
    device = dalle.image_head.weight.device
    select = fixed_mask.clone()
    select[: after + 1] = False
    if not bool(select.any()):
        return torch.zeros(tokens.shape[0])
    out = []
    for start, end in _chunks(tokens.shape[0], batch_size):
        chunk = tokens[start:end].to(device)
        _, logits = dalle(text[start:end].to(device), chunk[:, :-1])  # (b, N, V)
        logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, chunk[..., None]).squeeze(-1)  # (b, N)
        out.append(logp[:, select.to(device)].mean(dim=1).cpu())
    return torch.cat(out)


def edit_image(
    dalle: DALLE,
    image: Image.Image,
    box: tuple[int, int, int, int],
    prompt: str,
    num: int = 8,
    keep: int | None = None,
    scorer: Scorer | None = None,
    temperature: float = 1.0,
    top_k: int | None = DEFAULT_TOP_K,
    top_p: float | None = None,
    guidance: float = DEFAULT_GUIDANCE,
    seed: int = 0,
    batch_size: int = 16,
    progress: Callable[[int, int], None] | None = None,
    precision: str = "auto",
) -> GenerationResult:
    """Regenerate the region `box` (pixels x0, y0, x1, y1; x1/y1 exclusive) of `image` for `prompt`.

    Tokens of the cells the box touches are sampled in raster order, each conditioned on the prompt
    and all tokens before it; all other tokens keep the image's own. The returned images take the
    decoded pixels inside the token-aligned box and the original pixels everywhere else. Candidates
    are ranked by `scorer` if given, else by how well they fit the unchanged tokens after the box
    (score_kind "fit": mean log-likelihood of those tokens under the model).
    """
    keep = check_counts(num, keep, batch_size)
    check_sampling(temperature, top_k, top_p, guidance)
    config = dalle.config
    S, G = config.image_size, config.image_grid_size
    box_mask = box_to_token_mask(box, S, G)
    text = encode_prompt(dalle, prompt)
    empty = encode_prompt(dalle, "") if guidance != 1.0 else None
    original = _image_tokens(dalle, image)  # (N,)
    fixed_mask = ~box_mask.flatten()
    seeds = [seed + i for i in range(num)]
    all_tokens = []
    for start, end in _chunks(num, batch_size):
        tokens = sample_image_tokens(
            dalle, text[None, :].expand(end - start, -1), row_uniforms(seeds[start:end], config.image_token_count),
            temperature, top_k, top_p, guidance, empty, fixed=original[None, :].expand(end - start, -1),
            fixed_mask=fixed_mask, precision=precision,
        )
        all_tokens.append(tokens.cpu())
        if progress is not None:
            progress(end, num)
    tokens = torch.cat(all_tokens)
    decoded = _decode(dalle, tokens)
    cell = S // G
    rows, cols = box_mask.nonzero()[:, 0], box_mask.nonzero()[:, 1]
    region = (int(cols.min()) * cell, int(rows.min()) * cell, (int(cols.max()) + 1) * cell, (int(rows.max()) + 1) * cell)
    source = image.convert("RGB")
    images = []
    for picture in decoded:
        merged = source.copy()
        merged.paste(picture.crop(region), region[:2])
        images.append(merged)
    if scorer is not None:
        return _select(images, seeds, prompt, keep, scorer.score(images, [prompt] * num), "scorer")
    first_free = int((~fixed_mask).nonzero()[0])
    fit = fixed_token_fit(dalle, text[None, :].expand(num, -1), tokens, first_free, fixed_mask, batch_size)
    return _select(images, seeds, prompt, keep, fit, "fit")


def complete_image(
    dalle: DALLE,
    image: Image.Image,
    prompt: str,
    rows: int,
    num: int = 8,
    keep: int | None = None,
    scorer: Scorer | None = None,
    temperature: float = 1.0,
    top_k: int | None = DEFAULT_TOP_K,
    top_p: float | None = None,
    guidance: float = DEFAULT_GUIDANCE,
    seed: int = 0,
    batch_size: int = 16,
    progress: Callable[[int, int], None] | None = None,
    precision: str = "auto",
) -> GenerationResult:
    """Keep the first `rows` token rows of `image` and generate the rest (the paper's priming)."""
    keep = check_counts(num, keep, batch_size)
    G = dalle.config.image_grid_size
    if not 0 <= rows < G:
        raise GenerationError(f"rows must be between 0 and {G - 1} (the token grid has {G} rows), got {rows}")
    text = encode_prompt(dalle, prompt)
    empty = encode_prompt(dalle, "") if guidance != 1.0 else None
    original = _image_tokens(dalle, image)
    fixed_mask = torch.zeros(G * G, dtype=torch.bool)
    fixed_mask[: rows * G] = True
    seeds = [seed + i for i in range(num)]
    images: list[Image.Image] = []
    for start, end in _chunks(num, batch_size):
        tokens = sample_image_tokens(
            dalle, text[None, :].expand(end - start, -1), row_uniforms(seeds[start:end], G * G),
            temperature, top_k, top_p, guidance, empty, fixed=original[None, :].expand(end - start, -1),
            fixed_mask=fixed_mask, precision=precision,
        )
        images.extend(_decode(dalle, tokens))
        if progress is not None:
            progress(end, num)
    scores = scorer.score(images, [prompt] * num) if scorer is not None else None
    return _select(images, seeds, prompt, keep, scores, "scorer")
