"""An index of WebDataset shards: built, searched, updated after a repack (members recognised by
content), its images served by id; on both stores."""

from __future__ import annotations

import io

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from duomodal.data.pack import pack_dataset
from duomodal.search.build import BuildOptions, build_index, update_index
from duomodal.search.index import ImageIndex
from duomodal.search.query import parse_query, query_vector
from duomodal.search.store import IndexStoreError

from .conftest import FakeEmbedder


def test_index_shards_search_repack_and_serve(shape_dataset, tmp_path, vector_store):
    from duomodal.serve.app import create_app

    packed = tmp_path / "packed"
    pack_dataset(shape_dataset, packed, shard_size=5)
    embedder = FakeEmbedder()
    report = build_index(packed, tmp_path / "idx", embedder, options=BuildOptions(store=vector_store), progress=False)
    assert (report.count, report.embedded, report.reused, report.skipped) == (24, 12, 12, [])
    with ImageIndex.open(tmp_path / "idx") as index:
        hits = index.search(query_vector(embedder, parse_query("red")), k=4)
        assert all(h.caption.startswith("a red") for h in hits)
        assert all(".tar#" in h.path for h in hits) and index.file_path(hits[0].id) is None
        original = next(shape_dataset.glob(f"{hits[0].caption.split()[1]}_{hits[0].caption.split()[2]}_*.png"))
        assert index.read_image_bytes(hits[0].path) == original.read_bytes()
        with TestClient(create_app(index, embedder), base_url="http://localhost") as client:
            served = client.get(f"/api/image/{hits[0].id}")
            assert served.status_code == 200 and served.headers["content-type"] == "image/png"
            assert served.content == original.read_bytes()
            thumb = client.get(f"/api/thumb/{hits[0].id}")
            assert thumb.status_code == 200 and Image.open(io.BytesIO(thumb.content)).size[0] >= 16
            body = client.get("/api/search", params={"q": "blue", "k": 3}).json()
            assert [r["caption"].split()[1] for r in body["results"]] == ["blue"] * 3

    pack_dataset(shape_dataset, packed, shard_size=7)  # a repack: every member in another shard
    again = update_index(tmp_path / "idx", embedder, progress=False)
    assert (again.embedded, again.reused, again.removed, again.count) == (0, 0, 0, 24)
    # a member now in another shard is a move; one in the same shard (rewritten: new mtime) a refresh
    assert again.moved + again.refreshed == 24 and again.moved > 0 and again.refreshed > 0
    assert embedder.images_embedded == 12
    with ImageIndex.open(tmp_path / "idx") as index:
        for hit in index.search(query_vector(embedder, parse_query("green")), k=24):
            assert index.search(index.vector(hit.id), k=1)[0].score == pytest.approx(1.0, abs=1e-5)


def test_remote_shards_are_refused_with_what_to_do(tmp_path):
    with pytest.raises(IndexStoreError) as e:
        build_index("https://example.com/shards/{000..009}.tar", tmp_path / "idx", FakeEmbedder(), progress=False)
    assert str(e.value) == (
        "https://example.com/shards/{000..009}.tar: an index reads local shards (it serves images from them); "
        "copy the shards to local or shared storage and index that copy"
    )


def test_shard_members_pass_the_same_image_checks_as_files(tmp_path):
    """A sliver (an extreme aspect ratio) is refused before decoding whether it is a file or a shard
    member: skipped by the index build with the same reason, and refused by load_record_image."""
    from duomodal.data.dataset import load_record_image
    from duomodal.data.images import DEGENERATE, ImageError
    from duomodal.data.records import load_records

    folder = tmp_path / "folder"
    folder.mkdir()
    Image.new("RGB", (16, 16), (255, 0, 0)).save(folder / "square.png")
    Image.new("RGB", (2000, 1), (0, 0, 255)).save(folder / "sliver.png")
    (folder / "square.txt").write_text("a red square\n")
    (folder / "sliver.txt").write_text("a blue line\n")
    packed = tmp_path / "packed"
    pack_dataset(folder, packed, shard_size=5, val_fraction=0.0)

    reasons = {}
    for name, root in (("folder", folder), ("shards", packed)):
        report = build_index(root, tmp_path / f"idx-{name}", FakeEmbedder(), progress=False)
        assert report.count == 1 and len(report.skipped) == 1
        path, reasons[name] = report.skipped[0]
        assert (path == "sliver.png") if name == "folder" else (".tar#" in path)
    assert "aspect ratio of 2000:1" in reasons["folder"]
    assert reasons["shards"] == reasons["folder"]

    sliver = next(r for r in load_records(packed) if r.captions == ("a blue line",))
    with pytest.raises(ImageError) as e:
        load_record_image(sliver)
    assert e.value.kind == DEGENERATE
