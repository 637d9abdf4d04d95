"""The BPE tokenizer: training, round trips, normalisation, context length, unknown words, files."""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models

from duomodal.text.tokenizer import BOS, EOS, PAD, UNK, Tokenizer, TokenizerError

SHAPES = ("heart outline", "star", "account box", "arrow left bold", "circle")
COLORS = ("red", "green", "blue", "black", "yellow", "purple", "orange", "pink")
CAPTIONS = [
    caption
    for shape in SHAPES
    for color in COLORS
    for caption in (f"a {color} {shape} icon", f"{shape}, {color}", f"an icon of a {shape} in {color}")
]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train(CAPTIONS, vocab_size=64)


def test_training_gives_the_special_tokens_fixed_ids(tokenizer):
    assert tokenizer.vocab_size == 64
    assert [tokenizer.hf.token_to_id(t) for t in (PAD, UNK, BOS, EOS)] == [0, 1, 2, 3]
    assert (tokenizer.pad_id, tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 1, 2, 3)


def test_vocabulary_size_is_an_option():
    small = Tokenizer.train(CAPTIONS, vocab_size=40)
    assert small.vocab_size == 40
    # the same captions cost more tokens with fewer merges
    caption = "an icon of a heart outline in purple"
    assert len(small.tokens(caption)) > len(Tokenizer.train(CAPTIONS, vocab_size=64).tokens(caption))
    with pytest.raises(TokenizerError, match=r"^vocab_size 4 is too small; use at least 5$"):
        Tokenizer.train(CAPTIONS, vocab_size=4)


def test_encode_is_bos_tokens_eos_then_padding(tokenizer):
    ids = tokenizer.encode("a red star icon", context_length=16)
    assert len(ids) == 16
    body = tokenizer.tokens("a red star icon")
    assert ids == [2, *body, 3] + [0] * (16 - len(body) - 2)
    assert 1 not in ids  # every character was seen in training


@pytest.mark.parametrize("caption", ["a red heart outline icon", "an icon of a star in orange", "pink star"])
def test_round_trip(tokenizer, caption):
    assert tokenizer.decode(tokenizer.encode(caption, 32)) == caption
    assert tokenizer.decode(torch.tensor(tokenizer.encode(caption, 32))) == caption


def test_normalisation_is_the_same_for_every_spelling(tokenizer):
    reference = tokenizer.encode("a red heart outline icon", 24)
    spellings = (
        "  A   RED\tHeart\nOUTLINE icon  ",  # case and whitespace
        "a red heart outline icon\n",
        "ａ ｒｅｄ heart outline icon",  # full-width letters (NFKC)
    )
    for spelling in spellings:
        assert tokenizer.normalize(spelling) == "a red heart outline icon"
        assert tokenizer.encode(spelling, 24) == reference


def test_normalisation_survives_save_and_load(tokenizer, tmp_path):
    tokenizer.save(tmp_path / "tokenizer.json")
    loaded = Tokenizer.load(tmp_path)
    assert loaded.encode("  A  BLUE Star ", 12) == tokenizer.encode("a blue star", 12)


def test_too_long_caption_is_an_error_naming_it(tokenizer):
    caption = "an icon of a heart outline in purple"
    length = len(tokenizer.tokens(caption)) + 2
    with pytest.raises(TokenizerError) as error:
        tokenizer.encode(caption, context_length=length - 1)
    assert str(error.value) == (
        f"caption 'an icon of a heart outline in purple' is {length} tokens with BOS/EOS, longer than the "
        f"context of {length - 1}; shorten it, raise the context length, or ask for truncation"
    )
    assert len(tokenizer.encode(caption, context_length=length)) == length  # exactly fits


def test_truncation_keeps_the_start_and_ends_with_eos(tokenizer):
    caption = "an icon of a heart outline in purple"
    full = tokenizer.encode(caption, 64)
    cut = tokenizer.encode(caption, 6, truncate=True)
    assert cut == full[:5] + [3]
    short = "star"
    context = len(tokenizer.tokens(short)) + 2
    assert context < len(full) - full.count(0)
    batch = tokenizer.encode_batch([caption, short], context, truncate=True)
    assert batch.dtype == torch.long and batch.shape == (2, context)
    assert batch[0].tolist() == full[: context - 1] + [3]
    assert batch[1].tolist() == tokenizer.encode(short, context)
    with pytest.raises(TokenizerError, match=r"^caption 'an icon of a heart outline in purple' is "):
        tokenizer.encode_batch([short, caption], context)


def test_context_length_must_hold_bos_and_eos(tokenizer):
    with pytest.raises(TokenizerError, match=r"^context_length 1 is too small; BOS and EOS need at least 2$"):
        tokenizer.encode("star", 1, truncate=True)
    assert tokenizer.encode("star", 2, truncate=True) == [2, 3]


def test_unknown_words(tokenizer):
    assert tokenizer.unknown_words("a red star") == []
    assert tokenizer.unknown_words("a zebra in red") == ["zebra"]
    # offsets are taken in the normalised text, whatever the spacing and case of the input
    assert tokenizer.unknown_words("   A   RED ☃snow   star  ") == ["☃snow"]
    ids = tokenizer.encode("a zebra", 16)
    assert tokenizer.unk_id in ids


def test_save_and_load(tokenizer, tmp_path):
    path = tmp_path / "model" / "tokenizer.json"
    tokenizer.save(path)
    assert json.loads(path.read_text())["normalizer"] is not None
    assert sorted(p.name for p in path.parent.iterdir()) == ["tokenizer.json"]  # written atomically
    for source in (path, path.parent):
        loaded = Tokenizer.load(source)
        assert loaded.vocab_size == tokenizer.vocab_size
        for caption in CAPTIONS[:10]:
            assert loaded.encode(caption, 24) == tokenizer.encode(caption, 24)


def test_load_errors(tmp_path):
    with pytest.raises(TokenizerError) as error:
        Tokenizer.load(tmp_path)
    assert str(error.value) == f"no tokenizer at {tmp_path / 'tokenizer.json'}"
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match=r"tokenizer.json is not a tokenizer file: "):
        Tokenizer.load(tmp_path)
    foreign = HFTokenizer(models.BPE(unk_token="<unk>"))
    foreign.add_special_tokens(["<unk>", "<s>"])
    foreign.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(TokenizerError) as error:
        Tokenizer.load(tmp_path)
    assert str(error.value) == "tokenizer must have [PAD] at id 0; was it trained by duomodal?"


def test_decode_attaches_punctuation_as_in_written_text(tmp_path):
    captions = ["a red heart, icon.", "don't stop! it's a t-shirt (blue): 50% off; play/pause? yes"] * 5
    tokenizer = Tokenizer.train(captions, vocab_size=128)
    for caption in captions[:2]:
        assert tokenizer.decode(tokenizer.encode(caption, 64)) == caption
    # a tokenizer.json saved by an earlier version has a plain BPEDecoder ("a red heart , icon ."):
    # it loads with the new decoder and encodes exactly as before
    tokenizer.save(tmp_path / "tokenizer.json")
    saved = json.loads((tmp_path / "tokenizer.json").read_text())
    saved["decoder"] = {"type": "BPEDecoder", "suffix": "</w>"}
    (tmp_path / "tokenizer.json").write_text(json.dumps(saved))
    assert HFTokenizer.from_file(str(tmp_path / "tokenizer.json")).decode(tokenizer.tokens(captions[0])) == (
        "a red heart , icon ."
    )
    old = Tokenizer.load(tmp_path)
    assert old.decode(old.encode(captions[0], 64)) == "a red heart, icon."
    assert [old.encode(c, 64) for c in captions[:2]] == [tokenizer.encode(c, 64) for c in captions[:2]]
