"""Where a DALL-E training step's time goes, and what fraction of the machine's bf16 peak it reaches.

For the quick preset's model (or `--set` overrides of it) at its batch size, under bf16 autocast on the
CPU (as training runs there), it times in one process, each as the median of `--steps` steps after
warm-up: the forward + loss + backward, gradient clipping, and the optimizer step of each optimizer
asked for (AdamW, Muon + AdamW, and torch.optim.Muon's part alone, beside ours that orthogonalises
the matrices of one shape as a batch); with `--compile`, also the forward + backward of
`torch.compile(model)`. The machine's bf16 peak is measured in the same run as the best rate of a large
bf16 matmul (4096 x 4096 x 4096), and a step's model FLOPs are counted from the matmuls
(6 x parameters in matmuls x tokens, plus attention's 12 x layers x L^2 x width per sequence), so
"of peak" is model FLOPs per second over that peak.

    flock /tmp/duomodal-heavy.lock .venv/bin/python benchmarks/step_dalle.py --compile
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from duomodal.config import PRESETS, merge, override
from duomodal.models.dalle import DALLE, DALLEConfig, text_ids_with_padding, weighted_loss
from duomodal.train.recipe import TrainConfig, build_optimizer


def bf16_peak(size: int = 4096, repeats: int = 5) -> float:
    """FLOP/s of the best of `repeats` (size x size) @ (size x size) bf16 matmuls."""
    a = torch.randn(size, size, dtype=torch.bfloat16)
    b = torch.randn(size, size, dtype=torch.bfloat16)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def model_flops(model: DALLE, batch: int) -> float:
    """Matmul FLOPs of one training step (forward + backward = 3 x forward)."""
    c = model.config
    L = c.seq_len
    matmul_params = sum(p.numel() for n, p in model.named_parameters()
                        if p.ndim == 2 and ("blocks" in n or "head" in n))
    # per sequence: 2 FLOPs per parameter and token; attention scores and weighted sum 2 x 2 x L^2 x width
    forward = 2 * matmul_params * L + 4 * c.n_layer * L * L * c.n_embd
    return 3 * forward * batch


def median_time(fn, steps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="model.* / train.* overrides of the quick preset")
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile(model)")
    args = parser.parse_args()

    from duomodal.train.dalle_task import DALLERunConfig

    run = override(merge(DALLERunConfig(), PRESETS["dalle"]["quick"]), args.overrides)
    config = DALLEConfig(**{**run.model.__dict__, "image_vocab_size": 512, "image_grid_size": 8, "image_size": 32})
    batch = run.train.batch_size
    torch.manual_seed(0)
    model = DALLE(config).train()
    text = torch.randint(4, config.text_vocab_size, (batch, config.text_seq_len))
    image = torch.randint(0, 512, (batch, config.image_token_count))
    targets = text_ids_with_padding(text, config.text_pad_id, config.text_vocab_size)[:, 1:]

    def forward_backward(net: torch.nn.Module) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            text_logits, image_logits = net(text, image[:, :-1])
            loss, _, _ = weighted_loss(text_logits, image_logits, targets, image, 1.0, 7.0)
        loss.backward()

    peak = bf16_peak()
    flops = model_flops(model, batch)
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads; quick model {' '.join(args.overrides)}")
    print(f"bf16 matmul peak: {peak / 1e9:.0f} GFLOP/s; model FLOPs per step: {flops / 1e9:.1f} G (batch {batch})")
    fb = median_time(lambda: forward_backward(model), args.steps)
    clip = median_time(lambda: torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0), args.steps)
    rows = [("forward + backward", fb), ("gradient clipping", clip)]
    for name in ("adamw", "muon"):
        optimizer = build_optimizer(model, TrainConfig(optimizer=name, weight_decay=0.01), torch.device("cpu"))
        rows.append((f"{name} step", median_time(optimizer.step, args.steps)))
    # torch's own Muon on the same matrices (one Newton-Schulz per matrix), beside ours (batched by shape)
    reference = torch.optim.Muon(model.hidden_matrices(), lr=1e-3, weight_decay=0.01, adjust_lr_fn="match_rms_adamw")
    rows.append(("torch.optim.Muon part", median_time(reference.step, args.steps)))
    if args.compile:
        started = time.perf_counter()
        compiled = torch.compile(model)
        forward_backward(compiled)
        print(f"torch.compile: first step {time.perf_counter() - started:.0f} s")
        rows.append(("compiled forward + backward", median_time(lambda: forward_backward(compiled), args.steps)))
    print(f"{'part':>28} {'ms':>8} {'of peak':>8}")
    for name, seconds in rows:
        share = f"{100 * flops / seconds / peak:.1f}%" if "forward" in name else ""
        print(f"{name:>28} {seconds * 1000:>8.1f} {share:>8}")
    for name in ("adamw", "muon"):
        step = fb + clip + dict(rows)[f"{name} step"]
        print(f"whole step with {name}: {step * 1000:.1f} ms, {batch / step:.0f} images/s, "
              f"{100 * flops / step / peak:.1f}% of the bf16 peak")


if __name__ == "__main__":
    main()
