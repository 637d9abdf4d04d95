"""What only a Milvus server shows: a crash after a finished build, a server restarted part-way
through a build, two processes building into one collection at once, credentials, TLS and a
database. (Everything else runs on the server too, through the `vector_store` fixture.)"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from duomodal import cli
from duomodal.cli import search as cli_search
from duomodal.search.vectors import milvus_store
from duomodal.search.build import BuildOptions, build_index
from duomodal.search.index import ImageIndex

from ..conftest import TEST_MILVUS_SETTINGS
from .conftest import FakeEmbedder
from .test_index import all_rows, make_images

pytest.importorskip("pymilvus", reason="install duomodal[milvus] to test the Milvus store")


def server_or_skip(directory: Path, **options):
    from duomodal.search.milvus_server import LocalMilvusServer, milvus_server_installed

    if not milvus_server_installed():
        pytest.skip("the Milvus server is not installed (pip install milvus; the dev extra installs it)")
    return LocalMilvusServer(directory, TEST_MILVUS_SETTINGS | options.pop("settings", {}), **options)


@pytest.fixture(scope="module")
def own_server(tmp_path_factory):
    """A server of this module's own: these tests kill it (the shared one serves the other tests)."""
    server = server_or_skip(tmp_path_factory.mktemp("own-milvus"))
    server.start()
    yield server
    server.kill()  # nothing here to keep


def collection_ids(server, collection: str, **options) -> list[int]:
    """Every id in the collection, as a fresh client reads it (strongly consistent)."""
    from pymilvus import MilvusClient

    client = MilvusClient(uri=server.uri, dedicated=True, **options)
    try:
        client.load_collection(collection)
        rows = client.query(collection, filter="id >= 0", output_fields=["id"], consistency_level="Strong")
        return sorted(int(row["id"]) for row in rows)
    finally:
        client.close()


def assert_every_image_finds_itself(index_dir: Path, count: int) -> None:
    with ImageIndex.open(index_dir) as index:
        assert index.count == count
        for image_id, *_ in all_rows(index_dir).values():
            top = index.search(index.vector(image_id), k=1)[0]
            assert top.id == image_id and np.isclose(top.score, 1.0, atol=1e-5)


@pytest.fixture
def fake_clip(monkeypatch, tmp_path):
    embedder = FakeEmbedder()
    monkeypatch.setattr(cli_search, "_search_load_clip", lambda path, device, precision="auto": embedder)
    (tmp_path / "clip").mkdir()
    return embedder


@pytest.mark.slow
def test_a_server_crash_mid_build_loses_no_finished_row_and_a_rerun_resumes_without_duplicates(
    own_server, tmp_path, monkeypatch, capsys, fake_clip
):
    """One index finished, a second one building when the server is SIGKILLed: the second fails with
    one clear line; after the restart the first holds every row it reported, and re-running the
    second embeds nothing again and loads each row once."""
    make_images(tmp_path / "done", 30)
    report = build_index(tmp_path / "done", tmp_path / "idx-done", FakeEmbedder(),
                         options=BuildOptions(store=own_server.spec("finished")), progress=False)
    assert report.count == 30

    make_images(tmp_path / "photos", 12, seed=1)
    spec, index_dir = own_server.spec("interrupted"), tmp_path / "idx"
    monkeypatch.setenv("MILVUS_TIMEOUT", "3")
    monkeypatch.setattr(milvus_store, "INSERT_CHUNK", 4)
    real_rebuild = milvus_store.MilvusEngine.rebuild

    def rebuild_with_a_crash(engine, *args, **kwargs):
        client = engine.client
        real_insert, calls = client.insert, []

        def insert(*a, **k):
            if calls:
                own_server.kill()  # no shutdown: the server dies after the first chunk went in
            calls.append(1)
            return real_insert(*a, **k)

        client.insert = insert
        return real_rebuild(engine, *args, **kwargs)

    monkeypatch.setattr(milvus_store.MilvusEngine, "rebuild", rebuild_with_a_crash)
    argv = ["index", "build", str(tmp_path / "photos"), "--clip", str(tmp_path / "clip"), "--out", str(index_dir),
            "--store", spec, "--quiet"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and fake_clip.images_embedded == 12
    assert err.startswith(f"duomodal: error: Milvus at {spec} failed during the sync: ")
    assert err.endswith(f"; nothing is lost (the index's SQLite store keeps every vector): run 'duomodal index "
                        f"update {index_dir}' when the server answers again\n")
    monkeypatch.setattr(milvus_store.MilvusEngine, "rebuild", real_rebuild)

    own_server.start()
    finished = sorted(row[0] for row in all_rows(tmp_path / "idx-done").values())
    assert collection_ids(own_server, "finished") == finished  # read before any sync could repair anything
    assert_every_image_finds_itself(tmp_path / "idx-done", 30)

    assert cli.main(["index", "update", str(index_dir), "--quiet"]) == 0
    assert fake_clip.images_embedded == 12  # nothing embedded again
    stored = sorted(row[0] for row in all_rows(index_dir).values())
    assert collection_ids(own_server, "interrupted") == stored  # every row once: no duplicates
    assert_every_image_finds_itself(index_dir, 12)


BUILDER = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("fake", {conftest!r})
fake = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fake)
from duomodal.search.build import BuildOptions, build_index
from duomodal.search.store import IndexStoreError

print("ready", flush=True)
sys.stdin.readline()  # both processes start building on the same signal
try:
    build_index(sys.argv[1], sys.argv[2], fake.FakeEmbedder(), options=BuildOptions(store={store!r}), progress=False)
except IndexStoreError as e:
    print("refused:", e, flush=True)
else:
    print("built", flush=True)
"""


@pytest.mark.slow
def test_two_processes_building_into_one_collection_at_once_end_with_one_owner(milvus_server, tmp_path):
    """Two indexes, one collection, two processes at the same moment: one builds, the other is refused."""
    spec = milvus_server.spec("contested")
    script = tmp_path / "builder.py"
    script.write_text(BUILDER.format(conftest=str(Path(__file__).with_name("conftest.py")), store=spec))
    builders = []
    for name, seed in (("a", 0), ("b", 1)):
        make_images(tmp_path / name, 20, seed=seed)
        builders.append(subprocess.Popen(
            [sys.executable, str(script), str(tmp_path / name), str(tmp_path / f"idx-{name}")],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        ))
    for builder in builders:
        assert builder.stdout.readline() == "ready\n", builder.stderr.read()
    for builder in builders:
        builder.stdin.write("go\n")
        builder.stdin.flush()
    outcomes = [builder.communicate(timeout=120) for builder in builders]
    said = sorted(out.strip() for out, _ in outcomes)
    assert said[0] == "built", outcomes
    assert said[1].startswith(f"refused: Milvus collection 'contested' at {spec} belongs to another index ("), outcomes
    winner = tmp_path / ("idx-a" if outcomes[0][0].strip() == "built" else "idx-b")
    assert collection_ids(milvus_server, "contested") == sorted(row[0] for row in all_rows(winner).values())
    assert_every_image_finds_itself(winner, 20)


def make_certificate(directory: Path) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make the test server's TLS certificate")
    directory.mkdir(parents=True, exist_ok=True)
    key, cert = directory / "server.key", directory / "server.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "2", "-subj", "/CN=localhost", "-addext",
                    "subjectAltName=DNS:localhost,IP:127.0.0.1"], check=True, capture_output=True)
    return cert, key


@pytest.mark.slow
def test_credentials_tls_and_a_database(tmp_path_factory, tmp_path, monkeypatch, capsys, fake_clip):
    """A server that wants a password over TLS: the index is built into database `prod` with the
    credentials from the environment; they appear in no file of the index and in no message."""
    from pymilvus import MilvusClient

    cert, key = make_certificate(tmp_path / "tls")
    password = "Milvus"  # the server's initial root password
    client_options = {"token": f"root:{password}", "secure": True, "server_pem_path": str(cert)}
    server = server_or_skip(
        tmp_path_factory.mktemp("secure-milvus"), client_options=client_options,
        settings={"common.security.authorizationEnabled": "true", "common.security.tlsMode": 1,
                  "tls.serverPemPath": str(cert), "tls.serverKeyPath": str(key)},
    )
    server.start()
    try:
        client = MilvusClient(uri=server.uri, dedicated=True, **client_options)
        client.create_database("prod")
        client.close()
        make_images(tmp_path / "photos", 6)
        index_dir = tmp_path / "idx"
        spec = f"milvus://127.0.0.1:{server.port}/prod/icons?tls=1&ca={cert}"
        monkeypatch.setenv("MILVUS_TOKEN", f"root:{password}")
        assert cli.main(["index", "build", str(tmp_path / "photos"), "--clip", str(tmp_path / "clip"),
                         "--out", str(index_dir), "--store", spec, "--quiet"]) == 0
        built = capsys.readouterr().out
        assert built.startswith(f"{index_dir}: 6 images (flat index in {spec}) in ") and password not in built
        assert cli.main(["search", str(index_dir), "red", "-k", "3", "--json"]) == 0
        out, err = capsys.readouterr()
        assert len(json.loads(out)["results"]) == 3
        assert password not in out + err
        for file in index_dir.rglob("*"):
            assert not file.is_file() or f"root:{password}".encode() not in file.read_bytes(), file
        assert collection_ids(server, "icons", db_name="prod", **client_options) == list(range(1, 7))

        monkeypatch.delenv("MILVUS_TOKEN")
        assert cli.main(["search", str(index_dir), "red"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"cannot connect to the Milvus server at {spec}: " in err
        assert err.endswith("(UNAUTHENTICATED: missing authorization in header); set the credentials in "
                            "MILVUS_TOKEN=USER:PASSWORD (or MILVUS_USER and MILVUS_PASSWORD); they are never "
                            "recorded in the index\n")
        monkeypatch.setenv("MILVUS_USER", "root")
        monkeypatch.setenv("MILVUS_PASSWORD", "not-the-password")
        assert cli.main(["search", str(index_dir), "red"]) == 2
        err = capsys.readouterr().err
        assert "UNAUTHENTICATED: auth check failure" in err and "not-the-password" not in err
    finally:
        server.kill()  # nothing here to keep
