"""duomodal: train your own small DALL-E and CLIP, generate images from text, search images by what they show.

The main entry points are importable from here (``duomodal.load_dalle``, ``duomodal.generate_images``,
``duomodal.ImageIndex``...); docs/api.md has an example of each. They are imported on first use, so
``import duomodal`` (and ``duomodal --help``) do not import torch because of them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "BuildOptions",
    "ClassifyResult",
    "ClipEmbedder",
    "DalleRun",
    "EvalOptions",
    "GenerationResult",
    "ImageIndex",
    "SamplingOptions",
    "build_index",
    "classify_images",
    "complete_image",
    "edit_image",
    "generate_images",
    "load_clip",
    "load_dalle",
    "load_vae",
    "run_evaluation",
    "update_index",
]

# Each public name -> the module that defines it (the name's one home; this is only its address).
_MODULE_OF = {
    "load_vae": "duomodal.models.vae",
    "DalleRun": "duomodal.models.dalle",
    "load_dalle": "duomodal.models.dalle",
    "ClipEmbedder": "duomodal.models.clip",
    "load_clip": "duomodal.models.clip",
    "SamplingOptions": "duomodal.models.sampling",
    "GenerationResult": "duomodal.generate",
    "generate_images": "duomodal.generate",
    "edit_image": "duomodal.generate",
    "complete_image": "duomodal.generate",
    "BuildOptions": "duomodal.search.build",
    "build_index": "duomodal.search.build",
    "update_index": "duomodal.search.build",
    "ImageIndex": "duomodal.search.index",
    "ClassifyResult": "duomodal.classify",
    "classify_images": "duomodal.classify",
    "EvalOptions": "duomodal.evaluate",
    "run_evaluation": "duomodal.evaluate",
}

if TYPE_CHECKING:
    from duomodal.classify import ClassifyResult, classify_images
    from duomodal.evaluate import EvalOptions, run_evaluation
    from duomodal.generate import GenerationResult, complete_image, edit_image, generate_images
    from duomodal.models.clip import ClipEmbedder, load_clip
    from duomodal.models.dalle import DalleRun, load_dalle
    from duomodal.models.sampling import SamplingOptions
    from duomodal.models.vae import load_vae
    from duomodal.search.build import BuildOptions, build_index, update_index
    from duomodal.search.index import ImageIndex


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'duomodal' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups find it without coming here
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
