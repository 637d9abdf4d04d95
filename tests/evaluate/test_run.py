"""`duomodal eval` with stand-in models whose answers are known, so every figure can be checked.

The VAE is a real (untrained) DiscreteVAE saved in a model directory. The DALL-E stand-in predicts
uniform logits (so bits per image token is exactly log2 of the codebook size) and "generates"
shapes in the prompted colour for even seeds and in the wrong colour for odd ones. The CLIP
stand-ins embed an image by its colour (the reranker) or by its shape (the judge), and a text by
the colour or shape word it contains.
"""

from __future__ import annotations

import json
import math
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from duomodal.cli import main
from duomodal.config import to_dict
from duomodal.data.profile import captions_for, unseen_phrasing
from duomodal.evaluate import EvalError, EvalOptions, run_evaluation
from duomodal.metrics import dominant_color
from duomodal.modelfile import save_model
from duomodal.models.dalle import DalleRun
from duomodal.models.sampling import SamplingOptions
from duomodal.models.vae import DiscreteVAE, VAEConfig

from .conftest import COLORS, HELDOUT, PALETTE, SHAPES


@pytest.fixture
def data(labelled_data) -> Path:
    return labelled_data


@pytest.fixture
def vae_dir(tmp_path) -> Path:
    config = VAEConfig(image_size=16, n_downsample=2, width=8, max_width=16, codebook_size=16, codebook_dim=8)
    directory = tmp_path / "vae"
    save_model(directory, "vae", to_dict(config), DiscreteVAE(config).state_dict())
    rows = [{"split": "train", "step": s, "loss": 1.0 / s, "lr": 1e-3} for s in (1, 2, 3)]
    (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return directory


def draw(shape: str, color: str, size: int = 16) -> Image.Image:
    image = Image.new("RGB", (size, size), "white")
    d = ImageDraw.Draw(image)
    box = (3, 3, size - 4, size - 4)
    {"square": d.rectangle, "circle": d.ellipse}.get(shape, lambda b, fill: d.polygon(
        [(size // 2, 3), (3, size - 4), (size - 4, size - 4)], fill=fill))(box, fill=COLORS[color])
    image.info["shape"] = shape  # what the judge stand-in looks at
    return image


def jaccard(a: str, b: str) -> float:
    """IoU of the ink of two drawn shapes, counted pixel by pixel (colour does not matter)."""
    ink_a, ink_b = (np.asarray(draw(s, "blue")).min(axis=2) < 200 for s in (a, b))
    return float((ink_a & ink_b).sum() / (ink_a | ink_b).sum())


def template_rank(image_shape: str, wanted: str) -> int:
    """Rank of the wanted shape's template for an image of image_shape: ties count against it."""
    return sum(jaccard(image_shape, t) >= jaccard(image_shape, wanted) for t in SHAPES)


def words(text: str, vocabulary) -> str | None:
    return next((w for w in vocabulary if w in text.split()), None)


class FakeClip:
    """Embeds images by colour ("color") or by their drawn shape ("shape"); texts by the word they contain."""

    def __init__(self, by: str, model_id: str):
        self.by, self.model_id, self.dim = by, model_id, 8
        self.names = list(COLORS) if by == "color" else list(SHAPES)

    def _one_hot(self, name: str | None) -> torch.Tensor:
        v = torch.full((self.dim,), 0.01)
        if name in self.names:
            v[self.names.index(name)] = 1.0
        return torch.nn.functional.normalize(v, dim=0)

    def embed_images(self, images):
        if self.by == "color":
            return torch.stack([self._one_hot(dominant_color(im, PALETTE)) for im in images]).reshape(-1, self.dim)
        return torch.stack([self._one_hot(im.info.get("shape")) for im in images]).reshape(-1, self.dim)

    def embed_texts(self, texts):
        return torch.stack([self._one_hot(words(t.replace(",", " "), self.names)) for t in texts]).reshape(-1, self.dim)

    def score(self, images, texts):
        texts = list(texts) * len(images) if len(texts) == 1 else texts
        return (self.embed_images(images) * self.embed_texts(texts)).sum(-1)


class FakeDalle(torch.nn.Module):
    """Uniform image logits; carries a real VAE; a tokenizer stand-in."""

    def __init__(self, vae):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.vae = vae
        self.config = types.SimpleNamespace(text_seq_len=4, image_size=vae.image_size)
        self.tokenizer = types.SimpleNamespace(
            encode_batch=lambda texts, n, truncate=False: torch.zeros(len(texts), n, dtype=torch.long))

    def forward(self, text, image):
        B, n = image.shape
        return None, torch.zeros(B, n + 1, self.vae.codebook_size) + self.weight


def fake_generate(run, prompt, num=16, keep=None, scorer=None, options=SamplingOptions(), **kwargs):
    """Even seeds: the prompted shape in the prompted colour; odd seeds: the wrong colour and shape."""
    color, shape = words(prompt.replace(",", " "), COLORS), words(prompt.replace(",", " "), SHAPES)
    wrong_color = [c for c in COLORS if c != color][0]
    wrong_shape = [s for s in SHAPES if s != shape][0]
    seed = options.seed
    images = [draw(shape, color) if (seed + i) % 2 == 0 else draw(wrong_shape, wrong_color) for i in range(num)]
    return types.SimpleNamespace(images=images, scores=None, prompt=prompt)


@pytest.fixture
def fakes(monkeypatch, vae_dir):
    from duomodal.models.vae import load_vae

    clips = {"reranker": FakeClip("color", "fake:reranker"), "judge": FakeClip("shape", "fake:judge"),
             "same": FakeClip("shape", "fake:reranker")}
    monkeypatch.setattr("duomodal.evaluate.context.load_clip", lambda path, device=None, precision="auto": clips[Path(path).name])

    def fake_load_dalle(path, device=None):
        vae = load_vae(vae_dir)
        model = FakeDalle(vae)
        return DalleRun(model, vae, model.tokenizer)

    monkeypatch.setattr("duomodal.evaluate.samples.load_dalle", fake_load_dalle)
    monkeypatch.setattr("duomodal.evaluate.prompts.generate_images", fake_generate)
    return clips


def options(data, out, **changes) -> EvalOptions:
    base = dict(data=data, out=out, prompts=3, samples_per_prompt=2, rerank_from=4, seed=0)
    return EvalOptions(**{**base, **changes})


def test_full_evaluation_with_known_answers(tmp_path, data, vae_dir, fakes):
    out = tmp_path / "report"
    result = run_evaluation(options(data, out, vae=vae_dir, dalle=tmp_path / "dalle", clip=tmp_path / "reranker",
                                    judge_clip=tmp_path / "judge"))
    m = json.loads((out / "metrics.json").read_text())
    assert m == json.loads(json.dumps(result.metrics, allow_nan=False))
    assert m["data"]["counts"] == {"train": 18, "val": 2, "heldout": 4}

    # VAE: an untrained VAE on the 2 val images
    assert m["vae"]["images"] == 2
    assert 0 < m["vae"]["psnr_db"] < 100
    assert m["vae"]["codebook"]["size"] == 16 and m["vae"]["codebook"]["token_count"] == 2 * 4 * 4
    assert (out / "vae_reconstructions.png").is_file()

    # DALL-E likelihood: uniform logits over 16 codes = 4 bits per token, whatever the images
    bits = m["dalle"]["bits_per_image_token"]
    assert bits["train"]["bits"] == pytest.approx(math.log2(16))
    assert bits["val"]["images"] == 2 and bits["heldout"]["tokens"] == 4 * 16

    # prompts: 3 train pairs, the 2 held-out pairs; each prompt is the pair's first caption
    prompts = m["dalle"]["prompts"]
    assert len(prompts["train"]) == 3
    assert {(p["icon"], p["color"]) for p in prompts["heldout"]} == HELDOUT
    assert all(p["prompt"] == captions_for(p["icon"], p["color"])[0] for p in prompts["heldout"])
    # the same held-out pairs again, asked in phrasings no training caption has, from the same seeds
    reworded = prompts["heldout_reworded"]
    assert [(p["icon"], p["color"]) for p in reworded] == [(p["icon"], p["color"]) for p in prompts["heldout"]]
    assert [p["prompt"] for p in reworded] == [unseen_phrasing(p["icon"], p["color"], i) for i, p in enumerate(reworded)]
    assert m["dalle"]["samples"]["heldout_reworded"]["color_accuracy"] == \
        m["dalle"]["samples"]["heldout"]["color_accuracy"]

    # first 2 of seeds s, s+1: one right, one wrong, in colour and in shape
    train = m["dalle"]["samples"]["train"]
    assert train["color_accuracy"] == {"accuracy": 0.5, "correct": 3, "count": 6}
    assert train["shape_accuracy"] == {"accuracy": 0.5, "correct": 3, "count": 6}
    heldout = m["dalle"]["reranking"]["heldout"]
    assert heldout["without"]["color_accuracy"] == {"accuracy": 0.5, "correct": 2, "count": 4}
    # reranking by colour keeps the two right images of the four
    assert heldout["with"]["color_accuracy"] == {"accuracy": 1.0, "correct": 4, "count": 4}
    assert heldout["with"]["shape_accuracy"]["accuracy"] == 1.0
    # the template matcher sees the drawn shapes: right for even seeds, wrong for odd ones
    assert train["shape_match_accuracy"] == {"accuracy": 0.5, "correct": 3, "count": 6}
    assert heldout["with"]["shape_match_accuracy"] == {"accuracy": 1.0, "correct": 4, "count": 4}
    # the template figures, from the drawn shapes: a right image is its icon's template exactly (rank 1,
    # IoU 1); a wrong one is the first other shape; name-blind compares with the next prompt's icon
    for split, entry in (("train", train), ("heldout", heldout["without"])):
        icons = [p["icon"] for p in prompts[split]]
        others = icons[1:] + icons[:1]  # the prompts' icons are distinct here
        wrong = [[s for s in SHAPES if s != icon][0] for icon in icons]
        ranks = [1] * len(icons) + [template_rank(w, icon) for w, icon in zip(wrong, icons)]
        assert min(ranks[len(icons):]) >= 2
        assert entry["shape_match_top10"] == {"accuracy": 1.0, "correct": 2 * len(icons), "count": 2 * len(icons)}
        assert entry["shape_median_rank"] == float(np.median(ranks))
        assert entry["shape_iou"] == pytest.approx(
            (len(icons) + sum(jaccard(w, icon) for w, icon in zip(wrong, icons))) / (2 * len(icons)))
        assert entry["shape_iou_name_blind"] == pytest.approx(
            sum(jaccard(icon, o) + jaccard(w, o) for icon, w, o in zip(icons, wrong, others)) / (2 * len(icons)))
        assert entry["shape_iou"] > entry["shape_iou_name_blind"]
    # reranked held-out: the right images only; circle and triangle are each other's name-blind icon
    assert heldout["with"]["shape_median_rank"] == 1.0 and heldout["with"]["shape_iou"] == 1.0
    assert heldout["with"]["shape_iou_name_blind"] == pytest.approx(jaccard("circle", "triangle"))
    assert m["dalle"]["template_matcher"] == {
        "icons": 3, "accuracy_on_dataset_images": {"train": {"accuracy": 1.0, "correct": 3, "count": 3},
                                                   "heldout": {"accuracy": 1.0, "correct": 2, "count": 2}}}
    assert heldout["with"]["clip_score"] > heldout["without"]["clip_score"]
    assert m["dalle"]["judge"]["independent"] is True
    calibration = m["dalle"]["color_classifier_on_dataset_images"]
    assert calibration == {"train": {"accuracy": 1.0, "correct": 18, "count": 18},
                           "heldout": {"accuracy": 1.0, "correct": 4, "count": 4}}
    assert m["dalle"]["judge"]["accuracy_on_dataset_images"]["heldout"]["count"] == 2

    # CLIP: the colour stand-in classifies colour perfectly
    assert m["clip"]["model_id"] == "fake:reranker"
    assert m["clip"]["val"]["zero_shot_color"] == {"accuracy": 1.0, "correct": 2, "count": 2, "classes": 4}
    assert m["clip"]["heldout"]["text_to_image_recall@10"]["count"] == 4
    assert m["clip"]["heldout"]["text_to_image_recall@10"]["accuracy"] == 1.0
    # every icon name of the dataset competes in zero-shot icon; top-10 of 3 names always holds
    heldout_clip = m["clip"]["heldout"]
    assert heldout_clip["zero_shot_icon"]["classes"] == 3 and heldout_clip["zero_shot_icon"]["count"] == 4
    assert heldout_clip["zero_shot_icon_top10"]["accuracy"] == 1.0
    assert heldout_clip["zero_shot_color_unseen"]["count"] == 4
    # name search: one query per icon of the split's images, against those images
    assert heldout_clip["name_search_top10"] == {"accuracy": 1.0, "correct": 2, "count": 2, "images": 4}

    assert m["curves"]["VAE"]["series"] == ["train loss", "train lr"]
    assert m["curves"]["DALL-E"]["skipped"].startswith("no metrics.jsonl")

    report = (out / "report.md").read_text()
    blind = f"{jaccard('circle', 'triangle'):.2f}"
    assert ("| DALL-E heldout prompts, reranked | colour 100.0% (4/4), shape (judge CLIP) 100.0% (4/4), "
            f"shape (template) top-1 4/4, top-10 4/4, median rank 1 of 3, IoU 1.00 vs {blind} name-blind |") in report
    assert "| DALL-E bits / image token | train 4.000, val 4.000, heldout 4.000 |" in report
    for heading in ("## Overview", "## Summary", "## VAE", "## DALL-E: likelihood of real images",
                    "## DALL-E: samples, colour and shape accuracy", "## Reranking with CLIP", "## CLIP",
                    "## Training curves"):
        assert heading in report
    train_cell = (f"top-1 3/6, top-10 6/6, median rank {train['shape_median_rank']:g} of 3, "
                  f"IoU {train['shape_iou']:.2f} vs {train['shape_iou_name_blind']:.2f} name-blind")
    # the judge ranks all 3 icon names: every image has its icon in its top 10
    assert train["shape_judge_top10"] == {"accuracy": 1.0, "correct": 6, "count": 6}
    assert heldout["with"]["shape_judge_median_rank"] == 1.0
    judge_cell = f"top-1 50.0% (3/6), top-10 100.0% (6/6), median rank {train['shape_judge_median_rank']:g} of 3"
    assert f"| train | 3 | 6 | 50.0% (3/6) | {judge_cell} | {train_cell} |" in report
    assert (f"| heldout | best k by CLIP | 4 | 100.0% (4/4) | top-1 100.0% (4/4), top-10 100.0% (4/4), median rank 1 "
            f"of 3 | top-1 4/4, top-10 4/4, median rank 1 of 3, IoU 1.00 vs {blind} name-blind |") in report
    assert "name-blind: what a model that ignores the icon's name would get" in report
    assert "Shape judge: judge" in report
    assert "so chance is 1 in 4. The same classifier on the dataset's own images: train: 100.0% (18/18); heldout: 100.0% (4/4)." in report
    assert "It ranks all 3 icon names, so chance is 1 in 3." in report
    for figure in ("dalle_samples_train.png", "dalle_samples_heldout.png", "dalle_reranked_heldout.png",
                   "dalle_samples_heldout_reworded.png", "curves_vae.png"):
        assert f"]({figure})" in report and (out / figure).is_file()
    page = (out / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == 8 and "https://" not in page


def test_without_a_judge_shape_accuracy_is_not_measured(tmp_path, data, fakes):
    out = tmp_path / "report"
    m = run_evaluation(options(data, out, dalle=tmp_path / "dalle", clip=tmp_path / "reranker")).metrics
    shape = m["dalle"]["samples"]["train"]["shape_accuracy"]
    assert shape["accuracy"] is None and shape["reason"].startswith("no --judge-clip given")
    assert m["dalle"]["reranking"]["train"]["with"]["shape_accuracy"]["accuracy"] is None
    report = (out / "report.md").read_text()
    assert "Shape accuracy: **not measured**: no --judge-clip given" in report
    assert "| train | 3 | 6 | 50.0% (3/6) | not measured | top-1 3/6, top-10 6/6, median rank 1.5 of 3, IoU " in report
    assert m["vae"] == {"skipped": "no --vae given"}
    assert "| VAE | not given: its sections are skipped |" in report


def test_a_judge_with_the_rerankers_weights_is_refused(tmp_path, data, fakes):
    m = run_evaluation(options(data, tmp_path / "r", dalle=tmp_path / "dalle", clip=tmp_path / "reranker",
                               judge_clip=tmp_path / "same")).metrics
    assert m["dalle"]["judge"]["independent"] is False
    assert "same weights as --clip (model id fake:reranker)" in m["dalle"]["judge"]["how"]
    assert m["dalle"]["samples"]["heldout"]["shape_accuracy"]["accuracy"] is None


def test_without_clip_there_is_no_reranking(tmp_path, data, fakes):
    out = tmp_path / "report"
    m = run_evaluation(options(data, out, dalle=tmp_path / "dalle", judge_clip=tmp_path / "judge")).metrics
    assert m["dalle"]["reranking"] == {}
    assert m["dalle"]["samples"]["train"]["shape_accuracy"]["count"] == 6
    assert m["clip"] == {"skipped": "no --clip given"}
    assert "Not measured: no --clip given to rerank with." in (out / "report.md").read_text()


def test_unlabelled_data_skips_the_prompt_figures(tmp_path, shape_dataset, fakes):
    m = run_evaluation(options(shape_dataset, tmp_path / "r", dalle=tmp_path / "dalle", clip=tmp_path / "reranker")).metrics
    assert m["dalle"]["samples"]["skipped"].startswith("the dataset has no icon/color labels")
    assert "zero_shot_color" not in m["clip"]["val"]


def test_options_are_checked():
    with pytest.raises(EvalError, match=r"rerank-from \(2\) must be at least samples-per-prompt \(4\)"):
        EvalOptions(data=Path("d"), out=Path("o"), clip=Path("c"), samples_per_prompt=4, rerank_from=2)
    with pytest.raises(EvalError, match="nothing to evaluate: give at least one of --vae, --dalle, --clip"):
        EvalOptions(data=Path("d"), out=Path("o"))
    with pytest.raises(EvalError, match="prompts must be at least 1, got 0"):
        EvalOptions(data=Path("d"), out=Path("o"), clip=Path("c"), prompts=0)


def test_cli_eval(tmp_path, data, vae_dir, fakes, capsys):
    out = tmp_path / "report"
    code = main(["eval", "--data", str(data), "--vae", str(vae_dir), "--clip", str(tmp_path / "reranker"),
                 "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0
    assert "VAE val PSNR: " in captured.out and f"report: {out / 'report.html'}" in captured.out
    assert "CLIP val: text->image R@1 " in captured.out
    assert (out / "report.md").is_file()


def test_cli_eval_errors(tmp_path, capsys):
    code = main(["eval", "--data", str(tmp_path / "missing"), "--clip", str(tmp_path), "--out", str(tmp_path / "r")])
    assert code == 2
    assert capsys.readouterr().err.strip() == f"duomodal: error: dataset folder {tmp_path / 'missing'} does not exist"
    code = main(["eval", "--data", str(tmp_path), "--out", str(tmp_path / "r")])
    assert code == 2
    assert "nothing to evaluate" in capsys.readouterr().err


def test_sampling_settings_are_checked_and_recorded(tmp_path, data, fakes):
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\], got 1.5"):
        run_evaluation(options(data, tmp_path / "r", dalle=tmp_path / "dalle", sampling=SamplingOptions(top_p=1.5)))
    assert not (tmp_path / "r").exists()  # checked before any work
    out = tmp_path / "ok"
    sampling = SamplingOptions(temperature=0.7, top_k=3, guidance=1.0)
    m = run_evaluation(options(data, out, dalle=tmp_path / "dalle", sampling=sampling, prompts=1)).metrics
    assert (m["settings"]["temperature"], m["settings"]["top_k"], m["settings"]["top_p"]) == (0.7, 3, None)
    assert ("Sampling: temperature 0.7, top-k 3, top-p off, min-p off, guidance 1.0, seed 0, prompt words no training caption "
            "had left out.") in (out / "report.md").read_text()


def test_a_prompt_the_model_cannot_read_is_skipped_and_counted(tmp_path, data, fakes, monkeypatch):
    from duomodal.generate import GenerationError

    def picky(run, prompt, **kwargs):
        if "triangle" in prompt:
            raise GenerationError(f"prompt {prompt!r} has characters this model's tokenizer never saw, in: triangle")
        return fake_generate(run, prompt, **kwargs)

    monkeypatch.setattr("duomodal.evaluate.prompts.generate_images", picky)
    lines: list[str] = []
    out = tmp_path / "r"
    m = run_evaluation(options(data, out, dalle=tmp_path / "dalle", judge_clip=tmp_path / "judge"),
                       log=lines.append).metrics
    heldout = m["dalle"]["samples"]["heldout"]
    assert heldout["prompts"] == 1 and heldout["images"] == 2
    assert heldout["skipped_prompts"] == [{"prompt": "a yellow triangle icon", "reason": "prompt 'a yellow triangle icon' "
                                           "has characters this model's tokenizer never saw, in: triangle"}]
    assert ("skipped prompt 'a yellow triangle icon': prompt 'a yellow triangle icon' has characters this "
            "model's tokenizer never saw, in: triangle") in lines
    assert "| heldout | 1 (1 skipped) | 2 |" in (out / "report.md").read_text()
