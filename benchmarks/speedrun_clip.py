"""CLIP speedrun: training recipes side by side, the same wall-clock budget, the evaluation's own figures.

Each recipe is the `quick` CLIP preset plus `--set` overrides (`--baseline`, and one `--candidate` or
more, each a space-separated list of KEY=VALUE, optionally after 'LABEL:'). A recipe first runs a short
probe (`--probe-steps`) to measure its training speed on this machine; its run then gets as many steps as
fit in `--minutes` of training at that speed, so that its learning-rate schedule ends when the budget
does. The recipes run back to back in one invocation (probes first, then the runs).

For each recipe it prints: steps, images/s, and from `duomodal clip eval` on the held-out (icon, colour)
images: zero-shot colour (with the training captions' wording, and with wordings they never use),
zero-shot icon top-1 / top-10 over all icon names (prompt-ensembled), and text->image recall@10 over the
whole split. Then the training time at which each candidate first reached the baseline's final val
text->image recall@10, and it writes `OUT/speedrun.png` (val recall@10 and zero-shot icon top-10 against
training minutes) and `OUT/speedrun.json`.

    flock /tmp/duomodal-heavy.lock .venv/bin/python benchmarks/speedrun_clip.py \
        --data work/icons-32 --out work/speedrun-clip --minutes 3 \
        --baseline "" --candidate "bf16: train.precision=bf16"
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from speedrun_common import duomodal, metrics_rows, parse_recipes, percent, preset_batch_size, probe_rate, plot_curves, \
    reach_time, run, set_args
from this_machine import auto_precision, print_header

VALIDATIONS = 5  # validations over a run: the points of the quality-vs-minutes curve
CURVE_KEYS = ("text_to_image_recall@10", "zero_shot_icon_top10")


def train_command(args: argparse.Namespace, overrides: list[str], run_dir: Path) -> list[str]:
    return duomodal("train", "clip", "--data", str(args.data), "--out", str(run_dir), "--preset", "quick",
                    "--device", "cpu", *set_args(overrides))


def train(args: argparse.Namespace, name: str, overrides: list[str], steps: int) -> Path:
    run_dir = args.out / name
    every = max(1, steps // VALIDATIONS)
    schedule = [f"train.steps={steps}", f"train.val_every={every}", f"train.log_every={min(25, every)}",
                f"train.checkpoint_every={steps}", f"train.sample_every={steps}"]
    run(train_command(args, [*overrides, *schedule], run_dir), args.out / f"{name}.log")
    return run_dir


def curve(run_dir: Path, seconds_per_step: float | None) -> list[dict]:
    """At each validation: the step, its training seconds at the probe's speed ("seconds"; what the run took
    on a quiet machine) and as measured ("train_s"; slower while other jobs share the cores), val
    recall@10 and val zero-shot icon top-10."""
    return [{"step": row["step"], "seconds": row["step"] * (seconds_per_step or 0.0), "train_s": row["train_s"],
             **{key: row.get(key) for key in CURVE_KEYS}}
            for row in metrics_rows(run_dir) if row.get("split") == "val" and CURVE_KEYS[0] in row]


def evaluate(args: argparse.Namespace, run_dir: Path) -> dict:
    figures = args.out / f"{run_dir.name}-eval.json"
    run(duomodal("clip", "eval", str(run_dir), "--data", str(args.data), "--split", "heldout", "--device", "cpu",
                 "--templates", "icon", "--templates", "unseen", "--json", str(figures)),
        args.out / f"{run_dir.name}-eval.log")
    return json.loads(figures.read_text())


def plot(results: dict[str, dict], path: Path) -> None:
    by_step = any(r.get("probe_images_per_s") is None for r in results.values())
    plot_curves(results, path, (lambda p: p["step"]) if by_step else (lambda p: p["seconds"] / 60),
                [(CURVE_KEYS[0], "-o", "val text->image R@10"), (CURVE_KEYS[1], "--", "val zero-shot icon top-10")],
                "training steps" if by_step else "training minutes at the probe's speed (2 CPU cores)",
                "share of val images", ylim=(0, 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="the 32 px icon dataset (duomodal data icons)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the runs, evaluations, plot and JSON")
    parser.add_argument("--minutes", type=float, default=3.0, help="training budget of each recipe (default 3)")
    parser.add_argument("--baseline", default="", help="overrides of the current recipe (default: the quick preset)")
    parser.add_argument("--candidate", action="append", default=[],
                        help="overrides of a candidate recipe, optionally 'LABEL: overrides'; repeat for more")
    parser.add_argument("--probe-steps", type=int, default=24, help="steps of each speed probe (default 24)")
    parser.add_argument("--steps", type=int, default=0,
                        help="train every recipe this many steps instead of probing (for recipes whose steps cost "
                        "the same: one model, one precision); curves are then drawn against steps")
    parser.add_argument("--replot", action="store_true",
                        help="train nothing: redo the curves, plot and table from OUT's runs and speedrun.json")
    args = parser.parse_args()
    if args.replot:
        results = json.loads((args.out / "speedrun.json").read_text())
        for name, r in results.items():
            rate = r.get("probe_images_per_s")
            r["curve"] = curve(args.out / name, preset_batch_size("clip", r["overrides"]) / rate if rate else None)
        summarise(args, results, None)
        return
    if not args.candidate:
        parser.error("give at least one --candidate (or --replot)")
    print_header(f"{auto_precision('cpu')} for training, where a recipe does not set train.precision", "cpu")
    args.out.mkdir(parents=True, exist_ok=True)
    recipes = parse_recipes(args.baseline, args.candidate)
    started = time.perf_counter()
    speed = {name: probe_rate(lambda o, d: train_command(args, o, d), overrides, args.probe_steps,
                              args.out / f"probe-{name}", args.out / f"probe-{name}.log", pick=max, lines=8)
             for name, overrides in recipes.items() if not args.steps}
    results = {}
    for name, overrides in recipes.items():
        batch = preset_batch_size("clip", overrides)
        steps = args.steps or max(1, round(args.minutes * 60 * speed[name] / batch))
        run_dir = train(args, name, overrides, steps)
        final = json.loads((run_dir / "result.json").read_text())
        results[name] = {"overrides": overrides, "steps": steps, "probe_images_per_s": speed.get(name),
                         "images_per_s": final["items_per_s"], "train_s": final.get("train_s"),
                         "curve": curve(run_dir, batch / speed[name] if name in speed else None),
                         "heldout": evaluate(args, run_dir)}
    summarise(args, results, time.perf_counter() - started)


def summarise(args: argparse.Namespace, results: dict[str, dict], seconds: float | None) -> None:
    """Reach times, plot, JSON and the printed table."""
    target = results["baseline"]["curve"][-1][CURVE_KEYS[0]]
    by_step = any(r.get("probe_images_per_s") is None for r in results.values())
    unit = "step" if by_step else "seconds"
    for r in results.values():
        reach = reach_time([{**p, "seconds": p[unit]} for p in r["curve"]], CURVE_KEYS[0], target, False)
        r["reaches_baseline_recall_" + ("step" if by_step else "s")] = reach
    plot(results, args.out / "speedrun.png")
    (args.out / "speedrun.json").write_text(json.dumps(results, indent=2) + "\n")
    print((f"{results['baseline']['steps']} steps per recipe" if by_step
           else f"budget {args.minutes:g} min of training per recipe at its probe's speed")
          + (f"; {seconds:.0f} s in all" if seconds is not None else ""))
    print("held-out (icon, colour) images; zero-shot over all icon names, prompt-ensembled")
    header = ("recipe", "steps", "probe img/s", "run img/s", "colour", "colour (unseen wording)", "icon top-1",
              "icon top-10", "icon top-10 (unseen wording)", "T->I R@10")
    print(" | ".join(header))
    for name, r in results.items():
        h = r["heldout"]
        probe = r.get("probe_images_per_s")
        print(" | ".join([name, str(r["steps"]), "n/a" if probe is None else f"{probe:.0f}", f"{r['images_per_s']:.0f}",
                          percent(h.get("zero_shot_color")), percent(h.get("unseen/zero_shot_color")),
                          percent(h.get("zero_shot_icon")), percent(h.get("zero_shot_icon_top10")),
                          percent(h.get("unseen/zero_shot_icon_top10")), percent(h.get("text_to_image_recall@10"))]))
    for name in list(results)[1:]:
        reach = results[name]["reaches_baseline_recall_" + ("step" if by_step else "s")]
        when = "no point of its run" if reach is None else (f"step {reach:.0f}" if by_step else f"{reach / 60:.2f} min")
        print(f"{name} reaches the baseline's final val text->image R@10 ({target:.3f}) after {when} of training")
    for name, r in results.items():
        print(f"{name}: {' '.join(r['overrides']) or '(the quick preset)'}")
    print(f"wrote {args.out / 'speedrun.png'} and {args.out / 'speedrun.json'}")


if __name__ == "__main__":
    main()
