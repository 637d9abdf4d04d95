"""Kill a build with SIGKILL part-way (twice), run it again: nothing lost, nothing duplicated."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from duomodal.search.build import BuildOptions, build_index
from duomodal.search.index import ImageIndex
from duomodal.search.vectors import vector_store_spec
from duomodal.search.store import STORE_FILE

from .conftest import FakeEmbedder
from .test_index import make_images

SCRIPT = """
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("fake", {conftest!r})
fake = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fake)
from duomodal.search.build import BuildOptions, build_index

class SlowEmbedder(fake.FakeEmbedder):
    def embed_images(self, images):
        time.sleep(0.05)
        return super().embed_images(images)

build_index({root!r}, {index!r}, SlowEmbedder(), options=BuildOptions(batch_size=2, store={store!r}), progress=False)
"""


def stored_count(index_dir: Path) -> int:
    try:
        with sqlite3.connect(index_dir / STORE_FILE, timeout=5) as db:
            return db.execute("SELECT COUNT(*) FROM images").fetchone()[0]
    except sqlite3.OperationalError:  # not created yet
        return 0


def kill_when(index_dir: Path, script: Path, at_least: int) -> int:
    process = subprocess.Popen([sys.executable, str(script)], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    try:
        while stored_count(index_dir) < at_least:
            if process.poll() is not None:
                raise AssertionError(f"build ended before it was killed: {process.stderr.read().decode()}")
            if time.monotonic() > deadline:
                raise AssertionError("build made no progress in 60 s")
            time.sleep(0.01)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    return stored_count(index_dir)


def vectors_by_path(index_dir: Path) -> dict[str, np.ndarray]:
    with sqlite3.connect(index_dir / STORE_FILE) as db:
        return {p: np.frombuffer(v, dtype="<f4") for p, v in db.execute("SELECT path, vector FROM images")}


def test_killed_build_resumes_without_duplicates_or_losses(tmp_path, vector_store):
    root = tmp_path / "photos"
    make_images(root, 40)
    index_dir = tmp_path / "idx"
    script = tmp_path / "build.py"
    conftest = str(Path(__file__).with_name("conftest.py"))
    script.write_text(SCRIPT.format(conftest=conftest, root=str(root), index=str(index_dir), store=vector_store))

    first = kill_when(index_dir, script, at_least=6)
    assert 6 <= first < 40
    second = kill_when(index_dir, script, at_least=first + 10)
    assert first + 10 <= second < 40

    embedder = FakeEmbedder()
    report = build_index(root, index_dir, embedder, options=BuildOptions(batch_size=2), progress=False)
    assert report.count == 40
    assert embedder.images_embedded == 40 - second  # work already stored is not redone
    reference = tmp_path / "reference"
    build_index(root, reference, FakeEmbedder(), progress=False)
    resumed, expected = vectors_by_path(index_dir), vectors_by_path(reference)
    assert sorted(resumed) == sorted(expected)
    for path in expected:
        np.testing.assert_array_equal(resumed[path], expected[path])
    with ImageIndex.open(index_dir) as index:
        assert index.count == 40 and index.vector_store == vector_store_spec(vector_store)
        hits = index.search(index.vector(1), k=40)
        assert len({h.id for h in hits}) == 40
