"""DALL-E training: the VAE token cache, caption table, task datasets, and the CLI end to end."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from duomodal.cli import main
from duomodal.config import override, to_dict
from duomodal.data.dataset import DataConfig
from duomodal.data.images import load_image, to_tensor
from duomodal.data.records import load_records
from duomodal.modelfile import save_model
from duomodal.models.vae import DiscreteVAE, VAEConfig
from duomodal.text.tokenizer import Tokenizer
from duomodal.train.dalle_task import CaptionTable, DALLERunConfig, DALLETask, encode_images

VAE_TINY = dict(image_size=16, n_downsample=2, width=8, max_width=16, res_blocks=0, codebook_size=32, codebook_dim=8)
DALLE_TINY = [
    "--set", "model.n_layer=2", "--set", "model.n_embd=32", "--set", "model.n_head=2",
    "--set", "model.text_seq_len=8", "--set", "model.text_vocab_size=64",
    "--set", "train.batch_size=8", "--set", "train.warmup_steps=0", "--set", "train.lr=3e-3",
    "--set", "samples.per_prompt=2", "--set", "samples.prompt_count=2",
]


def random_vae(directory: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    config = VAEConfig(**VAE_TINY)
    save_model(directory, "vae", to_dict(config), DiscreteVAE(config).state_dict())
    return directory


def test_token_cache_is_reused_and_invalidated(tmp_path, shape_dataset):
    data = shutil.copytree(shape_dataset, tmp_path / "shapes")
    records = load_records(data)
    vae = DiscreteVAE(VAEConfig(**VAE_TINY)).eval()
    config = DataConfig(image_size=16)
    first = encode_images(records, vae, "vae-a", config, tmp_path / "cache", show_progress=False)
    assert not first.reused and first.tokens.shape == (24, 16) and bool(first.readable.all())
    expected = vae.encode(torch.stack([to_tensor(load_image(r.path), 16) for r in records])).flatten(1)
    assert torch.equal(first.tokens.long(), expected)
    again = encode_images(records, vae, "vae-a", config, tmp_path / "cache", show_progress=False)
    assert again.reused and again.path == first.path and torch.equal(again.tokens, first.tokens)
    # another VAE: another cache file
    other_vae = encode_images(records, vae, "vae-b", config, tmp_path / "cache", show_progress=False)
    assert not other_vae.reused and other_vae.path != first.path
    # a changed image file: another cache file
    stat = records[0].path.stat()
    os.utime(records[0].path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    changed = encode_images(records, vae, "vae-a", config, tmp_path / "cache", show_progress=False)
    assert not changed.reused and changed.path != first.path


def test_unreadable_images_are_marked_and_skipped(tmp_path, shape_dataset):
    data = shutil.copytree(shape_dataset, tmp_path / "shapes")
    bad = data / "red_square_0.png"
    bad.write_bytes(b"not a png")
    records = load_records(data)
    table = encode_images(records, DiscreteVAE(VAEConfig(**VAE_TINY)).eval(), "v", DataConfig(image_size=16),
                          tmp_path / "cache", show_progress=False)
    index = [r.path.name for r in records].index("red_square_0.png")
    assert not bool(table.readable[index]) and int(table.readable.sum()) == len(records) - 1


def test_caption_table_skips_captions_that_do_not_fit(tmp_path):
    from duomodal.data.records import Record

    tokenizer = Tokenizer.train(["a red square", "a very very long red square caption"] * 5, vocab_size=64)
    records = [
        Record(tmp_path / "a.png", ("a red square", "a very very long red square caption"), "train"),
        Record(tmp_path / "b.png", ("a very very long red square caption",), "train"),
    ]
    table = CaptionTable(records, tokenizer, context=6)
    assert table.offsets.tolist() == [0, 1, 2]  # record a keeps only its short caption
    assert tokenizer.decode(table.tokens[0]) == "a red square"
    assert table.truncated == 1 and table.tokens[1, -1].item() == tokenizer.eos_id


def test_task_items_and_loss(tmp_path, shape_dataset):
    vae_dir = random_vae(tmp_path / "vae")
    config = DALLERunConfig(vae=str(vae_dir), token_cache=str(tmp_path / "cache"))
    config = override(config, DALLE_TINY[1::2])
    task = DALLETask(config, shape_dataset, tmp_path / "run", show_progress=False)
    train, val = task.datasets()
    item = train[0]
    assert item["text"].shape == (8,) and item["image"].shape == (16,) and item["text"][0].item() == 2
    assert task.model_config()["image_vocab_size"] == 32 and task.model_config()["image_grid_size"] == 4
    model = task.build_model()
    batch = task.collate([train[i] for i in range(4)])
    loss, figures = task.loss(model, batch, 0)
    assert loss.ndim == 0 and set(figures) == {"text_loss", "image_bits"}
    assert 4.0 < figures["image_bits"] < 6.0  # about log2(32) = 5 bits for an untrained model
    model.eval()
    with torch.no_grad():
        figures = task.validate(model, [task.collate([val[i] for i in range(len(val))])])
    assert {"loss", "text_loss", "image_bits"} <= set(figures)


def test_training_captions_are_augmented_and_validation_captions_are_not(tmp_path, shape_dataset):
    vae_dir = random_vae(tmp_path / "vae")
    config = DALLERunConfig(vae=str(vae_dir), token_cache=str(tmp_path / "cache"))
    augmented = ["captions.synonym=0.5", "captions.word_dropout=0.2", "captions.noise_tokens=0.5"]
    config = override(config, [*DALLE_TINY[1::2], "model.text_seq_len=12", *augmented])
    task = DALLETask(config, shape_dataset, tmp_path / "run", show_progress=False)
    train, val = task.datasets()
    tokenizer = task.tokenizer
    texts = set()
    for seed in range(40):
        torch.manual_seed(seed)
        ids = train[0]["text"]
        assert ids[0] == tokenizer.bos_id and tokenizer.eos_id in ids.tolist() and ids.shape == (12,)
        texts.add(tuple(ids.tolist()))
    plain = {tuple(task.captions.tokens[k].long().tolist())
             for k in range(int(task.captions.offsets[0]), int(task.captions.offsets[1]))}
    assert len(texts - plain) > 3  # reworded or noised most of the time
    torch.manual_seed(0)
    first = val[0]["text"]
    torch.manual_seed(1)
    assert torch.equal(val[0]["text"], first) and tuple(first.tolist()) in {
        tuple(task.captions.tokens[k].long().tolist()) for k in range(len(task.captions.tokens))}


def test_cli_train_generate_edit_and_resume(tmp_path, shape_dataset, capsys):
    vae_run = tmp_path / "vae"
    assert main(["train", "vae", "--data", str(shape_dataset), "--out", str(vae_run), "--device", "cpu",
                 *sum((["--set", f"model.{k}={v}"] for k, v in VAE_TINY.items()), []),
                 "--set", "data.image_size=16", "--set", "train.steps=3", "--set", "train.batch_size=8",
                 "--set", "train.warmup_steps=0"]) == 0
    run = tmp_path / "dalle"
    cache = tmp_path / "cache"
    args = ["train", "dalle", "--data", str(shape_dataset), "--vae", str(vae_run), "--out", str(run),
            "--device", "cpu", *DALLE_TINY, "--set", f"token_cache={cache}", "--set", "train.sample_every=5"]
    assert main([*args, "--set", "train.steps=10"]) == 0
    out = capsys.readouterr().out
    assert "trained dalle for 10 steps" in out and "image_bits" in out
    for name in ("config.json", "model.safetensors", "tokenizer.json", "caption_words.json", "vae/model.safetensors",
                 "metrics.jsonl", "samples/step_0000005.png", "samples/step_0000010.png"):
        assert (run / name).is_file(), name
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(r["split"] == "val" and "image_bits" in r for r in rows)
    assert len(list(cache.glob("tokens-*.safetensors"))) == 1

    # resume to more steps: same tokenizer, same cache
    assert main([*args, "--set", "train.steps=14", "--resume"]) == 0
    assert "trained dalle for 14 steps" in capsys.readouterr().out
    assert len(list(cache.glob("tokens-*.safetensors"))) == 1

    # the run stays usable when its VAE folder is gone (it keeps a copy)
    shutil.rmtree(vae_run)
    grid = tmp_path / "gen" / "grid.png"
    assert main(["generate", str(run), "a red square", "--num", "4", "--keep", "2", "--seed", "7",
                 "--batch-size", "3", "--out", str(grid), "--device", "cpu"]) == 0
    record = json.loads(grid.with_suffix(".json").read_text())
    assert record["prompt"] == "a red square" and [i["seed"] for i in record["images"]] == [7, 8]
    assert (grid.parent / "grid-01.png").is_file() and (grid.parent / "grid-02.png").is_file() and grid.is_file()

    edited = tmp_path / "edit" / "e.png"
    source = shape_dataset / "red_square_0.png"
    assert main(["edit", str(run), str(source), "a blue square", "--box", "4,4,12,12", "--num", "3",
                 "--keep", "2", "--out", str(edited), "--device", "cpu"]) == 0
    assert json.loads(edited.with_suffix(".json").read_text())["box"] == [4, 4, 12, 12]
    capsys.readouterr()

    # a square image of another size is resized with a note; the box scales with it
    from PIL import Image

    big = tmp_path / "big.png"
    Image.open(source).resize((32, 32)).save(big)
    assert main(["edit", str(run), str(big), "a blue square", "--box", "8,8,24,24", "--num", "2",
                 "--out", str(edited), "--device", "cpu"]) == 0
    assert "resized to 16x16" in capsys.readouterr().err
    assert json.loads(edited.with_suffix(".json").read_text())["box"] == [4, 4, 12, 12]

    # errors: one line, exit status 2
    cases = [
        (["generate", str(run), "a red square", "--num", "5000", "--out", str(grid)],
         "num must be between 1 and 1024, got 5000"),
        (["generate", str(run), "a red square red square red square", "--out", str(grid)],
         "is 9 tokens with BOS/EOS; this model reads at most 8: shorten it"),
        (["generate", str(run), "a red sq€are", "--out", str(grid)], "characters this model's tokenizer never saw"),
        (["edit", str(run), str(source), "a red square", "--box", "1,2,3", "--out", str(edited)],
         "--box '1,2,3' must be four integers x0,y0,x1,y1"),
        (["edit", str(run), str(source), "a red square", "--box", "4,4,40,12", "--out", str(edited)],
         "box 4,4,40,12 must satisfy 0 <= x0 < x1 <= 16"),
        (["generate", str(tmp_path / "nowhere"), "a red square", "--out", str(grid)], "is not a directory"),
    ]
    wide = tmp_path / "wide.png"
    Image.open(source).resize((32, 16)).save(wide)
    # a wide image is fitted as training saw it (its centre square): a box left of that square is refused
    cases.append((["edit", str(run), str(wide), "a red square", "--box", "0,0,4,4", "--out", str(edited)],
                  "box 0,0,4,4 lies outside the centre square of the 32x16 image that the model sees"))
    for argv, message in cases:
        assert main([*argv, "--device", "cpu"]) == 2, argv
        err = capsys.readouterr().err
        assert message in err, (argv, err)

    main(["generate", str(run), "a blue cube", "--num", "1", "--out", str(grid), "--device", "cpu"])
    err = capsys.readouterr().err
    assert "no training caption has the word(s) cube" in err and "left out, the model reads 'a blue'" in err


def test_two_process_torchrun_training(tmp_path, shape_dataset):
    """Under torchrun every rank uses rank 0's tokenizer and rank 0's token cache; only rank 0 reports."""
    import subprocess
    import sys

    vae_run = random_vae(tmp_path / "vae")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2] / "src") + os.pathsep + env.get("PYTHONPATH", "")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "duomodal", "train", "dalle", "--data", str(shape_dataset), "--vae", str(vae_run),
               "--out", str(tmp_path / "ddp"), "--device", "cpu", *DALLE_TINY,
               "--set", f"token_cache={tmp_path / 'cache'}", "--set", "train.steps=3"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("trained dalle for 3 steps") == 1 and "2 process(es)" in done.stdout
    assert len(list((tmp_path / "cache").glob("tokens-*.safetensors"))) == 1
    Tokenizer.load(tmp_path / "ddp" / "tokenizer.json")
