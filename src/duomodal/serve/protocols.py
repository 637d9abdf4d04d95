"""What the server needs of the index, its hits, the CLIP embedder and the generator.

`duomodal.search.index.ImageIndex`, `duomodal.models.clip.ClipEmbedder` and
`duomodal.serve.generator.DalleGenerator` are the real ones; tests hand in small objects with the
same attributes and methods.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from duomodal.models.sampling import SamplingOptions
from duomodal.serve.jobs import JobControl, JobOutput

Box = tuple[int, int, int, int]  # left, top, right, bottom in pixels; right and bottom exclusive


class Hit(Protocol):
    """One indexed image, as a search or a lookup by id returns it."""

    id: int
    path: str  # as recorded in the index (relative to its root, or a shard member's name)
    score: float
    width: int
    height: int
    caption: str | None
    # the file's size and mtime when indexed, to check it before serving it (None: not recorded)
    size: int | None
    mtime_ns: int | None


class Index(Protocol):
    """The searchable index. An index over shards also has `source` (whose `file_path(path)` is
    None for a shard member) and `read_image_bytes(path)`; the server looks for them with getattr."""

    clip_model_id: str
    dim: int

    @property
    def count(self) -> int: ...

    @property
    def root(self) -> Path: ...

    def search(self, vector: np.ndarray, k: int) -> list[Hit]: ...

    def get(self, image_id: int) -> Hit | None: ...

    def vector(self, image_id: int) -> np.ndarray: ...

    def flag_changed(self, image_id: int) -> None:
        """Mark the row for the next `duomodal index update` (its file changed or went away)."""
        ...

    def is_stale(self) -> bool:
        """Whether the index changed on disk since it was opened."""
        ...


class Embedder(Protocol):
    """The CLIP the index was built with (what `duomodal.search.query.query_vector` needs)."""

    model_id: str
    dim: int

    def embed_texts(self, texts: list[str]) -> Any: ...  # (B, dim) tensor or array

    def embed_images(self, images: list[Image.Image]) -> Any: ...


class Generator(Protocol):
    """What the generation routes call. Each job method gets the job's `JobControl` to report
    progress and previews through; a report raises JobCancelled when the job should stop. The
    options' batch size and precision are the generator's to choose."""

    max_num: int
    image_size: int  # uploads are fitted to image_size x image_size
    grid_size: int  # token grid side

    def generate(self, prompt: str, *, num: int, keep: int | None, options: SamplingOptions,
                 control: JobControl) -> JobOutput: ...

    def prepare_edit(self, image: Image.Image, box: Box) -> tuple[Image.Image, Box]:
        """The upload and box as `edit` takes them (fast; runs in the request, so a box the model
        can't use is refused at once); raises ValueError with what to change."""
        ...

    def prepare_image(self, image: Image.Image) -> Image.Image:
        """The upload as `complete` takes it (fitted to the model's image size)."""
        ...

    def edit(self, image: Image.Image, box: Box, prompt: str, *, num: int, keep: int | None,
             options: SamplingOptions, control: JobControl) -> JobOutput: ...

    def complete(self, image: Image.Image, rows: int, prompt: str, *, num: int, keep: int | None,
                 options: SamplingOptions, control: JobControl) -> JobOutput: ...
