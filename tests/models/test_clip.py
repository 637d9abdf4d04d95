"""CLIP model: forward, loading duomodal and Hugging Face directories, every loading error, export."""

from __future__ import annotations

import hashlib
import json
import math
import string
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from duomodal.config import to_dict
from duomodal.modelfile import save_model
from duomodal.models.clip import (
    LOGIT_SCALE_MAX,
    ClipConfig,
    ClipLoadError,
    ContrastiveClip,
    export_hf,
    load_clip,
)
from duomodal.text.tokenizer import Tokenizer

CAPTIONS = ["a red square", "a green circle", "a blue triangle", "a yellow square", "red circle", "blue square"]


def _images(shape_dataset: Path, n: int = 4) -> list[Image.Image]:
    return [Image.open(p).convert("RGB") for p in sorted(shape_dataset.glob("*.png"))[:n]]


# --- the model -------------------------------------------------------------------------------------


def test_forward_gives_normalised_features_of_either_side(tiny_clip_config):
    model = ContrastiveClip.from_config(tiny_clip_config).eval()
    ids = torch.tensor([[2, 5, 6, 3, 0, 0], [2, 7, 3, 0, 0, 0]])
    out = model(pixel_values=torch.randn(2, 3, 16, 16), input_ids=ids)
    assert out.image.shape == (2, 32) and out.text.shape == (2, 32)
    assert torch.allclose(out.image.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert torch.allclose(out.text.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert model(input_ids=ids).image is None
    with pytest.raises(ValueError, match="ContrastiveClip needs pixel_values, input_ids or both"):
        model()


def test_text_pooling_takes_the_eos_position_and_ignores_padding(tiny_clip_config):
    model = ContrastiveClip.from_config(tiny_clip_config).eval()
    short = torch.tensor([[2, 5, 6, 3, 0, 0, 0, 0]])
    other_padding = torch.tensor([[2, 5, 6, 3, 9, 9, 9, 9]])  # anything after EOS is invisible (causal)
    changed_before_eos = torch.tensor([[2, 5, 7, 3, 0, 0, 0, 0]])
    with torch.no_grad():
        a, b, c = (model(input_ids=x).text for x in (short, other_padding, changed_before_eos))
    assert torch.allclose(a, b, atol=1e-6)
    assert not torch.allclose(a, c, atol=1e-3)


def test_logit_scale_is_clamped_at_ln_100_as_open_clip(tiny_clip_config):
    model = ContrastiveClip.from_config(tiny_clip_config).train()
    with torch.no_grad():
        model.clip.logit_scale.fill_(7.0)
    out = model(input_ids=torch.tensor([[2, 5, 3]]))
    assert out.logit_scale.item() == pytest.approx(100.0, rel=1e-5)
    assert model.clip.logit_scale.item() == pytest.approx(LOGIT_SCALE_MAX)
    assert math.exp(tiny_clip_config.logit_scale_init) == pytest.approx(1 / 0.07)


def test_config_errors_name_the_value():
    with pytest.raises(ValueError, match="model.image_size 18 is not a multiple of model.patch_size 4"):
        ClipConfig(image_size=18, patch_size=4)
    with pytest.raises(ValueError, match=r"model.image_std values must be positive, got \(0.5, 0.0, 0.5\)"):
        ClipConfig(image_std=(0.5, 0.0, 0.5))


# --- duomodal directories --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def duomodal_clip_dir(tmp_path_factory, tiny_clip_config) -> Path:
    torch.manual_seed(0)
    tokenizer = Tokenizer.train(CAPTIONS * 3, vocab_size=64, min_frequency=1)
    config = replace(tiny_clip_config, vocab_size=tokenizer.vocab_size, image_mean=(0.4, 0.5, 0.6))
    model = ContrastiveClip.from_config(config)
    directory = tmp_path_factory.mktemp("duomodal_clip")
    save_model(directory, "clip", to_dict(config), model.state_dict())
    tokenizer.save(directory / "tokenizer.json")
    return directory


def test_duomodal_dir_embeds_like_the_model(duomodal_clip_dir, shape_dataset):
    embedder = load_clip(duomodal_clip_dir, device="cpu")
    digest = hashlib.sha256((duomodal_clip_dir / "model.safetensors").read_bytes()).hexdigest()[:12]
    assert embedder.model_id == f"duomodal-clip:{digest}"
    assert embedder.dim == 32
    texts = embedder.embed_texts(CAPTIONS[:3])
    images = embedder.embed_images(_images(shape_dataset))
    assert texts.shape == (3, 32) and images.shape == (4, 32)
    assert texts.dtype == torch.float32 and texts.device.type == "cpu"
    assert torch.allclose(images.norm(dim=-1), torch.ones(4), atol=1e-5)
    tokenizer = Tokenizer.load(duomodal_clip_dir)
    ids = tokenizer.encode_batch(CAPTIONS[:3], 16)
    with torch.no_grad():
        direct = embedder.model(input_ids=ids).text
    assert torch.allclose(texts, direct, atol=1e-5)
    assert embedder.embed_texts([]).shape == (0, 32)


def test_score_is_the_cosine_of_each_pair_and_broadcasts_one_text(duomodal_clip_dir, shape_dataset):
    embedder = load_clip(duomodal_clip_dir, device="cpu")
    images = _images(shape_dataset, 3)
    scores = embedder.score(images, CAPTIONS[:3])
    expected = (embedder.embed_images(images) * embedder.embed_texts(CAPTIONS[:3])).sum(-1)
    assert scores.shape == (3,) and torch.allclose(scores, expected, atol=1e-5)
    one = embedder.score(images, ["a red square"])
    assert torch.allclose(one, embedder.embed_images(images) @ embedder.embed_texts(["a red square"])[0], atol=1e-5)
    with pytest.raises(ValueError, match="score needs as many texts as images \\(or one text\\), got 3 and 2"):
        embedder.score(images, CAPTIONS[:2])


def test_export_to_hugging_face_gives_the_same_embeddings(duomodal_clip_dir, shape_dataset, tmp_path):
    hf_dir = export_hf(duomodal_clip_dir, tmp_path / "hf")
    assert {"config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"} <= {
        p.name for p in hf_dir.iterdir()
    }
    ours = load_clip(duomodal_clip_dir, device="cpu")
    theirs = load_clip(hf_dir, device="cpu")
    assert theirs.model_id.startswith("hf-clip:")
    images = _images(shape_dataset)  # already 16x16: no resize, so both preprocessings agree exactly
    assert torch.allclose(ours.embed_texts(CAPTIONS), theirs.embed_texts(CAPTIONS), atol=1e-5)
    assert torch.allclose(ours.embed_images(images), theirs.embed_images(images), atol=1e-5)
    assert theirs.logit_scale == pytest.approx(ours.logit_scale)
    with pytest.raises(ClipLoadError, match="already exists and is not empty; choose a new directory"):
        export_hf(duomodal_clip_dir, hf_dir)


# --- Hugging Face directories ----------------------------------------------------------------------


def _hf_tokenizer():
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase:
        vocab[c] = len(vocab)
    for c in string.ascii_lowercase:
        vocab[c + "</w>"] = len(vocab)
    vocab["re"] = len(vocab)
    vocab["red</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[("r", "e"), ("re", "d</w>")])


@pytest.fixture(scope="module")
def hf_clip_dir(tmp_path_factory) -> Path:
    """A tiny CLIP saved the way Hugging Face checkpoints are: model, tokenizer, image processor."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    torch.manual_seed(0)
    tokenizer = _hf_tokenizer()
    config = CLIPConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "max_position_embeddings": 24, "projection_dim": 16,
                     "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": 24, "patch_size": 8, "projection_dim": 16},
        projection_dim=16,
    )
    directory = tmp_path_factory.mktemp("hf_clip")
    CLIPModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    CLIPImageProcessorPil(size={"shortest_edge": 24}, crop_size={"height": 24, "width": 24}).save_pretrained(directory)
    return directory


def test_hugging_face_dir_matches_direct_transformers_calls(hf_clip_dir, shape_dataset):
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    embedder = load_clip(hf_clip_dir, device="cpu")
    digest = hashlib.sha256((hf_clip_dir / "model.safetensors").read_bytes()).hexdigest()[:12]
    assert embedder.model_id == f"hf-clip:{digest}"
    assert embedder.dim == 16
    texts = ["a red cat", "blue", "red red red"]
    images = _images(shape_dataset, 3)
    model = CLIPModel.from_pretrained(hf_clip_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(hf_clip_dir)
    processor = AutoImageProcessor.from_pretrained(hf_clip_dir, backend="pil")
    with torch.no_grad():
        text_direct = model.get_text_features(**tokenizer(texts, padding=True, return_tensors="pt")).pooler_output
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        image_direct = model.get_image_features(pixel_values=pixels).pooler_output
    assert torch.allclose(embedder.embed_texts(texts), F.normalize(text_direct, dim=-1), atol=1e-5)
    assert torch.allclose(embedder.embed_images(images), F.normalize(image_direct, dim=-1), atol=1e-5)
    assert embedder.logit_scale == pytest.approx(math.exp(model.config.logit_scale_init_value), rel=1e-5)


def _copy_without(source: Path, target: Path, *missing: str) -> Path:
    target.mkdir()
    for path in source.iterdir():
        if path.name not in missing:
            (target / path.name).write_bytes(path.read_bytes())
    return target


def test_loading_errors_are_clear(hf_clip_dir, duomodal_clip_dir, tmp_path):
    with pytest.raises(ClipLoadError) as e:
        load_clip(tmp_path / "nowhere")
    assert str(e.value) == (
        f"{tmp_path / 'nowhere'} does not exist; pass a duomodal CLIP directory or a Hugging Face CLIP directory"
    )
    (tmp_path / "file.txt").write_text("hi")
    with pytest.raises(ClipLoadError, match="file.txt is not a directory; pass a duomodal CLIP directory"):
        load_clip(tmp_path / "file.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ClipLoadError) as e:
        load_clip(tmp_path / "empty")
    assert str(e.value) == (
        f"{tmp_path / 'empty'} has no config.json; it is not a CLIP model directory "
        "(a duomodal CLIP run/model directory or a Hugging Face CLIP directory)"
    )
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ClipLoadError) as e:
        load_clip(bert)
    assert str(e.value) == f"{bert} holds a Hugging Face 'bert' model, not CLIP; duomodal loads CLIP models (model_type 'clip')"
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ClipLoadError, match="config.json is not valid JSON"):
        load_clip(broken)

    no_weights = _copy_without(hf_clip_dir, tmp_path / "no_weights", "model.safetensors")
    with pytest.raises(ClipLoadError) as e:
        load_clip(no_weights)
    assert str(e.value) == f"{no_weights} is missing model.safetensors (the weights)"
    (no_weights / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ClipLoadError) as e:
        load_clip(no_weights)
    assert str(e.value) == (
        f"{no_weights} has only pickled weights (pytorch_model.bin); duomodal loads safetensors only: "
        "convert them to model.safetensors"
    )
    no_tokenizer = _copy_without(hf_clip_dir, tmp_path / "no_tokenizer", "tokenizer.json")
    with pytest.raises(ClipLoadError) as e:
        load_clip(no_tokenizer)
    assert str(e.value) == f"{no_tokenizer} is missing its tokenizer (tokenizer.json, or vocab.json and merges.txt)"
    no_processor = _copy_without(hf_clip_dir, tmp_path / "no_processor", "preprocessor_config.json")
    with pytest.raises(ClipLoadError) as e:
        load_clip(no_processor)
    assert str(e.value) == f"{no_processor} is missing preprocessor_config.json (the image processor)"
    corrupt = _copy_without(hf_clip_dir, tmp_path / "corrupt", "model.safetensors")
    (corrupt / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ClipLoadError, match="could not be loaded as a Hugging Face CLIP model"):
        load_clip(corrupt)

    vae = tmp_path / "vae"
    save_model(vae, "vae", {}, {})
    with pytest.raises(ClipLoadError) as e:
        load_clip(vae)
    assert str(e.value) == f"{vae} holds a vae model, expected a clip model"
    no_tok = _copy_without(duomodal_clip_dir, tmp_path / "no_tok", "tokenizer.json")
    with pytest.raises(ClipLoadError, match="is a duomodal CLIP without a usable tokenizer: no tokenizer at"):
        load_clip(no_tok)
    bad_weights = _copy_without(hf_clip_dir, tmp_path / "bad_weights", "config.json")
    (bad_weights / "config.json").write_bytes((duomodal_clip_dir / "config.json").read_bytes())
    with pytest.raises(ClipLoadError, match="model.safetensors does not match the model: missing tensors: clip."):
        load_clip(bad_weights)


def test_a_repo_id_not_in_the_cache_fails_fast_without_network(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ClipLoadError) as e:
        load_clip("nobody-xyz/no-such-clip")
    assert str(e.value) == (
        "nobody-xyz/no-such-clip is not a directory and not in the local Hugging Face cache; duomodal never downloads "
        "models: fetch it first (e.g. `huggingface-cli download nobody-xyz/no-such-clip`) or pass a local directory"
    )
