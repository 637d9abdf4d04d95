"""DALL-E transformer: masks, padding tokens, loss, cache parity, guidance, learnability, loading."""

from __future__ import annotations

import contextlib

import dataclasses

import pytest
import torch

from duomodal.config import ConfigError, from_dict, to_dict
from duomodal.models.dalle import (
    DALLE,
    DALLEConfig,
    drop_captions,
    load_dalle,
    text_ids_with_padding,
    vae_identity,
    weighted_loss,
)
from duomodal.models.dalle_attention import ATTENTION_TYPES, attend, attention_mask
from duomodal.modelfile import ModelFileError, save_model
from duomodal.models.dalle_step import StepDecoder, packed_linears_available
from duomodal.models.sampling import SamplingOptions, choose_tokens, row_uniforms, sample_image_tokens

T, G, VT, VI = 6, 4, 64, 32  # text positions, grid side, text vocab, image codebook


def tiny_config(**changes) -> DALLEConfig:
    base = DALLEConfig(text_seq_len=T, text_vocab_size=VT, image_vocab_size=VI, image_grid_size=G, image_size=16,
                       n_layer=2, n_head=2, n_embd=32, caption_dropout=0.0)
    return dataclasses.replace(base, **changes)


def sampling(**settings) -> SamplingOptions:
    """Plain sampling (every token, no guidance) unless `settings` say otherwise."""
    return SamplingOptions(**{"top_k": None, "guidance": 1.0, **settings})


def batch(B: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    text = torch.randint(4, VT, (B, T))
    text[:, 0] = 2  # BOS
    text[:, 3] = 3  # EOS
    text[:, 4:] = 0  # PAD
    return text, torch.randint(0, VI, (B, G * G))


def expected_visible(kind: str, i: int, j: int, text_len: int, grid: int, kernel: int) -> bool:
    """The definition, one pair at a time."""
    if j > i:
        return False
    if i < text_len or j < text_len:
        return True
    (qr, qc), (kr, kc) = divmod(i - text_len, grid), divmod(j - text_len, grid)
    return {
        "full": True,
        "axial_row": qr == kr,
        "axial_col": qc == kc,
        "conv_like": abs(qr - kr) <= kernel // 2 and abs(qc - kc) <= kernel // 2,
    }[kind]


@pytest.mark.parametrize("kind", ATTENTION_TYPES)
def test_mask_matches_definition(kind):
    mask = attention_mask(kind, 3, 4, conv_kernel_size=3)
    S = 3 + 16
    assert mask.shape == (S, S) and mask.dtype == torch.bool
    for i in range(S):
        for j in range(S):
            assert bool(mask[i, j]) == expected_visible(kind, i, j, 3, 4, 3), (kind, i, j)


def test_mask_examples():
    # image token 5 is at row 1, col 1 of a 4x4 grid; text is 3 tokens
    row = attention_mask("axial_row", 3, 4)[3 + 5]
    assert row[:3].all() and row.nonzero().flatten().tolist() == [0, 1, 2, 3 + 4, 3 + 5]
    col = attention_mask("axial_col", 3, 4)[3 + 5]
    assert col.nonzero().flatten().tolist() == [0, 1, 2, 3 + 1, 3 + 5]
    text_row = attention_mask("axial_col", 3, 4)[1]
    assert text_row.nonzero().flatten().tolist() == [0, 1]


@pytest.mark.parametrize("kind", ATTENTION_TYPES)
def test_model_sees_only_what_the_mask_allows(kind):
    model = DALLE(tiny_config(n_layer=1, attention_types=(kind,), conv_kernel_size=3)).eval()
    text, image = batch(1)
    mask = attention_mask(kind, T, G, 3)
    _, base = model(text, image[:, :-1])
    for j in range(T, T + G * G - 1):  # perturb each image input token in turn
        changed = image.clone()
        changed[0, j - T] = (changed[0, j - T] + 1) % VI
        _, out = model(text, changed[:, :-1])
        for i in range(T - 1, T + G * G - 1):  # image logits at input position i
            moved = not torch.allclose(out[0, i - (T - 1)], base[0, i - (T - 1)], atol=1e-6)
            assert moved == bool(mask[i, j]), (kind, i, j)


def test_padding_tokens_are_per_position():
    text = torch.tensor([[2, 9, 3, 0, 0, 0]])
    assert text_ids_with_padding(text, 0, VT).tolist() == [[2, 9, 3, VT + 3, VT + 4, VT + 5]]
    model = DALLE(tiny_config()).eval()
    assert model.text_embedding.num_embeddings == VT + T
    assert model.text_head.out_features == VT + T
    # the pad at position 3 and the pad at position 4 are different symbols with different embeddings
    ids = model.text_ids(text)
    emb = model.text_embedding(ids)
    assert not torch.allclose(emb[0, 3], emb[0, 4])


def test_logits_restricted_by_position_type_and_causal():
    model = DALLE(tiny_config()).eval()
    text, image = batch(2)
    text_logits, image_logits = model(text, image[:, :-1])
    assert text_logits.shape == (2, T - 1, VT + T)  # text positions: text vocabulary (with pads) only
    assert image_logits.shape == (2, G * G, VI)  # image positions: the codebook only
    changed = image.clone()
    changed[:, 5] = (changed[:, 5] + 1) % VI
    text_after, image_after = model(text, changed[:, :-1])
    assert torch.equal(text_after, text_logits)  # text never sees the image
    assert torch.allclose(image_after[:, :6], image_logits[:, :6])  # predictions of tokens 0..5 unchanged
    assert not torch.allclose(image_after[:, 6:], image_logits[:, 6:])


def test_weighted_loss_is_1_to_7_by_default():
    torch.manual_seed(1)
    text_logits, image_logits = torch.randn(2, 5, 11), torch.randn(2, 16, 7)
    text_targets, image_targets = torch.randint(0, 11, (2, 5)), torch.randint(0, 7, (2, 16))
    config = tiny_config()
    loss, text_ce, image_ce = weighted_loss(text_logits, image_logits, text_targets, image_targets,
                                            config.text_loss_weight, config.image_loss_weight)
    expected_text = torch.nn.functional.cross_entropy(text_logits.reshape(-1, 11), text_targets.reshape(-1))
    expected_image = torch.nn.functional.cross_entropy(image_logits.reshape(-1, 7), image_targets.reshape(-1))
    assert torch.allclose(text_ce, expected_text) and torch.allclose(image_ce, expected_image)
    assert torch.allclose(loss, (expected_text + 7 * expected_image) / 8)


def test_caption_dropout():
    text = torch.arange(40).view(8, 5)
    empty = torch.tensor([2, 3, 0, 0, 0])
    assert torch.equal(drop_captions(text, empty, 0.0), text)
    assert (drop_captions(text, empty, 1.0) == empty).all()
    torch.manual_seed(3)
    dropped = (drop_captions(text.repeat(100, 1), empty, 0.25) == empty).all(dim=1).float().mean()
    assert 0.18 < float(dropped) < 0.32


BLOCKS = [{}, {"mlp": "relu2", "qk_norm": True}]  # the GPT-2 block, and the speedrun block


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("types", [("full",), ("axial_row", "axial_col", "conv_like", "full")])
def test_cached_logits_match_uncached(types, block):
    model = DALLE(tiny_config(n_layer=4, attention_types=types, **block)).eval()
    text, image = batch(3)
    _, uncached = model(text, image[:, :-1])  # (B, N, VI)
    cache = model.new_cache(3)
    steps = [model.forward_cached(text, cache)] + [model.forward_cached(image[:, k : k + 1], cache) for k in range(G * G - 1)]
    assert torch.allclose(torch.stack(steps, dim=1), uncached, atol=1e-5)
    # a chunk of several tokens at once writes the same cache
    cache = model.new_cache(3)
    model.forward_cached(torch.cat([text, image[:, :7]], dim=1), cache)
    assert torch.allclose(model.forward_cached(image[:, 7:8], cache), uncached[:, 8], atol=1e-5)


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("types", [("full",), ("axial_row", "axial_col", "conv_like", "full")])
def test_step_decoder_matches_uncached_and_mixes_with_chunks(types, packed, block):
    if packed and not packed_linears_available(torch.device("cpu")):
        pytest.skip("this torch build has no oneDNN")
    model = DALLE(tiny_config(n_layer=4, attention_types=types, **block)).eval()
    text, image = batch(3)
    _, uncached = model(text, image[:, :-1])  # (B, N, VI)
    decoder = StepDecoder(model, 3, packed=packed)
    assert decoder.packed == packed
    model.forward_cached(torch.cat([text, image[:, :2]], dim=1), decoder.cache)
    for k in range(2, 9):  # one token at a time through the fast step
        assert torch.allclose(decoder.step(image[:, k]), uncached[:, k + 1], atol=1e-5)
    model.forward_cached(image[:, 9:12], decoder.cache)  # a chunk in between, on the same cache
    for k in range(12, G * G - 1):
        assert torch.allclose(decoder.step(image[:, k]), uncached[:, k + 1], atol=1e-5)
    with pytest.raises(ValueError, match="step takes image tokens 0..14 after the text"):
        decoder.step(image[:, 0])  # the cache is full
    with pytest.raises(ValueError, match="the cache is at stream position 0"):
        StepDecoder(model, 3).step(image[:, 0])  # no text in the cache yet


@pytest.mark.parametrize("kind", ["causal", "axial_row", "conv_like"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eager_attention_matches_sdpa(kind, dtype):
    B, nh, L, hs = 2, 2, T + G * G, 8
    q, k, v = (torch.randn(B, nh, L, hs, requires_grad=True) for _ in range(3))
    mask = None if kind == "causal" else attention_mask(kind, T, G)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        got = attend(q, k, v, mask, mask is None, kernel="eager")
    assert got.dtype == dtype
    assert torch.allclose(got.float(), expected, atol=3e-2 if dtype == torch.bfloat16 else 1e-5)
    got.float().sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))
    assert torch.equal(attend(q, k, v, mask, mask is None, kernel="sdpa"), expected)


def test_auto_attention_is_eager_on_the_cpu_and_computes_what_sdpa_does(monkeypatch):
    torch.manual_seed(0)
    auto = DALLE(tiny_config(attention_types=("full", "axial_row"))).eval()
    sdpa = DALLE(dataclasses.replace(auto.config, attention="sdpa")).eval()
    sdpa.load_state_dict(auto.state_dict())
    text, image = batch(2)
    expected = sdpa(text, image[:, :-1])
    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def no_sdpa(*args, **kwargs):
        raise AssertionError("SDPA ran on the CPU with attention 'auto'")

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", no_sdpa)
    got = auto(text, image[:, :-1])
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", real_sdpa)
    for a, b in zip(got, expected):
        assert torch.allclose(a, b, atol=1e-5)


def test_sampling_ignores_a_callers_autocast():
    # the training loop writes sample grids inside bf16 autocast; `precision` alone decides the dtype
    model = DALLE(tiny_config()).eval()
    text, _ = batch(3)
    uniforms = row_uniforms([1, 2, 3], G * G)
    plain = sample_image_tokens(model, text, sampling(top_k=10, precision="fp32"), uniforms)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = sample_image_tokens(model, text, sampling(top_k=10, precision="fp32"), uniforms)
    assert torch.equal(plain, inside)


@pytest.mark.parametrize("types", [("full",), ("axial_row", "conv_like")])
def test_greedy_and_seeded_sampling_cached_equals_uncached(types):
    model = DALLE(tiny_config(attention_types=types)).eval()
    text, _ = batch(3)
    fast = sample_image_tokens(model, text, sampling(temperature=0, precision="fp32"))
    slow = sample_image_tokens(model, text, sampling(temperature=0, precision="fp32"), use_cache=False)
    assert torch.equal(fast, slow)
    uniforms = row_uniforms([5, 6, 7], G * G)
    fast = sample_image_tokens(model, text, sampling(top_k=10, precision="fp32"), uniforms)
    slow = sample_image_tokens(model, text, sampling(top_k=10, precision="fp32"), uniforms, use_cache=False)
    assert torch.equal(fast, slow)


def test_guidance_scale_one_equals_conditional_sampling():
    model = DALLE(tiny_config()).eval()
    with torch.no_grad():
        model.text_embedding.weight.mul_(50)  # make the caption matter and the logits peaked, as they
        model.image_head.weight.mul_(20)  # are in a trained model
    text, _ = batch(2)
    empty = torch.tensor([2, 3, 0, 0, 0, 0])
    uniforms = row_uniforms([1, 2], G * G)
    plain = sample_image_tokens(model, text, sampling(precision="fp32"), uniforms)
    guided = sample_image_tokens(model, text, sampling(guidance=1.0, precision="fp32"), uniforms, empty_text=empty)
    assert torch.equal(plain, guided)
    strong = sample_image_tokens(model, text, sampling(guidance=4.0, precision="fp32"), uniforms, empty_text=empty)
    assert not torch.equal(plain, strong)


def test_fixed_tokens_are_kept_and_the_rest_sampled_in_order():
    model = DALLE(tiny_config()).eval()
    text, image = batch(2)
    box = torch.zeros(G, G, dtype=torch.bool)
    box[1:3, 1:3] = True  # tokens 5, 6, 9, 10 are free
    fixed_mask = ~box.flatten()
    uniforms = row_uniforms([3, 4], G * G)
    fast = sample_image_tokens(model, text, sampling(precision="fp32"), uniforms, fixed=image, fixed_mask=fixed_mask)
    slow = sample_image_tokens(model, text, sampling(precision="fp32"), uniforms, fixed=image, fixed_mask=fixed_mask, use_cache=False)
    assert torch.equal(fast, slow)
    assert torch.equal(fast[:, fixed_mask], image[:, fixed_mask])
    assert not torch.equal(fast[:, ~fixed_mask], image[:, ~fixed_mask])


def test_choose_tokens_filters():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    u = torch.tensor([0.999])
    assert choose_tokens(logits, u, sampling(temperature=0.0)).item() == 1  # greedy
    assert choose_tokens(logits, u, sampling(top_k=1)).item() == 1  # top-k 1 = greedy
    assert choose_tokens(logits, u, sampling(top_p=1e-6)).item() == 1  # tiny top-p = greedy
    assert choose_tokens(logits, u, sampling(top_k=2)).item() == 3  # the 2 likeliest are 1 and 3
    # min-p: the tokens at least min_p times as likely as the likeliest (e^2 / e^3 = 0.37 keeps 3)
    assert choose_tokens(logits, u, sampling(min_p=0.5)).item() == 1
    assert choose_tokens(logits, u, sampling(min_p=0.3)).item() == 3
    low = torch.tensor([0.0])
    assert choose_tokens(logits, low, sampling(min_p=0.3)).item() == 1  # 1 and 3 are left, in token order
    # inverse CDF follows the softmax probabilities
    n = 20000
    uniforms = torch.rand(n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    picks = choose_tokens(logits.expand(n, -1), uniforms, sampling())
    freq = torch.bincount(picks, minlength=4).double() / n
    assert torch.allclose(freq, torch.softmax(logits[0].double(), 0), atol=0.015)


@pytest.mark.parametrize("block", [{}, {"mlp": "relu2", "qk_norm": True, "proj_init": "zero"}])
def test_overfits_one_batch(block):
    torch.manual_seed(0)
    config = tiny_config(**block)
    model = DALLE(config)
    text, image = batch(4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(40):
        text_logits, image_logits = model(text, image[:, :-1])
        loss, _, image_ce = weighted_loss(text_logits, image_logits, model.text_ids(text)[:, 1:], image,
                                          config.text_loss_weight, config.image_loss_weight)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert float(image_ce.detach()) < 0.1, float(image_ce.detach())  # ln(32) = 3.47 at the start


def test_config_validation_messages():
    with pytest.raises(ConfigError, match=r"model.attention_types: 'sparse' is not one of full, axial_row, axial_col, conv_like"):
        tiny_config(attention_types=("full", "sparse"))
    with pytest.raises(ConfigError, match=r"model.n_embd 30 must be a multiple of model.n_head 4"):
        tiny_config(n_embd=30, n_head=4)
    with pytest.raises(ConfigError, match=r"model.conv_kernel_size must be odd and positive, got 4"):
        tiny_config(conv_kernel_size=4)
    with pytest.raises(ConfigError, match=r"model.image_vocab_size is 0; resolve it from the VAE first"):
        DALLE(DALLEConfig())
    with pytest.raises(ConfigError, match=r"^model.mlp: 'swiglu' is not one of gelu, relu2$"):
        tiny_config(mlp="swiglu")
    with pytest.raises(ConfigError, match=r"^model.proj_init: 'small' is not one of scaled, zero$"):
        tiny_config(proj_init="small")
    config = tiny_config(attention_types=("axial_row", "full"), mlp="relu2", qk_norm=True)
    assert from_dict(DALLEConfig, to_dict(config)) == config


def test_zero_initialised_projections_make_each_block_the_identity():
    model = DALLE(tiny_config(proj_init="zero"))
    text, image = batch(2)
    x = model._embed(torch.cat([model.text_ids(text), image[:, :-1]], dim=1), 0)
    for layer, block in enumerate(model.blocks):
        mask, is_causal = model._layer_mask(layer, 0, x.shape[1])
        assert torch.equal(block(x, mask, is_causal), x)
    default = DALLE(tiny_config())
    assert all(float(b.attn.proj.weight.detach().abs().sum()) > 0 for b in default.blocks)


def test_load_dalle_roundtrip(tmp_path):
    from duomodal.models.vae import DiscreteVAE, VAEConfig
    from duomodal.text.tokenizer import Tokenizer

    vae_config = VAEConfig(image_size=16, n_downsample=2, width=8, max_width=16, res_blocks=0, codebook_size=VI,
                           codebook_dim=8)
    vae = DiscreteVAE(vae_config)
    save_model(tmp_path / "vae", "vae", to_dict(vae_config), vae.state_dict())
    tokenizer = Tokenizer.train(["a red square", "a blue circle", "green triangle"] * 5, vocab_size=VT)
    config = tiny_config(text_vocab_size=tokenizer.vocab_size, vae_dir=str(tmp_path / "vae"),
                         vae_id=vae_identity(tmp_path / "vae"))
    model = DALLE(config)
    run = tmp_path / "run"
    save_model(run, "dalle", to_dict(config), model.state_dict())
    with pytest.raises(ModelFileError, match="has no tokenizer.json"):
        load_dalle(run)
    tokenizer.save(run / "tokenizer.json")
    loaded = load_dalle(run)
    assert not loaded.model.training and loaded.vae is not None and loaded.tokenizer.vocab_size == tokenizer.vocab_size
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.model.state_dict().values()))
    assert not any(k.startswith("vae") for k in loaded.model.state_dict())  # the VAE is not part of the weights
    # a different VAE at the referenced path is refused
    other = DiscreteVAE(vae_config)
    save_model(tmp_path / "vae", "vae", to_dict(vae_config), other.state_dict())
    with pytest.raises(ModelFileError, match="is not the one .* was trained with"):
        load_dalle(run)


def test_bf16_sampling_uses_a_cast_copy_and_agrees_with_fp32():
    # bf16 runs on every CPU: natively, or emulated after a SlowPrecisionWarning
    from duomodal.device import SlowPrecisionWarning, bf16_supported

    model = DALLE(tiny_config()).eval()
    with torch.no_grad():
        model.image_head.weight.mul_(20)  # peaked logits, so rounding rarely flips the argmax
    text, _ = batch(3)
    fp32 = sample_image_tokens(model, text, sampling(temperature=0, precision="fp32"))
    emulated = not bf16_supported(torch.device("cpu"))
    with pytest.warns(SlowPrecisionWarning) if emulated else contextlib.nullcontext():
        bf16 = sample_image_tokens(model, text, sampling(temperature=0, precision="bf16"))
    assert model.image_head.weight.dtype == torch.float32  # the model itself is left as it was
    assert float((fp32 == bf16).float().mean()) > 0.8


def test_row_done_sees_each_finished_row_and_changes_nothing():
    torch.manual_seed(0)
    model = DALLE(tiny_config()).eval()
    text, image = batch(2)
    uniforms = row_uniforms([1, 2], G * G)
    plain = sample_image_tokens(model, text, sampling(top_k=10, precision="fp32"), uniforms)
    seen = []
    watched = sample_image_tokens(model, text, sampling(top_k=10, precision="fp32"), uniforms,
                                  row_done=lambda tokens, rows: seen.append((rows, tokens.clone())))
    assert torch.equal(plain, watched)
    assert [rows for rows, _ in seen] == [1, 2, 3]  # not after the last row: the caller has the tokens then
    for rows, tokens in seen:
        assert torch.equal(tokens[:, : rows * G], plain[:, : rows * G]) and (tokens[:, rows * G:] == 0).all()
    # A region edit (free cells in rows 1-2, columns 1-2): called as sampling leaves row 1.
    fixed_mask = torch.ones(G, G, dtype=torch.bool)
    fixed_mask[1:3, 1:3] = False
    seen.clear()
    sample_image_tokens(model, text, sampling(top_k=10, precision="fp32"), uniforms, fixed=image,
                        fixed_mask=fixed_mask.flatten(), row_done=lambda tokens, rows: seen.append((rows, None)))
    assert [rows for rows, _ in seen] == [2]
    # An exception from it stops the sampling.
    def stop(tokens, rows):
        raise InterruptedError(f"stop after row {rows}")

    with pytest.raises(InterruptedError, match="stop after row 1"):
        sample_image_tokens(model, text, sampling(precision="fp32"), uniforms, row_done=stop)
