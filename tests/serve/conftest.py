"""Small stand-ins for the index, the CLIP embedder and the generator, with the same methods the
server uses, over the shared shape dataset. The fake CLIP embeds what the shapes really are
(colour and shape features), so searches have right answers to check."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import uvicorn
from fastapi.testclient import TestClient
from PIL import Image

from duomodal.serve.app import create_app
from duomodal.serve.config import ServeConfig
from duomodal.serve.jobs import JobOutput

COLOR_RGB = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (30, 60, 220), "yellow": (235, 200, 20)}
SHAPE_NAMES = ("square", "circle", "triangle")
FEATURES = (*COLOR_RGB, *SHAPE_NAMES, "bias")


def _normalise(vectors: np.ndarray) -> torch.Tensor:
    vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    return torch.from_numpy(vectors.astype(np.float32))


class FakeClip:
    """Text -> which colour/shape words it names; image -> its colour and shape (by fill ratio)."""

    model_id = "fake-clip-8d"
    dim = len(FEATURES)

    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        vectors = np.zeros((len(texts), self.dim))
        for row, text in enumerate(texts):
            words = text.lower().replace(",", " ").split()
            for col, feature in enumerate(FEATURES[:-1]):
                vectors[row, col] = float(feature in words)
            vectors[row, -1] = 0.1
        return _normalise(vectors)

    def embed_images(self, images: list[Image.Image]) -> torch.Tensor:
        vectors = np.zeros((len(images), self.dim))
        for row, image in enumerate(images):
            pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
            ink = pixels.min(axis=2) < 200
            vectors[row, -1] = 0.1
            if not ink.any():
                continue
            mean = pixels[ink].mean(axis=0)
            names = list(COLOR_RGB)
            nearest = min(names, key=lambda n: float(np.sum((np.array(COLOR_RGB[n]) - mean) ** 2)))
            vectors[row, names.index(nearest)] = 1.0
            ys, xs = np.nonzero(ink)
            fill = ink.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))
            shape = "square" if fill > 0.9 else "circle" if fill > 0.65 else "triangle"
            vectors[row, len(COLOR_RGB) + SHAPE_NAMES.index(shape)] = 1.0
        return _normalise(vectors)

    def score(self, images: list[Image.Image], texts: list[str]) -> torch.Tensor:
        return (self.embed_images(images) * self.embed_texts(texts)).sum(dim=1)


@dataclass(frozen=True)
class FakeHit:
    id: int
    path: str
    score: float
    width: int
    height: int
    caption: str | None
    size: int | None = None
    mtime_ns: int | None = None


class FakeIndex:
    """Exact search over the images of a directory, ids 100, 101, ... (not 0-based on purpose)."""

    def __init__(self, root: Path, embedder: FakeClip, names: list[str] | None = None):
        self.root = root
        self.clip_model_id = embedder.model_id
        self.dim = embedder.dim
        self.paths = names or sorted(p.name for p in root.glob("*.png"))
        images = [Image.open(root / name).convert("RGB") for name in self.paths]
        self.vectors = embedder.embed_images(images).numpy()
        self.ids = [100 + n for n in range(len(self.paths))]
        self.captions = [(root / n).with_suffix(".txt").read_text().splitlines()[0] for n in self.paths]
        self.sizes = [image.size for image in images]
        self.stats = [(root / name).stat() for name in self.paths]
        self.stale = False  # tests set it to say "changed on disk"
        self.flagged: list[int] = []  # ids the server found changed on disk

    def flag_changed(self, image_id: int) -> None:
        self.flagged.append(image_id)

    def is_stale(self) -> bool:
        return self.stale

    @property
    def count(self) -> int:
        return len(self.ids)

    def _hit(self, row: int, score: float) -> FakeHit:
        width, height = self.sizes[row]
        stat = self.stats[row]
        return FakeHit(self.ids[row], self.paths[row], score, width, height, self.captions[row],
                       stat.st_size, stat.st_mtime_ns)

    def search(self, vector: np.ndarray, k: int) -> list[FakeHit]:
        scores = self.vectors @ np.asarray(vector, dtype=np.float32)
        order = np.argsort(-scores, kind="stable")[:k]
        return [self._hit(int(row), float(scores[row])) for row in order]

    def get(self, image_id: int) -> FakeHit | None:
        if image_id not in self.ids:
            return None
        return self._hit(self.ids.index(image_id), 0.0)

    def vector(self, image_id: int) -> np.ndarray:
        return self.vectors[self.ids.index(image_id)]


class FakeGenerator:
    """'Samples' dataset images (seeded), reranks them with the fake CLIP, reports progress and a
    preview per image (the image with its lower half blank)."""

    max_num = 8
    image_size = 16
    grid_size = 4

    def __init__(self, root: Path, scorer: FakeClip, seconds_per_image: float = 0.02):
        self.images = [Image.open(p).convert("RGB") for p in sorted(root.glob("*.png"))]
        self.scorer = scorer
        self.seconds_per_image = seconds_per_image
        self.calls: list[dict] = []

    def _rerank(self, images, prompt, keep, seeds) -> JobOutput:
        scores = self.scorer.score(images, [prompt] * len(images))
        order = [int(i) for i in torch.argsort(scores, descending=True, stable=True)]
        return JobOutput([images[i] for i in order], [float(scores[i]) for i in order], "clip",
                         seeds=[seeds[i] for i in order], sample_indices=order, keep=keep)

    def _sample(self, images, control):
        for n, image in enumerate(images):
            time.sleep(self.seconds_per_image)
            half = image.copy()
            half.paste((228, 231, 236), (0, 8, 16, 16))
            control.preview([half], first=n, rows=2, grid_rows=4)
            control.progress(n + 1, len(images))

    def generate(self, prompt, *, num, keep, options, control):
        seed = options.seed
        self.calls.append(dict(prompt=prompt, num=num, keep=keep, guidance=options.guidance, seed=seed))
        if options.unseen_words != "drop":
            self.calls[-1]["unseen_words"] = options.unseen_words
        if "explode" in prompt:
            raise ValueError("prompt 'explode' has a word the tokenizer refuses")
        if "crash" in prompt:
            raise MemoryError("out of memory")
        images = [self.images[(seed + n) % len(self.images)] for n in range(num)]
        self._sample(images, control)
        return self._rerank(images, prompt, keep, [seed + n for n in range(num)])

    def prepare_edit(self, image, box):
        return image, box

    def prepare_image(self, image):
        return image

    def edit(self, image, box, prompt, *, num, keep, options, control):
        seed = options.seed
        self.calls.append(dict(prompt=prompt, box=box, num=num, keep=keep, seed=seed))
        words = prompt.split()
        color = next((COLOR_RGB[w] for w in words if w in COLOR_RGB), (0, 0, 0))
        images = []
        for n in range(num):
            edited = image.copy()
            edited.paste(color, box)
            images.append(edited)
        self._sample(images, control)
        return self._rerank(images, prompt, keep, [seed + n for n in range(num)])

    def complete(self, image, rows, prompt, *, num, keep, options, control):
        seed = options.seed
        self.calls.append(dict(prompt=prompt, rows=rows, num=num, keep=keep, seed=seed))
        images = []
        for n in range(num):
            completed = image.copy()
            completed.paste((0, 0, 0), (0, rows * 4, 16, 16))
            images.append(completed)
        self._sample(images, control)
        return self._rerank(images, prompt, keep, [seed + n for n in range(num)])


@pytest.fixture(scope="session")
def fake_clip() -> FakeClip:
    return FakeClip()


@pytest.fixture(scope="session")
def fake_index(shape_dataset, fake_clip) -> FakeIndex:
    return FakeIndex(shape_dataset, fake_clip)


@pytest.fixture(scope="session")
def make_fake_index():
    return FakeIndex


@pytest.fixture
def fake_generator(shape_dataset, fake_clip) -> FakeGenerator:
    return FakeGenerator(shape_dataset, fake_clip)


@pytest.fixture
def app(fake_index, fake_clip, fake_generator):
    return create_app(fake_index, fake_clip, fake_generator, ServeConfig(max_upload_bytes=64 * 1024))


BASE_URL = "http://localhost"  # the server answers loopback Host names only (security.py)


@pytest.fixture
def client(app):
    with TestClient(app, base_url=BASE_URL) as client:
        yield client


def wait_for_job(client: TestClient, url: str, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        body = client.get(url).json()
        if body["status"] in ("done", "failed", "cancelled") or time.monotonic() > deadline:
            return body
        time.sleep(0.02)


@pytest.fixture
def job_waiter():
    return wait_for_job


@contextlib.contextmanager
def _serving(app):
    """`app` served by uvicorn on a free port of 127.0.0.1 in a thread; yields its URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture
def serving():
    """A context manager: serving(app) runs `app` with uvicorn on a free loopback port, yields its URL."""
    return _serving


CHROMIUM = Path("/usr/bin/chromium")  # Debian's; the browser tests are skipped without it


@pytest.fixture
def page():
    """A Chromium page (Debian's, driven by Playwright) that records console errors in `page.problems`."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=str(CHROMIUM),
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"],
        )
        page = browser.new_page(viewport={"width": 1100, "height": 800})
        page.set_default_timeout(10_000)
        page.problems = []
        page.on("console", lambda m: m.type == "error" and page.problems.append(m.text))
        page.on("pageerror", lambda e: page.problems.append(str(e)))
        yield page
        browser.close()
