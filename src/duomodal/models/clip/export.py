"""Writing a duomodal CLIP as a Hugging Face CLIP directory."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from duomodal.models.clip.load import ClipLoadError, load_contrastive_clip


def export_hf(directory: str | os.PathLike, hf_directory: str | os.PathLike) -> Path:
    """Write a duomodal CLIP as a Hugging Face CLIP directory (model, tokenizer, image processor).

    The exported tokenizer adds ``[BOS]``/``[EOS]`` itself, so ``CLIPModel`` + ``AutoTokenizer`` +
    ``AutoImageProcessor`` give the same embeddings as ``load_clip`` on the duomodal directory
    (up to the image resize filter). The directory is written beside its target and renamed into place.
    """
    # transformers loads here, on export only: importing it takes seconds
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
