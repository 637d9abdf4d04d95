"""One DALL-E training step of the quick preset, timed per precision and attention kernel side by side:
where its time goes, and what fraction of the precision's matmul peak it reaches.

For the quick preset's model (or `--set` overrides of it) at its batch size, on random tokens, a step is
what the training loop does: forward + loss + backward under the precision's autocast, gradient
clipping, and the preset's optimizer step (Muon + AdamW: Muon's Newton-Schulz in the run's precision).
The variants: each precision this machine can use sensibly (fp32, and bf16 where it is native;
`--precisions fp32,bf16` asks for an emulated bf16 too) x attention kernel (eager, sdpa), and with
`--compile` the model under `torch.compile` in each precision with the kernel `auto` picks, its first
step (the compile, with empty caches as on a first run) timed apart. They run interleaved, round after
round, so that other load on the machine falls on all of them; each figure is the fastest of its rounds,
the median beside it. Then Muon's Newton-Schulz batched by shape against one matrix at a time, and what
`auto` picks beside the fastest.

The machine's fp32 and bf16 matmul peaks are measured at the start (this_machine.py). A step's model
FLOPs are counted from the matmuls (6 x parameters in matmuls x tokens, plus attention's 12 x layers x
L^2 x width per sequence), and "of peak" is model FLOPs per second over the peak of the variant's precision.

    flock /tmp/duomodal-heavy.lock .venv/bin/python benchmarks/step_dalle.py [--compile] [--precisions fp32,bf16]
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import torch

from duomodal.config import merge, override, preset
from duomodal.device import attention_kernel, resolve_device
from duomodal.models.dalle import DALLE, text_ids_with_padding, weighted_loss
from duomodal.train.recipe import build_optimizer
from step_common import (KERNELS, auto_line, autocast, cold_compile_cache, compile_line, interleaved, newton_schulz,
                         precisions_to_compare)
from this_machine import print_header, synchronize


def model_flops(model: DALLE, batch: int) -> float:
    """Matmul FLOPs of one training step (forward + backward = 3 x forward)."""
    c = model.config
    L = c.seq_len
    matmul_params = sum(p.numel() for n, p in model.named_parameters()
                        if p.ndim == 2 and ("blocks" in n or "head" in n))
    # per sequence: 2 FLOPs per parameter and token; attention scores and weighted sum 2 x 2 x L^2 x width
    forward = 2 * matmul_params * L + 4 * c.n_layer * L * L * c.n_embd
    return 3 * forward * batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="model.* / train.* overrides of the quick preset")
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds of every variant (default 15)")
    parser.add_argument("--precisions", default=None,
                        help="comma list (default: fp32, and bf16 where native; fp16 on CUDA without bf16)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile(model) in each precision")
    parser.add_argument("--device", default="auto", help="auto: CUDA where there is one, else cpu")
    args = parser.parse_args()

    from duomodal.train.dalle_task import DALLERunConfig

    device = resolve_device(args.device)
    precisions = precisions_to_compare(device, args.precisions)
    machine = print_header(f"{', '.join(precisions)} (one variant each)", device)
    run = override(merge(DALLERunConfig(), preset("dalle", "quick")), args.overrides)
    config = replace(run.model, image_vocab_size=512, image_grid_size=8, image_size=32)
    batch = run.train.batch_size
    torch.manual_seed(0)
    text = torch.randint(4, config.text_vocab_size, (batch, config.text_seq_len), device=device)
    image = torch.randint(0, 512, (batch, config.image_token_count), device=device)
    targets = text_ids_with_padding(text, config.text_pad_id, config.text_vocab_size)[:, 1:]

    def variant(precision: str, kernel: str, compiled: bool):
        torch.manual_seed(0)
        model = DALLE(replace(config, attention=kernel)).to(device).train()
        optimizer = build_optimizer(model, run.train, device, precision)
        net = torch.compile(model) if compiled else model

        def step() -> dict[str, float]:
            synchronize(device)
            started = time.perf_counter()
            with autocast(precision, device):
                text_logits, image_logits = net(text, image[:, :-1])
                loss, _, _ = weighted_loss(text_logits, image_logits, targets, image, 1.0, 7.0)
            loss.backward()
            synchronize(device)
            backward_done = time.perf_counter()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            synchronize(device)
            clipped = time.perf_counter()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            synchronize(device)
            done = time.perf_counter()
            return {"forward + backward": backward_done - started, "clipping": clipped - backward_done,
                    "optimizer": done - clipped, "step": done - started}

        return model, step

    steps, model = {}, None
    for precision in precisions:
        for kernel in KERNELS:
            model, steps[(precision, kernel, False)] = variant(precision, kernel, False)
        if args.compile:
            _, steps[(precision, attention_kernel("auto", device), True)] = variant(precision, "auto", True)
    with cold_compile_cache():  # the compile time of a first run (a no-op without --compile)
        times, first = interleaved(steps, args.rounds)

    flops = model_flops(model, batch)
    overrides = f" with {' '.join(args.overrides)}" if args.overrides else ""
    print(f"DALL-E quick model{overrides}, batch {batch}, {run.train.optimizer}, "
          f"{flops / 1e9:.1f} GFLOP of matmuls a step; {args.rounds} rounds interleaved, the fastest (median)")
    print("precision | attention | forward + backward ms | of peak | clipping ms | optimizer ms | step ms | "
          "images/s | of peak | speed vs fp32 eager")
    reference = min(times[("fp32", "eager", False)]["step"]) if ("fp32", "eager", False) in times else None
    for (precision, kernel, compiled), parts in times.items():
        fb, step = min(parts["forward + backward"]), min(parts["step"])
        peak = machine.peak(precision)
        versus = f"{reference / step:.2f}x" if reference else ""
        fb_median, step_median = statistics.median(parts["forward + backward"]), statistics.median(parts["step"])
        print(f"{precision} | {kernel}{' compiled' if compiled else ''} | {1000 * fb:.1f} ({1000 * fb_median:.1f}) | "
              f"{100 * flops / fb / peak:.1f}% | {1000 * min(parts['clipping']):.1f} | "
              f"{1000 * min(parts['optimizer']):.1f} | {1000 * step:.1f} ({1000 * step_median:.1f}) | "
              f"{batch / step:.0f} | {100 * flops / step / peak:.1f}% | {versus}")
    for (precision, kernel, compiled), seconds in first.items():
        if compiled:
            print(compile_line(f"{precision}, {kernel}", seconds, min(times[(precision, kernel, True)]["step"]),
                               min(times[(precision, kernel, False)]["step"])))
    for line in newton_schulz(model.hidden_matrices(), precisions, device, args.rounds):
        print(line)
    print(auto_line(device, {(p, k): min(parts["step"]) for (p, k, compiled), parts in times.items() if not compiled}))


if __name__ == "__main__":
    main()
