"""Zero-shot classification: templates, prompt ensembling, the classify and clip eval CLIs with bad images.
The metrics themselves (recall@k, confusion matrix) are tested in tests/evaluate/test_metrics.py."""

from __future__ import annotations

import csv
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from duomodal.classify import (
    ClassifyError,
    class_text_features,
    clip_figures,
    label_text,
    parse_labels,
    resolve_templates,
    zero_shot_label_figures,
)
from duomodal.cli import main
from duomodal.config import to_dict
from duomodal.modelfile import save_model
from duomodal.models.clip import ContrastiveClip
from duomodal.text.tokenizer import Tokenizer


def test_templates_and_labels():
    assert resolve_templates() == ("{}",)
    assert resolve_templates(["a {} icon"], "plain") == ("a {} icon", "{}")
    assert len(resolve_templates([], "photo")) == 10
    with pytest.raises(ClassifyError, match="unknown template set 'nope'; sets: color, icon, photo, plain"):
        resolve_templates([], "nope")
    with pytest.raises(ClassifyError, match=r"template 'an icon' must contain '\{\}' exactly once"):
        resolve_templates(["an icon"])
    assert parse_labels([" red", "green ", ""]) == ["red", "green"]
    with pytest.raises(ClassifyError, match=r"zero-shot classification needs at least 2 labels, got \['red'\]"):
        parse_labels(["red"])
    with pytest.raises(ClassifyError, match="label 'red' is given twice"):
        parse_labels(["red", "blue", "red"])
    assert label_text("heart-outline") == "heart outline" and label_text("sports_car") == "sports car"


def test_prompt_ensembling_averages_normalised_template_embeddings():
    table = {
        "a cat": torch.tensor([3.0, 0.0]), "cat!": torch.tensor([0.0, 1.0]),
        "a dog": torch.tensor([0.0, 2.0]), "dog!": torch.tensor([0.0, 5.0]),
    }
    seen = []

    def embed(texts: list[str]) -> torch.Tensor:
        seen.extend(texts)
        return torch.stack([table[t] for t in texts])

    features = class_text_features(embed, ["cat", "dog"], ["a {}", "{}!"])
    assert seen == ["a cat", "cat!", "a dog", "dog!"]
    s = 2**-0.5
    assert torch.allclose(features, torch.tensor([[s, s], [0.0, 1.0]]), atol=1e-6)
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1]])
    assert zero_shot_label_figures(images, ["cat", "dog", "dog"], ["cat", "dog"], embed, ["a {}", "{}!"]) == \
        (pytest.approx(2 / 3), None)
    assert zero_shot_label_figures(images, [None, "bird", None], ["cat", "dog"], embed, ["{}!"]) is None


def test_zero_shot_reports_top10_for_many_classes():
    classes = [f"c{i}" for i in range(12)]
    class_vectors = torch.eye(12)
    images = torch.stack([class_vectors[0], 0.9 * class_vectors[0] + 0.1 * class_vectors[5]])  # both nearest c0
    labels = ["c0", "c5"]  # the second is wrong at top-1, right at top-10 (c5 ranks second)
    embed = lambda texts: torch.stack([class_vectors[int(t[1:])] for t in texts])  # noqa: E731
    assert zero_shot_label_figures(images, labels, classes, embed, ["{}"]) == (0.5, 1.0)
    figures = clip_figures(images, images, ["a", "b"], [{"shape": "c0"}, {"shape": "c5"}], {"shape": classes},
                           embed, ["{}"])
    assert figures["zero_shot_shape"] == 0.5 and figures["zero_shot_shape_top10"] == 1.0


def test_clip_figures_name_recall_as_the_evaluation_does_and_match_captions_by_key():
    image = torch.eye(3)
    text = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.2, 1.0], [0.0, 0.9, 0.1]])  # texts 1 and 2 point at each other's image
    labels = [{"color": "red"}, {"color": "red"}, {}]  # image 1 is nearer "blue": zero-shot gets 1 of 2
    embed = {"red": torch.tensor([1.0, 0.0, 0.0]), "blue": torch.tensor([0.0, 0.8, 0.6])}
    figures = clip_figures(image, text, ["a red", "a blue", "A  Blue"], labels, {"color": ["blue", "red"]},
                           lambda texts: torch.stack([embed[t] for t in texts]), ["{}"])
    # captions 1 and 2 read the same, so retrieving either image for either text counts
    assert figures == {"text_to_image_recall@1": 1.0, "image_to_text_recall@1": 1.0,
                       "text_to_image_recall@5": 1.0, "image_to_text_recall@5": 1.0,
                       "text_to_image_recall@10": 1.0, "image_to_text_recall@10": 1.0, "zero_shot_color": 0.5}


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory, tiny_clip_config) -> Path:
    torch.manual_seed(0)
    tokenizer = Tokenizer.train(["a red icon", "a green icon", "a blue icon", "red", "green"] * 3, vocab_size=64,
                                min_frequency=1)
    config = replace(tiny_clip_config, vocab_size=tokenizer.vocab_size)
    directory = tmp_path_factory.mktemp("clip")
    save_model(directory, "clip", to_dict(config), ContrastiveClip.from_config(config).state_dict())
    tokenizer.save(directory / "tokenizer.json")
    return directory


def _folders(shape_dataset: Path, root: Path) -> Path:
    """DIR/<colour>/<image>.png for red and green, plus one unreadable file."""
    for png in sorted(shape_dataset.glob("*.png")):
        color = png.stem.split("_")[0]
        if color in ("red", "green"):
            (root / color).mkdir(parents=True, exist_ok=True)
            shutil.copy(png, root / color / png.name)
    (root / "red" / "broken.png").write_bytes(b"this is not a png")
    return root


def test_classify_cli_with_folders_and_an_unreadable_image(tiny_clip_dir, shape_dataset, tmp_path, capsys):
    images = _folders(shape_dataset, tmp_path / "images")
    out_csv = tmp_path / "out" / "pred.csv"
    code = main(["classify", str(tiny_clip_dir), str(images), "--labels", "red,green,blue", "--template",
                 "a {} icon", "--templates", "color", "--top-k", "2", "--csv", str(out_csv), "--device", "cpu"])
    assert code == 0
    captured = capsys.readouterr()
    assert f"skipping {images / 'red' / 'broken.png'}:" in captured.err
    lines = captured.out.splitlines()
    assert "classified 12 image(s) over 3 labels with 4 template(s); skipped 1 unreadable" in lines
    assert sum(1 for line in lines if "(true: red)" in line) == 6
    accuracy_line = next(line for line in lines if line.startswith("accuracy "))
    assert accuracy_line.endswith("/12 images with a known label)")
    assert (tmp_path / "out" / "confusion.png").read_bytes()[:4] == b"\x89PNG"
    rows = list(csv.DictReader(out_csv.open()))
    assert len(rows) == 12 and set(rows[0]) == {"path", "true_label", "label_1", "prob_1", "label_2", "prob_2"}
    for row in rows:
        assert row["label_1"] in {"red", "green", "blue"}
        assert float(row["prob_1"]) >= float(row["prob_2"]) > 0
    assert {row["true_label"] for row in rows} == {"red", "green"}


def test_classify_cli_labels_file_manifest_field_and_errors(tiny_clip_dir, shape_dataset, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    lines = []
    for png in sorted(shape_dataset.glob("*.png"))[:6]:
        shutil.copy(png, data / png.name)
        lines.append(json.dumps({"file": png.name, "caption": "x", "color": png.stem.split("_")[0]}))
    (data / "captions.jsonl").write_text("\n".join(lines) + "\n")
    labels_file = tmp_path / "labels.txt"
    labels_file.write_text("blue\ngreen\n\nred\nyellow\n")
    confusion = tmp_path / "cm.png"
    assert main(["classify", str(tiny_clip_dir), str(data), "--labels-file", str(labels_file), "--label-field",
                 "color", "--confusion", str(confusion), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "classified 6 image(s) over 4 labels with 1 template(s); skipped 0 unreadable" in out
    assert "/6 images with a known label)" in out and confusion.is_file()

    single = data / sorted(p.name for p in data.glob("*.png"))[0]
    assert main(["classify", str(tiny_clip_dir), str(single), "--labels", "red", "--device", "cpu"]) == 2
    assert "duomodal: error: zero-shot classification needs at least 2 labels, got ['red']" in capsys.readouterr().err
    assert main(["classify", str(tiny_clip_dir), str(single), "--device", "cpu"]) == 2
    assert "give the labels with --labels a,b,c or --labels-file FILE" in capsys.readouterr().err
    assert main(["classify", str(tiny_clip_dir), str(data), "--labels", "a,b", "--label-field", "shape"]) == 2
    assert f"no image in {data} has the label field 'shape'; fields: color" in capsys.readouterr().err
    assert main(["classify", str(tmp_path / "nope"), str(single), "--labels", "a,b"]) == 2
    assert "does not exist; pass a duomodal CLIP directory" in capsys.readouterr().err
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    (only_bad / "x.png").write_bytes(b"nope")
    assert main(["classify", str(tiny_clip_dir), str(only_bad), "--labels", "a,b", "--device", "cpu"]) == 1
    assert "classified 0 image(s) over 2 labels with 1 template(s); skipped 1 unreadable" in capsys.readouterr().out


def test_clip_eval_and_export_cli(tiny_clip_dir, shape_dataset, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    lines = []
    for png in sorted(shape_dataset.glob("*.png")):
        shutil.copy(png, data / png.name)
        color, shape, copy = png.stem.split("_")
        lines.append(json.dumps({"file": png.name, "caption": [f"a {color} {shape}"], "color": color,
                                 "split": "heldout" if copy == "1" else "train"}))
    (data / "captions.jsonl").write_text("\n".join(lines) + "\n")
    assert main(["clip", "eval", str(tiny_clip_dir), "--data", str(data), "--split", "heldout", "--device", "cpu",
                 "--json", str(tmp_path / "eval.json")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("heldout: 12 images (0 skipped), model duomodal-clip:")
    assert "text_to_image_recall@10" in out and "zero_shot_color" in out and "unseen/zero_shot_color" in out
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["split"] == "heldout" and saved["count"] == 12 and list(saved["templates"]) == ["icon", "unseen"]
    assert 0 <= saved["unseen/zero_shot_color"] <= 1 and "unseen/text_to_image_recall@10" not in saved
    assert main(["clip", "export", str(tiny_clip_dir), str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "preprocessor_config.json").is_file()
    assert main(["clip", "eval", str(tmp_path / "hf"), "--data", str(data), "--split", "val", "--device", "cpu"]) == 1
    assert f"{data} has no images in the val split" in capsys.readouterr().err
