"""`duomodal generate --prime IMAGE --prime-rows R`: image completion from the command line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from duomodal.cli import main
from duomodal.data.images import load_image, to_rgb, to_tensor
from duomodal.models.vae import DiscreteVAE, load_vae


@pytest.fixture
def decoded_tokens(monkeypatch):
    """Every (B, 4, 4) token grid the VAE decodes into pictures, in order."""
    grids = []
    decode = DiscreteVAE.decode

    def spy(self, tokens):
        grids.append(tokens.detach().cpu().clone())
        return decode(self, tokens)

    monkeypatch.setattr(DiscreteVAE, "decode", spy)
    return grids


def noise_image(path, size: int):
    """A seeded random colour in each token cell (4x4 cells): rows of tokens that differ from each other."""
    cells = np.random.default_rng(1).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    pixels = cells.repeat(size // 4, axis=0).repeat(size // 4, axis=1)
    Image.fromarray(pixels).save(path)
    return path


def prime_tokens(run, path) -> torch.Tensor:
    """The (4, 4) VAE tokens of the 16 px image at `path`."""
    vae = load_vae(run.parent / "vae", device="cpu")
    with torch.no_grad():
        return vae.encode(to_tensor(to_rgb(load_image(path)), 16)[None])[0].cpu()


def test_prime_keeps_the_first_rows_of_tokens(dalle_run, decoded_tokens, tmp_path, capsys):
    source = noise_image(tmp_path / "prime.png", 16)
    grid = tmp_path / "out" / "primed.png"
    assert main(["generate", str(dalle_run), "a red square", "--prime", str(source), "--prime-rows", "2",
                 "--num", "5", "--keep", "3", "--batch-size", "2", "--seed", "3", "--out", str(grid),
                 "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith(
        f"wrote {grid}: the primed image (first) and 3 of 5 completions of its first 2 token rows, in "
    )
    expected = prime_tokens(dalle_run, source)
    assert len(set(map(tuple, expected.tolist()))) == 4  # rows that differ, so that a wrong row can be seen
    tokens = torch.cat(decoded_tokens)
    assert tokens.shape == (5, 4, 4)  # every generated image, in batches of 2, 2, 1
    assert torch.equal(tokens[:, :2], expected[:2].expand(5, -1, -1))
    assert not torch.equal(tokens[:, 2:], expected[2:].expand(5, -1, -1))  # the rest is sampled
    record = json.loads(grid.with_suffix(".json").read_text())
    assert record["prime"] == str(source) and record["prime_rows"] == 2
    assert record["prompt"] == "a red square" and [i["seed"] for i in record["images"]] == [3, 4, 5]
    assert [i["file"] for i in record["images"]] == ["primed-01.png", "primed-02.png", "primed-03.png"]
    assert all((grid.parent / i["file"]).is_file() for i in record["images"]) and grid.is_file()
    # the grid shows the primed image first, then the kept completions
    assert Image.open(grid).size == (4 * 18 + 2, 18 + 2)


def test_prime_with_a_square_image_of_another_size_is_resized(dalle_run, decoded_tokens, tmp_path, capsys):
    big = noise_image(tmp_path / "big.png", 32)
    grid = tmp_path / "big-out.png"
    assert main(["generate", str(dalle_run), "a blue circle", "--prime", str(big), "--prime-rows", "3",
                 "--num", "2", "--out", str(grid), "--device", "cpu"]) == 0
    assert f"note: {big} is 32x32; resized to 16x16 for the model" in capsys.readouterr().err
    resized = tmp_path / "resized.png"
    load_image(big).resize((16, 16), resample=3).save(resized)
    expected = prime_tokens(dalle_run, resized)
    tokens = torch.cat(decoded_tokens)
    assert torch.equal(tokens[:, :3], expected[:3].expand(2, -1, -1))
    assert json.loads(grid.with_suffix(".json").read_text())["prime_rows"] == 3


def test_prime_with_a_non_square_image_takes_its_centre_square(dalle_run, decoded_tokens, tmp_path, capsys):
    # the command line fits images as the server and training do (generate.fit_to_model)
    wide = tmp_path / "wide.png"
    pixels = np.zeros((16, 32, 3), dtype=np.uint8)
    pixels[:, 8:24] = np.asarray(load_image(noise_image(tmp_path / "centre.png", 16)))
    Image.fromarray(pixels).save(wide)
    grid = tmp_path / "wide-out.png"
    assert main(["generate", str(dalle_run), "a blue circle", "--prime", str(wide), "--prime-rows", "2",
                 "--num", "2", "--out", str(grid), "--device", "cpu"]) == 0
    assert f"note: {wide} is 32x16; its centre square resized to 16x16 for the model" in capsys.readouterr().err
    expected = prime_tokens(dalle_run, tmp_path / "centre.png")
    assert torch.equal(torch.cat(decoded_tokens)[:, :2], expected[:2].expand(2, -1, -1))


def test_prime_errors_are_one_clear_line(dalle_run, shape_dataset, tmp_path, capsys):
    source = shape_dataset / "red_square_0.png"
    grid = tmp_path / "g.png"
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    base = ["generate", str(dalle_run), "a red square", "--out", str(grid), "--device", "cpu"]
    cases = [
        (["--prime", str(source), "--prime-rows", "0"],
         "duomodal: error: --prime-rows must be from 1 to 3 (this model's token grid has 4 rows), got 0\n"),
        (["--prime", str(source), "--prime-rows", "4"],
         "duomodal: error: --prime-rows must be from 1 to 3 (this model's token grid has 4 rows), got 4\n"),
        (["--prime-rows", "2"], "duomodal: error: --prime-rows needs --prime IMAGE, the image to complete\n"),
        (["--prime", str(source)],
         "duomodal: error: --prime needs --prime-rows R, the number of the image's token rows to keep\n"),
        (["--prime", str(broken), "--prime-rows", "1"], f"duomodal: error: {broken}: "),
        (["--prime", str(tmp_path / "missing.png"), "--prime-rows", "1"],
         f"duomodal: error: {tmp_path / 'missing.png'}: cannot read file"),
    ]
    for extra, message in cases:
        assert main([*base, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith(message) if not message.endswith("\n") else err == message, (extra, err)
    assert not grid.exists()


def test_sampling_defaults_and_plain_sampling(dalle_run, decoded_tokens, tmp_path):
    """By default top-k 64 with guidance 3 (recorded in the JSON); `--top-k 0 --guidance 1` is plain sampling."""
    from duomodal.generate import encode_prompt
    from duomodal.models.dalle import load_dalle
    from duomodal.models.sampling import SamplingOptions, row_uniforms, sample_image_tokens

    assert (SamplingOptions().top_k, SamplingOptions().guidance) == (64, 3.0)
    out = tmp_path / "default.png"
    assert main(["generate", str(dalle_run), "a red square", "--num", "2", "--out", str(out), "--device", "cpu"]) == 0
    record = json.loads(out.with_suffix(".json").read_text())
    assert (record["top_k"], record["guidance"], record["temperature"]) == (64, 3.0, 1.0)
    assert (record["top_p"], record["min_p"], record["keep_unseen_words"]) == (None, None, False)  # all recorded

    decoded_tokens.clear()
    plain = tmp_path / "plain.png"
    assert main(["generate", str(dalle_run), "a red square", "--num", "2", "--top-k", "0", "--guidance", "1",
                 "--out", str(plain), "--device", "cpu"]) == 0
    record = json.loads(plain.with_suffix(".json").read_text())
    assert record["top_k"] is None and record["guidance"] == 1.0
    run = load_dalle(dalle_run, "cpu")
    text = encode_prompt(run, "a red square")
    plain_sampling = SamplingOptions(top_k=None, guidance=1.0)
    expected = sample_image_tokens(run.model, text[None].expand(2, -1), plain_sampling, row_uniforms([0, 1], 16))
    assert torch.equal(torch.cat(decoded_tokens).flatten(1), expected)
    assert main(["generate", str(dalle_run), "a red square", "--num", "2", "--min-p", "0.2", "--out",
                 str(tmp_path / "min-p.png"), "--device", "cpu"]) == 0
    assert json.loads((tmp_path / "min-p.json").read_text())["min_p"] == 0.2
    assert main(["generate", str(dalle_run), "a red square", "--min-p", "1.5", "--out", str(tmp_path / "x.png"),
                 "--device", "cpu"]) == 2
