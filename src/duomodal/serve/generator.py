"""The server's generator: a trained DALL-E behind the `Generator` interface the routes use, with
a CLIP as the reranker. Uploaded images for region edits are fitted to the model's image size."""

from __future__ import annotations

from PIL import Image

from duomodal.data.images import to_pil, to_tensor
from duomodal.generate import GenerationError, Scorer, edit_image, generate_images
from duomodal.models.dalle import DalleRun
from duomodal.models.sampling import SamplingOptions
from duomodal.serve.jobs import JobOutput, Progress

DEFAULT_MAX_NUM = 64  # images one request may ask for; generation on CPU is slow


def fit_to_model(
    image: Image.Image, box: tuple[int, int, int, int], size: int
) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """Scale the shorter side of `image` to `size` and crop the centre square (as training did);
    move `box` (pixels x0, y0, x1, y1 of the original, x1/y1 exclusive) with it.

    Raises GenerationError when no part of the box is left inside the square.
    """
    width, height = image.size
    scale = size / min(width, height)
    off_x = (width * scale - size) / 2
    off_y = (height * scale - size) / 2
    x0, y0, x1, y1 = box
    fitted = (
        max(0, int(x0 * scale - off_x)),
        max(0, int(y0 * scale - off_y)),
        min(size, int(round(x1 * scale - off_x))),
        min(size, int(round(y1 * scale - off_y))),
    )
    if not (fitted[0] < fitted[2] and fitted[1] < fitted[3]):
        raise GenerationError(
            f"box {x0},{y0},{x1},{y1} lies outside the centre square of the {width}x{height} image "
            "that the model sees: move the box towards the centre"
        )
    if image.size == (size, size):
        return image, fitted
    return to_pil(to_tensor(image, size)), fitted


class DalleGenerator:
    """Generation and region edits with a DALL-E, reranked by `scorer` (a CLIP) when given."""

    def __init__(self, run: DalleRun, scorer: Scorer | None = None, max_num: int = DEFAULT_MAX_NUM,
                 batch_size: int = 16):
        if not 1 <= max_num:
            raise ValueError(f"max_num must be at least 1, got {max_num}")
        self.run = run
        self.scorer = scorer
        self.max_num = max_num
        self.batch_size = batch_size

    @property
    def image_size(self) -> int:
        return int(self.run.config.image_size)

    def generate(self, prompt, *, num, keep, guidance, temperature, top_k, seed, progress: Progress) -> JobOutput:
        options = SamplingOptions(temperature=temperature, top_k=top_k, guidance=guidance, seed=seed,
                                  batch_size=min(self.batch_size, num))
        result = generate_images(self.run, prompt, num=num, keep=keep, scorer=self.scorer, options=options,
                                 progress=progress)
        return JobOutput(result.images, result.scores, _score_kind(result.score_kind))

    def prepare_edit(self, image, box):
        return fit_to_model(image, box, self.image_size)

    def edit(self, image, box, prompt, *, num, keep, seed, progress: Progress) -> JobOutput:
        """Edit `box` of `image`, both as `prepare_edit` returned them."""
        options = SamplingOptions(seed=seed, batch_size=min(self.batch_size, num))
        result = edit_image(self.run, image, box, prompt, num=num, keep=keep, scorer=self.scorer, options=options,
                            progress=progress)
        return JobOutput(result.images, result.scores, _score_kind(result.score_kind))


def _score_kind(kind: str | None) -> str | None:
    """The library's name for what the scores are -> the API's ("clip" for the reranker)."""
    return {"scorer": "clip", "fit": "fit", None: None}[kind]
