"""Pairing images with captions (sidecar .txt, captions.jsonl, captions.csv) and the hash split."""

from __future__ import annotations

import json
import shutil
import unicodedata
from pathlib import Path

import pytest
from PIL import Image

from duomodal.data.records import (
    MANIFEST,
    NO_CAPTION,
    ORPHAN_CAPTION,
    DatasetError,
    Problem,
    Record,
    filter_split,
    hash_split,
    load_records,
    scan_dataset,
)


def image(path: Path, color=(200, 10, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), color).save(path)
    return path


def write_jsonl(root: Path, rows: list) -> None:
    lines = [row if isinstance(row, str) else json.dumps(row, ensure_ascii=False) for row in rows]
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


# --- sidecar .txt ---------------------------------------------------------------------------------


def test_sidecar_captions_one_per_line(tmp_path):
    image(tmp_path / "cat.png")
    (tmp_path / "cat.txt").write_text("a cat\n\n   \n  a small cat  \na cat\n")
    image(tmp_path / "deep" / "er" / "dog.JPG")
    (tmp_path / "deep" / "er" / "dog.txt").write_text("\ufeffa dog")  # BOM is not part of the caption
    records = load_records(tmp_path)
    assert records == [
        Record(tmp_path / "cat.png", ("a cat", "a small cat"), hash_split("cat.png", 0.05), {}),
        Record(tmp_path / "deep/er/dog.JPG", ("a dog",), hash_split("deep/er/dog.JPG", 0.05), {}),
    ]
    assert all(r.path.is_absolute() for r in records)


def test_all_extensions_and_hidden_files(tmp_path):
    for name in ("a.jpg", "b.jpeg", "c.png", "d.webp", "e.bmp", "f.gif", "g.tiff", ".hidden.png", ".git/h.png"):
        path = tmp_path / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"not decoded by load_records")
        path.with_suffix(".txt").write_text(name)
    scan = scan_dataset(tmp_path)
    assert list(scan.images.values()) == ["a.jpg", "b.jpeg", "c.png", "d.webp", "e.bmp", "f.gif"]
    assert [str(p) for p in scan.problems] == ["g.txt: caption without image: no image named g.* next to it"]
    assert scan.caption_source == "sidecar .txt files"


def test_sidecar_images_without_caption_and_captions_without_image(tmp_path):
    image(tmp_path / "lonely.png")
    image(tmp_path / "blank.png")
    (tmp_path / "blank.txt").write_text("\n  \n")
    image(tmp_path / "latin1.png")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "orphan.txt").write_text("nobody")
    image(tmp_path / "good.png")
    (tmp_path / "good.txt").write_text("fine")
    scan = scan_dataset(tmp_path)
    assert sorted(scan.problems, key=lambda p: p.path) == [
        Problem("blank.png", NO_CAPTION, "no caption (blank.txt has no caption text)"),
        Problem("latin1.png", NO_CAPTION, "no caption (latin1.txt (not UTF-8 text: byte 3) has no caption text)"),
        Problem("lonely.png", NO_CAPTION, "no caption (no lonely.txt next to it)"),
        Problem("orphan.txt", ORPHAN_CAPTION, "caption without image: no image named orphan.* next to it"),
    ]
    assert [r.path.name for r in load_records(tmp_path)] == ["good.png"]


def test_unicode_file_names(tmp_path):
    image(tmp_path / "çà et là" / "日本の猫.png")
    (tmp_path / "çà et là" / "日本の猫.txt").write_text("一匹の猫", encoding="utf-8")
    [record] = load_records(tmp_path)
    assert record.path == tmp_path / "çà et là" / "日本の猫.png"
    assert record.captions == ("一匹の猫",)


# --- captions.jsonl -------------------------------------------------------------------------------


def test_jsonl_manifest(tmp_path):
    image(tmp_path / "images" / "heart__red.png")
    image(tmp_path / "images" / "heart__blue.png")
    image(tmp_path / "images" / "star__red.png")
    image(tmp_path / "images" / "star__red.png").with_suffix(".txt").write_text("sidecars are not read")
    write_jsonl(tmp_path, [
        {"file": "images/heart__red.png", "caption": ["a red heart icon", "heart, red", " "], "icon": "heart",
         "color": "red", "split": "train", "heldout": False},
        {"file": "images/heart__blue.png", "caption": "a blue heart icon", "icon": "heart", "color": "blue",
         "split": "heldout", "heldout": True, "size": 128, "tags": ["love"], "note": None},
        "",
        {"file": "./images/star__red.png", "caption": "a red star", "split": "val"},
    ])
    records = load_records(tmp_path)
    assert records == [
        Record(tmp_path / "images/heart__blue.png", ("a blue heart icon",), "heldout",
               {"icon": "heart", "color": "blue", "size": "128", "tags": '["love"]'}),
        Record(tmp_path / "images/heart__red.png", ("a red heart icon", "heart, red"), "train",
               {"icon": "heart", "color": "red"}),
        Record(tmp_path / "images/star__red.png", ("a red star",), "val", {}),
    ]
    assert scan_dataset(tmp_path).caption_source == "captions.jsonl"
    assert filter_split(records, "heldout") == records[:1]


def test_jsonl_heldout_true_wins_and_split_missing_uses_hash(tmp_path):
    image(tmp_path / "a.png")
    image(tmp_path / "b.png")
    write_jsonl(tmp_path, [
        {"file": "a.png", "caption": "a", "split": "train", "heldout": "true"},
        {"file": "b.png", "caption": "b", "heldout": False},
    ])
    a, b = load_records(tmp_path, val_fraction=0.5)
    assert a.split == "heldout"
    assert b.split == hash_split("b.png", 0.5)


def test_jsonl_rows_for_one_file_merge(tmp_path):
    image(tmp_path / "a.png")
    write_jsonl(tmp_path, [
        {"file": "a.png", "caption": "one", "kind": "x"},
        {"file": "a.png", "caption": ["two", "one"], "kind": "y", "more": "z"},
    ])
    [record] = load_records(tmp_path)
    assert record.captions == ("one", "two")
    assert record.labels == {"kind": "x", "more": "z"}


def test_jsonl_manifest_problems(tmp_path):
    image(tmp_path / "ok.png")
    image(tmp_path / "also.png")
    write_jsonl(tmp_path, [
        {"file": "ok.png", "caption": "fine", "split": "train"},
        '{"file": "x.png", "caption": ',
        '["file", "caption"]',
        {"caption": "no file"},
        {"file": "ok.png", "caption": 3},
        {"file": "../outside.png", "caption": "up"},
        {"file": "notes.txt", "caption": "text"},
        {"file": "ok.png", "caption": "x", "split": "test"},
        {"file": "ok.png", "caption": "x", "heldout": "maybe"},
        {"file": "ok.png", "caption": "x", "split": "val"},
        {"file": "gone.png", "caption": "missing"},
        {"file": "also.png", "caption": []},
    ])
    scan = scan_dataset(tmp_path)
    assert [str(p) for p in scan.problems] == [
        "captions.jsonl: line 2: not valid JSON (Expecting value, column 30)",
        'captions.jsonl: line 3: expected an object with "file" and "caption", got list',
        'captions.jsonl: line 4: no "file" given',
        'captions.jsonl: line 5: "caption" must be a string or a list of strings',
        f'captions.jsonl: line 6: file "../outside.png" is outside the dataset folder; give a path relative to {tmp_path}',
        'captions.jsonl: line 7: file "notes.txt" is not an image (jpg, jpeg, png, webp, bmp, gif)',
        "captions.jsonl: line 8: split 'test' is not one of train, val, heldout",
        "captions.jsonl: line 9: \"heldout\" must be true or false, got 'maybe'",
        'captions.jsonl: line 10: split "val" conflicts with "train" given earlier for ok.png',
        "gone.png: caption without image: captions.jsonl line 11 names a file that does not exist",
        "also.png: no caption (captions.jsonl line 12 has no caption text)",
    ]
    assert {p.kind for p in scan.problems[:9]} == {MANIFEST}
    with pytest.raises(DatasetError) as info:
        load_records(tmp_path)
    assert str(info.value) == (
        f"{tmp_path}: 9 problem(s) in the caption manifest, the first: captions.jsonl: line 2: not valid JSON "
        f"(Expecting value, column 30); fix them (`duomodal data check {tmp_path}` lists them all)"
    )


def test_manifest_path_in_other_unicode_normalisation(tmp_path):
    name = unicodedata.normalize("NFC", "café.png")
    image(tmp_path / name)
    write_jsonl(tmp_path, [{"file": unicodedata.normalize("NFD", name), "caption": "coffee"}])
    [record] = load_records(tmp_path)
    assert record.path == tmp_path / name and record.captions == ("coffee",)


# --- captions.csv ---------------------------------------------------------------------------------


def test_csv_manifest(tmp_path):
    image(tmp_path / "pics" / "a b.png")
    image(tmp_path / "pics" / "c.png")
    (tmp_path / "captions.csv").write_text(
        "file,caption,photographer,split,heldout\n"
        'pics/a b.png,"a cat, sleeping",ann,,\n'
        "pics/a b.png,a sleeping cat,,,\n"
        "pics/c.png,a dog,bob,val,no\n",
        encoding="utf-8",
    )
    records = load_records(tmp_path)
    assert records == [
        Record(tmp_path / "pics/a b.png", ("a cat, sleeping", "a sleeping cat"), hash_split("pics/a b.png", 0.05),
               {"photographer": "ann"}),
        Record(tmp_path / "pics/c.png", ("a dog",), "val", {"photographer": "bob"}),
    ]
    assert scan_dataset(tmp_path).caption_source == "captions.csv"


def test_csv_heldout_column_and_bad_rows(tmp_path):
    image(tmp_path / "a.png")
    (tmp_path / "captions.csv").write_text(
        "file,caption,heldout\na.png,an a,TRUE\na.png,x,y,z\nmissing.png,gone,\n", encoding="utf-8"
    )
    scan = scan_dataset(tmp_path)
    assert [str(p) for p in scan.problems] == [
        "captions.csv: line 3: more cells than header columns",
        "missing.png: caption without image: captions.csv line 4 names a file that does not exist",
    ]
    assert scan.captions["a.png"].split == "heldout"


def test_csv_without_required_columns(tmp_path):
    image(tmp_path / "a.png")
    (tmp_path / "captions.csv").write_text("image,text\na.png,an a\n")
    scan = scan_dataset(tmp_path)
    assert [str(p) for p in scan.problems] == [
        'captions.csv: the header must name "file" and "caption" columns; found image, text',
        "a.png: no caption (not in captions.csv)",
    ]
    with pytest.raises(DatasetError, match=r"1 problem\(s\) in the caption manifest"):
        load_records(tmp_path)


def test_both_manifests_is_a_problem(tmp_path):
    image(tmp_path / "a.png")
    write_jsonl(tmp_path, [{"file": "a.png", "caption": "json"}])
    (tmp_path / "captions.csv").write_text("file,caption\na.png,csv\n")
    scan = scan_dataset(tmp_path)
    assert [str(p) for p in scan.problems] == ["captions.csv: ignored: captions.jsonl is used; keep one manifest"]
    assert scan.captions["a.png"].captions == ["json"]


# --- split ----------------------------------------------------------------------------------------


def test_hash_split_is_deterministic_and_near_the_fraction():
    names = [f"dir/image_{i}.png" for i in range(2000)]
    splits = [hash_split(n, 0.2) for n in names]
    assert splits == [hash_split(n, 0.2) for n in names]
    assert 0.17 < splits.count("val") / len(names) < 0.23
    assert all(hash_split(n, 0.0) == "train" for n in names[:100])
    # a larger fraction only moves images from train to val, never back
    assert all(hash_split(n, 0.3) == "val" for n, s in zip(names, splits) if s == "val")


def test_split_is_stable_when_files_are_added_or_the_folder_moves(tmp_path):
    root = tmp_path / "data"
    for i in range(30):
        image(root / f"img_{i}.png").with_suffix(".txt").write_text(f"image {i}")
    before = {r.path.name: r.split for r in load_records(root, val_fraction=0.3)}
    assert set(before.values()) == {"train", "val"}
    for i in range(30, 90):
        image(root / "new" / f"img_{i}.png").with_suffix(".txt").write_text(f"image {i}")
    after = {r.path.name: r.split for r in load_records(root, val_fraction=0.3)}
    assert {name: after[name] for name in before} == before
    moved = shutil.copytree(root, tmp_path / "elsewhere")
    assert {r.path.name: r.split for r in load_records(moved, val_fraction=0.3)} == after


def test_filter_split_and_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match=r"^split 'test' is not one of train, val, heldout$"):
        filter_split([], "test")
    with pytest.raises(ValueError, match=r"^val_fraction must be in \[0, 1\), got 1\.0$"):
        load_records(tmp_path, val_fraction=1.0)


def test_missing_folder_and_no_captioned_images(tmp_path):
    with pytest.raises(DatasetError, match=rf"^dataset folder {tmp_path / 'nope'} does not exist$"):
        load_records(tmp_path / "nope")
    image(tmp_path / "a.png")
    with pytest.raises(DatasetError) as info:
        load_records(tmp_path)
    assert str(info.value) == (
        f"no captioned images in {tmp_path} (1 images found, captions from sidecar .txt files); "
        "give each image a .txt file of captions or add a captions.jsonl"
    )
    with pytest.raises(DatasetError, match=r"is not a folder$"):
        scan_dataset(tmp_path / "a.png")


def test_shape_fixture_records(shape_dataset):
    records = load_records(shape_dataset, val_fraction=0.25)
    assert len(records) == 24
    assert all(len(r.captions) == 2 for r in records)
    assert {r.split for r in records} == {"train", "val"}
