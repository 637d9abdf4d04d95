"""Training speed of DALL-E: tokens per second and peak memory, fp32 vs bf16 autocast.

Setups: the `quick` and `seed` presets' models (at their VAE presets' token grids), and the size the
issue compares against (DALLE-pytorch 1.6.6 at dim 256, depth 4, 8 heads, 32 text + 256 image tokens,
batch 16: ~2,800 tokens/s on a machine like this one), and DALLE-pytorch itself at that size when it is
installed (see dalle_pytorch_ref.py; heads of 32 like duomodal's, its own loss), timed the same way in
the same run: the "vs it" column divides by it. One training step is what the training loop
does: autocast forward, the 1:7 weighted loss, backward, gradient clipping, AdamW. Tokens/s counts
text + image tokens of each sequence. Each setup runs in its own process, so "peak RSS" is that
process's resident peak (including ~0.3-0.5 GB of Python and torch); on CUDA it is the peak of
allocated GPU memory.

    flock /tmp/duomodal-heavy.lock .venv/bin/python benchmarks/train_dalle.py
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import subprocess
import sys
import time

import torch

from dalle_pytorch_ref import import_dalle_pytorch, reference_dalle
from duomodal.config import from_dict, presets
from duomodal.models.dalle import DALLE, DALLEConfig, text_ids_with_padding, weighted_loss
from this_machine import print_header

DALLE_PYTORCH_TRAINING = 2800.0  # tokens/s, dim 256, depth 4, 32 + 256 tokens, batch 16 (issue 4)


def setups() -> dict[str, tuple[DALLEConfig, int]]:
    """name -> (model config, batch size)."""
    found = {}
    for name, grid in (("quick", 8), ("seed", 16)):
        preset = presets("dalle").get(name)
        if preset is None:
            continue
        model = from_dict(DALLEConfig, {**preset.get("model", {}), "image_vocab_size": 512,
                                        "image_grid_size": grid, "image_size": grid * 4})
        found[name] = (model, int(preset.get("train", {}).get("batch_size", 64)))
    found["dalle-pytorch-size"] = (
        DALLEConfig(text_seq_len=32, text_vocab_size=1024, image_vocab_size=512, image_grid_size=16,
                    image_size=128, n_layer=4, n_head=8, n_embd=256), 16)
    return found


def measure(name: str, precision: str, device: str, steps: int) -> dict:
    if name == "dalle-pytorch":
        return measure_reference(precision, device, steps)
    config, batch = setups()[name]
    device_ = torch.device(device)
    torch.manual_seed(0)
    model = DALLE(config).to(device_).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device_.type == "cuda")
    T, N = config.text_seq_len, config.image_token_count
    text = torch.randint(4, config.text_vocab_size, (batch, T), device=device_)
    image = torch.randint(0, config.image_vocab_size, (batch, N), device=device_)
    autocast = (lambda: torch.autocast(device_.type, dtype=torch.bfloat16)) if precision == "bf16" \
        else contextlib.nullcontext
    if device_.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps + 2):
        start = time.perf_counter()
        with autocast():
            text_logits, image_logits = model(text, image[:, :-1])
            targets = text_ids_with_padding(text, config.text_pad_id, config.text_vocab_size)[:, 1:]
            loss, _, _ = weighted_loss(text_logits, image_logits, targets, image, 1.0, 7.0)
        optimizer.zero_grad(set_to_none=True)
        loss.float().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if device_.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    step_time = sorted(times[2:])[len(times[2:]) // 2]  # median after 2 warm-up steps
    peak = (torch.cuda.max_memory_allocated() if device_.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"setup": name, "precision": precision, "batch": batch, "seq_tokens": T + N,
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
            "tokens_per_s": batch * (T + N) / step_time, "image_tokens_per_s": batch * N / step_time,
            "step_s": step_time, "peak_mb": peak / 2**20}


def measure_reference(precision: str, device: str, steps: int) -> dict:
    """The same step for DALLE-pytorch's DALLE at the dalle-pytorch-size setup (its own 1:7 loss)."""
    classes = import_dalle_pytorch()
    if classes is None:
        raise SystemExit("DALLE-pytorch is not installed (see benchmarks/dalle_pytorch_ref.py)")
    device_ = torch.device(device)
    torch.manual_seed(0)
    model = reference_dalle(classes, 16).to(device_).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    batch, T, N = 16, 32, 256
    text = torch.randint(1, 1024, (batch, T), device=device_)
    image = torch.randint(0, 512, (batch, N), device=device_)
    autocast = (lambda: torch.autocast(device_.type, dtype=torch.bfloat16)) if precision == "bf16" \
        else contextlib.nullcontext
    times = []
    for _ in range(steps + 2):
        start = time.perf_counter()
        with autocast():
            loss = model(text, image, return_loss=True)
        optimizer.zero_grad(set_to_none=True)
        loss.float().backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if device_.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    step_time = sorted(times[2:])[len(times[2:]) // 2]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"setup": "dalle-pytorch", "precision": precision, "batch": batch, "seq_tokens": T + N,
            "params_m": sum(p.numel() for p in params) / 1e6,
            "tokens_per_s": batch * (T + N) / step_time, "image_tokens_per_s": batch * N / step_time,
            "step_s": step_time, "peak_mb": peak / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_setups = [*setups(), *(["dalle-pytorch"] if import_dalle_pytorch() is not None else [])]
    parser.add_argument("--setups", default=",".join(default_setups), help="comma-separated setups")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per figure (median)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--one", nargs=2, metavar=("SETUP", "PRECISION"), help=argparse.SUPPRESS)
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(measure(args.one[0], args.one[1], args.device, args.steps)))
        return
    print_header(f"{args.precisions.replace(',', ', ')} (one row each)", args.device)
    print(f"{'setup':>18} {'params':>7} {'batch':>5} {'seq':>4} {'precision':>9} {'tokens/s':>9} "
          f"{'img tok/s':>9} {'step ms':>8} {'peak MB':>8} {'vs 2,800':>8} {'vs it':>6}")
    names = args.setups.split(",")
    if "dalle-pytorch" in names and "dalle-pytorch-size" in names:  # the reference first, to compare against
        names.remove("dalle-pytorch")
        names.insert(0, "dalle-pytorch")
    rows, reference = [], {}
    for name in names:
        for precision in args.precisions.split(","):
            out = subprocess.run(
                [sys.executable, __file__, "--one", name, precision, "--device", args.device,
                 "--steps", str(args.steps), "--threads", str(args.threads)], capture_output=True, text=True, check=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(row)
            if name == "dalle-pytorch":
                reference[precision] = row["tokens_per_s"]
            constant = f"{row['tokens_per_s'] / DALLE_PYTORCH_TRAINING:.1f}x" if name == "dalle-pytorch-size" else ""
            versus = (f"{row['tokens_per_s'] / reference[precision]:.1f}x"
                      if name == "dalle-pytorch-size" and precision in reference else "")
            print(f"{name:>18} {row['params_m']:>6.1f}M {row['batch']:>5} {row['seq_tokens']:>4} {precision:>9} "
                  f"{row['tokens_per_s']:>9.0f} {row['image_tokens_per_s']:>9.0f} {row['step_s'] * 1000:>8.0f} "
                  f"{row['peak_mb']:>8.0f} {constant:>8} {versus:>6}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
