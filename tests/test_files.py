"""Files: atomic writes, JSON round trips, content hashes."""

import os
from dataclasses import dataclass

import pytest

from duomodal import files as files_module
from duomodal.config import ConfigError, from_dict
from duomodal.files import (
    UnsafeFileError,
    atomic_write_bytes,
    atomic_write_text,
    file_sha256,
    load_json,
    read_regular,
    save_json,
)


@dataclass(frozen=True)
class Run:
    name: str = "run"
    lr: float = 3e-4


def test_save_and_load_json(tmp_path):
    run = Run(name="ünïcode")
    path = tmp_path / "deep" / "config.json"
    save_json(run, path)
    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n") and '"lr": 0.0003' in text
    assert from_dict(Run, load_json(path)) == run
    assert [p.name for p in path.parent.iterdir()] == ["config.json"]  # no temporary file left


def test_load_json_errors(tmp_path):
    with pytest.raises(ConfigError, match=rf"^{tmp_path / 'none.json'} does not exist$"):
        load_json(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"bad.json is not valid JSON: Expecting property name"):
        load_json(tmp_path / "bad.json")


def test_atomic_write_replaces_whole_files(tmp_path):
    path = tmp_path / "file.bin"
    atomic_write_bytes(path, b"old")
    atomic_write_text(path, "new ✓")
    assert path.read_text(encoding="utf-8") == "new ✓"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.bin"]


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "config.json"
    save_json({"a": 1}, path)

    def failing_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(files_module.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="disk full"):
        save_json({"a": 2}, path)
    monkeypatch.undo()
    assert load_json(path) == {"a": 1}  # a reader sees the old file, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]  # and no temporary file


def test_file_sha256(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"abc")
    assert file_sha256(path) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


@pytest.mark.timeout(20)
def test_only_regular_files_under_the_cap_are_opened(tmp_path):
    os.mkfifo(tmp_path / "pipe")  # an open without O_NONBLOCK would wait for a writer
    with pytest.raises(UnsafeFileError, match=r"pipe: not a regular file: it is a named pipe \(FIFO\)$"):
        file_sha256(tmp_path / "pipe")
    (tmp_path / "zero").symlink_to("/dev/zero")
    with pytest.raises(UnsafeFileError, match=r"not a regular file: it is a character device$"):
        read_regular(tmp_path / "zero", 100)
    (tmp_path / "big").write_bytes(b"x" * 3 * 2**20)
    with pytest.raises(UnsafeFileError, match=r"big: file is 3\.0 MiB, over the 1\.0 MiB limit$"):
        read_regular(tmp_path / "big", 2**20)
    assert read_regular(tmp_path / "big", 4 * 2**20) == b"x" * 3 * 2**20
