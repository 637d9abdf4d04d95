"""Generation on a tiny random DALL-E + tiny random VAE: seeds, reranking, edits, completion, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from duomodal.generate import (
    MAX_NUM,
    GenerationError,
    box_to_token_mask,
    complete_image,
    edit_image,
    conditioning_text,
    encode_prompt,
    generate_images,
    unseen_words,
)
from duomodal.models.dalle import DALLE, DALLEConfig, DalleRun
from duomodal.models.sampling import SamplingOptions
from duomodal.models.vae import DiscreteVAE, VAEConfig
from duomodal.text.tokenizer import Tokenizer

FP32 = SamplingOptions(precision="fp32")
CAPTIONS = ["a red square", "a blue circle", "a green triangle", "square, red", "circle, blue"] * 4


@pytest.fixture(scope="module")
def dalle() -> DalleRun:
    torch.manual_seed(0)
    vae = DiscreteVAE(VAEConfig(image_size=16, n_downsample=2, width=8, max_width=16, res_blocks=0,
                                codebook_size=32, codebook_dim=8)).eval()
    tokenizer = Tokenizer.train(CAPTIONS, vocab_size=64)
    config = DALLEConfig(text_seq_len=8, text_vocab_size=tokenizer.vocab_size, image_vocab_size=32,
                         image_grid_size=4, image_size=16, n_layer=2, n_head=2, n_embd=32)
    model = DALLE(config).eval()
    with torch.no_grad():
        model.image_head.weight.mul_(10)  # peaked distributions, as in a trained model
    return DalleRun(model, vae, tokenizer, frozenset({"a", "red", "square", "blue", "circle", "green", "triangle"}))


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


class RednessScorer:
    """Scores an image by how red it is (stands in for CLIP)."""

    def __init__(self):
        self.calls = []

    def score(self, images, texts):
        self.calls.append(list(texts))
        return torch.tensor([float(pixels(im)[..., 0].mean() - pixels(im)[..., 1:].mean()) for im in images])


def test_generate_counts_seeds_and_reproducibility(dalle):
    result = generate_images(dalle, "a red square", num=5, keep=3,
                             options=SamplingOptions(batch_size=2, seed=10, precision="fp32"))
    assert len(result.images) == 3 and result.images[0].size == (16, 16)
    assert result.seeds == [10, 11, 12] and result.indices == [0, 1, 2] and result.scores is None
    # an image depends on its seed only, not on the batch it was drawn in
    alone = generate_images(dalle, "a red square", num=1, options=SamplingOptions(seed=12, precision="fp32"))
    assert np.array_equal(pixels(alone.images[0]), pixels(result.images[2]))
    other = generate_images(dalle, "a red square", num=3,
                            options=SamplingOptions(seed=10, batch_size=3, precision="fp32"))
    assert all(np.array_equal(pixels(a), pixels(b)) for a, b in zip(other.images, result.images))


def test_reranking_keeps_the_best_by_score(dalle):
    scorer = RednessScorer()
    result = generate_images(dalle, "a red square", num=6, keep=2, scorer=scorer, options=FP32)
    every = generate_images(dalle, "a red square", num=6, options=FP32)
    all_scores = scorer.score(every.images, ["x"] * 6)
    best = sorted(range(6), key=lambda i: -float(all_scores[i]))[:2]
    assert result.indices == best and result.seeds == best
    assert result.scores == pytest.approx([float(all_scores[i]) for i in best])
    assert result.score_kind == "scorer" and scorer.calls[0] == ["a red square"] * 6


def test_guidance_runs_and_progress_is_reported(dalle):
    seen = []
    result = generate_images(dalle, "a blue circle", num=3,
                             options=SamplingOptions(batch_size=2, guidance=3.0, top_k=8, top_p=0.9), progress=lambda done, total: seen.append((done, total)))
    assert len(result.images) == 3 and seen == [(2, 3), (3, 3)]


def test_bad_requests_have_clear_errors(dalle):
    with pytest.raises(GenerationError, match=rf"^num must be between 1 and {MAX_NUM}, got {MAX_NUM + 1}$"):
        generate_images(dalle, "a red square", num=MAX_NUM + 1)
    with pytest.raises(GenerationError, match=r"^keep must be between 1 and num \(4\), got 5$"):
        generate_images(dalle, "a red square", num=4, keep=5)
    with pytest.raises(GenerationError, match=r"is 11 tokens with BOS/EOS; this model reads at most 8: shorten it"):
        generate_images(dalle, "a red square a red square a red square", num=1)
    with pytest.raises(GenerationError, match=r"characters this model's tokenizer never saw, in: sq€are"):
        generate_images(dalle, "a red sq€are", num=1)
    with pytest.raises(GenerationError, match=r"^top_p must be in \(0, 1\], got 0.0$"):
        generate_images(dalle, "a red square", num=1, options=SamplingOptions(top_p=0.0))
    with pytest.raises(GenerationError, match=r"^temperature must be in \[0, 5\], got -1.0$"):
        generate_images(dalle, "a red square", num=1, options=SamplingOptions(temperature=-1.0))
    assert encode_prompt(dalle, "").tolist()[:2] == [2, 3]  # the empty prompt is the unconditional one
    assert unseen_words(dalle, "A purple square") == ["purple"]


def test_unseen_words_are_left_out_of_the_conditioning(dalle):
    # the tiny tokenizer knows the characters of these words, but no caption had the words
    assert conditioning_text(dalle, "nice square tinted red") == "square red"
    assert conditioning_text(dalle, "square clean, red") == "square, red"
    assert conditioning_text(dalle, "a red square") == "a red square"  # nothing unseen: the prompt itself
    assert conditioning_text(dalle, "tinted cube") == "tinted cube"  # nothing else: kept, nothing to condition on
    dropped = encode_prompt(dalle, "nice square tinted red")  # 12 tokens with the words: too long to keep them
    assert torch.equal(dropped, encode_prompt(dalle, "square red"))
    assert not torch.equal(encode_prompt(dalle, "tan square red", "keep"), encode_prompt(dalle, "tan square red"))
    # sampling conditions on what is left: the same images as the prompt without the words
    plain = generate_images(dalle, "square red", num=2, options=FP32)
    asked = generate_images(dalle, "tan square red", num=2, options=FP32)
    assert all(np.array_equal(pixels(a), pixels(b)) for a, b in zip(plain.images, asked.images))
    kept = generate_images(dalle, "tan square red", num=2,
                           options=SamplingOptions(precision="fp32", unseen_words="keep"))
    assert not all(np.array_equal(pixels(a), pixels(b)) for a, b in zip(plain.images, kept.images))
    with pytest.raises(GenerationError, match="unseen_words 'ignore' is not one of drop, keep"):
        SamplingOptions(unseen_words="ignore")


def test_box_maps_to_token_cells():
    mask = box_to_token_mask((4, 4, 12, 12), 16, 4)
    assert mask.nonzero().tolist() == [[1, 1], [1, 2], [2, 1], [2, 2]]
    assert box_to_token_mask((0, 0, 1, 1), 16, 4).nonzero().tolist() == [[0, 0]]
    assert box_to_token_mask((3, 0, 5, 16), 16, 4)[:, :2].all()
    with pytest.raises(GenerationError, match=r"box 4,4,20,12 must satisfy 0 <= x0 < x1 <= 16"):
        box_to_token_mask((4, 4, 20, 12), 16, 4)
    with pytest.raises(GenerationError, match=r"box 8,4,8,12 must satisfy"):
        box_to_token_mask((8, 4, 8, 12), 16, 4)


def test_edit_keeps_everything_outside_the_box(dalle):
    rng = np.random.default_rng(0)
    source = Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))
    result = edit_image(dalle, source, (5, 4, 11, 8), "a blue circle", num=4, keep=3, options=FP32)
    assert len(result.images) == 3 and result.score_kind == "fit" and len(result.scores) == 3
    assert result.scores == sorted(result.scores, reverse=True)
    original = pixels(source)
    region = np.zeros((16, 16), dtype=bool)
    region[4:8, 4:12] = True  # the token cells the box touches (4 px cells)
    changed_inside = False
    for image in result.images:
        edited = pixels(image)
        assert np.array_equal(edited[~region], original[~region])
        changed_inside |= not np.array_equal(edited[region], original[region])
    assert changed_inside
    with pytest.raises(GenerationError, match=r"the image is 20x16 pixels; this model works on 16x16 images"):
        edit_image(dalle, source.resize((20, 16)), (0, 0, 4, 4), "a blue circle")


def test_completion_is_reproducible_and_checks_rows(dalle):
    source = Image.new("RGB", (16, 16), (200, 30, 30))
    a = complete_image(dalle, source, "a red square", rows=2, num=2, options=SamplingOptions(seed=4, precision="fp32"))
    b = complete_image(dalle, source, "a red square", rows=2, num=2, options=SamplingOptions(seed=4, precision="fp32"))
    assert all(np.array_equal(pixels(x), pixels(y)) for x, y in zip(a.images, b.images))
    with pytest.raises(GenerationError, match=r"rows must be between 0 and 3 \(the token grid has 4 rows\), got 4"):
        complete_image(dalle, source, "a red square", rows=4)
