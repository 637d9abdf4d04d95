"""Shared fixtures: a tiny captioned dataset of coloured shapes and a tiny DALL-E run, seeded, made on the fly."""

from __future__ import annotations

import json
import random
import uuid
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

COLORS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (30, 60, 220), "yellow": (235, 200, 20)}
SHAPES = ("square", "circle", "triangle")


def draw_shape(shape: str, color: tuple[int, int, int], size: int = 16) -> Image.Image:
    image = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    m = size // 5
    box = (m, m, size - m - 1, size - m - 1)
    if shape == "square":
        draw.rectangle(box, fill=color)
    elif shape == "circle":
        draw.ellipse(box, fill=color)
    else:
        draw.polygon([(size // 2, m), (m, size - m - 1), (size - m - 1, size - m - 1)], fill=color)
    return image


def make_shape_dataset(root: Path, size: int = 16, copies: int = 2) -> Path:
    """Images of every (shape, colour) pair, `copies` each, with a sidecar .txt of two captions."""
    root.mkdir(parents=True, exist_ok=True)
    for shape in SHAPES:
        for color_name, rgb in COLORS.items():
            for k in range(copies):
                stem = root / f"{color_name}_{shape}_{k}"
                draw_shape(shape, rgb, size).save(stem.with_suffix(".png"))
                stem.with_suffix(".txt").write_text(f"a {color_name} {shape}\n{shape}, {color_name}\n")
    return root


VECTOR_STORES = ("faiss", "milvus-lite", "milvus-server")
# The test server seals segments and ticks sooner than Milvus's defaults (2 s and 200 ms): a flush
# takes ~0.5 s instead of ~3 s and a strongly consistent count 0.06 s instead of 0.5 s; its
# sessions live 10 s instead of 30, so a server restarted after a crash serves again in ~25 s
# instead of ~55 (it waits for the dead process's sessions to expire). Same code paths, same
# guarantees; the benchmarks run the defaults.
TEST_MILVUS_SETTINGS = {"dataCoord.segment.assignmentExpiration": 100, "proxy.timeTickInterval": 50,
                        "common.session.ttl": 10}


@pytest.fixture(scope="session")
def milvus_server(tmp_path_factory):
    """A Milvus standalone server (the `milvus` package's milvus-server) on free ports of
    127.0.0.1, its data in a temporary folder; started on first use, stopped after the last test."""
    from duomodal.search.milvus_server import LocalMilvusServer, milvus_server_installed

    pytest.importorskip("pymilvus", reason="install duomodal[milvus] to test the Milvus store")
    if not milvus_server_installed():
        pytest.skip("the Milvus server is not installed (pip install milvus; the dev extra installs it)")
    server = LocalMilvusServer(tmp_path_factory.mktemp("milvus-server"), TEST_MILVUS_SETTINGS)
    server.start()
    yield server
    server.stop(timeout=5)


def store_spec(request, kind: str, directory: Path):
    """The `--store` spec of a test index in `kind` of store (one of VECTOR_STORES), and a function
    that drops what it left in a server."""
    if kind == "faiss":
        return "faiss", lambda: None
    if kind == "milvus-lite":
        pytest.importorskip("milvus_lite", reason="install duomodal[milvus] to test the Milvus store")
        return f"milvus:{directory / 'vectors.db'}", lambda: None
    server = request.getfixturevalue("milvus_server")
    collection = f"test_{uuid.uuid4().hex[:16]}"

    def drop() -> None:
        from pymilvus import MilvusClient

        client = MilvusClient(uri=server.uri, dedicated=True)
        try:
            client.drop_collection(collection)
        finally:
            client.close()

    return server.spec(collection), drop


@pytest.fixture(params=VECTOR_STORES)
def vector_store(request, tmp_path):
    """The `--store` of an index under test: the same tests run on faiss, milvus-lite and a Milvus server."""
    spec, drop = store_spec(request, request.param, tmp_path)
    yield spec
    drop()


@pytest.fixture(scope="session")
def shape_dataset(tmp_path_factory) -> Path:
    """3 shapes x 4 colours x 2 copies = 24 images, 16x16, each with two captions."""
    return make_shape_dataset(tmp_path_factory.mktemp("shapes"))


@pytest.fixture(scope="session")
def dalle_run(tmp_path_factory, shape_dataset) -> Path:
    """A tiny untrained DALL-E run: 16 px images as a 4x4 token grid, its VAE and tokenizer."""
    from duomodal.config import to_dict
    from duomodal.modelfile import save_model
    from duomodal.models.dalle import CAPTION_WORDS_FILE, DALLE, DALLEConfig, vae_identity, words_of
    from duomodal.models.vae import DiscreteVAE, VAEConfig
    from duomodal.text.tokenizer import Tokenizer

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("dalle")
    vae_config = VAEConfig(image_size=16, n_downsample=2, width=8, max_width=16, res_blocks=0,
                           codebook_size=32, codebook_dim=8)
    vae = DiscreteVAE(vae_config)
    with torch.no_grad():  # codes that follow the picture, as in a trained VAE (not one code everywhere)
        vae.encoder.out.bias.zero_()
        vae.encoder.out.weight.mul_(10)
    save_model(root / "vae", "vae", to_dict(vae_config), vae.state_dict())
    captions = [p.read_text() for p in sorted(shape_dataset.glob("*.txt"))]
    tokenizer = Tokenizer.train(captions, vocab_size=64, min_frequency=1)
    config = DALLEConfig(text_seq_len=8, text_vocab_size=tokenizer.vocab_size, image_vocab_size=32,
                         image_grid_size=4, image_size=16, n_layer=2, n_head=2, n_embd=32,
                         vae_dir=str(root / "vae"), vae_id=vae_identity(root / "vae"))
    run = root / "run"
    save_model(run, "dalle", to_dict(config), DALLE(config).state_dict())
    tokenizer.save(run / "tokenizer.json")
    words = sorted({w for c in captions for w in words_of(tokenizer.normalize(c))})
    (run / CAPTION_WORDS_FILE).write_text(json.dumps(words))  # as training writes it: unseen words are known
    return run


@pytest.fixture(scope="session")
def tiny_clip_config():
    """The tests' CLIP: 16 px images in 4 px patches, both towers 2 layers of width 32, 32-d, vocab 64."""
    from duomodal.models.clip import ClipConfig

    return ClipConfig(image_size=16, patch_size=4, vision_width=32, vision_layers=2, vision_heads=2, text_width=32,
                      text_layers=2, text_heads=2, context_length=16, vocab_size=64, embed_dim=32)


@pytest.fixture(autouse=True)
def _seed_everything_and_use_one_thread():
    """Seeded, and one torch thread: tiny models gain nothing from two, and on a shared 2-core
    machine two threads per process spin against each other (a 1-layer sampler ran 7x slower)."""
    random.seed(0)
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
