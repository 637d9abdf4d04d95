"""Training, resuming and evaluating from WebDataset shards, as the user calls it (`--data SHARDS`)."""

from __future__ import annotations

import json

import pytest

from duomodal.cli import main
from duomodal.data.pack import pack_dataset
from duomodal.data.shards import open_shards
from duomodal.train.checkpoints import list_checkpoints, load_checkpoint_state

pytestmark = pytest.mark.timeout(120)

VAE_SETS = [
    "model.image_size=16", "data.image_size=16", "model.width=16", "model.max_width=32",
    "model.codebook_size=32", "model.codebook_dim=16", "model.quantizer=vq",
    "train.batch_size=4", "train.log_every=2", "train.val_every=4", "train.sample_every=0",
    "train.checkpoint_every=4", "train.warmup_steps=2",
]
CLIP_SETS = [
    "model.image_size=16", "data.image_size=16", "model.patch_size=4", "model.vision_width=32",
    "model.vision_layers=2", "model.vision_heads=2", "model.text_width=32", "model.text_layers=2",
    "model.text_heads=2", "model.context_length=16", "model.vocab_size=64", "model.embed_dim=32",
    "train.batch_size=4", "train.steps=4", "train.log_every=2", "train.val_every=4", "train.sample_every=0",
    "train.warmup_steps=2", "train.num_workers=2",
]
DALLE_SETS = [
    "model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.text_seq_len=16", "train.batch_size=4",
    "train.steps=4", "train.log_every=2", "train.val_every=4", "train.sample_every=0", "train.warmup_steps=2",
]


def sets(items: list[str]) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def test_train_resume_and_evaluate_from_shards(shape_dataset, tmp_path, capsys):
    packed = tmp_path / "packed"
    summary = pack_dataset(shape_dataset, packed, shard_size=3, val_fraction=0.2)
    train_shards = len(open_shards(packed).urls_for("train"))
    vae = tmp_path / "vae"
    assert main(["train", "vae", "--data", str(packed), "--out", str(vae), *sets(VAE_SETS + ["train.steps=4"])]) == 0
    assert "trained vae for 4 steps" in capsys.readouterr().out
    state = load_checkpoint_state(list_checkpoints(vae)[-1][1])
    position = state["ranks"][0]["position"]
    assert position["epoch"] == 0 and set(position["done"]) <= set(range(train_shards))
    assert main(["train", "vae", "--data", str(packed), "--out", str(vae), "--resume",
                 *sets(VAE_SETS + ["train.steps=12"])]) == 0
    assert "trained vae for 12 steps" in capsys.readouterr().out
    later = load_checkpoint_state(list_checkpoints(vae)[-1][1])["ranks"][0]["position"]
    assert (later["epoch"], len(later["done"])) > (position["epoch"], len(position["done"]))
    rows = [json.loads(line) for line in (vae / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == [2, 4, 6, 8, 10, 12]

    clip = tmp_path / "clip"
    pattern = str(packed / f"train-{{000000..{train_shards - 1:06d}}}.tar")  # a pattern: hash splits, no val shards
    assert main(["train", "clip", "--data", pattern, "--out", str(clip), *sets(CLIP_SETS)]) == 0
    dalle = tmp_path / "dalle"
    assert main(["train", "dalle", "--data", str(packed), "--vae", str(vae), "--out", str(dalle),
                 *sets(DALLE_SETS)]) == 0
    out = capsys.readouterr().out
    assert "trained clip for 4 steps" in out and "trained dalle for 4 steps" in out
    report = tmp_path / "report"
    assert main(["eval", "--data", str(packed), "--out", str(report), "--vae", str(vae), "--device", "cpu"]) == 0
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["data"]["counts"] == {"train": 19, "val": 5, "heldout": 0} == summary["counts"]
    assert metrics["skipped_images"] == [] and metrics["vae"]["images"] == 5 and metrics["vae"]["psnr_db"] > 0


def test_positions_of_another_process_count_merge_at_the_earliest_epoch():
    from duomodal.train.batches import ShardBatchStream

    positions = [{"epoch": 2, "done": [4, 1]}, {"epoch": 2, "done": [3]}, {"epoch": 3, "done": [0]}]
    assert ShardBatchStream.merge(positions) == {"epoch": 2, "done": [1, 3, 4]}
