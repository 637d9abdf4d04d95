"""The discrete VAE: shapes, learnability, strict loading, bad input."""

from __future__ import annotations

import pytest
import torch

from duomodal.modelfile import ModelFileError, save_model
from duomodal.models.vae import DiscreteVAE, VAEConfig, load_vae
from duomodal.config import to_dict

TINY = dict(image_size=16, n_downsample=2, width=16, max_width=32, res_blocks=1, codebook_size=32, codebook_dim=16)


def shape_batch() -> torch.Tensor:
    """4 images 16x16: coloured squares and discs on white."""
    images = torch.ones(4, 3, 16, 16)
    yy, xx = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    disc = ((yy - 7.5) ** 2 + (xx - 7.5) ** 2) < 30
    colours = torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.7, 0.2], [0.1, 0.2, 0.9], [0.9, 0.8, 0.1]])
    for i in range(4):
        mask = disc if i % 2 else (yy >= 3) & (yy < 13) & (xx >= 3) & (xx < 13)
        images[i][:, mask] = colours[i][:, None]
    return images


@pytest.mark.parametrize("quantizer", ["gumbel", "vq"])
def test_encode_decode_shapes(quantizer):
    vae = DiscreteVAE(VAEConfig(**TINY, quantizer=quantizer)).eval()
    images = torch.rand(3, 3, 16, 16)
    tokens = vae.encode(images)
    assert tokens.shape == (3, 4, 4) and tokens.dtype == torch.long
    assert int(tokens.min()) >= 0 and int(tokens.max()) < 32
    decoded = vae.decode(tokens)
    assert decoded.shape == (3, 3, 16, 16)
    assert float(decoded.min()) >= 0 and float(decoded.max()) <= 1
    assert vae.grid_size == 4 and vae.codebook_size == 32 and vae.image_size == 16
    # encode is deterministic (argmax, no noise)
    assert torch.equal(vae.encode(images), tokens)


@pytest.mark.parametrize("quantizer", ["gumbel", "vq"])
def test_forward_returns_one_type(quantizer):
    vae = DiscreteVAE(VAEConfig(**TINY, quantizer=quantizer)).train()
    out = vae(torch.rand(2, 3, 16, 16), temperature=0.5, kl_weight=0.1)
    assert out.recon.shape == (2, 3, 16, 16)
    assert out.tokens.shape == (2, 4, 4)
    assert out.loss.ndim == 0 and torch.allclose(out.loss, out.recon_loss + out.quant_loss)
    assert 1.0 <= float(out.perplexity) <= 32.0 + 1e-3
    out.loss.backward()
    assert all(p.grad is not None for p in vae.encoder.parameters())


@pytest.mark.parametrize("quantizer,steps,below", [("vq", 200, 0.01), ("gumbel", 200, 0.01)])
def test_overfits_one_batch(quantizer, steps, below):
    """Learnability: the reconstruction MSE of 4 images falls below `below` within `steps` steps."""
    torch.manual_seed(0)
    config = VAEConfig(**TINY, quantizer=quantizer, kl_weight=0.0, restart_threshold=0.0)
    vae = DiscreteVAE(config).train()
    images = shape_batch()
    optimizer = torch.optim.Adam(vae.parameters(), lr=3e-3)
    for step in range(steps):
        out = vae(images, temperature=max(1.0 - step / 100, 0.1))
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    vae.eval()
    mse = float(((vae.decode(vae.encode(images)) - images) ** 2).mean())
    assert mse < below, f"{quantizer}: MSE {mse:.4f} after {steps} steps"


def test_vq_restarts_dead_codes():
    torch.manual_seed(0)
    vae = DiscreteVAE(VAEConfig(**TINY, quantizer="vq", restart_threshold=0.5, ema_decay=0.5)).train()
    images = shape_batch()
    vae(images)  # first batch initialises the codebook from encoder outputs
    vae.quantizer.cluster_size[:10] = 0.0  # ten codes look dead
    before = vae.quantizer.codebook[:10].clone()
    vae(images)
    assert not torch.allclose(vae.quantizer.codebook[:10], before)
    assert bool((vae.quantizer.cluster_size >= 0.5).all()) or int((vae.quantizer.cluster_size < 0.5).sum()) == 0


def test_load_vae_round_trip_and_strict(tmp_path):
    config = VAEConfig(**TINY, quantizer="vq")
    vae = DiscreteVAE(config).eval()
    save_model(tmp_path / "vae", "vae", to_dict(config), vae.state_dict())
    loaded = load_vae(tmp_path / "vae")
    images = torch.rand(2, 3, 16, 16)
    assert torch.equal(loaded.encode(images), vae.encode(images))
    assert not loaded.training
    state = vae.state_dict()
    state.pop("decoder.out.bias")
    save_model(tmp_path / "broken", "vae", to_dict(config), state)
    with pytest.raises(ModelFileError, match="missing tensors: decoder.out.bias"):
        load_vae(tmp_path / "broken")
    save_model(tmp_path / "clip", "clip", {}, {})
    with pytest.raises(ModelFileError, match="holds a clip model, expected a vae model"):
        load_vae(tmp_path / "clip")


def test_bad_input_messages():
    with pytest.raises(ValueError, match=r"image_size 20 must be a multiple of 2\*\*n_downsample = 8"):
        VAEConfig(image_size=20, n_downsample=3)
    with pytest.raises(ValueError, match="quantizer must be 'gumbel' or 'vq', got 'kmeans'"):
        VAEConfig(quantizer="kmeans")  # type: ignore[arg-type]
    vae = DiscreteVAE(VAEConfig(**TINY))
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 3, 16, 16\), got \(1, 3, 32, 32\)"):
        vae.encode(torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 32\), got 40"):
        vae.decode(torch.full((1, 4, 4), 40))
    with pytest.raises(ValueError, match=r"expected tokens of shape \(B, 4, 4\), got \(1, 3, 3\)"):
        vae.decode(torch.zeros(1, 3, 3, dtype=torch.long))


def test_vq_distances_stay_fp32_under_bf16_autocast():
    vae = DiscreteVAE(VAEConfig(**TINY, quantizer="vq")).train()
    vae(shape_batch())  # initialise the codebook
    z = torch.randn(2, 16, 4, 4)
    expected = vae.quantizer.tokens(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(vae.quantizer.tokens(z), expected)
        out = vae.eval()(shape_batch())
    assert out.recon.shape == (4, 3, 16, 16)
