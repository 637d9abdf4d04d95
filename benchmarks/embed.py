"""CLIP embedding throughput: images/s and texts/s through ``ClipEmbedder`` (preprocessing included).

Two models with random weights: the ``quick`` preset's (what ``duomodal train clip --preset quick``
trains) and a ViT-B/32-sized config (224 px, 12+12 layers, 512-d embeddings: the size of the
pretrained CLIPs users bring). Run it under the heavy lock on a shared machine:

    flock /tmp/duomodal-heavy.lock .venv/bin/python benchmarks/embed.py
"""

from __future__ import annotations

import argparse
import random
import time

import torch
from PIL import Image

from duomodal.config import merge, preset
from duomodal.models.clip import (
    ClipConfig,
    ClipEmbedder,
    ContrastiveClip,
    duomodal_image_preprocessor,
    duomodal_text_encoder,
)
from duomodal.text.tokenizer import Tokenizer
from duomodal.train.clip_task import ClipRunConfig
from this_machine import auto_precision, print_header

VIT_B32 = ClipConfig(
    image_size=224, patch_size=32, vision_width=768, vision_layers=12, vision_heads=12,
    text_width=512, text_layers=12, text_heads=8, context_length=77, vocab_size=49408, embed_dim=512,
    hidden_act="quick_gelu",
)
COLORS = ("red", "green", "blue", "black", "yellow", "purple", "orange", "pink")
NAMES = ("heart outline", "arrow left", "account circle", "home", "star", "cloud upload", "bell ring", "cog")


def _captions(n: int, rng: random.Random) -> list[str]:
    return [f"a {rng.choice(COLORS)} {rng.choice(NAMES)} icon" for _ in range(n)]


def _images(n: int, size: int) -> list[Image.Image]:
    return [Image.effect_noise((size, size), 64).convert("RGB") for _ in range(n)]


def measure(name: str, config: ClipConfig, tokenizer: Tokenizer, images: int, texts: int, device: str,
            batch_size: int) -> None:
    torch.manual_seed(0)
    rng = random.Random(0)
    embedder = ClipEmbedder(
        ContrastiveClip.from_config(config), duomodal_text_encoder(tokenizer, config.context_length),
        duomodal_image_preprocessor(config), f"random:{name}", device=device, batch_size=batch_size,
    )
    pictures = _images(images, 64)
    captions = _captions(texts, rng)
    embedder.embed_images(pictures[:batch_size])  # warm-up
    embedder.embed_texts(captions[:batch_size])
    started = time.perf_counter()
    embedder.embed_images(pictures)
    image_rate = images / (time.perf_counter() - started)
    started = time.perf_counter()
    embedder.embed_texts(captions)
    text_rate = texts / (time.perf_counter() - started)
    params = sum(p.numel() for p in embedder.model.parameters()) / 1e6
    print(f"{name:<10} {params:7.1f}M params  {config.image_size:>3} px  images {image_rate:8.1f} /s   "
          f"texts {text_rate:8.1f} /s   (batch {batch_size}, {images} images, {texts} texts, {device})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--quick-items", type=int, default=2048, help="images and texts for the quick model")
    parser.add_argument("--b32-items", type=int, default=256, help="images and texts for the ViT-B/32-sized model")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rng = random.Random(0)
    tokenizer = Tokenizer.train(_captions(2000, rng), vocab_size=256)
    quick = merge(ClipRunConfig(), preset("clip", "quick")).model
    quick = ClipConfig(**{**quick.__dict__, "vocab_size": tokenizer.vocab_size})
    print_header(f"{auto_precision(args.device)} in ClipEmbedder", args.device)
    measure("quick", quick, tokenizer, args.quick_items, args.quick_items, args.device, args.batch_size)
    measure("ViT-B/32", VIT_B32, tokenizer, args.b32_items, args.b32_items, args.device, args.batch_size)


if __name__ == "__main__":
    main()
