"""`torchrun --nproc_per_node 2` build on CPU: ranks split the embedding, rank 0 merges one index."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from duomodal.search.build import build_index
from duomodal.search.index import ImageIndex
from duomodal.search.handoff import HANDOFF_DIR

from ..conftest import store_spec
from .conftest import FakeEmbedder
from .test_index import make_images
from .test_resume import vectors_by_path

SCRIPT = """
import importlib.util, os
spec = importlib.util.spec_from_file_location("fake", {conftest!r})
fake = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fake)
from duomodal.search.build import BuildOptions, build_index

embedder = fake.FakeEmbedder()
report = build_index({root!r}, {index!r}, embedder, options=BuildOptions(batch_size=3, store={store!r}),
                     progress=False)
with open(os.path.join({out!r}, "rank" + os.environ["RANK"]), "w") as f:
    f.write(f"{{embedder.images_embedded}} {{report.count}} {{report.embedded}} {{report.reused}} {{len(report.skipped)}}")
"""


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["faiss", "milvus-server"])
def test_torchrun_two_processes_build_one_index(tmp_path, request, kind):
    """Both ranks embed; rank 0 merges and syncs the vectors (into a Milvus server, for the second
    case: the hand-off of docs/shards.md's multi-node recipe)."""
    store, drop = store_spec(request, kind, tmp_path)
    request.addfinalizer(drop)
    torchrun = Path(sys.executable).with_name("torchrun")
    root = tmp_path / "photos"
    paths = make_images(root, 17)
    for path in paths[:3]:
        shutil.copy2(path, root / f"copy_{path.name}")  # same content: embedded once, on one rank
    (root / "broken.png").write_bytes(b"not an image")
    script = tmp_path / "build.py"
    conftest = str(Path(__file__).with_name("conftest.py"))
    script.write_text(SCRIPT.format(conftest=conftest, root=str(root), index=str(tmp_path / "idx"), out=str(tmp_path),
                                    store=store))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node", "2", str(script)],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rank0 = [int(x) for x in (tmp_path / "rank0").read_text().split()]
    rank1 = [int(x) for x in (tmp_path / "rank1").read_text().split()]
    assert rank0[0] > 0 and rank1[0] > 0 and rank0[0] + rank1[0] == 17  # the work was shared
    assert rank0[1:] == [20, 17, 3, 1]  # rank 0 reports the merged index: 20 images, 1 skipped
    assert not list((tmp_path / "idx" / HANDOFF_DIR).glob("*"))

    build_index(root, tmp_path / "reference", FakeEmbedder(), progress=False)
    merged, expected = vectors_by_path(tmp_path / "idx"), vectors_by_path(tmp_path / "reference")
    assert sorted(merged) == sorted(expected)
    for path in expected:
        np.testing.assert_array_equal(merged[path], expected[path])
    with ImageIndex.open(tmp_path / "idx") as index:
        assert index.count == 20 and index.vector_store == store
        for image_id in (1, 10, 20):
            assert index.search(index.vector(image_id), k=1)[0].id == image_id


def test_shards_left_by_an_interrupted_run_are_merged_not_redone(tmp_path):
    from duomodal.files import file_sha256
    from duomodal.search.handoff import write_handoff
    from duomodal.search.store import NewImage

    root = tmp_path / "photos"
    make_images(root, 3)
    build_index(root, tmp_path / "idx", FakeEmbedder(), progress=False)
    extra = make_images(root, 1, seed=9, prefix="late")[0]
    stat = extra.stat()
    vector = FakeEmbedder().embed_images([Image.open(extra)])[0].numpy()
    record = NewImage("late_000.png", file_sha256(extra), stat.st_size, stat.st_mtime_ns, 16, 16, None, vector)
    write_handoff(tmp_path / "idx", "crashed-r1-000000", [record])  # as if rank 1 wrote it, then the run died
    embedder = FakeEmbedder()
    report = build_index(root, tmp_path / "idx", embedder, progress=False)
    assert (report.count, embedder.images_embedded, report.unchanged) == (4, 0, 4)
    assert not list((tmp_path / "idx" / HANDOFF_DIR).glob("*"))
