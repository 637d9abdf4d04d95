"""DALL-E speedrun: two training recipes, the same wall-clock budget, the evaluation's own figures.

Each recipe is the `quick` preset plus `--set` overrides (`--baseline`, and one `--candidate` or more,
each a space-separated list of KEY=VALUE; a candidate may start with a label and a colon,
``"wsd: train.schedule=wsd"``). A recipe first runs a short probe (`--probe-steps`) to measure its
training speed on this machine; its run then gets as many steps as fit in `--minutes` of training at
that speed (the probe's least disturbed stretch, so other jobs on the machine do not shrink a budget),
so that its learning-rate schedule ends when the budget does. `--steps N` instead trains every recipe
N steps (for recipes whose steps cost the same: the machine's speed drifts between minutes, steps do
not) and draws the curves against steps. All recipes run back to back in one invocation (probes first,
then the runs), so they see the same machine.

For each recipe it prints: steps, images/s, val and held-out bits per image token (the training log's
last validation, over the same images for both), and from `duomodal eval` on held-out (icon, colour)
prompts with the default sampling (top-k 64, guidance 3): colour accuracy, the prompted icon's
template in the top 10, and its median rank among all icons. Then the training time at which the
candidate first reached the baseline's final val bits (linear between validations), and it writes
`OUT/speedrun.png` (val and held-out bits against training minutes) and `OUT/speedrun.json`.

    flock /tmp/duomodal-heavy.lock .venv/bin/python benchmarks/speedrun_dalle.py \
        --data work/icons-32 --vae work/vae-quick --out work/speedrun --minutes 2 \
        --baseline "" --candidate "train.optimizer=muon"
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from speedrun_common import (
    duomodal,
    metrics_rows,
    parse_recipes,
    percent,
    plot_curves,
    preset_batch_size,
    probe_rate,
    reach_time,
    run,
    set_args,
)
from this_machine import auto_precision, print_header

VALIDATIONS = 8  # validations over a run: the points of the quality-vs-minutes curve


def train_command(args: argparse.Namespace, overrides: list[str], run_dir: Path) -> list[str]:
    return duomodal("train", "dalle", "--data", str(args.data), "--vae", str(args.vae), "--out", str(run_dir),
                    "--preset", "quick", *set_args(overrides))


def train(args: argparse.Namespace, name: str, overrides: list[str], steps: int, out: Path) -> Path:
    run_dir = out / name
    every = max(1, steps // VALIDATIONS)
    schedule = [f"train.steps={steps}", f"train.val_every={every}", f"train.log_every={min(50, every)}",
                f"train.checkpoint_every={steps}", f"train.sample_every={steps}"]
    run(train_command(args, [*overrides, *schedule], run_dir), out / f"{name}.log")
    return run_dir


def curve(run_dir: Path) -> list[dict]:
    """(training seconds, val bits, held-out bits) at each validation, from the run's log."""
    points = []
    for row in metrics_rows(run_dir):
        if row.get("split") == "val" and "image_bits" in row:
            points.append({"step": row["step"], "seconds": row["train_s"], "val": row["image_bits"],
                           "heldout": row.get("heldout_image_bits")})
    return points


def evaluate(args: argparse.Namespace, run_dir: Path, out: Path) -> dict:
    report = out / f"{run_dir.name}-report"
    run(duomodal("eval", "--data", str(args.data), "--dalle", str(run_dir), "--out", str(report),
                 "--prompts", str(args.eval_prompts), "--samples-per-prompt", "4", "--top-k", "64",
                 "--guidance", "3", "--max-images", "512"), out / f"{run_dir.name}-eval.log")
    metrics = json.loads((report / "metrics.json").read_text())["dalle"]
    figures = {"eval_bits": {s: e.get("bits") for s, e in metrics["bits_per_image_token"].items()}}
    for split in ("heldout", "heldout_reworded"):
        entry = metrics["samples"].get(split, {})
        figures[split] = {
            "colour": entry.get("color_accuracy", {}).get("accuracy"),
            "shape_top10": entry.get("shape_match_top10", {}).get("accuracy"),
            "median_rank": entry.get("shape_median_rank"),
            "images": entry.get("images", 0),
        }
    return figures


def plot(results: dict[str, dict], path: Path, by_step: bool) -> None:
    plot_curves(results, path, (lambda p: p["step"]) if by_step else (lambda p: p["seconds"] / 60),
                [("val", "-o", "val"), ("heldout", "--", "held-out")],
                "training steps" if by_step else "training minutes (2 CPU cores)", "bits per image token")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="the 32 px icon dataset (duomodal data icons)")
    parser.add_argument("--vae", type=Path, required=True, help="the quick VAE run")
    parser.add_argument("--out", type=Path, required=True, help="folder for the runs, reports, plot and JSON")
    parser.add_argument("--minutes", type=float, default=2.0, help="training budget of each recipe (default 2)")
    parser.add_argument("--baseline", default="", help="overrides of the current recipe (default: the quick preset)")
    parser.add_argument("--candidate", action="append", required=True,
                        help="overrides of a candidate recipe, optionally 'LABEL: overrides'; repeat for more")
    parser.add_argument("--probe-steps", type=int, default=40, help="steps of each speed probe (default 40)")
    parser.add_argument("--steps", type=int, default=0,
                        help="train every recipe this many steps instead of probing (for recipes whose steps cost "
                        "the same); curves are then drawn against steps")
    parser.add_argument("--eval-prompts", type=int, default=50, help="held-out prompts evaluated (default 50)")
    args = parser.parse_args()
    print_header(f"{auto_precision()} for training, where a recipe does not set train.precision")
    args.out.mkdir(parents=True, exist_ok=True)
    recipes = parse_recipes(args.baseline, args.candidate)
    started = time.perf_counter()
    speed = {name: probe_rate(lambda o, d: train_command(args, o, d), overrides, args.probe_steps,
                              args.out / f"probe-{name}", args.out / f"probe-{name}.log", pick=max, lines=8)
             for name, overrides in recipes.items() if not args.steps}
    results = {}
    for name, overrides in recipes.items():
        steps = args.steps or max(1, round(args.minutes * 60 * speed[name] / preset_batch_size("dalle", overrides)))
        run_dir = train(args, name, overrides, steps, args.out)
        final = json.loads((run_dir / "result.json").read_text())
        results[name] = {"overrides": overrides, "steps": steps, "probe_images_per_s": speed.get(name),
                         "images_per_s": final["items_per_s"], "train_s": final.get("train_s"),
                         "curve": curve(run_dir),
                         **evaluate(args, run_dir, args.out)}
    target = results["baseline"]["curve"][-1]["val"]
    unit = "step" if args.steps else "seconds"
    for name in recipes:
        points = [{**p, "seconds": p[unit]} for p in results[name]["curve"]]
        results[name]["reaches_baseline_val_" + ("step" if args.steps else "s")] = reach_time(points, "val", target,
                                                                                            True)
    plot(results, args.out / "speedrun.png", bool(args.steps))
    (args.out / "speedrun.json").write_text(json.dumps(results, indent=2) + "\n")
    print((f"{args.steps} steps per recipe" if args.steps else f"budget {args.minutes:g} min of training per recipe")
          + f"; {time.perf_counter() - started:.0f} s in all")
    header = ("recipe", "steps", "img/s", "val bits", "held-out bits", "held-out: colour, shape top-10, median rank",
              "reworded: colour, shape top-10, median rank")
    print(" | ".join(header))
    for name, r in results.items():
        last = r["curve"][-1]
        print(" | ".join([name, str(r["steps"]), f"{r['images_per_s'] or r['probe_images_per_s'] or 0:.0f}",
                          f"{last['val']:.3f}", f"{last['heldout']:.3f}" if last["heldout"] else "n/a",
                          describe(r["heldout"]), describe(r["heldout_reworded"])]))
    for name in list(recipes)[1:]:
        reach = results[name]["reaches_baseline_val_" + ("step" if args.steps else "s")]
        when = (f"step {reach:.0f}" if args.steps else f"{reach / 60:.2f} min of training") if reach is not None \
            else "no point of its run"
        print(f"{name} reaches the baseline's final val bits ({target:.3f}) at {when}")
    for name, r in results.items():
        print(f"{name}: {' '.join(r['overrides']) or '(the quick preset)'}")
    print(f"wrote {args.out / 'speedrun.png'} and {args.out / 'speedrun.json'}")


def describe(figures: dict) -> str:
    rank = figures.get("median_rank")
    return f"{percent(figures.get('colour'))}, {percent(figures.get('shape_top10'))}, " + \
        ("n/a" if rank is None else f"{rank:g}")


if __name__ == "__main__":
    main()
