"""Building, updating and opening an index with the fake embedder: incremental cases, errors, resync."""

from __future__ import annotations

import os
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from duomodal.data.records import load_records
from duomodal.search.build import BuildOptions, build_index, update_index
from duomodal.search.index import MAX_K, ImageIndex
from duomodal.search.query import parse_query, query_vector
from duomodal.search.store import SCHEMA_VERSION, STORE_FILE, IndexStoreError, ModelMismatchError

from .conftest import FakeEmbedder


def make_images(root: Path, count: int, seed: int = 0, prefix: str = "img") -> list[Path]:
    """`count` distinct 16x16 images of random blocks (distinct content, distinct vectors)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        pixels = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8).repeat(4, 0).repeat(4, 1)
        path = root / f"{prefix}_{i:03d}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def all_rows(index_dir: Path) -> dict[str, tuple]:
    with sqlite3.connect(index_dir / STORE_FILE) as db:
        return {r[0]: r[1:] for r in db.execute("SELECT path, id, sha256, caption, vector FROM images")}


def build(root, index_dir, embedder=None, **options):
    return build_index(root, index_dir, embedder or FakeEmbedder(), options=BuildOptions(**options), progress=False)


def test_build_records_metadata_and_searches(shape_dataset, tmp_path, vector_store):
    report = build(shape_dataset, tmp_path / "idx", store=vector_store)
    assert (report.count, report.embedded, report.reused, report.index_type) == (24, 12, 12, "flat")
    with ImageIndex.open(tmp_path / "idx") as index:
        assert (index.count, index.dim, index.clip_model_id, index.root) == (24, 24, "fake-colour-v1", shape_dataset)
        assert index.index_type == "flat"
        hits = index.search(query_vector(FakeEmbedder(), parse_query("red")), k=4)
        assert [h.path.split("_")[0] for h in hits] == ["red"] * 4
        assert hits[0].score >= hits[-1].score
        hit = index.get(hits[0].id)
        assert (hit.width, hit.height, hit.score) == (16, 16, 0.0)
        assert hit.caption == f"a red {hit.path.split('_')[1]}"
        assert index.file_path(hit.id) == shape_dataset / hit.path
        np.testing.assert_allclose(np.linalg.norm(index.vector(hit.id)), 1.0, rtol=1e-5)
        assert index.get(10_000) is None
    with sqlite3.connect(tmp_path / "idx" / STORE_FILE) as db:
        meta = dict(db.execute("SELECT key, value FROM meta"))
        row = db.execute("SELECT sha256, size, mtime_ns FROM images WHERE path = 'red_square_0.png'").fetchone()
    assert meta["schema_version"] == str(SCHEMA_VERSION)
    assert (meta["clip_model_id"], meta["dim"], meta["index_type"]) == ("fake-colour-v1", "24", "flat")
    stat = (shape_dataset / "red_square_0.png").stat()
    assert row[1:] == (stat.st_size, stat.st_mtime_ns) and len(row[0]) == 64


def test_update_add_change_delete_rename(tmp_path, vector_store):
    root = tmp_path / "photos"
    paths = make_images(root, 6)
    (root / "sub").mkdir()
    embedder = FakeEmbedder()
    build(root, tmp_path / "idx", embedder, store=vector_store)
    assert embedder.images_embedded == 6
    before = all_rows(tmp_path / "idx")

    unchanged = update_index(tmp_path / "idx", embedder, progress=False)
    assert (unchanged.unchanged, unchanged.embedded, embedder.images_embedded) == (6, 0, 6)

    make_images(root, 2, seed=1, prefix="new")  # add 2
    Image.new("RGB", (16, 16), (1, 2, 3)).save(paths[0])  # change 1
    os.utime(paths[0], ns=(1, 1))
    paths[1].unlink()  # delete 1
    paths[2].rename(root / "sub" / "moved.png")  # rename 1
    os.utime(paths[3], ns=(5, 5))  # touch 1: same content
    report = update_index(tmp_path / "idx", embedder, progress=False)
    assert (report.embedded, report.moved, report.removed, report.refreshed) == (3, 1, 1, 1)
    assert embedder.images_embedded == 6 + 3  # the renamed file was not embedded again
    after = all_rows(tmp_path / "idx")
    assert sorted(after) == sorted(
        ["img_000.png", "img_003.png", "img_004.png", "img_005.png", "new_000.png", "new_001.png", "sub/moved.png"]
    )
    assert after["sub/moved.png"][:2] == before["img_002.png"][:2]  # same id, same hash
    assert after["img_000.png"][0] == before["img_000.png"][0]  # changed in place: same id
    assert after["img_000.png"][1] != before["img_000.png"][1] and after["img_000.png"][3] != before["img_000.png"][3]
    with ImageIndex.open(tmp_path / "idx") as index:
        assert index.count == 7
        for path, (image_id, *_rest) in after.items():
            top = index.search(index.vector(image_id), k=1)[0]
            assert np.isclose(top.score, 1.0, atol=1e-5)
    again = update_index(tmp_path / "idx", embedder, progress=False)
    assert (again.unchanged, again.embedded, again.moved, again.removed) == (7, 0, 0, 0)


def test_copies_reuse_vectors_and_captions_follow_sidecars(tmp_path, vector_store):
    root = tmp_path / "photos"
    first = make_images(root, 2)[0]
    embedder = FakeEmbedder()
    build(root, tmp_path / "idx", embedder, store=vector_store)
    shutil.copy2(first, root / "copy.png")
    (root / "img_001.txt").write_text("\n  a blocky picture \nsecond caption\n")
    report = update_index(tmp_path / "idx", embedder, progress=False)
    assert (report.reused, report.embedded, embedder.images_embedded) == (1, 0, 2)
    rows = all_rows(tmp_path / "idx")
    assert rows["copy.png"][1] == rows["img_000.png"][1] and rows["copy.png"][0] != rows["img_000.png"][0]
    assert rows["img_001.png"][2] == "a blocky picture"


def test_captions_from_manifest(tmp_path):
    root = tmp_path / "photos"
    make_images(root / "images", 2)
    (root / "captions.jsonl").write_text(
        '{"file": "images/img_000.png", "caption": ["a red heart icon", "heart, red"]}\nnot json\n'
    )
    build(root, tmp_path / "idx")
    rows = all_rows(tmp_path / "idx")
    assert rows["images/img_000.png"][2] == "a red heart icon" and rows["images/img_001.png"][2] is None


def test_captions_from_a_csv_manifest_as_datasets_read_it(tmp_path):
    root = tmp_path / "photos"
    make_images(root / "images", 3)
    (root / "captions.csv").write_text(
        'file,caption\nimages/img_000.png,"a red heart icon"\nimages/img_000.png,"heart, red"\n'
        './images/img_001.png,  a blue star  \n'
    )
    (root / "images" / "img_002.txt").write_text("from the sidecar\n")
    build(root, tmp_path / "idx")
    rows = all_rows(tmp_path / "idx")
    assert rows["images/img_000.png"][2] == "a red heart icon"
    assert rows["images/img_001.png"][2] == "a blue star"
    assert rows["images/img_002.png"][2] == "from the sidecar"  # not in the manifest: its sidecar
    assert [r.captions for r in load_records(root)][:2] == [("a red heart icon", "heart, red"), ("a blue star",)]


def test_unreadable_files_are_skipped_with_a_line_each(tmp_path, vector_store):
    root = tmp_path / "photos"
    make_images(root, 3)
    (root / "broken.png").write_bytes(b"\x89PNG not really")
    (root / "empty.jpg").write_bytes(b"")
    lines = []
    report = build_index(root, tmp_path / "idx", FakeEmbedder(), options=BuildOptions(store=vector_store),
                         on_skip=lambda p, r: lines.append(f"{p}: {r}"),
                         progress=False)
    assert report.count == 3 and len(report.skipped) == 2
    assert sorted(p for p, _ in report.skipped) == ["broken.png", "empty.jpg"]
    assert "empty.jpg: empty file (0 bytes)" in lines
    assert any(line.startswith("broken.png: not an image") for line in lines)


def test_model_mismatch_is_a_clear_error(tmp_path, vector_store):
    root = tmp_path / "photos"
    make_images(root, 2)
    build(root, tmp_path / "idx", store=vector_store)
    with pytest.raises(ModelMismatchError) as e:
        update_index(tmp_path / "idx", FakeEmbedder(model_id="other-clip"), progress=False)
    assert str(e.value) == (
        f"{tmp_path / 'idx'} was built with CLIP model 'fake-colour-v1', not 'other-clip'; "
        "update it with the same CLIP, or build a new index with this one"
    )
    with ImageIndex.open(tmp_path / "idx") as index:
        index.check_model("fake-colour-v1")
        with pytest.raises(ModelMismatchError) as e:
            index.check_model("other-clip")
        assert str(e.value) == (
            f"{tmp_path / 'idx'} was built with CLIP model 'fake-colour-v1' but the query CLIP is 'other-clip'; "
            "search with the CLIP the index was built with or rebuild the index with this one"
        )
        with pytest.raises(ValueError, match="^query vector has 3 values, the index holds 24-d vectors$"):
            index.search(np.ones(3, np.float32), k=1)
        with pytest.raises(ValueError, match=f"^k must be an integer from 1 to {MAX_K}, got 1001$"):
            index.search(np.ones(24, np.float32), k=1001)


def test_build_into_index_of_another_root_is_refused(tmp_path):
    make_images(tmp_path / "a", 1)
    make_images(tmp_path / "b", 1)
    build(tmp_path / "a", tmp_path / "idx")
    with pytest.raises(IndexStoreError, match="already indexes .*/a, not .*/b; choose another --out"):
        build(tmp_path / "b", tmp_path / "idx")


def test_open_errors(tmp_path):
    with pytest.raises(IndexStoreError) as e:
        ImageIndex.open(tmp_path / "nope")
    assert str(e.value) == f"{tmp_path / 'nope'} is not a directory; build one with 'duomodal index build'"
    (tmp_path / "empty").mkdir()
    with pytest.raises(IndexStoreError, match="has no index.sqlite; is it a duomodal index directory"):
        ImageIndex.open(tmp_path / "empty")
    make_images(tmp_path / "a", 1)
    build(tmp_path / "a", tmp_path / "idx")
    with sqlite3.connect(tmp_path / "idx" / STORE_FILE) as db:
        db.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(IndexStoreError, match="has schema version 99; this duomodal reads version 1"):
        ImageIndex.open(tmp_path / "idx")


def test_stale_faiss_file_is_brought_up_to_date(tmp_path):
    """A crash after the store commits but before the faiss file is saved: opening repairs it."""
    root = tmp_path / "photos"
    make_images(root, 4)
    build(root, tmp_path / "idx")
    old_faiss = {p.name: p.read_bytes() for p in (tmp_path / "idx").glob("vectors.*.faiss")}
    make_images(root, 3, seed=1, prefix="new")
    (root / "img_000.png").unlink()
    update_index(tmp_path / "idx", FakeEmbedder(), progress=False)
    for p in (tmp_path / "idx").glob("vectors.*.faiss"):
        p.unlink()
    for name, data in old_faiss.items():
        (tmp_path / "idx" / name).write_bytes(data)
    with ImageIndex.open(tmp_path / "idx") as index:
        assert index.count == 6
        rows = all_rows(tmp_path / "idx")
        for image_id, *_ in rows.values():
            assert index.search(index.vector(image_id), k=1)[0].id == image_id
    assert len(list((tmp_path / "idx").glob("vectors.*.faiss"))) == 1


@pytest.mark.parametrize("index_type", ["hnsw", "ivf"])
def test_approximate_index_types_update_incrementally(tmp_path, index_type, vector_store):
    root = tmp_path / "photos"
    paths = make_images(root, 30)
    report = build(root, tmp_path / "idx", index_type=index_type, store=vector_store)
    assert report.index_type == index_type
    paths[0].unlink()
    make_images(root, 2, seed=3, prefix="new")
    update_index(tmp_path / "idx", FakeEmbedder(), progress=False)
    with ImageIndex.open(tmp_path / "idx") as index:
        assert (index.index_type, index.count) == (index_type, 31)
        for image_id, *_ in all_rows(tmp_path / "idx").values():
            assert index.search(index.vector(image_id), k=1)[0].id == image_id


def test_index_type_can_be_changed_on_update(tmp_path, vector_store):
    make_images(tmp_path / "a", 5)
    build(tmp_path / "a", tmp_path / "idx", store=vector_store)
    report = update_index(tmp_path / "idx", FakeEmbedder(), options=BuildOptions(index_type="hnsw", store=vector_store), progress=False)
    assert report.index_type == "hnsw"
    with ImageIndex.open(tmp_path / "idx") as index:
        assert index.index_type == "hnsw" and index.count == 5


def test_auto_switches_to_hnsw_above_the_threshold(tmp_path, monkeypatch, vector_store):
    from duomodal.search.vectors import base

    monkeypatch.setattr(base, "AUTO_EXACT_MAX", 5)
    root = tmp_path / "photos"
    make_images(root, 5)
    assert build(root, tmp_path / "idx", store=vector_store).index_type == "flat"
    make_images(root, 2, seed=1, prefix="new")
    assert update_index(tmp_path / "idx", FakeEmbedder(), progress=False).index_type == "hnsw"
    with ImageIndex.open(tmp_path / "idx") as index:
        assert (index.index_type, index.count) == ("hnsw", 7)


def test_a_second_writer_is_refused_while_one_holds_the_index(tmp_path, vector_store):
    from duomodal.search.index import IndexLock

    make_images(tmp_path / "a", 1)
    build(tmp_path / "a", tmp_path / "idx", store=vector_store)
    with IndexLock(tmp_path / "idx"):
        with pytest.raises(IndexStoreError) as e:
            update_index(tmp_path / "idx", FakeEmbedder(), progress=False)
        assert str(e.value) == (
            f"{tmp_path / 'idx'} is being updated by another process (lock {tmp_path / 'idx' / 'lock'}); "
            "wait for it to finish"
        )
        with ImageIndex.open(tmp_path / "idx") as index:  # readers still open it (in-memory sync)
            assert index.count == 1


def test_option_errors_name_the_value():
    from duomodal.search.vectors import FaissParams

    with pytest.raises(ValueError) as e:
        BuildOptions(index_type="annoy")
    assert str(e.value) == "index type 'annoy' is not one of auto, flat, hnsw, ivf"
    with pytest.raises(ValueError) as e:
        BuildOptions(batch_size=0)
    assert str(e.value) == "batch size must be an integer from 1 to 4096, got 0"
    with pytest.raises(ValueError) as e:
        FaissParams(hnsw_m=0)
    assert str(e.value) == "hnsw_m must be an integer >= 1, got 0"
