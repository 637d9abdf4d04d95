"""The server's generator: a trained DALL-E behind the `Generator` interface the routes use, with
a CLIP as the reranker. Uploaded images for edits and completions are fitted to the model's image
size (generate.fit_to_model, as the command line fits them). While a batch samples, its partial
token grids are decoded into previews every few token rows (never per token: a decode costs about
as much as several sampling steps)."""

from __future__ import annotations

import time
from dataclasses import replace

import torch
from PIL import Image, ImageDraw

from duomodal.generate import (
    GenerationResult,
    Scorer,
    box_to_token_mask,
    complete_image,
    decode_tokens,
    edit_image,
    fit_to_model,
    generate_images,
    paste_region,
    token_region,
)
from duomodal.models.dalle import DalleRun
from duomodal.models.sampling import SETTING, SamplingOptions
from duomodal.serve.config import ServeConfig
from duomodal.serve.jobs import JobControl, JobOutput
from duomodal.serve.protocols import Box
UNDRAWN = (228, 231, 236)  # what a preview shows where no token has been sampled yet
PREVIEW_SHARE = 0.1  # decoding previews may take at most about this share of a job's time


class _Previews:
    """The `partial` callback of one job: checks for cancelling at every token row it is called
    for, and decodes the batch's tokens into previews at most every `every_rows` rows, and no
    sooner than `min_interval_s` or ten times the last decode's time after the previous one
    (so previews cost at most about PREVIEW_SHARE of the job, however slow the VAE). Parts not
    sampled yet are shown blank; an edit's previews keep the image outside the region, as its
    results do."""

    def __init__(self, run: DalleRun, control: JobControl, source: Image.Image | None = None,
                 region: tuple[int, int, int, int] | None = None, min_interval_s: float = 0.2):
        self.run = run
        self.control = control
        self.source = source
        self.size = int(run.config.image_size)
        self.region = region or (0, 0, self.size, self.size)  # where sampling changes the picture
        self.grid = int(run.config.image_grid_size)
        self.every_rows = max(1, self.grid // 8)
        self.min_interval_s = min_interval_s
        self._batch = -1  # first sample of the batch last shown
        self._rows = 0
        self._time = float("-inf")
        self._decode_s = 0.0

    def __call__(self, tokens: torch.Tensor, first: int, rows: int) -> None:
        self.control.check()
        now = time.monotonic()
        if first != self._batch:
            self._batch, self._rows = first, 0
        wait = max(self.min_interval_s, self._decode_s / PREVIEW_SHARE)
        if rows - self._rows < self.every_rows or now - self._time < wait:
            return
        self._rows, self._time = rows, now
        images = decode_tokens(self.run, tokens.detach().cpu(), batch_size=tokens.shape[0])
        self._decode_s = time.monotonic() - now
        if self.source is not None:
            images = paste_region(self.source, images, self.region)
        x0, y0, x1, y1 = self.region
        top = max(y0, self.size * rows // self.grid)
        if top < y1:
            for image in images:
                ImageDraw.Draw(image).rectangle((x0, top, x1 - 1, y1 - 1), fill=UNDRAWN)
        self.control.preview(images, first=first, rows=rows, grid_rows=self.grid)


def _output(result: GenerationResult, keep: int) -> JobOutput:
    return JobOutput(result.images, result.scores, _score_kind(result.score_kind), seeds=list(result.seeds),
                     sample_indices=list(result.indices), keep=keep)


class DalleGenerator:
    """Generation, completion and region edits with a DALL-E, reranked by `scorer` (a CLIP) when given.

    Every sample is kept and ranked, so a job can show the reranked order beside the sampling order;
    the job's `keep` marks how many of them are its result.
    """

    def __init__(self, run: DalleRun, scorer: Scorer | None = None, max_num: int = ServeConfig.max_generate,
                 batch_size: int = SETTING["batch_size"].default, precision: str = "auto"):
        if not 1 <= max_num:
            raise ValueError(f"max_num must be at least 1, got {max_num}")
        self.run = run
        self.precision = precision  # of sampling; auto: from the hardware (duomodal.device)
        self.scorer = scorer
        self.max_num = max_num
        self.batch_size = batch_size

    @property
    def image_size(self) -> int:
        return int(self.run.config.image_size)

    @property
    def grid_size(self) -> int:
        return int(self.run.config.image_grid_size)

    def _options(self, options: SamplingOptions, num: int) -> SamplingOptions:
        """A request's options with this generator's batch size and precision."""
        return replace(options, batch_size=min(self.batch_size, num), precision=self.precision)

    def generate(self, prompt: str, *, num: int, keep: int | None, options: SamplingOptions,
                 control: JobControl) -> JobOutput:
        result = generate_images(self.run, prompt, num=num, keep=num, scorer=self.scorer,
                                 options=self._options(options, num), progress=control.progress,
                                 partial=_Previews(self.run, control))
        return _output(result, keep or num)

    def prepare_edit(self, image: Image.Image, box: Box) -> tuple[Image.Image, Box]:
        """The upload fitted to the model (generate.fit_to_model) and the box moved with it."""
        fitted, fitted_box = fit_to_model(image, self.image_size, box)
        return fitted, fitted_box

    def prepare_image(self, image: Image.Image) -> Image.Image:
        """The image as the model sees it (generate.fit_to_model)."""
        return fit_to_model(image, self.image_size)[0]

    def edit(self, image: Image.Image, box: Box, prompt: str, *, num: int, keep: int | None,
             options: SamplingOptions, control: JobControl) -> JobOutput:
        """Edit `box` of `image`, both as `prepare_edit` returned them."""
        region = token_region(box_to_token_mask(box, self.image_size, self.grid_size), self.image_size)
        result = edit_image(self.run, image, box, prompt, num=num, keep=num, scorer=self.scorer,
                            options=self._options(options, num), progress=control.progress,
                            partial=_Previews(self.run, control, image, region))
        return _output(result, keep or num)

    def complete(self, image: Image.Image, rows: int, prompt: str, *, num: int, keep: int | None,
                 options: SamplingOptions, control: JobControl) -> JobOutput:
        """Keep the top `rows` token rows of `image` (as `prepare_image` returned it, its pixels
        unchanged above the line); draw the rest."""
        below = (0, rows * (self.image_size // self.grid_size), self.image_size, self.image_size)
        result = complete_image(self.run, image, prompt, rows, num=num, keep=num, scorer=self.scorer,
                                options=self._options(options, num), progress=control.progress, keep_pixels=True,
                                partial=_Previews(self.run, control, image, below))
        return _output(result, keep or num)


def _score_kind(kind: str | None) -> str | None:
    """The library's name for what the scores are -> the API's ("clip" for the reranker)."""
    return {"scorer": "clip", "fit": "fit", None: None}[kind]
