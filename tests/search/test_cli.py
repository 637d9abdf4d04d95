"""`duomodal index build/update` and `duomodal search` as a user runs them (fake CLIP injected)."""

from __future__ import annotations

import json
import shutil

import pytest

from duomodal import cli
from duomodal.cli import search as cli_search

from .conftest import FakeEmbedder


@pytest.fixture
def fake_clip(monkeypatch):
    loaded = []

    def load(path, device, precision):
        loaded.append(path)
        return FakeEmbedder(model_id="other-clip" if "other" in str(path) else "fake-colour-v1")

    monkeypatch.setattr(cli_search, "_search_load_clip", load)
    return loaded


def test_build_search_update(shape_dataset, tmp_path, fake_clip, capsys, vector_store):
    photos = tmp_path / "photos"
    shutil.copytree(shape_dataset, photos)
    (photos / "broken.jpg").write_bytes(b"nope")
    clip_dir = tmp_path / "clip"
    clip_dir.mkdir()
    index_dir = tmp_path / "idx"
    argv = ["index", "build", str(photos), "--clip", str(clip_dir), "--out", str(index_dir), "--quiet"]
    assert cli.main([*argv, "--store", vector_store]) == 0
    out, err = capsys.readouterr()
    assert "skipped broken.jpg: not an image Pillow can read" in err
    where = "" if vector_store == "faiss" else f" in {vector_store}"
    assert out.startswith(f"{index_dir}: 24 images (flat index{where}) in ")
    assert out.rstrip().endswith("12 embedded, 12 reused, 0 moved, 0 refreshed, 0 removed, 0 unchanged, 1 skipped")

    assert cli.main(["search", str(index_dir), "red", "-k", "3", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert fake_clip[-1] == str(clip_dir.resolve())  # the CLIP recorded in the index
    assert [r["rank"] for r in result["results"]] == [1, 2, 3]
    assert all(r["path"].startswith("red_") and r["caption"].startswith("a red") for r in result["results"])
    assert result["results"][0]["file"] == str(photos / result["results"][0]["path"])

    assert cli.main(["search", str(index_dir), "blue -red", "-k", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["rank", "score", "path"]
    assert len(lines) == 3 and all("/blue_" in line for line in lines[1:])

    assert cli.main(["search", str(index_dir), "--image", str(photos / "green_circle_0.png"), "-k", "4", "--dedup", "0.999"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "green_circle_" in lines[1] and "(+1 near-duplicate)" in lines[1]  # its identical copy

    (photos / "red_square_0.png").rename(photos / "renamed.png")
    assert cli.main(["index", "update", str(index_dir), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert f": 24 images (flat index{where})" in out and "0 embedded, 0 reused, 1 moved" in out


def test_search_errors(shape_dataset, tmp_path, fake_clip, capsys):
    index_dir = tmp_path / "idx"
    assert cli.main(["index", "build", str(shape_dataset), "--clip", str(tmp_path), "--out", str(index_dir), "--quiet"]) == 0
    capsys.readouterr()
    cases = [
        (["search", str(index_dir), "red", "-k", "0"], "-k must be from 1 to 1000, got 0"),
        (["search", str(index_dir), "red", "-k", "1001"], "-k must be from 1 to 1000, got 1001"),
        (["search", str(index_dir)], "give a text query, --image PATH, or both"),
        (["search", str(index_dir), "--", "-people"], "query '-people' has only negative terms; add a positive one, e.g. 'beach -people'"),
        (["search", str(index_dir), "red", "--dedup", "2"], "dedup threshold must be a number in (0, 1], got 2.0"),
        (["search", str(tmp_path / "missing"), "red"], f"{tmp_path / 'missing'} is not a directory; build one with 'duomodal index build'"),
        (
            ["search", str(index_dir), "red", "--clip", str(tmp_path / "other")],
            f"{index_dir} was built with CLIP model 'fake-colour-v1' but the query CLIP is 'other-clip'; search with "
            f"the CLIP the index was built with ({tmp_path}) or rebuild the index with this one",
        ),
    ]
    for argv, message in cases:
        assert cli.main(argv) == 2, argv
        assert capsys.readouterr().err == f"duomodal: error: {message}\n"
