"""One CLIP training step of the quick preset, timed per precision and attention kernel, side by side.

A step is forward (both towers), the contrastive loss, backward and the optimizer step on one batch of
random pixels and caption-like token ids (no data loading: that is what `data.memory_cache_mb` removes
from the second epoch on). The four variants (fp32 / bf16 autocast x sdpa / eager attention) run
interleaved, round after round, so that other load on the machine falls on all of them; each figure is
the fastest of its rounds (the step's speed without other load) with the median beside it.

    flock /tmp/duomodal-heavy.lock .venv/bin/python benchmarks/step_clip.py [--batch 256] [--rounds 12]
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import torch

from duomodal.config import PRESETS, from_dict
from duomodal.models.clip import ContrastiveClip
from duomodal.train.clip_task import ClipRunConfig, pair_loss
from duomodal.train.recipe import TrainConfig, build_optimizer


def caption_ids(batch: int, vocab: int, generator: torch.Generator) -> torch.Tensor:
    """(B, 10) BOS, 4-8 word pieces, EOS, padding: the length of the icon captions."""
    ids = torch.zeros(batch, 10, dtype=torch.long)
    ids[:, 0] = 2
    for row in range(batch):
        length = int(torch.randint(4, 9, (), generator=generator))
        ids[row, 1 : 1 + length] = torch.randint(4, vocab, (length,), generator=generator)
        ids[row, 1 + length] = 3
    return ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--optimizer", default="muon", choices=["adamw", "muon"])
    args = parser.parse_args()
    config = from_dict(ClipRunConfig, PRESETS["clip"]["quick"]).model
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(args.batch, 3, config.image_size, config.image_size, generator=generator)
    ids = caption_ids(args.batch, config.vocab_size, generator)
    variants = {}
    for precision in ("fp32", "bf16"):
        for attention in ("sdpa", "eager"):
            torch.manual_seed(0)
            model = ContrastiveClip.from_config(replace(config, attention=attention)).train()
            optimizer = build_optimizer(model, TrainConfig(optimizer=args.optimizer), torch.device("cpu"))
            variants[(precision, attention)] = (model, optimizer)

    def step(precision: str, attention: str) -> float:
        model, optimizer = variants[(precision, attention)]
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = model(pixel_values=pixels, input_ids=ids)
            loss = pair_loss(out.image.float(), out.text.float(), out)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - started

    for key in variants:  # warm-up
        step(*key)
    times: dict[tuple[str, str], list[float]] = {key: [] for key in variants}
    for _ in range(args.rounds):
        for key in variants:
            times[key].append(step(*key))
    reference = min(times[("fp32", "sdpa")])
    print(f"CLIP quick preset, batch {args.batch}, {args.optimizer}, {torch.get_num_threads()} threads, "
          f"{args.rounds} rounds interleaved")
    print("precision | attention | fastest step (s) | median (s) | images/s | speed vs fp32 sdpa")
    for (precision, attention), values in times.items():
        fastest = min(values)
        print(f"{precision} | {attention} | {fastest:.3f} | {statistics.median(values):.3f} | "
              f"{args.batch / fastest:.0f} | {reference / fastest:.2f}x")


if __name__ == "__main__":
    main()
