"""CLIP training: the loss by hand, overfitting a batch, 2-process gather parity, zero-shot after training."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from duomodal.cli import main
from duomodal.config import to_dict
from duomodal.models.clip import ClipConfig, ContrastiveClip, load_clip
from duomodal.train.clip_task import (
    AugmentConfig,
    ClipRunConfig,
    augment_image,
    contrastive_loss,
    gather_features,
    sigmoid_loss,
)


def model_sets(config: ClipConfig) -> list[str]:
    """`--set` overrides that make `duomodal train clip` build `config` (the fields that differ from the default)."""
    default = ClipConfig()
    changed = [f.name for f in fields(config) if getattr(config, f.name) != getattr(default, f.name)]
    return [f"model.{name}={getattr(config, name)}" for name in changed] + [f"data.image_size={config.image_size}"]


def test_contrastive_loss_matches_a_hand_computed_case():
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    scale = torch.tensor(2.0)
    # logits_per_image = 2 * image @ text.T = [[2, 1.2], [0, 1.6]]
    i2t = (-math.log(math.exp(2) / (math.exp(2) + math.exp(1.2))) - math.log(math.exp(1.6) / (1 + math.exp(1.6)))) / 2
    t2i = (-math.log(math.exp(2) / (math.exp(2) + 1)) - math.log(math.exp(1.6) / (math.exp(1.2) + math.exp(1.6)))) / 2
    assert contrastive_loss(image, text, scale).item() == pytest.approx((i2t + t2i) / 2, rel=1e-6)
    # perfectly aligned orthogonal pairs at a high temperature scale: loss near zero
    assert contrastive_loss(image, image, torch.tensor(100.0)).item() < 1e-6


def test_sigmoid_loss_matches_a_hand_computed_case():
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    # logits = 2 * image @ text.T - 1 = [[1, 0.2], [-1, 0.6]]; +1 on the diagonal, -1 off it
    expected = -(math.log(1 / (1 + math.exp(-1))) + math.log(1 / (1 + math.exp(0.2)))
                 + math.log(1 / (1 + math.exp(-1))) + math.log(1 / (1 + math.exp(-0.6)))) / 2
    assert sigmoid_loss(image, text, torch.tensor(2.0), torch.tensor(-1.0)).item() == pytest.approx(expected, rel=1e-6)


def test_sigmoid_model_has_a_learned_bias_and_overfits_one_batch(tiny_clip_config):
    from dataclasses import replace

    from duomodal.train.clip_task import pair_loss

    torch.manual_seed(0)
    config = replace(tiny_clip_config, loss="sigmoid", logit_scale_init=math.log(10))
    model = ContrastiveClip.from_config(config).train()
    assert "logit_bias" in model.state_dict() and "logit_bias" not in ContrastiveClip.from_config(
        tiny_clip_config).state_dict()
    pixels, ids = _batch(8, seed=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):
        out = model(pixel_values=pixels, input_ids=ids)
        loss = pair_loss(out.image, out.text, out)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert out.logit_bias is not None and out.logit_bias.item() != -10.0
    similarity = out.image @ out.text.T
    assert torch.equal(similarity.argmax(1), torch.arange(8)), "each image's own caption is its best match"


def test_eager_attention_gives_the_sdpa_features(tiny_clip_config):
    from dataclasses import replace

    torch.manual_seed(0)
    sdpa = ContrastiveClip.from_config(tiny_clip_config).eval()
    eager = ContrastiveClip.from_config(replace(tiny_clip_config, attention="eager")).eval()
    eager.load_state_dict(sdpa.state_dict())
    pixels, ids = _batch(4, seed=2)
    a, b = sdpa(pixel_values=pixels, input_ids=ids), eager(pixel_values=pixels, input_ids=ids)
    assert torch.allclose(a.image, b.image, atol=1e-5) and torch.allclose(a.text, b.text, atol=1e-5)


def test_muon_takes_the_towers_layer_matrices(tiny_clip_config):
    from duomodal.train.recipe import MuonWithAdamW, TrainConfig, build_optimizer

    model = ContrastiveClip.from_config(tiny_clip_config)
    matrices = model.hidden_matrices()
    layers = tiny_clip_config.text_layers + tiny_clip_config.vision_layers
    assert len(matrices) == 6 * layers and all(p.ndim == 2 for p in matrices)  # q, k, v, out, fc1, fc2
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(".encoder.layers." in names[id(p)] for p in matrices)
    optimizer = build_optimizer(model, TrainConfig(optimizer="muon"), torch.device("cpu"))
    assert isinstance(optimizer, MuonWithAdamW)


def test_gather_outside_torch_distributed_is_the_identity():
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    ga, gb = gather_features(a, b)
    assert ga is a and gb is b


def _batch(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(n, 3, 16, 16, generator=g)
    ids = torch.randint(4, 64, (n, 10), generator=g)
    ids[:, 0] = 2
    lengths = torch.randint(3, 10, (n,), generator=g)
    for row, length in enumerate(lengths.tolist()):
        ids[row, length] = 3
        ids[row, length + 1 :] = 0
    return pixels, ids


def test_overfits_one_batch(tiny_clip_config):
    torch.manual_seed(0)
    model = ContrastiveClip.from_config(tiny_clip_config).train()
    pixels, ids = _batch(8, seed=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):
        out = model(pixel_values=pixels, input_ids=ids)
        loss = contrastive_loss(out.image, out.text, out.logit_scale)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05, f"loss {loss.item():.4f} after 60 steps on one batch of 8"


WORKER = textwrap.dedent(
    """
    import gc
    import json
    import os
    import sys
    import torch
    import torch.distributed as dist
    from safetensors.torch import save_file
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    sys.path.insert(0, sys.argv[4])
    from test_clip_task import _batch
    from duomodal.config import from_dict
    from duomodal.models.clip import ClipConfig, ContrastiveClip
    from duomodal.train.clip_task import contrastive_loss, gather_features
    from duomodal.train.distributed import train_tokenizer

    rank, init_file, out_dir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = ContrastiveClip.from_config(from_dict(ClipConfig, json.loads(sys.argv[5]))).train()
    pixels, ids = _batch(8, seed=1)
    start, end = [(0, 3), (3, 8)][rank]  # uneven shares: 3 and 5 rows
    net = DistributedDataParallel(model)
    out = net(pixel_values=pixels[start:end], input_ids=ids[start:end])
    image, text = gather_features(out.image, out.text)
    loss = contrastive_loss(image, text, out.logit_scale)
    loss.backward()
    tensors = {"loss": loss.detach().reshape(1)}
    tensors.update({name: p.grad for name, p in model.named_parameters()})
    save_file(tensors, f"{out_dir}/rank{rank}.safetensors")
    words = ["red", "green", "blue", "heart", "outline", "arrow", "left", "right", "account", "circle"]
    captions = [f"a {a} {b} {c} icon" for a in words for b in words for c in words[::-1]]
    with open(f"{out_dir}/tokenizer{rank}.json", "w") as f:
        f.write(train_tokenizer(captions, 200).hf.to_str())
    del net, out, image, text, loss
    gc.collect()  # DDP's reducer holds the process group: free it while the group is still up
    dist.barrier()  # leaving while the peer still talks over gloo can abort the process
    dist.destroy_process_group()
    # Everything is saved. Interpreter teardown of the gloo objects aborted now and then under load
    # ("terminate called without an active exception", faulthandler: no Python frame), which says
    # nothing about the gather this test checks: leave without it.
    sys.stdout.flush()
    os._exit(0)
    """
)


def test_two_process_gather_gives_the_single_process_loss_and_gradients(tmp_path, tiny_clip_config):
    """Also: both ranks end up with rank 0's tokenizer (BPE training breaks ties differently per process)."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    here = str(Path(__file__).parent)
    config = json.dumps(to_dict(tiny_clip_config))
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(rank), str(tmp_path / "init"), str(tmp_path), here, config],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for rank in range(2)
    ]
    for proc in procs:
        output, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, output

    torch.manual_seed(0)
    model = ContrastiveClip.from_config(tiny_clip_config).train()
    pixels, ids = _batch(8, seed=1)
    out = model(pixel_values=pixels, input_ids=ids)
    loss = contrastive_loss(out.image, out.text, out.logit_scale)
    loss.backward()
    assert (tmp_path / "tokenizer0.json").read_text() == (tmp_path / "tokenizer1.json").read_text()
    for rank in range(2):
        result = load_file(str(tmp_path / f"rank{rank}.safetensors"))
        assert result["loss"].item() == pytest.approx(loss.item(), rel=1e-5)
        for name, p in model.named_parameters():
            error = (result[name] - p.grad).abs().max().item()
            assert torch.allclose(result[name], p.grad, rtol=1e-4, atol=1e-6), (name, error)


def test_augmentation_keeps_size_and_colour_and_flips_only_when_asked():
    image = torch.zeros(3, 16, 16)
    image[0] = 1.0  # pure red
    image[:, :, :4] = 1.0  # a white band on the left
    g = torch.Generator().manual_seed(0)
    out = augment_image(image, AugmentConfig(crop_scale_min=0.5), g)
    assert out.shape == (3, 16, 16)
    assert out.min() >= 0 and out.max() <= 1
    assert torch.allclose(out[0], torch.ones(16, 16))  # the red channel is untouched: no colour jitter
    unflipped = [augment_image(image, AugmentConfig(), g) for _ in range(10)]
    assert all(torch.equal(u, image) for u in unflipped)
    flipped = [augment_image(image, AugmentConfig(horizontal_flip=True), g) for _ in range(20)]
    assert any(torch.equal(f, image.flip(-1)) for f in flipped)
    with pytest.raises(ValueError, match="augment.crop_scale_min must be in \\[0.1, 1.0\\], got 0.05"):
        AugmentConfig(crop_scale_min=0.05)


def test_run_config_refuses_mismatched_image_sizes():
    from duomodal.config import override

    with pytest.raises(ValueError, match="data.image_size 32 differs from model.image_size 16; set both"):
        override(ClipRunConfig(), ["model.image_size=16"])


def _manifest_shapes(shape_dataset: Path, root: Path) -> Path:
    """The shape images with a captions.jsonl: copy 0 of each (shape, colour) in train, copy 1 in val."""
    root.mkdir()
    lines = []
    for png in sorted(shape_dataset.glob("*.png")):
        color, shape, copy = png.stem.split("_")
        shutil.copy(png, root / png.name)
        lines.append(json.dumps({
            "file": png.name, "caption": [f"a {color} {shape}", f"{shape}, {color}"],
            "color": color, "shape": shape, "split": "train" if copy == "0" else "val",
        }))
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_train_clip_cli_learns_zero_shot_colour(shape_dataset, tmp_path, capsys, tiny_clip_config):
    from duomodal.classify import classify_images

    data = _manifest_shapes(shape_dataset, tmp_path / "shapes")
    out = tmp_path / "run"
    sets = model_sets(tiny_clip_config) + ["train.steps=120", "train.batch_size=12", "train.lr=3e-3", "train.warmup_steps=10",
                        "train.val_every=120", "train.sample_every=0", "train.log_every=40",
                        "train.checkpoint_every=0", "augment.crop_scale_min=0.9"]
    argv = ["train", "clip", "--data", str(data), "--out", str(out), "--device", "cpu"]
    for s in sets:
        argv += ["--set", s]
    assert main(argv) == 0
    assert "validation:" in capsys.readouterr().out
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if r.get("split") == "val"][-1]
    assert {"text_to_image_recall@1", "image_to_text_recall@10", "zero_shot_color", "zero_shot_shape"} <= set(val)
    # "a red icon" is not caption-like here, so validation's zero-shot varies with BPE tie-breaking
    # (0.83-1.0 seen); well above chance (0.25) is what it shows. The ensembled check below is the strict one.
    assert val["zero_shot_color"] >= 0.5 and val["text_to_image_recall@1"] >= 0.9, val
    embedder = load_clip(out, device="cpu")
    images = [(p, p.stem.split("_")[0]) for p in sorted(data.glob("*.png"))]
    # prompt ensembling over the shapes the data has: "a red square", "a red circle", "a red triangle"
    templates = ["a {} square", "a {} circle", "a {} triangle"]
    result = classify_images(embedder, images, ["blue", "green", "red", "yellow"], templates)
    assert result.accuracy is not None and result.accuracy >= 0.9, result.accuracy
    assert (out / "tokenizer.json").is_file() and (out / "samples").is_dir()


def test_caption_augmentation_rewords_training_captions_only(shape_dataset, tmp_path, tiny_clip_config):
    from duomodal.config import from_dict
    from duomodal.train.clip_task import ClipTask

    data = _manifest_shapes(shape_dataset, tmp_path / "shapes")
    config = from_dict(ClipRunConfig, {"model": to_dict(tiny_clip_config), "data": {"image_size": 16},
                                       "captions": {"word_dropout": 0.4}})
    task = ClipTask(config, data)
    train, val = task.datasets()
    torch.manual_seed(0)
    shorter = 0
    for index in range(len(train)):
        item = train[index]
        plain = task._tokenize(item["caption"])
        shorter += int((item["tokens"] != 0).sum() < (plain != 0).sum())
    assert shorter > 0, "word dropout left some training caption shorter"
    for index in range(len(val)):
        item = val[index]
        assert torch.equal(item["tokens"], task._tokenize(item["caption"])), "validation captions stay as written"


def test_a_caption_longer_than_the_context_is_refused_naming_it(shape_dataset, tmp_path):
    from duomodal.config import ConfigError, merge
    from duomodal.train.clip_task import ClipTask

    data = tmp_path / "data"
    shutil.copytree(shape_dataset, data)
    long = "a red square drawn with a very steady hand on a perfectly white page at noon"
    (data / "red_square_0.txt").write_text(long + "\n")
    config = merge(ClipRunConfig(), {"model": {"context_length": 8, "vocab_size": 64}})
    with pytest.raises(ConfigError, match=r"^caption '" + long + r"' is \d+ tokens with BOS/EOS, longer than "
                                          r"model.context_length 8; set model.context_length=\d+"):
        ClipTask(config, data)
