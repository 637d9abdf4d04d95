"""Loading a CLIP from disk: a duomodal CLIP directory, a Hugging Face CLIP directory, or a repo id
already in the Hugging Face cache. Nothing is ever downloaded."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from PIL import Image

from duomodal.config import ConfigError, from_dict
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
from duomodal.models.clip.config import KIND, ClipConfig
from duomodal.models.clip.embedder import ClipEmbedder
from duomodal.models.clip.model import ContrastiveClip
from duomodal.models.clip.preprocess import duomodal_image_preprocessor, duomodal_text_encoder
from duomodal.text.tokenizer import Tokenizer, TokenizerError

HF_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ClipLoadError(ValueError):
    """A path that is not a loadable CLIP model (missing, not CLIP, missing files, not on disk)."""


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
    # huggingface_hub (transformers' dependency) loads here, for a repo id only
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
    # transformers loads here, when a CLIP is built or loaded: importing it takes seconds that the modules
    # importing this one (DALL-E sampling, the index, the server's start) do not need
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
