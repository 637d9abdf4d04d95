"""The index and search commands with a real (tiny, random-weight) duomodal CLIP loaded by load_clip."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from duomodal import cli
from duomodal.config import to_dict
from duomodal.modelfile import save_model
from duomodal.models.clip import ClipConfig, ContrastiveClip, load_clip
from duomodal.text.tokenizer import Tokenizer

CAPTIONS = ["a red square", "a green circle", "a blue triangle", "a yellow square", "red circle", "blue square"]


def save_tiny_clip(directory: Path, config: ClipConfig, seed: int) -> Path:
    torch.manual_seed(seed)
    tokenizer = Tokenizer.train(CAPTIONS * 3, vocab_size=64, min_frequency=1)
    config = replace(config, vocab_size=tokenizer.vocab_size)
    save_model(directory, "clip", to_dict(config), ContrastiveClip.from_config(config).state_dict())
    tokenizer.save(directory / "tokenizer.json")
    return directory


@pytest.fixture(scope="module")
def tiny_clips(tmp_path_factory, tiny_clip_config) -> tuple[Path, Path]:
    return (save_tiny_clip(tmp_path_factory.mktemp("clip_a"), tiny_clip_config, 0),
            save_tiny_clip(tmp_path_factory.mktemp("clip_b"), tiny_clip_config, 1))


def test_index_and_search_with_a_real_clip(shape_dataset, tiny_clips, tmp_path, capsys):
    clip_a, clip_b = tiny_clips
    index_dir = tmp_path / "idx"
    argv = ["index", "build", str(shape_dataset), "--clip", str(clip_a), "--out", str(index_dir), "--quiet",
            "--device", "cpu"]
    assert cli.main(argv) == 0
    assert ": 24 images (flat index)" in capsys.readouterr().out

    assert cli.main(["search", str(index_dir), "a red square -blue", "-k", "5", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)["results"]
    assert len(results) == 5 and results[0]["score"] >= results[-1]["score"]

    query_image = shape_dataset / "blue_circle_0.png"
    assert cli.main(["search", str(index_dir), "--image", str(query_image), "-k", "2", "--json"]) == 0
    top = json.loads(capsys.readouterr().out)["results"]
    assert {r["path"] for r in top} == {"blue_circle_0.png", "blue_circle_1.png"}  # itself and its copy
    assert top[0]["score"] == pytest.approx(1.0, abs=1e-4)

    model_b = load_clip(clip_b, device="cpu").model_id
    model_a = load_clip(clip_a, device="cpu").model_id
    assert cli.main(["search", str(index_dir), "red", "--clip", str(clip_b)]) == 2
    assert f"was built with CLIP model {model_a!r} but the query CLIP is {model_b!r}" in capsys.readouterr().err
    assert cli.main(["index", "update", str(index_dir), "--clip", str(clip_b), "--quiet"]) == 2
    assert f"was built with CLIP model {model_a!r}, not {model_b!r}" in capsys.readouterr().err


def test_torchrun_index_build_command(shape_dataset, tiny_clips, tmp_path):
    """The command a user types for a sharded build: torchrun ... -m duomodal index build."""
    import os
    import subprocess
    import sys

    torchrun = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "duomodal", "index", "build",
               str(shape_dataset), "--clip", str(tiny_clips[0]), "--out", str(tmp_path / "idx"), "--quiet",
               "--device", "cpu"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    summary = [line for line in result.stdout.splitlines() if " images (" in line]
    assert len(summary) == 1  # rank 0 only
    assert ": 24 images (flat index)" in summary[0] and "12 embedded, 12 reused" in summary[0]
