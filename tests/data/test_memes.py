"""The rendered meme corpus: deterministic from its seed, captions as planned, phrases from captions."""

from __future__ import annotations

import hashlib

import numpy as np
from PIL import Image

from duomodal.data.memes import (
    BACKGROUNDS,
    PHRASE_WORDS,
    STYLES,
    Meme,
    phrase_in,
    plan_memes,
    read_truth,
    render_meme,
    write_corpus,
)


def test_plan_is_deterministic_and_mixed():
    memes = plan_memes(60, seed=5, textless=10)
    assert memes == plan_memes(60, seed=5, textless=10)
    assert memes != plan_memes(60, seed=6, textless=10)
    assert len(memes) == 70 and sum(not m.phrase for m in memes) == 10
    with_text = [m for m in memes if m.phrase]
    assert {m.style for m in with_text} == set(STYLES)
    assert {m.background for m in memes} == set(BACKGROUNDS)
    assert any(m.top and m.bottom for m in with_text) and any(bool(m.top) != bool(m.bottom) for m in with_text)
    for meme in with_text:
        assert len(meme.phrase.split()) == PHRASE_WORDS
        assert phrase_in(meme.top, meme.phrase) or phrase_in(meme.bottom, meme.phrase)
        if meme.style == "outline":
            assert meme.text == meme.text.upper()
    assert len({m.file for m in memes}) == len(memes)


def test_render_is_deterministic_and_draws_the_styles():
    memes = [m for m in plan_memes(12, seed=2, textless=0)]
    outline = next(m for m in memes if m.style == "outline" and m.top)
    plain = next(m for m in memes if m.style == "plain")
    for meme in (outline, plain):
        image = render_meme(meme)
        assert image.size == (meme.width, meme.height) and image.mode == "RGB"
        assert hashlib.sha256(image.tobytes()).digest() == hashlib.sha256(render_meme(meme).tobytes()).digest()
    pixels = np.asarray(render_meme(outline))
    top = pixels[: outline.height // 5]
    assert ((top.min(axis=2) > 240).mean() > 0.01) and ((top.max(axis=2) < 20).mean() > 0.01)  # white fill, black outline
    without = Meme(**{**outline.__dict__, "top": "", "bottom": "", "style": "", "phrase": "", "font": ""})
    assert (np.asarray(render_meme(without))[: outline.height // 5].max(axis=2) < 20).mean() < 0.01


def test_write_corpus_round_trip(tmp_path):
    memes = write_corpus(tmp_path, 4, seed=1, textless=1)
    assert read_truth(tmp_path) == memes
    for meme in memes:
        with Image.open(tmp_path / meme.file) as image:
            assert image.size == (meme.width, meme.height)


def test_phrase_in_ignores_case_and_punctuation_but_not_order():
    assert phrase_in("WHEN THE CODE, WORKS!", "the code works")
    assert not phrase_in("when the code works", "code the works")
    assert not phrase_in("thecode works", "the code works")
