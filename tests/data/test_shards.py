"""WebDataset shards as a dataset source: packing (splits kept), specs, records, bad members,
`data check`, and streaming a split: ranks and workers read distinct shards, resume at a shard."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from duomodal.cli import main
from duomodal.data.dataset import CaptionedImageDataset, load_record_image
from duomodal.data.pack import pack_dataset
from duomodal.data.records import DatasetError, load_records
from duomodal.data.shards import SHARD_MANIFEST, open_shards
from duomodal.data.stream import ShardStream, StreamPosition


def png_bytes(color: tuple[int, int, int], size: int = 16) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format="PNG")
    return buffer.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A shard as img2dataset writes one: members in order, keys grouped."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def img2dataset_shards(root: Path, shards: int = 4, per_shard: int = 5) -> list[str]:
    """`shards` shards of `per_shard` samples: a .jpg, a .txt caption and a .json with "caption"."""
    captions = []
    for s in range(shards):
        members = []
        for i in range(per_shard):
            key = f"{s:05d}{i:04d}"
            caption = f"picture {s} {i}"
            captions.append(caption)
            image = io.BytesIO()
            Image.new("RGB", (20, 12), (40 * s, 30 * i, 90)).save(image, format="JPEG")
            members += [(f"{key}.jpg", image.getvalue()), (f"{key}.txt", caption.encode()),
                        (f"{key}.json", json.dumps({"key": key, "caption": caption, "status": "success"}).encode())]
        write_tar(root / f"{s:05d}.tar", members)
    return captions


def test_pack_keeps_splits_captions_and_labels_of_the_icon_dataset(tmp_path, capsys):
    from duomodal.data.icons import build_icon_dataset

    icons = tmp_path / "icons"
    build_icon_dataset(icons, size=16, colors=4, limit=6, progress=False, workers=1)
    assert main(["data", "pack", str(icons), str(tmp_path / "packed"), "--shard-size", "5"]) == 0
    folder = load_records(icons)
    counts = {s: sum(r.split == s for r in folder) for s in ("train", "val", "heldout")}
    shard_counts = {s: -(-n // 5) for s, n in counts.items()}
    expected = ", ".join(f"{s} {counts[s]} in {shard_counts[s]} shard{'s' if shard_counts[s] != 1 else ''}"
                         for s in counts)
    assert capsys.readouterr().out == f"packed {len(folder)} images into {tmp_path / 'packed'}: {expected}; 0 skipped\n"
    assert counts["heldout"] > 0 and counts["val"] > 0
    packed = load_records(tmp_path / "packed")
    key = lambda r: (r.split, r.captions, tuple(sorted(r.labels.items())))  # noqa: E731
    assert sorted(map(key, packed)) == sorted(map(key, folder))
    by_caption = {r.captions: r for r in folder}
    for record in packed[:: max(1, len(packed) // 5)]:
        assert record.member is not None and record.location.startswith(str(tmp_path / "packed"))
        assert load_record_image(record).tobytes() == load_record_image(by_caption[record.captions]).tobytes()
    assert (tmp_path / "packed" / "dataset.json").read_text() == (icons / "dataset.json").read_text()
    manifest = json.loads((tmp_path / "packed" / SHARD_MANIFEST).read_text())
    assert manifest["counts"] == {s: n for s, n in counts.items() if n}
    shards = open_shards(tmp_path / "packed")
    assert len(shards.urls_for("heldout")) == shard_counts["heldout"]
    assert all(Path(u).name.startswith("heldout-") for u in shards.urls_for("heldout"))


def test_img2dataset_shards_by_pattern_and_by_pipe_url(tmp_path):
    captions = img2dataset_shards(tmp_path / "shards")
    records = load_records(str(tmp_path / "shards" / "{00000..00003}.tar"), val_fraction=0.2)
    assert sorted(c for r in records for c in r.captions) == sorted(captions)
    assert {r.split for r in records} == {"train", "val"}  # split by the hash of each key
    dataset = CaptionedImageDataset(records, 8)
    assert dataset[7]["image"].shape == (3, 8, 8)
    piped = load_records(f"pipe:cat {tmp_path / 'shards'}/{{00000..00001}}.tar", val_fraction=0.2)
    assert [r.captions for r in piped] == [r.captions for r in records[:10]]
    assert [r.split for r in piped] == [r.split for r in records[:10]]
    assert all(r.member.offset == -1 for r in piped)  # streamed: no random access
    with pytest.raises(Exception, match="is in a remote shard, which is read as a stream only"):
        load_record_image(piped[0])
    stream = ShardStream(open_shards(f"pipe:cat {tmp_path / 'shards'}/{{00000..00001}}.tar"), "train", 0, 8,
                         val_fraction=0.2)
    streamed = sorted(item["caption"] for batch in stream for item in batch.items)  # training reads remote shards
    assert streamed == sorted(r.captions[0] for r in piped if r.split == "train")


def test_spec_errors_name_the_problem(tmp_path):
    img2dataset_shards(tmp_path / "shards", shards=2)
    with pytest.raises(DatasetError) as e:
        open_shards(str(tmp_path / "shards" / "{00000..00003}.tar"))
    assert str(e.value) == (
        f"2 of the 4 shards of {tmp_path / 'shards'}/{{00000..00003}}.tar do not exist, the first: "
        f"{tmp_path / 'shards' / '00002.tar'}; check the pattern (e.g. shards/{{00000..00099}}.tar)"
    )
    write_tar(tmp_path / "empty" / "0.tar", [("0.txt", b"no image here")])
    with pytest.raises(DatasetError, match=r"no captioned images in the 1 shard\(s\) of .*0\.tar; a sample needs"):
        load_records(str(tmp_path / "empty" / "0.tar"))
    with pytest.raises(ValueError, match="^shard size must be a positive integer, got 0$"):
        pack_dataset(tmp_path / "shards", tmp_path / "out", shard_size=0)


def test_bad_members_are_skipped_with_a_reason_and_counted(tmp_path, capsys):
    good = png_bytes((200, 0, 0))
    shard = write_tar(tmp_path / "s" / "0.tar", [
        ("a.png", good), ("a.txt", b"a red square"),
        ("b.png", b"\x89PNG broken"), ("b.txt", b"a broken one"),
        ("c.png", png_bytes((0, 0, 200))),  # no caption
        ("d.txt", b"a caption without image"),
        ("e.png", b""), ("e.json", b'{"caption": "an empty file"}'),
        ("f.png", png_bytes((0, 200, 0))), ("f.json", b"{not json"),
        ("g.png", good), ("g.json", json.dumps({"caption": ["same bytes as a"], "split": "train"}).encode()),
    ])
    records = load_records(str(shard))
    assert sorted(r.member.name for r in records) == ["a.png", "b.png", "e.png", "g.png"]
    assert main(["data", "check", str(shard)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert f"{shard}#b.png: not an image Pillow can read (JPEG, PNG, WebP, BMP or GIF)" in lines
    assert f"{shard}#c: no caption (no .txt or .json member with caption text)" in lines
    assert f"{shard}#d: caption without image: the sample has txt but no image member" in lines
    assert f"{shard}#e.png: empty file (0 bytes)" in lines
    assert any(line.startswith(f"{shard}#f: f.json: Expecting property name") for line in lines)
    assert f"{shard}#g.png: duplicate: same content as {shard}#a.png" in lines
    assert "usable: 2 captioned images decode and can be used for training" in lines
    assert main(["data", "check", str(shard), "--json"]) == 0
    counts = json.loads(capsys.readouterr().out)["problem_counts"]
    assert (counts["unreadable"], counts["no-caption"], counts["orphan-caption"], counts["empty"],
            counts["manifest"], counts["duplicate"]) == (1, 1, 1, 1, 1, 1)
    write_tar(tmp_path / "t" / "0.tar", [("a.png", good), ("a.txt", b"x")])
    (tmp_path / "t" / "1.tar").write_bytes(b"not a tar at all" * 100)
    assert main(["data", "check", str(tmp_path / "t" / "{0..1}.tar")]) == 0
    assert any(line.startswith(f"{tmp_path / 't' / '1.tar'}: not a readable tar shard (") for line in
               capsys.readouterr().out.splitlines())

    stream = ShardStream(open_shards(str(shard)), "train", 4, 8, val_fraction=0.0)
    items = [item for batch in stream for item in batch.items]
    assert len(items) == 4 and sum(item is None for item in items) == 2  # b and e: dropped and counted later


def stream_of(spec: str, rank: int, world_size: int, epoch: int = 0, done=frozenset()) -> ShardStream:
    stream = ShardStream(open_shards(spec), "train", 0, 8, val_fraction=0.0, shuffle_buffer=3)
    stream.start_epoch(StreamPosition(epoch, frozenset(done)), seed=7, rank=rank, world_size=world_size, micro_batch=1)
    return stream


def test_an_epoch_is_set_up_in_one_call_that_checks_it(tmp_path):
    img2dataset_shards(tmp_path / "shards", shards=2, per_shard=2)
    stream = stream_of(str(tmp_path / "shards" / "{00000..00001}.tar"), 1, 2, epoch=3)
    assert (stream.seed, stream.rank, stream.world_size, stream.micro_batch, stream.position.epoch) == (7, 1, 2, 1, 3)
    with pytest.raises(ValueError, match=r"^rank must be in \[0, 2\), got 2$"):
        stream.start_epoch(StreamPosition(), seed=0, rank=2, world_size=2, micro_batch=1)
    with pytest.raises(ValueError, match=r"^micro_batch must be at least 1, got 0$"):
        stream.start_epoch(StreamPosition(), seed=0, rank=0, world_size=1, micro_batch=0)


def test_each_rank_and_worker_reads_its_own_shards(tmp_path):
    captions = img2dataset_shards(tmp_path / "shards", shards=8, per_shard=3)
    spec = str(tmp_path / "shards" / "{00000..00007}.tar")
    seen, finished = [], []
    for rank in range(2):
        loader = DataLoader(stream_of(spec, rank, 2), batch_size=None, num_workers=2, collate_fn=lambda b: b)
        batches = list(loader)
        seen.append([item["caption"] for b in batches for item in b.items])
        finished.append([s for b in batches for s in b.finished])
        shards_of = {int(c.split()[1]) for c in seen[rank]}
        assert sorted(finished[rank]) == sorted(shards_of) and len(shards_of) == 4
    assert not set(finished[0]) & set(finished[1])
    assert sorted(seen[0] + seen[1]) == sorted(captions)  # every sample once per epoch over the ranks
    other_epoch = stream_of(spec, 0, 2, epoch=1)
    assert other_epoch.rank_shards(1) != stream_of(spec, 0, 2).rank_shards(0)  # reshuffled per epoch


def test_a_resumed_stream_reads_only_the_unfinished_shards(tmp_path):
    img2dataset_shards(tmp_path / "shards", shards=4, per_shard=3)
    spec = str(tmp_path / "shards" / "{00000..00003}.tar")
    full = stream_of(spec, 0, 1)
    order = full.rank_shards(0)
    resumed = stream_of(spec, 0, 1, done={order[0], order[2]})
    shards_read = {int(item["caption"].split()[1]) for batch in resumed for item in batch.items}
    assert shards_read == {order[1], order[3]}
    torch.manual_seed(0)
    first = [item["caption"] for batch in stream_of(spec, 0, 1) for item in batch.items]
    again = [item["caption"] for batch in stream_of(spec, 0, 1) for item in batch.items]
    assert first == again  # the order of an epoch is seeded
