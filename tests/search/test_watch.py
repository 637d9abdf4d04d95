"""Following an indexed folder: new, changed, renamed and deleted images reach the index, a burst
is one update, and an unavailable folder removes nothing."""

from __future__ import annotations

import shutil
import threading
import time

import pytest

from duomodal import cli
from duomodal.cli import search as cli_search
from duomodal.search.build import build_index, update_index
from duomodal.search.index import ImageIndex
from duomodal.search.watch import WatchOptions, watch_index

from .conftest import FakeEmbedder

pytestmark = pytest.mark.timeout(60)


def wait_for(condition, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def paths(index_dir) -> set[str]:
    with ImageIndex.open(index_dir) as index:
        return {h.path for h in index.search(FakeEmbedder().embed_texts(["red"])[0].numpy(), 100)}


def test_watch_follows_the_folder(shape_dataset, tmp_path):
    photos = tmp_path / "photos"
    shutil.copytree(shape_dataset, photos)
    index_dir = tmp_path / "idx"
    embedder = FakeEmbedder()
    build_index(photos, index_dir, embedder, progress=False)
    reports, waits = [], []
    stop = threading.Event()
    thread = threading.Thread(target=watch_index, args=(index_dir, lambda: update_index(index_dir, embedder, progress=False),
                                                        stop, WatchOptions(0.1, 0.2), reports.append, waits.append))
    thread.start()
    try:
        assert wait_for(lambda: len(reports) == 1)  # the first look brings the index up to date
        embedded = embedder.images_embedded
        shutil.copyfile(photos / "red_circle_0.png", photos / "new_copy.png")
        for n in range(30):  # a burst: one update, once the folder is quiet
            (photos / f"burst_{n}.png").write_bytes((photos / "blue_square_0.png").read_bytes())
        assert wait_for(lambda: len(reports) == 2)
        assert {"burst_29.png", "new_copy.png"} <= paths(index_dir)
        assert embedder.images_embedded == embedded  # copies: vectors reused
        time.sleep(0.5)
        assert len(reports) == 2  # the burst was one update
        (photos / "red_circle_1.png").rename(photos / "renamed.png")
        (photos / "green_circle_0.png").unlink()
        assert wait_for(lambda: len(reports) == 3)
        assert "renamed.png" in paths(index_dir) and "green_circle_0.png" not in paths(index_dir)
        assert reports[-1].moved == 1 and reports[-1].removed == 1 and reports[-1].embedded == 0

        hidden = tmp_path / "away"
        photos.rename(hidden)  # unmounted
        assert wait_for(lambda: bool(waits))
        time.sleep(0.4)
        assert "is not available" in waits[0] and len(paths(index_dir)) > 20  # nothing removed
        hidden.rename(photos)
        (photos / "back.png").write_bytes((photos / "red_square_0.png").read_bytes())
        assert wait_for(lambda: "back.png" in paths(index_dir))
    finally:
        stop.set()
        thread.join(10)
    assert not thread.is_alive()


def test_watch_options_are_checked():
    with pytest.raises(ValueError, match="interval_s must be above 0 and at most 3600 seconds, got 0"):
        WatchOptions(interval_s=0)


def test_index_watch_command_runs_until_interrupted(shape_dataset, tmp_path, monkeypatch, capsys):
    photos = tmp_path / "photos"
    shutil.copytree(shape_dataset, photos)
    build_index(photos, tmp_path / "idx", FakeEmbedder(), clip_path=tmp_path, progress=False)
    monkeypatch.setattr(cli_search, "_search_load_clip", lambda path, device, precision: FakeEmbedder())
    from duomodal.cli import watch as cli_watch

    def watch_once(index_dir, update, stop, options, on_update, on_wait):
        assert options == WatchOptions(0.5, 0.25)
        on_update(update())
        raise KeyboardInterrupt

    monkeypatch.setattr("duomodal.search.watch.watch_index", watch_once)
    assert cli_watch is not None
    assert cli.main(["index", "watch", str(tmp_path / "idx"), "--interval", "0.5", "--settle", "0.25"]) == 130
    captured = capsys.readouterr()
    assert "watching the folder of" in captured.err
    assert captured.out.startswith(f"{tmp_path / 'idx'}: 24 images; 0 embedded")
