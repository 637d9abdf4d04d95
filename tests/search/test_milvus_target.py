"""Milvus store specs and connection settings (no Milvus needed), and a server that is down at start."""

from __future__ import annotations

import sqlite3

import pytest

from duomodal import cli
from duomodal.search.vectors import milvus_target
from duomodal.search.build import BuildOptions
from duomodal.search.vectors import vector_store_spec
from duomodal.search.vectors.milvus_target import ConnectionSettings, MilvusTarget, credentials
from duomodal.search.store import STORE_FILE, IndexStoreError

from .test_index import make_images

MILVUS_ENV = ("MILVUS_TOKEN", "MILVUS_USER", "MILVUS_PASSWORD", "MILVUS_TLS", "MILVUS_CA_CERT", "MILVUS_CLIENT_CERT",
              "MILVUS_CLIENT_KEY", "MILVUS_SERVER_NAME", "MILVUS_TIMEOUT", "MILVUS_WAIT_TIMEOUT")


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch):
    for name in MILVUS_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(milvus_target, "_SPEC_CREDENTIALS", {})


def test_server_specs_with_a_database_and_connection_settings(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plain = MilvusTarget.parse("milvus://milvus.local:19530/icons")
    assert (plain.uri, plain.db, plain.collection, plain.spec) == (
        "http://milvus.local:19530", "", "icons", "milvus://milvus.local:19530/icons")
    spec = "milvus://milvus.local:19530/prod/icons?tls=1&ca=certs/ca.pem&server_name=milvus&timeout=5"
    target = MilvusTarget.parse(spec)
    assert (target.db, target.collection, target.tls, target.ca, target.server_name, target.timeout) == (
        "prod", "icons", True, str(tmp_path / "certs" / "ca.pem"), "milvus", 5.0)
    assert target.location == "milvus://milvus.local:19530/prod/icons"
    assert target.spec == (f"milvus://milvus.local:19530/prod/icons?tls=1&ca={tmp_path}/certs/ca.pem"
                           "&server_name=milvus&timeout=5")
    assert MilvusTarget.parse(target.spec) == target  # the recorded spec reads back the same
    errors = {
        "milvus://h:19530/a/b/c": "store 'milvus://h:19530/a/b/c': give milvus://HOST:PORT/COLLECTION or "
        "milvus://HOST:PORT/DB/COLLECTION",
        "milvus://h:19530/9db/icons": "Milvus database name '9db' must start with a letter or _ and hold only "
        "letters, digits and _",
        "milvus://h:19530/icons?tsl=1": "store 'milvus://h:19530/icons?tsl=1': unknown setting 'tsl'; the settings "
        "are tls, ca, cert, key, server_name, timeout, wait_timeout",
        "milvus://h:19530/icons?timeout=0": "store 'milvus://h:19530/icons?timeout=0': timeout must be a number "
        "of seconds > 0, got '0'",
        "milvus://h:19530/icons?tls=maybe": "store 'milvus://h:19530/icons?tls=maybe': tls must be 1 or 0, "
        "got 'maybe'",
    }
    for bad, message in errors.items():
        with pytest.raises(ValueError) as e:
            BuildOptions(store=bad)
        assert str(e.value) == message


def test_credentials_in_a_spec_are_used_but_never_recorded_or_shown(tmp_path):
    secret = "s3cr3t-Pa55"
    canonical = vector_store_spec(f"milvus://root:{secret}@127.0.0.1:19530/icons")
    assert canonical == "milvus://127.0.0.1:19530/icons"
    assert credentials(MilvusTarget.parse(canonical)) == f"root:{secret}"  # for the rest of this run
    with pytest.raises(ValueError) as e:
        vector_store_spec(f"milvus://root:{secret}@127.0.0.1/icons")  # no port
    assert secret not in str(e.value) and "milvus://***@127.0.0.1/icons" in str(e.value)


def test_settings_and_credentials_from_the_environment(monkeypatch, tmp_path):
    target = MilvusTarget.parse("milvus://127.0.0.1:19530/icons?timeout=7")
    assert credentials(target) == ""
    assert ConnectionSettings.resolve(target) == ConnectionSettings(False, "", "", "", "", 7.0, 3600.0)
    monkeypatch.setenv("MILVUS_USER", "reader")
    with pytest.raises(IndexStoreError, match="set both MILVUS_USER and MILVUS_PASSWORD"):
        credentials(target)
    monkeypatch.setenv("MILVUS_PASSWORD", "pw")
    assert credentials(target) == "reader:pw"
    monkeypatch.setenv("MILVUS_TOKEN", "api-key")
    assert credentials(target) == "api-key"
    monkeypatch.setenv("MILVUS_TIMEOUT", "3")  # the spec's timeout wins
    monkeypatch.setenv("MILVUS_WAIT_TIMEOUT", "60")
    monkeypatch.setenv("MILVUS_CA_CERT", str(tmp_path / "ca.pem"))  # a CA turns TLS on
    assert ConnectionSettings.resolve(target) == ConnectionSettings(True, str(tmp_path / "ca.pem"), "", "", "",
                                                                    7.0, 60.0)
    monkeypatch.setenv("MILVUS_TLS", "0")
    assert not ConnectionSettings.resolve(target).tls
    monkeypatch.setenv("MILVUS_CLIENT_CERT", str(tmp_path / "client.pem"))
    with pytest.raises(IndexStoreError, match="mutual TLS needs both a client cert and its key"):
        ConnectionSettings.resolve(target)
    monkeypatch.setenv("MILVUS_TIMEOUT", "soon")
    with pytest.raises(ValueError, match=r"\$MILVUS_TIMEOUT: timeout must be a number of seconds > 0, got 'soon'"):
        ConnectionSettings.resolve(MilvusTarget.parse("milvus://127.0.0.1:19530/icons"))


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_server_down_at_start_is_one_line_naming_it_before_anything_is_embedded(tmp_path, capsys, monkeypatch):
    pytest.importorskip("pymilvus", reason="install duomodal[milvus] to test the Milvus store")
    from duomodal.cli import search as cli_search

    from .conftest import FakeEmbedder

    embedder = FakeEmbedder()
    monkeypatch.setattr(cli_search, "_search_load_clip", lambda path, device, precision="auto": embedder)
    monkeypatch.setenv("MILVUS_PASSWORD", "never-shown")
    monkeypatch.setenv("MILVUS_USER", "root")
    make_images(tmp_path / "photos", 3)
    (tmp_path / "clip").mkdir()
    spec = f"milvus://127.0.0.1:{free_port()}/icons"
    status = cli.main(["index", "build", str(tmp_path / "photos"), "--clip", str(tmp_path / "clip"),
                       "--out", str(tmp_path / "idx"), "--store", spec, "--quiet"])
    err = capsys.readouterr().err
    assert status == 2 and embedder.images_embedded == 0
    assert err.count("\n") == 1 and "never-shown" not in err
    assert err.startswith(f"duomodal: error: cannot connect to the Milvus server at {spec}: Fail connecting to server")
    assert err.endswith("; is the server running, and are the host, port and TLS settings right?\n")
    with sqlite3.connect(tmp_path / "idx" / STORE_FILE) as db:
        recorded = dict(db.execute("SELECT key, value FROM meta"))
    assert recorded["vector_store"] == spec and "never-shown" not in str(recorded)
