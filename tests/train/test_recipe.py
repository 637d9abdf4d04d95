"""The training recipe: which parameters each optimizer takes, the schedules, clear config errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from duomodal.config import ConfigError
from duomodal.models.dalle import DALLE, DALLEConfig
from duomodal.train.recipe import Muon, MuonWithAdamW, TrainConfig, build_optimizer, lr_multiplier


def tiny_dalle() -> DALLE:
    return DALLE(DALLEConfig(text_seq_len=6, text_vocab_size=64, image_vocab_size=32, image_grid_size=4,
                             image_size=16, n_layer=2, n_head=2, n_embd=32))


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest():
    model = tiny_dalle()
    optimizer = build_optimizer(model, TrainConfig(optimizer="muon", weight_decay=0.1), torch.device("cpu"))
    assert isinstance(optimizer, MuonWithAdamW)
    muon = {id(p) for g in optimizer.muon.param_groups for p in g["params"]}
    adamw = {id(p) for g in optimizer.adamw.param_groups for p in g["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[i] for i in muon) == sorted(
        f"blocks.{b}.{m}.weight" for b in range(2) for m in ("attn.qkv", "attn.proj", "mlp.0", "mlp.2"))
    assert not muon & adamw and muon | adamw == set(names)  # every parameter, once
    assert {"text_embedding.weight", "image_head.weight", "ln_f.weight"} <= {names[i] for i in adamw}
    decayed = {names[id(p)] for g in optimizer.adamw.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert "ln_f.weight" not in decayed and "image_head.weight" in decayed
    # one learning rate set on all groups reaches both optimizers
    for group in optimizer.param_groups:
        group["lr"] = 0.5
    assert optimizer.muon.param_groups[0]["lr"] == optimizer.adamw.param_groups[0]["lr"] == 0.5


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_embed_lr_scale_gives_the_embeddings_their_own_learning_rate(optimizer):
    model = tiny_dalle()
    names = {id(p): n for n, p in model.named_parameters()}
    plain = build_optimizer(model, TrainConfig(optimizer=optimizer), torch.device("cpu"))
    assert all("lr_scale" not in g for g in plain.param_groups)  # the groups older checkpoints hold
    scaled = build_optimizer(model, TrainConfig(optimizer=optimizer, embed_lr_scale=5.0), torch.device("cpu"))
    by_scale: dict[float, set[str]] = {}
    for group in scaled.param_groups:
        by_scale.setdefault(group.get("lr_scale", 1.0), set()).update(names[id(p)] for p in group["params"])
    assert by_scale[5.0] == {"text_embedding.weight", "image_embedding.weight", "text_position", "image_row",
                             "image_col"}
    assert not by_scale[5.0] & by_scale[1.0] and by_scale[5.0] | by_scale[1.0] == set(names.values())
    with pytest.raises(ConfigError, match="embed_lr_scale"):
        TrainConfig(embed_lr_scale=0)


def test_muon_steps_and_its_state_round_trips():
    model = tiny_dalle()
    optimizer = build_optimizer(model, TrainConfig(optimizer="muon"), torch.device("cpu"))
    before = model.blocks[0].attn.qkv.weight.detach().clone()
    text = torch.randint(4, 64, (2, 6))
    image = torch.randint(0, 32, (2, 15))
    _, logits = model(text, image)
    logits.float().logsumexp(-1).mean().backward()
    optimizer.step()
    assert not torch.equal(before, model.blocks[0].attn.qkv.weight)
    state = optimizer.state_dict()
    again = build_optimizer(model, TrainConfig(optimizer="muon"), torch.device("cpu"))
    again.load_state_dict(state)
    buffer = again.muon.state[model.blocks[0].attn.qkv.weight]["momentum_buffer"]
    assert torch.equal(buffer, optimizer.muon.state[model.blocks[0].attn.qkv.weight]["momentum_buffer"])
    adamw = torch.optim.AdamW(model.parameters())
    with pytest.raises(ConfigError, match="not Muon \\+ AdamW: it was trained with another train.optimizer"):
        again.load_state_dict(adamw.state_dict())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_batched_muon_matches_torch_muon(dtype):
    # torch.optim.Muon orthogonalises in bf16; ours in the run's dtype (fp32 where bf16 is emulated)
    torch.manual_seed(0)
    shapes = [(8, 24), (24, 8), (8, 24), (16, 16), (8, 32)]  # tall and wide, repeated and single shapes
    ours = [nn.Parameter(torch.randn(s)) for s in shapes]
    theirs = [nn.Parameter(p.detach().clone()) for p in ours]
    mine = Muon(ours, lr=0.02, weight_decay=0.1, momentum=0.95, dtype=dtype)
    reference = torch.optim.Muon(theirs, lr=0.02, weight_decay=0.1, momentum=0.95, adjust_lr_fn="match_rms_adamw")
    for _ in range(3):
        grads = [torch.randn(s) for s in shapes]
        for p, q, g in zip(ours, theirs, grads):
            p.grad, q.grad = g.clone(), g.clone()
        mine.step()
        reference.step()
    for p, q in zip(ours, theirs):
        assert torch.allclose(p, q, atol=2e-3, rtol=0), float((p - q).abs().max())
        assert torch.equal(mine.state[p]["momentum_buffer"], reference.state[q]["momentum_buffer"])


def test_recipe_errors_are_clear():
    with pytest.raises(ConfigError, match=r"^train.optimizer=muon needs a model that names its hidden matrices; "
                                          r"Sequential does not: use train.optimizer=adamw$"):
        build_optimizer(nn.Sequential(nn.Linear(2, 2)), TrainConfig(optimizer="muon"), torch.device("cpu"))
    with pytest.raises(ConfigError, match=r"^train.optimizer must be adamw or muon, got 'sgd'$"):
        TrainConfig(optimizer="sgd")
    with pytest.raises(ConfigError, match=r"^train.schedule must be cosine or wsd, got 'linear'$"):
        TrainConfig(schedule="linear")
    with pytest.raises(ConfigError, match=r"^train.cooldown_fraction must be in \(0, 1\], got 0.0$"):
        TrainConfig(cooldown_fraction=0.0)


def test_lr_multiplier_follows_the_schedule():
    cosine = TrainConfig(steps=100, warmup_steps=10, min_lr_ratio=0.1)
    wsd = TrainConfig(steps=100, warmup_steps=10, min_lr_ratio=0.1, schedule="wsd", cooldown_fraction=0.4)
    assert lr_multiplier(cosine, 55) < 1.0 and lr_multiplier(wsd, 55) == 1.0
    assert lr_multiplier(cosine, 99) == pytest.approx(lr_multiplier(wsd, 99), abs=0.01)
