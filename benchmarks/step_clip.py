"""One CLIP training step of the quick preset, timed per precision and attention kernel, side by side.

A step is forward (both towers) under the precision's autocast, the contrastive loss, backward and the
optimizer step (Muon's Newton-Schulz in the run's precision) on one batch of random pixels and
caption-like token ids (no data loading: that is what `data.memory_cache_mb` removes from the second
epoch on). The variants: each precision this machine can use sensibly (fp32, and bf16 where it is
native; `--precisions fp32,bf16` asks for an emulated bf16 too) x attention kernel (eager, sdpa), and
with `--compile` the model under `torch.compile` in each precision with the kernel `auto` picks, its
first step (the compile, with empty caches as on a first run) timed apart. They run interleaved, round
after round, so that other load on the machine falls on all of them; each figure is the fastest of its
rounds (the step's speed without other load) with the median beside it. Then Muon's Newton-Schulz
batched by shape against one matrix at a time, and what `auto` picks beside the fastest. The machine
and its fp32 and bf16 matmul peaks come first (this_machine.py).

    flock /tmp/duomodal-heavy.lock .venv/bin/python benchmarks/step_clip.py [--batch 256] [--rounds 12] \
        [--precisions fp32,bf16] [--compile]
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import torch

from duomodal.config import from_dict, preset
from duomodal.device import attention_kernel, resolve_device
from duomodal.models.clip import ContrastiveClip
from duomodal.train.clip_task import ClipRunConfig, pair_loss
from duomodal.train.recipe import TrainConfig, build_optimizer
from step_common import (KERNELS, auto_line, autocast, cold_compile_cache, compile_line, interleaved, newton_schulz,
                         precisions_to_compare)
from this_machine import print_header, synchronize


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
    parser.add_argument("--rounds", type=int, default=12, help="timed rounds of every variant (default 12)")
    parser.add_argument("--optimizer", default="muon", choices=["adamw", "muon"])
    parser.add_argument("--precisions", default=None,
                        help="comma list (default: fp32, and bf16 where native; fp16 on CUDA without bf16)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile(model) in each precision")
    parser.add_argument("--device", default="auto", help="auto: CUDA where there is one, else cpu")
    args = parser.parse_args()
    device = resolve_device(args.device)
    precisions = precisions_to_compare(device, args.precisions)
    print_header(f"{', '.join(precisions)} (one variant each)", device)
    config = from_dict(ClipRunConfig, preset("clip", "quick")).model
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(args.batch, 3, config.image_size, config.image_size, generator=generator).to(device)
    ids = caption_ids(args.batch, config.vocab_size, generator).to(device)

    def variant(precision: str, kernel: str, compiled: bool):
        torch.manual_seed(0)
        model = ContrastiveClip.from_config(replace(config, attention=kernel)).to(device).train()
        optimizer = build_optimizer(model, TrainConfig(optimizer=args.optimizer), device, precision)
        net = torch.compile(model) if compiled else model

        def step() -> dict[str, float]:
            synchronize(device)
            started = time.perf_counter()
            with autocast(precision, device):
                out = net(pixel_values=pixels, input_ids=ids)
                loss = pair_loss(out.image.float(), out.text.float(), out)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            synchronize(device)
            return {"step": time.perf_counter() - started}

        return model, step

    steps, model = {}, None
    for precision in precisions:
        for kernel in KERNELS:
            model, steps[(precision, kernel, False)] = variant(precision, kernel, False)
        if args.compile:
            _, steps[(precision, attention_kernel("auto", device), True)] = variant(precision, "auto", True)
    with cold_compile_cache():  # the compile time of a first run (a no-op without --compile)
        times, first = interleaved(steps, args.rounds)

    reference = min(times[("fp32", "eager", False)]["step"]) if ("fp32", "eager", False) in times else None
    print(f"CLIP quick preset, batch {args.batch}, {args.optimizer}, {args.rounds} rounds interleaved")
    print("precision | attention | fastest step (s) | median (s) | images/s | speed vs fp32 eager")
    for (precision, kernel, compiled), parts in times.items():
        fastest = min(parts["step"])
        versus = f"{reference / fastest:.2f}x" if reference else ""
        print(f"{precision} | {kernel}{' compiled' if compiled else ''} | {fastest:.3f} | "
              f"{statistics.median(parts['step']):.3f} | {args.batch / fastest:.0f} | {versus}")
    for (precision, kernel, compiled), seconds in first.items():
        if compiled:
            print(compile_line(f"{precision}, {kernel}", seconds, min(times[(precision, kernel, True)]["step"]),
                               min(times[(precision, kernel, False)]["step"])))
    if args.optimizer == "muon":
        for line in newton_schulz(model.hidden_matrices(), precisions, device, args.rounds):
            print(line)
    print(auto_line(device, {(p, k): min(parts["step"]) for (p, k, compiled), parts in times.items() if not compiled}))


if __name__ == "__main__":
    main()
