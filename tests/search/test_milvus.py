"""What only the Milvus store has: store specs, a collection owned by one index (lite and server), a
sync cut off half-way, moving an index between stores, a milvus-lite file busy in another process.
(Everything else runs on every store through the `vector_store` fixture; what only a server shows
is in test_milvus_server.py.)"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from duomodal.search.build import BuildOptions, build_index, update_index
from duomodal.search.index import ImageIndex
from duomodal.search.store import IndexStoreError
from duomodal.search.vectors import base, milvus_store, vector_store_spec
from duomodal.search.vectors.milvus_target import MilvusTarget

from ..conftest import store_spec
from .conftest import FakeEmbedder
from .test_index import all_rows, make_images

pytest.importorskip("milvus_lite", reason="install duomodal[milvus] to test the Milvus store")


def build(root: Path, index_dir: Path, store: str, **options):
    return build_index(root, index_dir, FakeEmbedder(), options=BuildOptions(store=store, **options), progress=False)


def assert_every_image_finds_itself(index_dir: Path, count: int) -> None:
    with ImageIndex.open(index_dir) as index:
        assert index.count == count
        for image_id, *_ in all_rows(index_dir).values():
            top = index.search(index.vector(image_id), k=1)[0]
            assert top.id == image_id and np.isclose(top.score, 1.0, atol=1e-5)


def test_store_specs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert vector_store_spec("faiss") == "faiss"
    assert vector_store_spec("milvus:./icons.db") == f"milvus:{tmp_path / 'icons.db'}"
    assert MilvusTarget.parse("milvus:./icons.db") == MilvusTarget(str(tmp_path / "icons.db"), "duomodal_images")
    server = MilvusTarget.parse("milvus://milvus.local:19530/icons_v2")
    assert (server.uri, server.collection, server.is_lite) == ("http://milvus.local:19530", "icons_v2", False)
    assert server.spec == "milvus://milvus.local:19530/icons_v2"
    errors = {
        "annoy": "store 'annoy' is not milvus:PATH.db or milvus://HOST:PORT/COLLECTION",
        "milvus:icons": "store 'milvus:icons': a milvus-lite file name must end in .db, e.g. milvus:./icons.db",
        "milvus://host/icons": "store 'milvus://host/icons' is not of the form milvus://HOST:PORT/COLLECTION",
        "milvus://host:19530/9icons": "Milvus collection name '9icons' must start with a letter or _ and hold "
        "only letters, digits and _",
    }
    for spec, message in errors.items():
        with pytest.raises(ValueError) as e:
            BuildOptions(store=spec)
        assert str(e.value) == message


@pytest.mark.parametrize("kind", ["milvus-lite", "milvus-server"])
def test_a_collection_belongs_to_one_index(tmp_path, request, kind):
    make_images(tmp_path / "a", 2)
    make_images(tmp_path / "b", 2, seed=1)
    store, drop = store_spec(request, kind, tmp_path)
    request.addfinalizer(drop)
    build(tmp_path / "a", tmp_path / "idx-a", store)
    with pytest.raises(IndexStoreError) as e:
        build(tmp_path / "b", tmp_path / "idx-b", store)
    collection = MilvusTarget.parse(store).collection
    assert str(e.value).startswith(f"Milvus collection {collection!r} at {vector_store_spec(store)} belongs to "
                                   "another index (")
    assert str(e.value).endswith("); choose another collection or file")
    assert_every_image_finds_itself(tmp_path / "idx-a", 2)  # the first index is untouched


@pytest.mark.parametrize("kind", ["milvus-lite", "milvus-server"])
@pytest.mark.parametrize("cut", ["apply", "rebuild"])
def test_a_sync_cut_off_half_way_is_repaired_on_the_next_open(tmp_path, monkeypatch, request, cut, kind):
    """The store committed; Milvus got part of the work and the state was never recorded."""
    root = tmp_path / "photos"
    paths = make_images(root, 8)
    store, drop = store_spec(request, kind, tmp_path)
    request.addfinalizer(drop)
    build(root, tmp_path / "idx", store)
    paths[0].unlink()
    make_images(root, 5, seed=2, prefix="new")
    monkeypatch.setattr(milvus_store, "INSERT_CHUNK", 2)
    real = base.apply_changes if cut == "apply" else milvus_store.MilvusEngine.rebuild
    calls = []

    def cut_off(*args, **kwargs):  # (store, engine, ...) for the change log, (engine, store, ...) for a rebuild
        engine = next(a for a in args if isinstance(a, milvus_store.MilvusEngine))
        client = engine.client
        calls.append(engine.target.collection)
        original_insert, original_upsert = client.insert, client.upsert
        sent = []

        def once(method):
            def call(*a, **k):
                if sent:
                    raise RuntimeError("killed")
                sent.append(1)
                return method(*a, **k)
            return call

        client.insert, client.upsert = once(original_insert), once(original_upsert)
        try:
            return real(*args, **kwargs)
        finally:
            client.insert, client.upsert = original_insert, original_upsert

    if cut == "apply":
        monkeypatch.setattr(base, "apply_changes", cut_off)
    else:
        monkeypatch.setattr(milvus_store.MilvusEngine, "rebuild", cut_off)
    options = BuildOptions(index_type="hnsw") if cut == "rebuild" else None  # a new type means a rebuild
    with pytest.raises(RuntimeError, match="killed"):
        update_index(tmp_path / "idx", FakeEmbedder(), options=options, progress=False)
    assert calls
    monkeypatch.undo()
    assert_every_image_finds_itself(tmp_path / "idx", 12)


@pytest.mark.parametrize("kind", ["milvus-lite", "milvus-server"])
def test_an_index_moves_between_stores_on_update(tmp_path, request, kind):
    root = tmp_path / "photos"
    make_images(root, 6)
    build(root, tmp_path / "idx", "faiss")
    with ImageIndex.open(tmp_path / "idx") as index:
        before = [(h.id, round(h.score, 5)) for h in index.search(index.vector(1), k=6)]
    store, drop = store_spec(request, kind, tmp_path)
    request.addfinalizer(drop)
    report = update_index(tmp_path / "idx", FakeEmbedder(), options=BuildOptions(store=store), progress=False)
    assert (report.vector_store, report.count, report.embedded) == (store, 6, 0)
    with ImageIndex.open(tmp_path / "idx") as index:
        assert index.vector_store == store
        assert [(h.id, round(h.score, 5)) for h in index.search(index.vector(1), k=6)] == before
    update_index(tmp_path / "idx", FakeEmbedder(), options=BuildOptions(store="faiss"), progress=False)
    assert_every_image_finds_itself(tmp_path / "idx", 6)


def test_a_store_that_missed_pruned_changes_is_rebuilt_when_the_index_moves_back(tmp_path):
    """faiss -> milvus-lite -> (a file changes; the Milvus sync prunes the log) -> faiss: the old faiss
    file cannot catch up from the log any more, so it is rebuilt, not left with the stale vector."""
    root = tmp_path / "photos"
    make_images(root, 6)
    build(root, tmp_path / "idx", "faiss")
    lite = f"milvus:{tmp_path / 'vectors.db'}"
    update_index(tmp_path / "idx", FakeEmbedder(), options=BuildOptions(store=lite), progress=False)
    make_images(root, 1, seed=7)  # img_000.png: new content, same count
    report = update_index(tmp_path / "idx", FakeEmbedder(), progress=False)
    assert (report.embedded, report.count) == (1, 6)
    update_index(tmp_path / "idx", FakeEmbedder(), options=BuildOptions(store="faiss"), progress=False)
    assert_every_image_finds_itself(tmp_path / "idx", 6)


HOLDER = """
import importlib.util, time
spec = importlib.util.spec_from_file_location("fake", {conftest!r})
fake = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fake)
from duomodal.search.build import BuildOptions, build_index
from duomodal.search.index import ImageIndex

build_index({root!r}, {index!r}, fake.FakeEmbedder(), options=BuildOptions(store={store!r}), progress=False)
index = ImageIndex.open({index!r})
print("open", flush=True)
time.sleep(60)
"""


def test_a_lite_file_held_by_another_process_is_a_clear_error(tmp_path):
    """milvus-lite locks its file for the life of the process that opened it."""
    make_images(tmp_path / "a", 2)
    store = f"milvus:{tmp_path / 'v.db'}"
    conftest = str(Path(__file__).with_name("conftest.py"))
    script = HOLDER.format(conftest=conftest, root=str(tmp_path / "a"), index=str(tmp_path / "idx"), store=store)
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "open\n"
        with pytest.raises(IndexStoreError) as e:
            ImageIndex.open(tmp_path / "idx")
        assert str(e.value).startswith(f"cannot open Milvus at {store}: ")
        assert str(e.value).endswith(
            "(milvus-lite serves one process at a time: is another duomodal process using this file?)"
        )
    finally:
        holder.kill()
        holder.wait()
    deadline = time.monotonic() + 10
    while True:  # the file is free once the holder is gone
        try:
            assert_every_image_finds_itself(tmp_path / "idx", 2)
            break
        except IndexStoreError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
