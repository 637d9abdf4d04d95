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
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from duomodal.config import ConfigError, from_dict
from duomodal.device import ATTENTION_KERNELS, attention_kernel, precision_dtype, resolve_device, resolve_precision
from duomodal.files import file_sha256
from duomodal.modelfile import (
    CONFIG_FILE,
    TOKENIZER_FILE,
    WEIGHTS_FILE,
    ModelFileError,
    load_state_dict_strict,
    load_weights,
    read_config,
)
from duomodal.text.tokenizer import Tokenizer, TokenizerError

KIND = "clip"
LOGIT_SCALE_MAX = math.log(100.0)  # open_clip clamps the learned log temperature to [0, ln 100]
HF_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ClipLoadError(ValueError):
    """A path that is not a loadable CLIP model (missing, not CLIP, missing files, not on disk)."""


# --- config ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClipConfig:
    image_size: int = 32  # input images are resized/cropped to image_size x image_size
    patch_size: int = 4  # ViT patch side; image_size must be a multiple
    vision_width: int = 128  # ViT hidden size
    vision_layers: int = 4
    vision_heads: int = 4
    text_width: int = 128  # text transformer hidden size
    text_layers: int = 4
    text_heads: int = 4
    context_length: int = 32  # text tokens incl. BOS and EOS
    vocab_size: int = 1024  # BPE vocabulary; the trainer sets it to the trained tokenizer's size
    embed_dim: int = 128  # joint embedding size (projection_dim)
    mlp_ratio: int = 4  # MLP hidden = mlp_ratio * width
    hidden_act: Literal["quick_gelu", "gelu"] = "gelu"
    # How attention is computed (the same weights either way): "sdpa" is torch's fused kernel, "eager" plain
    # matmuls; "auto" picks the faster one for the device the inputs are on (duomodal.device.attention_kernel).
    attention: Literal["auto", "sdpa", "eager"] = "auto"
    logit_scale_init: float = math.log(1 / 0.07)  # CLIP's initial temperature 0.07 (SigLIP starts at ln 10)
    # The contrastive loss the model is trained with: "softmax" (CLIP's InfoNCE over the batch) or
    # "sigmoid" (SigLIP: each pair a binary match / no match; adds a learned logit bias to the model).
    loss: Literal["softmax", "sigmoid"] = "softmax"
    logit_bias_init: float = -10.0  # sigmoid only: the bias starts by calling every pair a non-match
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)  # per-channel normalisation of [0, 1] pixels
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)

    def __post_init__(self) -> None:
        for name in ("image_size", "patch_size", "vision_width", "vision_layers", "vision_heads", "text_width",
                     "text_layers", "text_heads", "embed_dim", "mlp_ratio"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be at least 1, got {getattr(self, name)}")
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"model.image_size {self.image_size} is not a multiple of model.patch_size {self.patch_size}"
            )
        if self.vision_width % self.vision_heads:
            raise ConfigError(
                f"model.vision_width {self.vision_width} is not a multiple of model.vision_heads {self.vision_heads}"
            )
        if self.text_width % self.text_heads:
            raise ConfigError(
                f"model.text_width {self.text_width} is not a multiple of model.text_heads {self.text_heads}"
            )
        if self.context_length < 3:
            raise ConfigError(f"model.context_length must be at least 3 (BOS, a token, EOS), got {self.context_length}")
        if self.vocab_size < 5:
            raise ConfigError(f"model.vocab_size must be at least 5, got {self.vocab_size}")
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ConfigError(
                f"model.image_mean and model.image_std need 3 values (R, G, B), got {self.image_mean}, {self.image_std}"
            )
        if self.loss not in ("softmax", "sigmoid"):
            raise ConfigError(f"model.loss must be softmax or sigmoid, got {self.loss!r}")
        if self.attention not in ATTENTION_KERNELS:
            raise ConfigError(f"model.attention must be one of {', '.join(ATTENTION_KERNELS)}, got {self.attention!r}")
        if any(s <= 0 for s in self.image_std):
            raise ConfigError(f"model.image_std values must be positive, got {self.image_std}")


def hf_config(config: ClipConfig) -> Any:
    """The transformers ``CLIPConfig`` of a duomodal ``ClipConfig``."""
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config={
            "vocab_size": config.vocab_size,
            "hidden_size": config.text_width,
            "intermediate_size": config.mlp_ratio * config.text_width,
            "num_hidden_layers": config.text_layers,
            "num_attention_heads": config.text_heads,
            "max_position_embeddings": config.context_length,
            "hidden_act": config.hidden_act,
            "projection_dim": config.embed_dim,
            "pad_token_id": 0,
            "bos_token_id": 2,
            "eos_token_id": 3,
        },
        vision_config={
            "hidden_size": config.vision_width,
            "intermediate_size": config.mlp_ratio * config.vision_width,
            "num_hidden_layers": config.vision_layers,
            "num_attention_heads": config.vision_heads,
            "image_size": config.image_size,
            "patch_size": config.patch_size,
            "hidden_act": config.hidden_act,
            "projection_dim": config.embed_dim,
        },
        projection_dim=config.embed_dim,
        logit_scale_init_value=config.logit_scale_init,
    )


# --- the model -------------------------------------------------------------------------------------


@dataclass
class ClipFeatures:
    """L2-normalised features of whichever inputs were given, exp(clamped logit scale) and, for a model
    trained with the sigmoid loss, its logit bias."""

    image: torch.Tensor | None  # (B, D)
    text: torch.Tensor | None  # (B, D)
    logit_scale: torch.Tensor  # () scalar, the inverse temperature
    logit_bias: torch.Tensor | None = None  # () scalar (sigmoid loss only)


class ContrastiveClip(nn.Module):
    """A ``transformers.CLIPModel`` whose forward gives normalised features for the contrastive loss.

    Calling the module (rather than reaching into ``.clip``) keeps DDP's hooks in the path.
    """

    def __init__(self, clip: nn.Module, logit_bias: float | None = None, attention: str = "auto"):
        super().__init__()
        self.clip = clip
        self.attention = attention  # "auto", "sdpa" or "eager": resolved per forward from the inputs' device
        # SigLIP's learned bias (a sigmoid-loss model only; pretrained CLIPs and softmax models have none)
        self.logit_bias = None if logit_bias is None else nn.Parameter(torch.tensor(float(logit_bias)))

    @classmethod
    def from_config(cls, config: ClipConfig) -> ContrastiveClip:
        from transformers import CLIPModel

        hf = hf_config(config)
        hf._attn_implementation = "eager" if config.attention == "auto" else config.attention  # sub-configs too
        return cls(CLIPModel(hf), config.logit_bias_init if config.loss == "sigmoid" else None, config.attention)

    @property
    def embed_dim(self) -> int:
        return int(self.clip.config.projection_dim)

    def hidden_matrices(self) -> list[nn.Parameter]:
        """The 2-D weights inside both towers' transformer layers (attention and MLP), the ones
        ``train.optimizer=muon`` gives to Muon; embeddings, projections and norms stay with AdamW."""
        matrices = []
        for tower in (self.clip.text_model, self.clip.vision_model):
            for layer in tower.encoder.layers:
                matrices += [p for p in layer.parameters() if p.ndim == 2]
        return matrices

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,  # (B, 3, S, S) normalised
        input_ids: torch.Tensor | None = None,  # (B, T)
        attention_mask: torch.Tensor | None = None,  # (B, T)
    ) -> ClipFeatures:
        if pixel_values is None and input_ids is None:
            raise ValueError("ContrastiveClip needs pixel_values, input_ids or both")
        device = (pixel_values if pixel_values is not None else input_ids).device
        kernel = attention_kernel(self.attention, device)
        if self.clip.config._attn_implementation != kernel:
            self.clip.config._attn_implementation = kernel  # both towers' configs too
        image = text = None
        if pixel_values is not None:
            image = F.normalize(self.clip.get_image_features(pixel_values=pixel_values).pooler_output, dim=-1)
        if input_ids is not None:
            out = self.clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
            text = F.normalize(out.pooler_output, dim=-1)
        if self.training:
            with torch.no_grad():  # as open_clip after each step: the stored value never passes ln 100
                self.clip.logit_scale.clamp_(0, LOGIT_SCALE_MAX)
        logit_scale = self.clip.logit_scale.clamp(0, LOGIT_SCALE_MAX).exp()
        return ClipFeatures(image=image, text=text, logit_scale=logit_scale, logit_bias=self.logit_bias)


# --- preprocessing ---------------------------------------------------------------------------------


def normalize_pixels(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> normalised by per-channel mean and std."""
    mean_t = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images - mean_t) / std_t


def duomodal_image_preprocessor(config: ClipConfig) -> Callable[[list[Image.Image]], torch.Tensor]:
    from duomodal.data.images import to_tensor

    def preprocess(images: list[Image.Image]) -> torch.Tensor:
        pixels = torch.stack([to_tensor(image.convert("RGB"), config.image_size) for image in images])
        return normalize_pixels(pixels, config.image_mean, config.image_std)

    return preprocess


def trim_padding(input_ids: torch.Tensor, pad_id: int = 0) -> torch.Tensor:
    """Drop the columns after the longest text's EOS: with causal attention and absolute positions the
    pooled EOS state is unchanged, and short prompts embed several times faster."""
    used = (input_ids != pad_id).any(0).nonzero()
    return input_ids[:, : int(used.max()) + 1] if used.numel() else input_ids


TextEncoder = Callable[[list[str]], tuple[torch.Tensor, "torch.Tensor | None"]]


def duomodal_text_encoder(tokenizer: Tokenizer, context_length: int) -> TextEncoder:
    """Texts -> (input_ids (B, T), None); long texts are truncated (EOS kept)."""

    def encode(texts: list[str]) -> tuple[torch.Tensor, None]:
        return trim_padding(tokenizer.encode_batch(texts, context_length, truncate=True)), None

    return encode


# --- the embedder ----------------------------------------------------------------------------------


class ClipEmbedder:
    """Embeds images and texts into one normalised space; scores image-text pairs (a reranking Scorer)."""

    def __init__(
        self,
        model: ContrastiveClip,
        encode_texts: TextEncoder,
        preprocess_images: Callable[[list[Image.Image]], torch.Tensor],
        model_id: str,
        device: torch.device | str | None = None,
        batch_size: int = 64,
        precision: str = "auto",
    ):
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)  # "auto": from the hardware
        self.model = model.to(self.device).eval()
        self.encode_texts = encode_texts
        self.preprocess_images = preprocess_images
        self.model_id = model_id
        self.batch_size = batch_size

    @property
    def dim(self) -> int:
        return self.model.embed_dim

    @property
    def logit_scale(self) -> float:
        """exp of the learned (clamped) log temperature: multiply cosines by it before a softmax."""
        return float(self.model.clip.logit_scale.detach().clamp(0, LOGIT_SCALE_MAX).exp())

    def _autocast(self):
        if self.precision == "fp32":
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=precision_dtype(self.precision))

    @torch.inference_mode()
    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(N, D) L2-normalised float32 on the CPU."""
        chunks = [torch.zeros(0, self.dim)]
        for start in range(0, len(images), self.batch_size):
            pixels = self.preprocess_images(list(images[start : start + self.batch_size])).to(self.device)
            with self._autocast():
                features = self.model(pixel_values=pixels).image
            chunks.append(F.normalize(features.float(), dim=-1).cpu())
        return torch.cat(chunks)

    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, D) L2-normalised float32 on the CPU."""
        chunks = [torch.zeros(0, self.dim)]
        for start in range(0, len(texts), self.batch_size):
            input_ids, attention_mask = self.encode_texts(list(texts[start : start + self.batch_size]))
            input_ids = input_ids.to(self.device)
            if attention_mask is not None:
                attention_mask = attention_mask.to(self.device)
            with self._autocast():
                features = self.model(input_ids=input_ids, attention_mask=attention_mask).text
            chunks.append(F.normalize(features.float(), dim=-1).cpu())
        return torch.cat(chunks)

    def score(self, images: Sequence[Image.Image], texts: Sequence[str]) -> torch.Tensor:
        """(N,) cosine similarity of each (image, text) pair; satisfies ``duomodal.generate.Scorer``.

        A single text is broadcast over all images (the reranking case: N samples, one prompt).
        """
        if len(texts) == 1 and len(images) != 1:
            texts = list(texts) * len(images)
        if len(images) != len(texts):
            raise ValueError(f"score needs as many texts as images (or one text), got {len(images)} and {len(texts)}")
        if not images:
            return torch.zeros(0)
        image_features = self.embed_images(images)
        unique = list(dict.fromkeys(texts))
        text_features = self.embed_texts(unique)
        rows = torch.tensor([unique.index(t) for t in texts])
        return (image_features * text_features[rows]).sum(-1)


# --- loading ---------------------------------------------------------------------------------------


def file_model_id(prefix: str, path: Path) -> str:
    """``prefix:`` + the first 12 hex digits of the file's SHA-256: a stable identity of the weights."""
    return f"{prefix}:{file_sha256(path)[:12]}"


def load_clip(path: str | os.PathLike, device: torch.device | str | None = None,
              precision: str = "auto") -> ClipEmbedder:
    """A ``ClipEmbedder`` for a duomodal CLIP directory (model or run dir) or a Hugging Face CLIP, computing
    at `precision` ("auto": from the hardware, see duomodal.device).

    `path` may also be a Hugging Face repo id ("org/name") that is already in the local HF cache.
    """
    directory = Path(path)
    if not directory.exists():
        if HF_REPO_ID.match(str(path)):
            directory = _from_hf_cache(str(path))
        else:
            raise ClipLoadError(f"{path} does not exist; pass a duomodal CLIP directory or a Hugging Face CLIP directory")
    if not directory.is_dir():
        raise ClipLoadError(f"{path} is not a directory; pass a duomodal CLIP directory or a Hugging Face CLIP directory")
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise ClipLoadError(
            f"{directory} has no {CONFIG_FILE}; it is not a CLIP model directory "
            "(a duomodal CLIP run/model directory or a Hugging Face CLIP directory)"
        )
    try:
        data = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ClipLoadError(f"{config_path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ClipLoadError(f"{config_path} is not a model config")
    if "kind" in data:
        return _load_duomodal(directory, device, precision)
    if data.get("model_type") == "clip":
        return _load_hf(directory, device, precision)
    if "model_type" in data:
        raise ClipLoadError(
            f"{directory} holds a Hugging Face {data['model_type']!r} model, not CLIP; "
            "duomodal loads CLIP models (model_type 'clip')"
        )
    raise ClipLoadError(f"{directory} is not a CLIP model directory: {CONFIG_FILE} has neither 'kind' nor 'model_type'")


def _from_hf_cache(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=repo_id, local_files_only=True))
    except Exception:  # huggingface_hub raises LocalEntryNotFoundError (and others) when not cached
        raise ClipLoadError(
            f"{repo_id} is not a directory and not in the local Hugging Face cache; duomodal never downloads "
            f"models: fetch it first (e.g. `huggingface-cli download {repo_id}`) or pass a local directory"
        ) from None


def load_contrastive_clip(directory: str | os.PathLike) -> tuple[ContrastiveClip, ClipConfig, Tokenizer]:
    """The model (CPU, eval), its config and its tokenizer from a duomodal CLIP directory."""
    directory = Path(directory)
    try:
        raw = read_config(directory, kind=KIND)
        config = from_dict(ClipConfig, raw, "model")
    except (ModelFileError, ConfigError) as e:
        raise ClipLoadError(str(e)) from None
    model = ContrastiveClip.from_config(config)
    try:
        load_state_dict_strict(model, load_weights(directory), str(directory / WEIGHTS_FILE))
    except ModelFileError as e:
        raise ClipLoadError(str(e)) from None
    try:
        tokenizer = Tokenizer.load(directory / TOKENIZER_FILE)
    except TokenizerError as e:
        raise ClipLoadError(f"{directory} is a duomodal CLIP without a usable tokenizer: {e}") from None
    if tokenizer.vocab_size > config.vocab_size:
        raise ClipLoadError(
            f"{directory}: tokenizer has {tokenizer.vocab_size} tokens but the model only {config.vocab_size}"
        )
    return model.eval(), config, tokenizer


def _load_duomodal(directory: Path, device: torch.device | str | None, precision: str) -> ClipEmbedder:
    model, config, tokenizer = load_contrastive_clip(directory)
    return ClipEmbedder(
        model,
        duomodal_text_encoder(tokenizer, config.context_length),
        duomodal_image_preprocessor(config),
        file_model_id("duomodal-clip", directory / WEIGHTS_FILE),
        device=device,
        precision=precision,
    )


def _load_hf(directory: Path, device: torch.device | str | None, precision: str) -> ClipEmbedder:
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    weights = directory / "model.safetensors"
    if not weights.is_file():
        if (directory / "model.safetensors.index.json").is_file():
            raise ClipLoadError(f"{directory} holds sharded weights; duomodal loads a single model.safetensors")
        if (directory / "pytorch_model.bin").is_file():
            raise ClipLoadError(
                f"{directory} has only pickled weights (pytorch_model.bin); duomodal loads safetensors only: "
                "convert them to model.safetensors"
            )
        raise ClipLoadError(f"{directory} is missing model.safetensors (the weights)")
    if not (directory / "tokenizer.json").is_file() and not (
        (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file()
    ):
        raise ClipLoadError(f"{directory} is missing its tokenizer (tokenizer.json, or vocab.json and merges.txt)")
    if not (directory / "preprocessor_config.json").is_file():
        raise ClipLoadError(f"{directory} is missing preprocessor_config.json (the image processor)")
    try:
        clip = CLIPModel.from_pretrained(directory, local_files_only=True, use_safetensors=True, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        processor = AutoImageProcessor.from_pretrained(directory, local_files_only=True, backend="pil")
    except Exception as e:  # transformers, tokenizers and safetensors each raise their own error types
        raise ClipLoadError(f"{directory} could not be loaded as a Hugging Face CLIP model: {e}") from None
    context_length = int(clip.config.text_config.max_position_embeddings)

    def encode(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        batch = tokenizer(texts, padding=True, truncation=True, max_length=context_length, return_tensors="pt")
        return batch["input_ids"], batch["attention_mask"]

    def preprocess(images: list[Image.Image]) -> torch.Tensor:
        return processor(images=[image.convert("RGB") for image in images], return_tensors="pt")["pixel_values"]

    return ClipEmbedder(ContrastiveClip(clip), encode, preprocess, file_model_id("hf-clip", weights), device=device,
                        precision=precision)


# --- export ----------------------------------------------------------------------------------------


def export_hf(directory: str | os.PathLike, hf_directory: str | os.PathLike) -> Path:
    """Write a duomodal CLIP as a Hugging Face CLIP directory (model, tokenizer, image processor).

    The exported tokenizer adds ``[BOS]``/``[EOS]`` itself, so ``CLIPModel`` + ``AutoTokenizer`` +
    ``AutoImageProcessor`` give the same embeddings as ``load_clip`` on the duomodal directory
    (up to the image resize filter). The directory is written beside its target and renamed into place.
    """
    from tokenizers.processors import TemplateProcessing
    from transformers import CLIPImageProcessorPil, PreTrainedTokenizerFast

    hf_directory = Path(hf_directory)
    if hf_directory.exists() and (not hf_directory.is_dir() or any(hf_directory.iterdir())):
        raise ClipLoadError(f"{hf_directory} already exists and is not empty; choose a new directory")
    model, config, tokenizer = load_contrastive_clip(directory)
    hf_tokenizer = tokenizer.hf.from_str(tokenizer.hf.to_str())
    hf_tokenizer.post_processor = TemplateProcessing(
        single="[BOS] $A [EOS]", special_tokens=[("[BOS]", tokenizer.bos_id), ("[EOS]", tokenizer.eos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=hf_tokenizer,
        bos_token="[BOS]",
        eos_token="[EOS]",
        pad_token="[PAD]",
        unk_token="[UNK]",
        model_max_length=config.context_length,
    )
    processor = CLIPImageProcessorPil(
        size={"shortest_edge": config.image_size},
        crop_size={"height": config.image_size, "width": config.image_size},
        image_mean=list(config.image_mean),
        image_std=list(config.image_std),
    )
    hf_directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{hf_directory.name}.", dir=hf_directory.parent))
    try:
        model.clip.save_pretrained(staging)
        fast.save_pretrained(staging)
        processor.save_pretrained(staging)
        if hf_directory.exists():
            hf_directory.rmdir()
        os.replace(staging, hf_directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return hf_directory


__all__ = [
    "ClipConfig",
    "ClipEmbedder",
    "ClipFeatures",
    "ClipLoadError",
    "ContrastiveClip",
    "LOGIT_SCALE_MAX",
    "export_hf",
    "hf_config",
    "load_clip",
    "load_contrastive_clip",
    "normalize_pixels",
]
