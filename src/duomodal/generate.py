"""Text -> images with a trained DALL-E: classifier-free guidance, reranking, completion, region edits.

Every entry point takes a `DalleRun` (``load_dalle(run_dir)``) and one `SamplingOptions`; image i of a
call is drawn from ``options.seed + i`` alone, so a seed reproduces its image whatever the batch. The
token sampler itself is ``duomodal.models.sampling``.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
from PIL import Image

from duomodal.data.images import to_pil, to_rgb, to_tensor
from duomodal.models.dalle import DalleRun, words_of
from duomodal.models.sampling import GenerationError, SamplingOptions, row_uniforms, sample_image_tokens

MAX_NUM = 1024  # images one call may generate
Progress = Callable[[int, int], None]  # (done, total), called after each batch
# (tokens (b, N) of the batch being sampled, the index of its first image, complete token rows),
# called each time the batch completes a token row; see sample_image_tokens' row_done
Partial = Callable[[torch.Tensor, int, int], None]


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


# --- prompts and images --------------------------------------------------------------------------

_UNSEEN_WORD = re.compile(r"\w+")  # what `words_of` calls a word


def encode_prompt(run: DalleRun, prompt: str, unseen: str = "drop") -> torch.Tensor:
    """The prompt as tokenizer ids (T,); clear errors for unseen characters or a prompt too long.

    unseen="drop" leaves the words no training caption had out of the conditioning (`conditioning_text`):
    the model never learnt them, and their BPE pieces only disturb the words it knows."""
    tokenizer = run.tokenizer
    unknown = tokenizer.unknown_words(prompt)
    if unknown:
        raise GenerationError(
            f"prompt {prompt!r} has characters this model's tokenizer never saw, in: {', '.join(unknown)}; "
            "rephrase with the words of the training captions"
        )
    if unseen == "drop":
        prompt = conditioning_text(run, prompt)
    T = run.config.text_seq_len
    ids = [tokenizer.bos_id, *tokenizer.tokens(prompt), tokenizer.eos_id]
    if len(ids) > T:
        raise GenerationError(
            f"prompt {prompt!r} is {len(ids)} tokens with BOS/EOS; this model reads at most {T}: shorten it"
        )
    return torch.tensor(ids + [tokenizer.pad_id] * (T - len(ids)), dtype=torch.long)


def unseen_words(run: DalleRun, prompt: str) -> list[str]:
    """Words of the prompt that no training caption had (the model has not learnt them)."""
    if not run.caption_words:
        return []
    words = words_of(run.tokenizer.normalize(prompt))
    return [w for w in dict.fromkeys(words) if w not in run.caption_words]


def conditioning_text(run: DalleRun, prompt: str) -> str:
    """The (normalised) prompt without the words no training caption had ("please show a heart shaded
    red" -> "a heart red"), or the prompt itself when it has none of them or nothing else."""
    unseen = set(unseen_words(run, prompt))
    if not unseen:
        return prompt
    normalized = run.tokenizer.normalize(prompt)
    if not set(words_of(normalized)) - unseen:
        return prompt
    text = _UNSEEN_WORD.sub(lambda m: "" if m.group(0) in unseen else m.group(0), normalized)
    text = re.sub(r"\s+([,.;:!?])", r"\1", re.sub(r"\s+", " ", text))  # no space left before punctuation
    text = re.sub(r"([,.;:!?])(?:\s*[,.;:!?])+", r"\1", text)  # nor punctuation doubled
    return text.strip(" ,.;:!?")


def decode_tokens(run: DalleRun, tokens: torch.Tensor, batch_size: int = 16) -> list[Image.Image]:
    """Image tokens (B, N) -> B images through the run's VAE, `batch_size` at a time."""
    G = run.config.image_grid_size
    images = []
    for start, end in _chunks(tokens.shape[0], batch_size):
        pixels = run.vae.decode(tokens[start:end].view(-1, G, G)).float().cpu()  # (b, 3, H, W)
        images.extend(to_pil(image) for image in pixels)
    return images


def image_tokens(run: DalleRun, image: Image.Image) -> torch.Tensor:
    """(N,) VAE tokens of `image`, which must be the model's image size."""
    S = run.config.image_size
    if image.size != (S, S):
        raise GenerationError(
            f"the image is {image.size[0]}x{image.size[1]} pixels; this model works on {S}x{S} images: "
            f"resize it to {S}x{S} first"
        )
    pixels = to_tensor(to_rgb(image), S)[None]  # (1, 3, S, S)
    return run.vae.encode(pixels).flatten().cpu()


Box = tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels; x1, y1 exclusive


def fit_to_model(image: Image.Image, size: int, box: Box | None = None) -> tuple[Image.Image, Box | None]:
    """`image` as the model sees it, the way training saw images: its shorter side scaled to `size`
    and the centre square cut out (`to_tensor`), any aspect ratio; and `box` (pixels of the
    original) moved with it. The command line and the server both fit images with this.

    Raises GenerationError when no part of the box is left inside the square.
    """
    width, height = image.size
    scale = size / min(width, height)
    fitted = None
    if box is not None:
        x0, y0, x1, y1 = box
        try:
            (left, right), (top, bottom) = (_fit_span(x0, x1, scale, (width * scale - size) / 2, size),
                                            _fit_span(y0, y1, scale, (height * scale - size) / 2, size))
        except ValueError:
            raise GenerationError(
                f"box {x0},{y0},{x1},{y1} lies outside the centre square of the {width}x{height} image "
                "that the model sees: move the box towards the centre"
            ) from None
        fitted = (left, top, right, bottom)
    if image.size == (size, size):
        return image, fitted
    return to_pil(to_tensor(image, size)), fitted


def _fit_span(start: int, end: int, scale: float, offset: float, size: int) -> tuple[int, int]:
    """The pixels [start, end) of the original as pixels of the fitted square, at least one wide;
    ValueError when they miss the square."""
    low, high = start * scale - offset, end * scale - offset
    if high <= 0 or low >= size:
        raise ValueError("outside")
    first = max(0, int(low))
    return first, min(size, max(first + 1, round(high)))


def check_counts(num: int, keep: int | None) -> int:
    """The number of images to keep; clear errors for counts out of range."""
    if not 1 <= num <= MAX_NUM:
        raise GenerationError(f"num must be between 1 and {MAX_NUM}, got {num}")
    if keep is None:
        keep = num
    if not 1 <= keep <= num:
        raise GenerationError(f"keep must be between 1 and num ({num}), got {keep}")
    return keep


# --- sampling in batches -------------------------------------------------------------------------


def _chunks(total: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, total, size):
        yield start, min(total, start + size)


def sample_batches(
    run: DalleRun,
    prompt: str,
    num: int,
    options: SamplingOptions,
    fixed: torch.Tensor | None = None,
    fixed_mask: torch.Tensor | None = None,
    progress: Progress | None = None,
    partial: Partial | None = None,
) -> tuple[torch.Tensor, list[int]]:
    """Image tokens (num, N) for `prompt`, sampled `options.batch_size` at a time, and each row's seed.

    fixed (N,) with fixed_mask (N,) bool: positions every image takes from `fixed` instead of sampling.
    """
    text = encode_prompt(run, prompt, options.unseen_words)
    empty = encode_prompt(run, "") if options.guidance != 1.0 else None
    seeds = [options.seed + i for i in range(num)]
    N = run.config.image_token_count
    batches = []
    for start, end in _chunks(num, options.batch_size):
        count = end - start
        row_done = None if partial is None else functools.partial(_batch_rows, partial, start)
        batches.append(sample_image_tokens(
            run.model, text[None, :].expand(count, -1), options, row_uniforms(seeds[start:end], N),
            empty_text=empty, fixed=None if fixed is None else fixed[None, :].expand(count, -1),
            fixed_mask=fixed_mask, row_done=row_done,
        ).cpu())
        if progress is not None:
            progress(end, num)
    return torch.cat(batches), seeds


def _batch_rows(partial: Partial, first: int, tokens: torch.Tensor, rows: int) -> None:
    partial(tokens, first, rows)


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


def _rank(images: list[Image.Image], seeds: list[int], prompt: str, keep: int,
          scorer: Scorer | None) -> GenerationResult:
    """The `keep` best images by `scorer`, best first, or the first `keep` without a scorer."""
    scores = scorer.score(images, [prompt] * len(images)) if scorer is not None else None
    return _select(images, seeds, prompt, keep, scores, "scorer")


def generate_images(
    run: DalleRun,
    prompt: str,
    num: int = 16,
    keep: int | None = None,
    scorer: Scorer | None = None,
    options: SamplingOptions = SamplingOptions(),
    progress: Progress | None = None,
    partial: Partial | None = None,
) -> GenerationResult:
    """Generate `num` images for `prompt`; keep the `keep` best by `scorer` (or the first `keep` without one)."""
    keep = check_counts(num, keep)
    tokens, seeds = sample_batches(run, prompt, num, options, progress=progress, partial=partial)
    return _rank(decode_tokens(run, tokens, options.batch_size), seeds, prompt, keep, scorer)


def complete_image(
    run: DalleRun,
    image: Image.Image,
    prompt: str,
    rows: int,
    num: int = 8,
    keep: int | None = None,
    scorer: Scorer | None = None,
    options: SamplingOptions = SamplingOptions(),
    progress: Progress | None = None,
    partial: Partial | None = None,
    keep_pixels: bool = False,
) -> GenerationResult:
    """Keep the first `rows` token rows of `image` and generate the rest (the paper's priming).

    keep_pixels: the kept rows show the image's own pixels (as an edit's unchanged part does), not
    the VAE's decoding of their tokens; the images are ranked as returned.
    """
    keep = check_counts(num, keep)
    G = run.config.image_grid_size
    if not 0 <= rows < G:
        raise GenerationError(f"rows must be between 0 and {G - 1} (the token grid has {G} rows), got {rows}")
    fixed_mask = torch.zeros(G * G, dtype=torch.bool)
    fixed_mask[: rows * G] = True
    tokens, seeds = sample_batches(run, prompt, num, options, image_tokens(run, image), fixed_mask, progress,
                                   partial)
    images = decode_tokens(run, tokens, options.batch_size)
    if keep_pixels and rows > 0:
        S = run.config.image_size
        images = paste_region(image, images, (0, rows * (S // G), S, S))
    return _rank(images, seeds, prompt, keep, scorer)


# --- region edits --------------------------------------------------------------------------------


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


def token_region(box_mask: torch.Tensor, image_size: int) -> tuple[int, int, int, int]:
    """The pixel box (x0, y0, x1, y1; x1/y1 exclusive) of the token cells set in `box_mask` (grid, grid)."""
    cell = image_size // box_mask.shape[0]
    rows, cols = box_mask.nonzero()[:, 0], box_mask.nonzero()[:, 1]
    return (int(cols.min()) * cell, int(rows.min()) * cell, (int(cols.max()) + 1) * cell, (int(rows.max()) + 1) * cell)


def paste_region(source: Image.Image, pictures: list[Image.Image],
                 region: tuple[int, int, int, int]) -> list[Image.Image]:
    """`source` with `region` taken from each of `pictures`: an edit keeps every other pixel as it was."""
    source = source.convert("RGB")
    merged = []
    for picture in pictures:
        image = source.copy()
        image.paste(picture.crop(region), region[:2])
        merged.append(image)
    return merged


@torch.inference_mode()
def fixed_token_fit(run: DalleRun, text: torch.Tensor, tokens: torch.Tensor, after: int,
                    fixed_mask: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """Mean log-likelihood (B,) of the fixed tokens after position `after`, given everything before them:
    how well sampled tokens fit the unchanged part of the image that follows them."""
    device = run.device
    select = fixed_mask.clone()
    select[: after + 1] = False
    if not bool(select.any()):
        return torch.zeros(tokens.shape[0])
    out = []
    for start, end in _chunks(tokens.shape[0], batch_size):
        chunk = tokens[start:end].to(device)
        _, logits = run.model(text[start:end].to(device), chunk[:, :-1])  # (b, N, V)
        logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, chunk[..., None]).squeeze(-1)  # (b, N)
        out.append(logp[:, select.to(device)].mean(dim=1).cpu())
    return torch.cat(out)


def edit_image(
    run: DalleRun,
    image: Image.Image,
    box: tuple[int, int, int, int],
    prompt: str,
    num: int = 8,
    keep: int | None = None,
    scorer: Scorer | None = None,
    options: SamplingOptions = SamplingOptions(),
    progress: Progress | None = None,
    partial: Partial | None = None,
) -> GenerationResult:
    """Regenerate the region `box` (pixels x0, y0, x1, y1; x1/y1 exclusive) of `image` for `prompt`.

    Tokens of the cells the box touches are sampled in raster order, each conditioned on the prompt
    and all tokens before it; all other tokens keep the image's own. The returned images take the
    decoded pixels inside the token-aligned box and the original pixels everywhere else. Candidates
    are ranked by `scorer` if given, else by how well they fit the unchanged tokens after the box
    (score_kind "fit": mean log-likelihood of those tokens under the model).
    """
    keep = check_counts(num, keep)
    S, G = run.config.image_size, run.config.image_grid_size
    box_mask = box_to_token_mask(box, S, G)
    fixed_mask = ~box_mask.flatten()
    tokens, seeds = sample_batches(run, prompt, num, options, image_tokens(run, image), fixed_mask, progress,
                                   partial)
    images = paste_region(image, decode_tokens(run, tokens, options.batch_size), token_region(box_mask, S))
    if scorer is not None:
        return _rank(images, seeds, prompt, keep, scorer)
    first_free = int(box_mask.flatten().nonzero()[0])
    text = encode_prompt(run, prompt, options.unseen_words)[None, :].expand(num, -1)
    fit = fixed_token_fit(run, text, tokens, first_free, fixed_mask, options.batch_size)
    return _select(images, seeds, prompt, keep, fit, "fit")
