"""CLIP: Hugging Face ``CLIPModel`` for both duomodal's own small CLIP and pretrained ones.

One code path serves a CLIP trained from scratch by duomodal (a duomodal model directory of kind
"clip": config.json + model.safetensors + tokenizer.json) and any pretrained CLIP in Hugging Face
format on disk (a local directory, or a repo id already in the Hugging Face cache). Nothing is
ever downloaded: a model that is not on disk is an error that says so.

duomodal's CLIP uses duomodal's BPE tokenizer (``[BOS] tokens [EOS]`` padded with ``[PAD]``;
ids PAD=0, BOS=2, EOS=3): the text config's ``eos_token_id`` is 3, so ``CLIPTextModel`` pools
the hidden state at the first EOS. Its image preprocessing (size, mean, std) is in its config.
Causal attention means the padding after EOS never reaches the pooled state, so no attention
mask is needed.

The parts: ``config`` (ClipConfig), ``model`` (ContrastiveClip), ``preprocess`` (pixels and token ids),
``embedder`` (ClipEmbedder), ``load`` (load_clip) and ``export`` (export_hf); their public names are
importable from here.
"""

from duomodal.models.clip.config import KIND, LOGIT_SCALE_MAX, ClipConfig, hf_config
from duomodal.models.clip.embedder import ClipEmbedder
from duomodal.models.clip.export import export_hf
from duomodal.models.clip.load import HF_REPO_ID, ClipLoadError, file_model_id, load_clip, load_contrastive_clip
from duomodal.models.clip.model import ClipFeatures, ContrastiveClip
from duomodal.models.clip.preprocess import (
    TextEncoder,
    duomodal_image_preprocessor,
    duomodal_text_encoder,
    normalize_pixels,
    trim_padding,
)

__all__ = [
    "HF_REPO_ID",
    "KIND",
    "LOGIT_SCALE_MAX",
    "ClipConfig",
    "ClipEmbedder",
    "ClipFeatures",
    "ClipLoadError",
    "ContrastiveClip",
    "TextEncoder",
    "duomodal_image_preprocessor",
    "duomodal_text_encoder",
    "export_hf",
    "file_model_id",
    "hf_config",
    "load_clip",
    "load_contrastive_clip",
    "normalize_pixels",
    "trim_padding",
]
