"""Reading the words in an image (OCR), for indexing a collection's text beside its CLIP vectors.

Two engines, both offline, behind one small interface (``OcrEngine``: a ``name`` recorded in the
index and ``read_batch(images) -> texts``):

- ``rapidocr``: RapidOCR (PP-OCRv4 detection and recognition in ONNX Runtime); its wheel
  ``rapidocr-onnxruntime`` ships the models, nothing is downloaded. ``pip install 'duomodal[ocr]'``.
- ``tesseract``: the ``tesseract`` program (Debian: ``apt-get install tesseract-ocr
  tesseract-ocr-eng``), one process per image. Captions over a picture defeat it as it comes
  (``preprocess="none"``: the grey image, automatic page layout): white letters in a black outline
  are read as the picture's edges, and photo-like noise hides even black text. ``"captions"`` (the
  default) reads two clean black-on-white masks instead, one of the image's near-white pixels (the
  fill of outlined letters) and one of its near-black pixels (plain text), as sparse text, and joins
  both readings.

docs/search.md compares them on the rendered meme corpus (``benchmarks/ocr.py``) and says why
rapidocr is the default.
"""

from __future__ import annotations

import importlib.metadata
import io
import queue
import os
import shutil
import subprocess
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import numpy as np
from PIL import Image

OCR_ENGINES = ("rapidocr", "tesseract")
DEFAULT_OCR_ENGINE = "rapidocr"
TESSERACT_PREPROCESS = ("none", "captions")
RAPIDOCR_MAX_SIDE = 960  # rapidocr's detector reads larger images scaled down to this longer side
# Pixels at least this bright in every channel and at most this far from grey are caption fill;
# pixels at most this bright in every channel are plain (black) text.
_WHITE_MIN = 200
_WHITE_SPREAD = 40
_DARK_MAX = 80
_INSTALL = {
    "rapidocr": "pip install 'duomodal[ocr]' (rapidocr-onnxruntime, which ships its models)",
    "tesseract": "apt-get install tesseract-ocr tesseract-ocr-eng (Debian/Ubuntu)",
}


class OcrUnavailable(ValueError):
    """The OCR engine asked for is not installed here; the message says how to install it."""


class OcrEngine(Protocol):
    kind: str  # one of OCR_ENGINES
    name: str  # engine and version, recorded in the index (a change of engine re-reads every image)

    def read_batch(self, images: Sequence[Image.Image]) -> list[str]:
        """The words found in each image, in reading order, separated by spaces."""
        ...


def open_engine(name: str = DEFAULT_OCR_ENGINE, threads: int | None = None) -> OcrEngine:
    """The engine `name` (one of OCR_ENGINES) using `threads` CPU threads (default: every core).

    Raises OcrUnavailable, naming the install command, when the engine is not installed."""
    threads = threads or os.cpu_count() or 1
    if name == "rapidocr":
        return RapidOcrEngine(threads)
    if name == "tesseract":
        return TesseractEngine(threads)
    raise ValueError(f"OCR engine {name!r} is not one of {', '.join(OCR_ENGINES)}")


def unavailable(name: str, why: str) -> OcrUnavailable:
    return OcrUnavailable(f"the {name} OCR engine is not installed ({why}); install it with: {_INSTALL[name]}")


class RapidOcrEngine:
    kind = "rapidocr"

    def __init__(self, threads: int):
        try:
            # lazy: an optional extra, and onnxruntime takes a second to import
            from rapidocr_onnxruntime import RapidOCR
        except ImportError as e:
            raise unavailable("rapidocr", f"cannot import rapidocr_onnxruntime: {e}") from None
        self.name = f"rapidocr-onnxruntime {importlib.metadata.version('rapidocr-onnxruntime')} max{RAPIDOCR_MAX_SIDE}"
        # One reader per thread, each with one ONNX Runtime thread: images read side by side are
        # faster than one reader with all the threads, which a small image leaves idle (docs/search.md).
        # No angle classifier: captions are upright. The detector's default scales every image up to
        # a shorter side of 736 px, which halved the rate on 320-512 px memes and found no more words.
        self._threads = threads
        self._readers: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(threads):
            self._readers.put(RapidOCR(intra_op_num_threads=1, inter_op_num_threads=1, use_cls=False,
                                       det_limit_side_len=RAPIDOCR_MAX_SIDE, det_limit_type="max"))

    def read_batch(self, images: Sequence[Image.Image]) -> list[str]:
        with ThreadPoolExecutor(self._threads) as pool:  # ONNX Runtime releases the GIL while it runs
            return list(pool.map(self._read, images))

    def _read(self, image: Image.Image) -> str:
        reader = self._readers.get()
        try:
            result, _ = reader(np.asarray(image.convert("RGB"))[:, :, ::-1])  # BGR, as OpenCV reads
        finally:
            self._readers.put(reader)
        if not result:
            return ""
        boxes = sorted(result, key=lambda r: (round(min(p[1] for p in r[0]) / 8), min(p[0] for p in r[0])))
        return " ".join(text.strip() for _, text, _ in boxes if text.strip())


class TesseractEngine:
    kind = "tesseract"

    def __init__(self, threads: int, preprocess: str = "captions", language: str = "eng"):
        if preprocess not in TESSERACT_PREPROCESS:
            raise ValueError(f"preprocess {preprocess!r} is not one of {', '.join(TESSERACT_PREPROCESS)}")
        program = shutil.which("tesseract")
        if program is None:
            raise unavailable("tesseract", "no 'tesseract' program on PATH")
        version = subprocess.run([program, "--version"], capture_output=True, text=True, timeout=30)
        languages = subprocess.run([program, "--list-langs"], capture_output=True, text=True, timeout=30)
        if language not in languages.stdout.split():
            raise unavailable("tesseract", f"no '{language}' language data")
        self.name = f"{version.stdout.split(chr(10))[0].strip()} {preprocess}"
        self._program = program
        self._language = language
        self._preprocess = preprocess
        self._threads = threads
        self._env = {**os.environ, "OMP_THREAD_LIMIT": "1"}  # one core per process; we run `threads` of them

    def read_batch(self, images: Sequence[Image.Image]) -> list[str]:
        with ThreadPoolExecutor(self._threads) as pool:  # each call waits on a subprocess: no GIL held
            return list(pool.map(self._read, images))

    def _read(self, image: Image.Image) -> str:
        if self._preprocess == "none":
            return self._run(image.convert("L"), page_layout="3")
        # --psm 11: sparse text, no page layout (captions sit apart, the picture is masked away)
        texts = [self._run(mask, page_layout="11") for mask in (caption_mask(image), dark_mask(image))]
        return " ".join(t for t in texts if t)

    def _run(self, image: Image.Image, page_layout: str) -> str:
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        result = subprocess.run(
            [self._program, "stdin", "stdout", "--psm", page_layout, "-l", self._language],
            input=buffer.getvalue(), capture_output=True, env=self._env, timeout=120,
        )
        if result.returncode != 0:
            raise OSError(f"tesseract failed: {result.stderr.decode(errors='replace').strip()[:200]}")
        return " ".join(result.stdout.decode(errors="replace").split())


def caption_mask(image: Image.Image) -> Image.Image:
    """Black where `image` is near-white (the fill of outlined caption letters), white elsewhere."""
    pixels = np.asarray(image.convert("RGB")).astype(np.int16)
    low, high = pixels.min(axis=2), pixels.max(axis=2)
    white = (low >= _WHITE_MIN) & (high - low <= _WHITE_SPREAD)
    return Image.fromarray(np.where(white, 0, 255).astype(np.uint8))


def dark_mask(image: Image.Image) -> Image.Image:
    """Black where `image` is near-black in every channel (plain black text), white elsewhere."""
    dark = np.asarray(image.convert("RGB")).max(axis=2) <= _DARK_MAX
    return Image.fromarray(np.where(dark, 0, 255).astype(np.uint8))
