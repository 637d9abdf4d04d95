"""The multi-node recipe of docs/shards.md, simulated on one machine: two torchrun launchers with
--nnodes 2 (one process each, gloo) train a VAE from shards, then build one index of the shards
into milvus-lite, and (as the recipe ends) into a Milvus server; the index equals a single-process
build."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from duomodal.data.pack import pack_dataset
from duomodal.search.build import build_index
from duomodal.search.index import ImageIndex
from duomodal.train.checkpoints import list_checkpoints, load_checkpoint_state

from ..conftest import store_spec
from .conftest import FakeEmbedder
from .test_resume import vectors_by_path

pytest.importorskip("milvus_lite", reason="install duomodal[milvus] to test the Milvus store")

NODE = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("fake", {conftest!r})
fake = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fake)
from duomodal.cli import main
from duomodal.cli import search as cli_search

cli_search._search_load_clip = lambda path, device, precision: fake.FakeEmbedder()  # a stand-in CLIP on every node
sys.exit(main(sys.argv[1:]))
"""
VAE_SETS = [
    "model.image_size=16", "data.image_size=16", "model.width=16", "model.max_width=32",
    "model.codebook_size=32", "model.codebook_dim=16", "model.quantizer=vq", "train.batch_size=4",
    "train.steps=4", "train.log_every=2", "train.val_every=4", "train.sample_every=0",
    "train.checkpoint_every=4", "train.warmup_steps=2",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def on_two_nodes(script: Path, argv: list[str], cwd: Path) -> None:
    """Run `script argv` as `torchrun --nnodes 2 --node_rank R --nproc_per_node 1` for R = 0, 1."""
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    port = str(free_port())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [
        subprocess.Popen(
            [torchrun, "--nnodes", "2", "--node_rank", str(rank), "--nproc_per_node", "1",
             "--master_addr", "127.0.0.1", "--master_port", port, str(script), *argv],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd,
        )
        for rank in range(2)
    ]
    outputs = [node.communicate(timeout=180)[0] for node in nodes]
    for rank, (node, output) in enumerate(zip(nodes, outputs)):
        assert node.returncode == 0, f"node {rank}:\n{output[-3000:]}"


@pytest.mark.slow
def test_two_nodes_train_from_shards_and_index_them_into_milvus(shape_dataset, tmp_path):
    shards = tmp_path / "shared" / "shapes"  # "shared storage": both nodes read the same folder
    pack_dataset(shape_dataset, shards, shard_size=2)
    script = tmp_path / "node.py"
    script.write_text(NODE.format(conftest=str(Path(__file__).with_name("conftest.py"))))

    run = tmp_path / "shared" / "vae"
    on_two_nodes(script, ["train", "vae", "--data", str(shards), "--out", str(run),
                          *[a for s in VAE_SETS for a in ("--set", s)]], tmp_path)
    ranks = load_checkpoint_state(list_checkpoints(run)[-1][1])["ranks"]
    assert len(ranks) == 2 and all(set(r["position"]) == {"epoch", "done"} for r in ranks)
    assert not set(ranks[0]["position"]["done"]) & set(ranks[1]["position"]["done"])

    (tmp_path / "clip").mkdir()
    on_two_nodes(script, ["index", "build", str(shards), "--clip", str(tmp_path / "clip"),
                          "--out", str(tmp_path / "shared" / "idx"), "--store", "milvus:./shared/icons.db",
                          "--batch-size", "3", "--quiet"], tmp_path)
    build_index(shards, tmp_path / "reference", FakeEmbedder(), progress=False)
    merged, expected = vectors_by_path(tmp_path / "shared" / "idx"), vectors_by_path(tmp_path / "reference")
    assert sorted(merged) == sorted(expected) and len(expected) == 24
    for path in expected:
        np.testing.assert_array_equal(merged[path], expected[path])
    with ImageIndex.open(tmp_path / "shared" / "idx") as index:
        assert index.vector_store == f"milvus:{tmp_path / 'shared' / 'icons.db'}" and index.count == 24
        for image_id in (1, 12, 24):
            assert index.search(index.vector(image_id), k=1)[0].score == pytest.approx(1.0, abs=1e-5)


@pytest.mark.slow
def test_two_nodes_index_shards_into_a_milvus_server(shape_dataset, tmp_path, request):
    store, drop = store_spec(request, "milvus-server", tmp_path)
    request.addfinalizer(drop)
    shards = tmp_path / "shared" / "shapes"
    pack_dataset(shape_dataset, shards, shard_size=2)
    script = tmp_path / "node.py"
    script.write_text(NODE.format(conftest=str(Path(__file__).with_name("conftest.py"))))
    (tmp_path / "clip").mkdir()
    on_two_nodes(script, ["index", "build", str(shards), "--clip", str(tmp_path / "clip"),
                          "--out", str(tmp_path / "shared" / "idx"), "--store", store, "--batch-size", "3",
                          "--quiet"], tmp_path)
    build_index(shards, tmp_path / "reference", FakeEmbedder(), progress=False)
    merged, expected = vectors_by_path(tmp_path / "shared" / "idx"), vectors_by_path(tmp_path / "reference")
    assert sorted(merged) == sorted(expected) and len(expected) == 24
    with ImageIndex.open(tmp_path / "shared" / "idx") as index:  # as `duomodal serve` opens it
        assert index.vector_store == store and index.count == 24
        for image_id in (1, 12, 24):  # (each shape and colour is there twice: the top may be the twin)
            assert index.search(index.vector(image_id), k=1)[0].score == pytest.approx(1.0, abs=1e-5)
