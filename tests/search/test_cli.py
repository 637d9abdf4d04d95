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


# --- words in images (--ocr) ---------------------------------------------------------------------


def test_ocr_without_the_engine_fails_at_once_saying_how_to_install(shape_dataset, tmp_path, fake_clip, capsys,
                                                                    monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "rapidocr_onnxruntime", None)  # an import that fails
    monkeypatch.setenv("PATH", str(tmp_path))  # no tesseract program
    for engine, install in (("rapidocr", "pip install 'duomodal[ocr]'"),
                            ("tesseract", "apt-get install tesseract-ocr tesseract-ocr-eng")):
        argv = ["index", "build", str(shape_dataset), "--clip", str(tmp_path), "--out", str(tmp_path / "idx"),
                "--quiet", "--ocr", engine]
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith(f"duomodal: error: the {engine} OCR engine is not installed")
        assert err.endswith(f"install it with: {install}" + (" (Debian/Ubuntu)" if engine == "tesseract" else
                                                            " (rapidocr-onnxruntime, which ships its models)"))
    assert fake_clip == [] and not (tmp_path / "idx").exists()  # before the CLIP loads or anything is written


def test_ocr_build_update_and_hybrid_search(tmp_path, fake_clip, capsys, monkeypatch):
    from duomodal.data.images import load_image
    from duomodal.data.memes import write_corpus
    from duomodal.search import ocr as ocr_module

    from .test_text_index import FakeOcr

    memes = write_corpus(tmp_path / "memes", 6, seed=9, textless=1)
    texts = {FakeOcr.key(load_image(tmp_path / "memes" / m.file)): m.text for m in memes}
    opened = []
    monkeypatch.setattr(ocr_module, "open_engine", lambda kind: opened.append(kind) or FakeOcr(texts))
    index_dir = tmp_path / "idx"
    assert cli.main(["index", "build", str(tmp_path / "memes"), "--clip", str(tmp_path), "--out", str(index_dir),
                     "--quiet", "--ocr"]) == 0
    out = capsys.readouterr().out
    assert opened == ["rapidocr"] and "; words read in 7 images (" in out and "0 copied, 0 unreadable" in out
    target = next(m for m in memes if m.phrase)
    assert cli.main(["search", str(index_dir), target.phrase, "-k", "3", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    best = result["results"][0]
    assert best["path"] == target.file and best["words"] == target.text and best["text_rank"] == 1
    assert set(best["matched_words"]) == set(target.phrase.split()) and best["why"].startswith("words ")
    assert result["text_weight"] == 2.0 and {"fused", "clip_rank", "score"} <= set(best)
    assert cli.main(["search", str(index_dir), f'"{target.phrase}"']) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["rank", "score", "path", "[why]"] and len(lines) == 2
    assert target.file in lines[1] and f'words: "{target.text[:40]}' in lines[1]  # long words are cut at 80
    assert cli.main(["search", str(index_dir), '"nowhere at all"']) == 0
    assert capsys.readouterr().out.strip() == "no results (no image's words hold the quoted phrase)"
    assert cli.main(["search", str(index_dir), "x", "--text-weight", "101"]) == 2
    assert "text weight must be from 0 to 100, got 101.0" in capsys.readouterr().err
    assert cli.main(["index", "update", str(index_dir), "--quiet"]) == 0  # the recorded engine, nothing to read
    assert opened == ["rapidocr", "rapidocr"] and "words read in 0 images" in capsys.readouterr().out


def test_filters_and_cut_off(shape_dataset, tmp_path, fake_clip, capsys):
    import os

    photos = tmp_path / "photos"
    shutil.copytree(shape_dataset, photos)
    (photos / "old").mkdir()
    for name in ("red_circle_0.png", "red_square_0.png"):
        (photos / name).rename(photos / "old" / name)
        os.utime(photos / "old" / name, (1_600_000_000, 1_600_000_000))  # 2020-09-13
    (photos / "red_big.png").write_bytes((photos / "old" / "red_circle_0.png").read_bytes() + b"\0" * 5000)
    index_dir = tmp_path / "idx"
    assert cli.main(["index", "build", str(photos), "--clip", str(tmp_path), "--out", str(index_dir), "--quiet"]) == 0
    capsys.readouterr()

    def paths(*options: str) -> list[str]:
        assert cli.main(["search", str(index_dir), "red", "-k", "30", "--json", *options]) == 0
        return [r["path"] for r in json.loads(capsys.readouterr().out)["results"]]

    everything = paths()
    assert sorted(paths("--folder", "old")) == ["old/red_circle_0.png", "old/red_square_0.png"]
    assert sorted(paths("--before", "2021-01-01")) == ["old/red_circle_0.png", "old/red_square_0.png"]
    assert not set(paths("--after", "2021-01-01")) & {"old/red_circle_0.png", "old/red_square_0.png"}
    assert paths("--min-size", "5k") == ["red_big.png"]
    assert "red_big.png" not in paths("--max-size", "4k")
    assert paths("--format", "jpeg") == [] and len(paths("--format", "png,gif")) == len(everything)
    cut = paths("--min-score", "0.5")
    assert 0 < len(cut) < len(everything) and cut == everything[: len(cut)]  # a cut-off, best first
    by_date = paths("--sort", "date")  # newest first: the two files of 2020 last
    assert sorted(by_date) == sorted(everything) and set(by_date[-2:]) == {"old/red_circle_0.png", "old/red_square_0.png"}

    for options in (["--format", "jpeg"], ["--folder", "../etc"], ["--after", "2024-01-02", "--before", "2024-01-01"],
                    ["--min-size", "2k", "--max-size", "1k"]):  # an empty selection is no result, not an error
        assert cli.main(["search", str(index_dir), "red", *options]) == 0
        assert capsys.readouterr().out.strip() == "no results (no image passes the filters)"
    for options, message in (
        (["--after", "yesterday"], "after 'yesterday' is not a date; write it like 2024-05-01 or 2024-05-01T13:30"),
        (["--min-size", "big"], "min size 'big' is not a size; write bytes or a number with k, M or G, like 250k"),
        (["--format", "svg"], "unknown format(s) svg; choose from jpeg, png, gif, webp, bmp, tiff"),
        (["--min-score", "2"], "min_score must be from -1 to 1 (a cosine similarity), got 2.0"),
        (["--dedup", "0.9", "--folder", "old"], "--dedup does not combine with filters"),
    ):
        assert cli.main(["search", str(index_dir), "red", *options]) == 2
        assert message in capsys.readouterr().err
