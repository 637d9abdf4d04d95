"""CaptionedImageDataset: items, random caption choice, bad files skipped, batching, splits."""

from __future__ import annotations

import logging

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, default_collate

from duomodal.data.dataset import CaptionedImageDataset, DataConfig, open_split
from duomodal.data.records import Record, load_records


def char_tokenize(caption: str) -> torch.Tensor:
    """A stand-in tokenizer: character codes padded to 24."""
    ids = [ord(c) % 64 for c in caption[:24]]
    return torch.tensor(ids + [0] * (24 - len(ids)), dtype=torch.long)


def test_items(shape_dataset):
    records = load_records(shape_dataset)
    dataset = CaptionedImageDataset(records, 8, tokenize=char_tokenize)
    assert len(dataset) == 24
    item = dataset[3]
    assert set(item) == {"image", "caption", "tokens", "index"}
    assert item["image"].shape == (3, 8, 8) and item["image"].dtype == torch.float32
    assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0
    assert item["caption"] in records[3].captions
    assert torch.equal(item["tokens"], char_tokenize(item["caption"]))
    assert item["index"] == 3
    assert "tokens" not in CaptionedImageDataset(records, 8)[3]


def test_tokenize_may_return_a_list(shape_dataset):
    dataset = CaptionedImageDataset(load_records(shape_dataset), 8, tokenize=lambda c: [1, 2, 3])
    tokens = dataset[0]["tokens"]
    assert tokens.dtype == torch.long and tokens.tolist() == [1, 2, 3]


def test_caption_is_chosen_with_torchs_rng(shape_dataset):
    records = load_records(shape_dataset)
    dataset = CaptionedImageDataset(records, 8)
    torch.manual_seed(1)
    first = [dataset[0]["caption"] for _ in range(20)]
    torch.manual_seed(1)
    assert [dataset[0]["caption"] for _ in range(20)] == first
    assert set(first) == set(records[0].captions)  # both captions get used


def test_bad_file_gives_none_and_is_logged_once(tmp_path, caplog):
    Image.new("RGB", (4, 4), (0, 0, 255)).save(tmp_path / "good.png")
    (tmp_path / "bad.png").write_bytes(b"")
    records = [
        Record(tmp_path / "bad.png", ("empty",), "train", {}),
        Record(tmp_path / "good.png", ("blue",), "train", {}),
    ]
    dataset = CaptionedImageDataset(records, 4)
    with caplog.at_level(logging.WARNING, logger="duomodal.data.dataset"):
        assert dataset[0] is None
        assert dataset[0] is None
        (tmp_path / "good.png").unlink()  # a file that vanishes after the scan
        assert dataset[1] is None
    assert [r.getMessage() for r in caplog.records] == [
        f"skipping {tmp_path / 'bad.png'}: empty file (0 bytes)",
        f"skipping {tmp_path / 'good.png'}: cannot read file (No such file or directory)",
    ]


def test_a_loader_drops_nones_and_batches(shape_dataset, tmp_path):
    records = load_records(shape_dataset)[:5]
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    records.insert(2, Record(tmp_path / "broken.png", ("broken",), "train", {}))
    dataset = CaptionedImageDataset(records, 8, tokenize=char_tokenize)
    skipped = []

    def collate(items):  # what the training loop does
        kept = [item for item in items if item is not None]
        skipped.append(len(items) - len(kept))
        return default_collate(kept)

    batches = list(DataLoader(dataset, batch_size=3, collate_fn=collate))
    assert [b["image"].shape for b in batches] == [(2, 3, 8, 8), (3, 3, 8, 8)]
    assert batches[0]["tokens"].shape == (2, 24) and batches[0]["index"].tolist() == [0, 1]
    assert isinstance(batches[0]["caption"], list) and len(batches[0]["caption"]) == 2
    assert skipped == [1, 0]


def test_tokenize_errors_are_not_swallowed(shape_dataset):
    def too_long(caption: str):
        raise ValueError(f"caption {caption!r} is too long")

    dataset = CaptionedImageDataset(load_records(shape_dataset), 8, tokenize=too_long)
    with pytest.raises(ValueError, match="is too long"):
        dataset[0]


def test_background_for_transparent_images(tmp_path):
    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    records = [Record(tmp_path / "clear.png", ("nothing",), "train", {})]
    assert torch.all(CaptionedImageDataset(records, 4)[0]["image"] == 1.0)
    black = CaptionedImageDataset(records, 4, background="#000000")[0]["image"]
    assert torch.all(black == 0.0)


def test_open_split_partitions_the_folder(shape_dataset):
    config = DataConfig(image_size=8, val_fraction=0.3)
    train = open_split(shape_dataset, config, "train")
    val = open_split(shape_dataset, config, "val")
    train_paths = {r.path for r in train.records}
    val_paths = {r.path for r in val.records}
    assert train_paths and val_paths and not train_paths & val_paths
    assert len(train_paths | val_paths) == 24
    assert train[0]["image"].shape == (3, 8, 8)
    assert len(open_split(shape_dataset, config, "heldout")) == 0


def test_data_config_validation():
    assert DataConfig().background_rgb == (255, 255, 255)
    with pytest.raises(ValueError, match=r"^data\.image_size must be at least 1, got 0$"):
        DataConfig(image_size=0)
    with pytest.raises(ValueError, match=r"^data\.val_fraction must be in \[0, 1\), got -0\.1$"):
        DataConfig(val_fraction=-0.1)
    with pytest.raises(ValueError, match=r"^background colour 'nope' is not a colour"):
        DataConfig(background="nope")
    with pytest.raises(ValueError, match=r"^image_size must be at least 1, got 0$"):
        CaptionedImageDataset([], 0)


def test_memory_cache_gives_the_decoded_pixels_exactly_and_keeps_to_its_budget(shape_dataset, monkeypatch):
    import duomodal.data.dataset as dataset_module

    records = load_records(shape_dataset)
    decoded = [CaptionedImageDataset(records, 8)[i]["image"] for i in range(len(records))]
    cached = CaptionedImageDataset(records, 8, memory_cache_mb=1)
    assert all(torch.equal(cached[i]["image"], decoded[i]) for i in range(len(records)))
    decodes = []
    monkeypatch.setattr(dataset_module, "load_image", lambda *a, **k: decodes.append(a) or Image.new("RGB", (8, 8)))
    assert all(torch.equal(cached[i]["image"], decoded[i]) for i in range(len(records)))
    assert decodes == []  # the second pass came from memory, bit for bit
    # a budget of one image's bytes keeps one image; the other is decoded at each read
    small = CaptionedImageDataset(records, 8)
    small._cache_left = 3 * 8 * 8
    small[0], small[1]
    decodes.clear()
    small[0], small[1]
    assert len(decodes) == 1
    with pytest.raises(ValueError, match="data.memory_cache_mb must be >= 0"):
        DataConfig(memory_cache_mb=-1)
