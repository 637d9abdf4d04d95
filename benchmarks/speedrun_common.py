"""What the speedrun benchmarks share: running duomodal commands, reading a run's log, the recipes given on
the command line, speed probes, and the time at which a curve reaches a target."""

from __future__ import annotations

import json
import shlex
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path


def run(command: list[str], log: Path) -> None:
    """Run a command, its output to `log`; exit with the log's tail when it fails."""
    with open(log, "w") as f:
        done = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        tail = log.read_text().splitlines()[-20:]
        sys.exit(f"{' '.join(command)} failed ({done.returncode}); last lines of {log}:\n" + "\n".join(tail))


def duomodal(*args: str) -> list[str]:
    return [sys.executable, "-m", "duomodal", *args]


def metrics_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def set_args(overrides: list[str]) -> list[str]:
    return [item for s in overrides for item in ("--set", s)]


def parse_recipes(baseline: str, candidates: list[str]) -> dict[str, list[str]]:
    """{"baseline": overrides, label: overrides...}; a candidate may start with 'LABEL:'."""
    recipes = {"baseline": shlex.split(baseline)}
    for k, candidate in enumerate(candidates, start=1):
        label, _, overrides = candidate.rpartition(":") if ":" in candidate.split("=")[0] else ("", "", candidate)
        recipes[label.strip() or (f"candidate{k}" if len(candidates) > 1 else "candidate")] = shlex.split(overrides)
    return recipes


def probe_rate(train_command: Callable[[list[str], Path], list[str]], overrides: list[str], steps: int,
               run_dir: Path, log: Path, pick: Callable[[list[float]], float] = statistics.median,
               lines: int = 4) -> float:
    """Training items per second of a recipe: `pick` (the median; max: the least disturbed stretch) over
    a short run's `lines` train lines after the first.

    `train_command(overrides, run_dir)` is the full command that trains the recipe into `run_dir`."""
    every = max(1, steps // lines)
    probe = [*overrides, f"train.steps={steps}", f"train.log_every={every}", f"train.val_every={steps}",
             "train.val_batches=1", f"train.checkpoint_every={steps}", f"train.sample_every={steps}"]
    run(train_command(probe, run_dir), log)
    rates = [r["items_per_s"] for r in metrics_rows(run_dir) if r.get("split") == "train"][1:]
    return pick(rates)


def reach_time(points: list[dict], key: str, target: float, lower_is_better: bool) -> float | None:
    """Training seconds at which the curve's `key` first reaches `target`, linear between points."""
    previous = None
    for p in points:
        value = p[key]
        if (value <= target) if lower_is_better else (value >= target):
            if previous is None:
                return p["seconds"]
            fraction = (previous[key] - target) / (previous[key] - value or 1e-12)
            return previous["seconds"] + fraction * (p["seconds"] - previous["seconds"])
        previous = p
    return None


def preset_batch_size(kind: str, overrides: list[str]) -> int:
    """The recipe's batch size: its train.batch_size override, else the quick preset's."""
    from duomodal.config import preset

    for item in overrides:
        key, _, value = item.partition("=")
        if key.strip() == "train.batch_size":
            return int(value)
    return int(preset(kind, "quick")["train"]["batch_size"])


def percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def plot_curves(results: dict[str, dict], path: Path, x: Callable[[dict], float],
                series: list[tuple[str, str, str]], xlabel: str, ylabel: str,
                ylim: tuple[float, float] | None = None) -> None:
    """One colour per recipe, one line per (curve key, line style, label) of `series` (skipped when a
    point lacks it), against `x(point)`; written to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    colors = ("tab:gray", "tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple")
    for (name, r), color in zip(results.items(), colors):
        xs = [x(p) for p in r["curve"]]
        for key, style, label in series:
            if all(p.get(key) is not None for p in r["curve"]):
                ax.plot(xs, [p[key] for p in r["curve"]], style, color=color, ms=3, label=f"{name}: {label}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
