"""Sampling speed of DALL-E: image tokens per second, KV-cached vs uncached, on the same model and batch.

The model is the size the issue compares against (DALLE-pytorch 1.6.6 at dim 256, depth 4, 8 heads,
32 text tokens): random weights, which cost the same to run as trained ones. For 64 (8x8) and 256
(16x16) image tokens per image it prints tokens/s of the cached sampler, of the uncached one (the
whole prefix recomputed every step), their ratio, and the cached figure against DALLE-pytorch:

- "DALLE-pytorch here": DALLE-pytorch 1.6.6's own `generate_images` timed in the same run on the same
  batch and threads (dim 256, depth 4, 8 heads of 32, 32 text tokens, 512 codes, its default top-k
  filter), best of its cached and uncached modes, its final VAE decode subtracted. Needs the package,
  which is not a duomodal dependency: see dalle_pytorch_ref.py for the one-line install.
- "vs 78": the issue's figure for DALLE-pytorch at batch 4 with 256 image tokens "on a machine like
  this one" (a constant, so it moves with this machine's load; the side-by-side ratio does not).

"fp32" and "bf16" are the weights' dtype while sampling (cast once, no autocast).

    flock /tmp/duomodal-heavy.lock .venv/bin/python benchmarks/generate.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from dalle_pytorch_ref import import_dalle_pytorch, reference_dalle
from duomodal.device import bf16_supported
from duomodal.models.dalle import DALLE, DALLEConfig
from duomodal.models.sampling import SamplingOptions, row_uniforms, sample_image_tokens
from this_machine import print_header

DALLE_PYTORCH_SAMPLING = 78.0  # image tokens/s at batch 4, dim 256, depth 4, 256 image tokens (issue 4)


def build(grid: int, device: torch.device) -> DALLE:
    torch.manual_seed(0)
    config = DALLEConfig(text_seq_len=32, text_vocab_size=1024, image_vocab_size=512, image_grid_size=grid,
                         image_size=grid * 8, n_layer=4, n_head=8, n_embd=256)
    return DALLE(config).to(device).eval()


def tokens_per_second(model: DALLE, batch: int, precision: str, use_cache: bool, repeats: int) -> float:
    N = model.config.image_token_count
    text = torch.randint(4, 1024, (batch, model.config.text_seq_len))
    uniforms = row_uniforms(list(range(batch)), N)
    options = SamplingOptions(top_k=64, guidance=1.0, precision=precision)  # no empty caption: no guidance
    sample_image_tokens(model, text, options, uniforms, use_cache=use_cache)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        if model.image_head.weight.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        sample_image_tokens(model, text, options, uniforms, use_cache=use_cache)
        if model.image_head.weight.is_cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return batch * N / best


def dalle_pytorch_tokens_per_second(classes, grid: int, batch: int, repeats: int) -> float:
    """DALLE-pytorch's generate_images, image tokens/s: the best of use_cache False/True, VAE decode excluded."""
    torch.manual_seed(0)
    model = reference_dalle(classes, grid).eval()
    vae = model.vae
    text = torch.randint(1, 1024, (batch, 32))
    best = float("inf")
    with torch.inference_mode():
        codes = torch.randint(0, 512, (batch, grid * grid))
        start = time.perf_counter()
        vae.decode(codes)
        decode = time.perf_counter() - start
        for use_cache in (False, True):
            for _ in range(repeats):
                start = time.perf_counter()
                model.generate_images(text, use_cache=use_cache)
                best = min(best, time.perf_counter() - start - decode)
    return batch * grid * grid / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grids", default="8,16", help="token grid sides (8 -> 64 tokens, 16 -> 256)")
    parser.add_argument("--batch-sizes", default="4,16", help="images sampled at once")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per figure (the best is kept)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    parser.add_argument("--no-dalle-pytorch", action="store_true", help="skip timing DALLE-pytorch itself")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    precisions = [p for p in args.precisions.split(",") if p == "fp32" or bf16_supported(device)]
    skipped = [p for p in args.precisions.split(",") if p not in precisions]
    print_header(", ".join(precisions) + (f" ({', '.join(skipped)} skipped: not native here)" if skipped else ""),
                 device)
    print("# model dim 256, depth 4, 8 heads, 32 text tokens, 512 codes, top-k 64")
    reference = None if args.no_dalle_pytorch else import_dalle_pytorch()
    if reference is None and not args.no_dalle_pytorch:
        print("# DALLE-pytorch is not installed: no side-by-side column (see this script's docstring)")
    print(f"{'image tokens':>12} {'batch':>5} {'precision':>9} {'cached tok/s':>12} {'uncached tok/s':>14} "
          f"{'ratio':>6} {'DALLE-pytorch here':>18} {'vs it':>6} {'vs 78':>6}")
    rows = []
    for grid in (int(g) for g in args.grids.split(",")):
        model = build(grid, device)
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            dp = None
            if reference is not None and device.type == "cpu":
                dp = dalle_pytorch_tokens_per_second(reference, grid, batch, 1)
            for precision in precisions:
                cached = tokens_per_second(model, batch, precision, True, args.repeats)
                uncached = tokens_per_second(model, batch, precision, False, 1)
                rows.append({"image_tokens": grid * grid, "batch": batch, "precision": precision,
                             "cached_tokens_per_s": cached, "uncached_tokens_per_s": uncached,
                             "ratio": cached / uncached, "dalle_pytorch_tokens_per_s": dp})
                versus = f"{cached / dp:>5.1f}x" if dp else f"{'':>6}"
                print(f"{grid * grid:>12} {batch:>5} {precision:>9} {cached:>12.0f} {uncached:>14.0f} "
                      f"{cached / uncached:>5.1f}x {dp or 0:>18.1f} {versus} "
                      f"{cached / DALLE_PYTORCH_SAMPLING:>5.1f}x", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
