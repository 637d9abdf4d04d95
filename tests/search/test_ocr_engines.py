"""The real OCR engines on rendered memes (each skipped, saying why, where it is not installed)."""

from __future__ import annotations

import numpy as np
import pytest

from duomodal.data.memes import phrase_in, plan_memes, render_meme
from duomodal.search.text_index import letters
from duomodal.search.ocr import OCR_ENGINES, OcrUnavailable, caption_mask, open_engine

pytestmark = pytest.mark.timeout(120)


def engine_or_skip(kind: str):
    try:
        return open_engine(kind, threads=2)
    except OcrUnavailable as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def memes():
    planned = plan_memes(40, seed=21)
    plain = next(m for m in planned if m.style == "plain" and m.background == "noise")
    outline = next(m for m in planned if m.style == "outline" and m.background == "noise" and m.top and m.bottom)
    return plain, outline


@pytest.mark.parametrize("kind", OCR_ENGINES)
def test_engine_reads_plain_and_outlined_captions(kind, memes):
    engine = engine_or_skip(kind)
    assert engine.kind == kind and engine.name
    plain, outline = memes
    texts = engine.read_batch([render_meme(plain), render_meme(outline)])
    assert phrase_in(texts[0], plain.phrase), (plain.text, texts[0])
    found = sum(letters(word) in letters(texts[1]) for word in outline.text.split())  # spaces may be lost
    assert found >= len(outline.text.split()) // 2, (outline.text, texts[1])


def test_caption_mask_turns_white_fill_black_and_the_rest_white(memes):
    _, outline = memes
    image = render_meme(outline)
    mask = caption_mask(image)
    assert mask.mode == "L" and mask.size == image.size
    assert set(np.asarray(mask).ravel().tolist()) <= {0, 255}
    assert 0.001 < int((np.asarray(mask) == 0).sum()) / (image.width * image.height) < 0.3


def test_rapidocr_reads_with_the_models_its_wheel_ships():
    try:
        import rapidocr_onnxruntime
    except ImportError as e:
        pytest.skip(f"rapidocr-onnxruntime is not installed ({e})")
    from pathlib import Path

    models = sorted(p.name for p in (Path(rapidocr_onnxruntime.__file__).parent / "models").glob("*.onnx"))
    assert any("det" in m for m in models) and any("rec" in m for m in models)


def test_an_unknown_engine_is_refused():
    with pytest.raises(ValueError, match="OCR engine 'easyocr' is not one of rapidocr, tesseract"):
        open_engine("easyocr")
