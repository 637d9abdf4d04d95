"""The package's face: `import duomodal` stays light, every public name resolves, and every example of
docs/api.md runs on tiny models (so the page cannot go stale)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import duomodal

API_DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"
HEAVY_MODULES = ("torch", "transformers", "faiss")


def doc_examples() -> list[tuple[str, str]]:
    """(heading above it, code) of each ```python block of docs/api.md, in order."""
    examples = []
    heading = ""
    pattern = re.compile(r"^## ([^\n]+)$|^```python\n(.*?)^```$", re.MULTILINE | re.DOTALL)
    for match in pattern.finditer(API_DOC.read_text(encoding="utf-8")):
        if match.group(1) is not None:
            heading = match.group(1)
        else:
            examples.append((heading, match.group(2)))
    return examples


EXAMPLES = doc_examples()


def test_import_duomodal_imports_no_torch():
    code = "import json, sys, duomodal; print(json.dumps([duomodal.__file__, sorted(sys.modules)]))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    file, modules = json.loads(out)
    assert file == duomodal.__file__  # this working tree's package
    loaded = {name.split(".")[0] for name in modules}
    assert [name for name in HEAVY_MODULES if name in loaded] == []


def test_every_public_name_resolves_and_unknown_names_raise():
    assert sorted(duomodal.__all__) == sorted(duomodal._MODULE_OF)
    for name in duomodal.__all__:
        assert getattr(duomodal, name) is not None, name
        assert name in dir(duomodal)
    assert duomodal.load_dalle is __import__("duomodal.models.dalle", fromlist=["load_dalle"]).load_dalle
    with pytest.raises(AttributeError, match="^module 'duomodal' has no attribute 'generate_image'$"):
        duomodal.generate_image  # noqa: B018 (the attribute access is the test)
    namespace: dict = {}
    exec("from duomodal import *", namespace)
    assert set(duomodal.__all__) <= set(namespace)


def test_the_examples_use_only_top_level_names():
    assert [heading for heading, _ in EXAMPLES] == [
        "Generate images from text", "Edit a region of an image", "Complete an image", "Classify images zero-shot",
        "Build an index and search it by text and by image", "Load a Hugging Face CLIP",
        "Encode and decode with the VAE", "Write the evaluation report",
    ]
    for heading, code in EXAMPLES:
        assert re.findall(r"^\s*(?:from|import) duomodal\.", code, re.MULTILINE) == [], heading
        assert set(re.findall(r"\bduomodal\.(\w+)", code)) <= set(duomodal.__all__), heading


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory, shape_dataset) -> Path:
    """A tiny untrained duomodal CLIP for 16 px images, its tokenizer trained on the shape captions."""
    import torch

    from duomodal.config import to_dict
    from duomodal.modelfile import save_model
    from duomodal.models.clip import ClipConfig, ContrastiveClip
    from duomodal.text.tokenizer import Tokenizer

    torch.manual_seed(0)
    captions = [p.read_text() for p in sorted(shape_dataset.glob("*.txt"))]
    tokenizer = Tokenizer.train(captions, vocab_size=64, min_frequency=1)
    config = ClipConfig(image_size=16, patch_size=4, vision_width=32, vision_layers=2, vision_heads=2, text_width=32,
                        text_layers=2, text_heads=2, context_length=16, vocab_size=tokenizer.vocab_size, embed_dim=32)
    directory = tmp_path_factory.mktemp("clip")
    save_model(directory, "clip", to_dict(config), ContrastiveClip.from_config(config).state_dict())
    tokenizer.save(directory / "tokenizer.json")
    return directory


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, dalle_run, tiny_clip_dir, shape_dataset) -> Path:
    """A folder where the placeholder paths of docs/api.md are tiny models, images and a photo folder."""
    from duomodal.models.clip import export_hf

    root = tmp_path_factory.mktemp("api")
    (root / "runs").mkdir()
    (root / "runs" / "dalle").symlink_to(dalle_run)
    (root / "runs" / "vae").symlink_to(dalle_run.parent / "vae")
    (root / "runs" / "clip").symlink_to(tiny_clip_dir)
    export_hf(tiny_clip_dir, root / "hf-clip")
    photos = sorted(shape_dataset.glob("*_0.png"))  # 12: each (shape, colour) once
    (root / "my-photos").mkdir()
    for photo in photos:
        shutil.copy(photo, root / "my-photos" / photo.name)
    shutil.copy(shape_dataset / "red_circle_1.png", root / "icon.png")
    shutil.copytree(shape_dataset, root / "my-icons")
    return root


@pytest.mark.parametrize("heading, code", EXAMPLES, ids=[heading for heading, _ in EXAMPLES])
def test_doc_example_runs(heading, code, workspace, monkeypatch, capsys):
    monkeypatch.chdir(workspace)
    exec(compile(code, f"{API_DOC.name}: {heading}", "exec"), {"__name__": "__main__"})
    out = capsys.readouterr().out.splitlines()
    if heading.startswith("Generate"):
        assert len(out) == 8 and all(re.fullmatch(r"seed \d+: CLIP score -?\d\.\d{3}", line) for line in out)
        assert len(list(workspace.glob("red-circle-*.png"))) == 8
    elif heading.startswith("Edit"):
        assert (workspace / "edited.png").is_file() and out[0].startswith("fit [")
    elif heading.startswith("Complete"):
        assert sorted(p.name for p in workspace.glob("completed-*.png")) == [f"completed-{i}.png" for i in range(4)]
    elif heading.startswith("Classify"):
        assert len(out) == 13 and out[-1] == "0 unreadable"
        assert all(line.split()[1] in ("red", "green", "blue") for line in out[:-1])
    elif heading.startswith("Build"):
        assert out[0] == "12 images, 12 embedded, 0 skipped" and len(out) == 6
        assert all(line.split()[1].startswith(str((workspace / "my-photos").resolve())) for line in out[1:])
        assert (workspace / "my-photos.index" / "index.sqlite").is_file()
    elif heading.startswith("Load a Hugging Face"):
        assert re.fullmatch(r"hf-clip:[0-9a-f]{12} 32 -?\d\.\d+(e-?\d+)?", out[0])
    elif heading.startswith("Encode"):
        assert len(out) == 1 and out[0].startswith("torch.Size([1, 4, 4]) mean squared error ")
    else:
        assert out == ["report/report.html"]
        assert json.loads((workspace / "report" / "metrics.json").read_text())["data"]["counts"]["train"] > 0
