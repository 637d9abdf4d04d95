"""`duomodal demo`: the whole path of the seed post, as a plan of stages over one work folder.

dataset -> VAE -> DALL-E -> CLIP -> search index -> evaluation report (-> web app). Each stage is
a `duomodal` command line, so the demo does exactly what a user would type. A stage whose output
is complete is skipped; a training stage that stopped part-way resumes from its last checkpoint;
the dataset build and the index build resume on their own (and are no-ops when complete). The plan knows nothing of printing:
the CLI runs it and says what each stage is doing.

The quick demo runs by time: each training stage gets a share of the demo's budget (`--minutes`) as its
`duomodal train --minutes`, so a slower machine trains fewer steps in the same time and a faster one more.
The shares are fixed, so re-running an interrupted demo resumes a stage with the budget it was planned with.
A demo on few icons (`--limit`) lowers each trainer's batch to what its training split holds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from duomodal.config import preset as trainer_preset
from duomodal.train.checkpoints import list_checkpoints

TRAINER_KINDS = ("vae", "dalle", "clip")
# The quick demo's time budget in minutes, and each training stage's share of it (the dataset, index and
# report stages take the rest); measured on both kinds of 2-core CPU in docs/RESULTS.md.
DEMO_MINUTES = 13.5
DEMO_SHARES = {"vae": 0.055, "dalle": 0.5, "clip": 0.28}


@dataclass(frozen=True)
class DemoSetup:
    """Sizes of one demo preset."""

    image_size: int  # icon side in pixels
    icon_limit: int | None  # first N icons (sorted by name); None = all
    colors: int  # colours per icon
    train_preset: str  # the trainers' preset name
    overrides: dict[str, tuple[str, ...]]  # per trainer kind: --set assignments on top of the preset
    eval_prompts: int  # prompts per split in the report
    estimate: str  # what to tell the user before starting
    minutes: float | None = None  # the whole demo's time budget (--minutes); None = the presets' steps
    shares: dict[str, float] | None = None  # per trainer kind: its share of `minutes`; the rest is for the others


_ONLY_AT_THE_END = ("train.val_every=0", "train.sample_every=0")  # validation and samples after the last step

DEMO_SETUPS = {
    "quick": DemoSetup(
        image_size=32, icon_limit=None, colors=8, train_preset="quick", eval_prompts=16,
        # Budgets sized so that a 2-core CPU with AMX trains at least the steps of the step-based demo before
        # them (VAE 350, DALL-E 3,600, CLIP 700) and an AVX2-only one finishes within 15 minutes, install
        # included (docs/RESULTS.md); validation only at the end of each stage (and at step 0 when timing it),
        # on 512 images (the report evaluates the models itself; the whole split took 23 of the VAE's 44
        # seconds on a loaded machine). In the VAE's 45 seconds, batch 16 with warmup-stable-decay
        # reconstructs best (docs/vae.md).
        minutes=DEMO_MINUTES,
        shares=DEMO_SHARES,
        overrides={"vae": ("train.batch_size=16", "train.schedule=wsd", *_ONLY_AT_THE_END, "train.val_batches=32"),
                   "dalle": (*_ONLY_AT_THE_END, "train.val_batches=16"),
                   "clip": (*_ONLY_AT_THE_END, "train.val_batches=2")},
        estimate="about 14 minutes on a 2-core CPU, a few on a GPU",
    ),
    "seed": DemoSetup(
        image_size=128, icon_limit=None, colors=8, train_preset="seed", eval_prompts=32, overrides={},
        estimate="many hours on a CPU (the seed post's full setup); use a GPU, or --minutes",
        shares=DEMO_SHARES,
    ),
}


@dataclass(frozen=True)
class Stage:
    name: str  # short name: dataset, vae, dalle, clip, index, eval
    what: str  # one line for the user
    argv: tuple[str, ...]  # the duomodal command line that runs it
    done: bool  # its output is complete: skip it


def _training_stage(name: str, what: str, argv: list[str], run_dir: Path) -> Stage:
    result = run_dir / "result.json"
    if result.is_file():
        finished = json.loads(result.read_text(encoding="utf-8"))
        if finished.get("interrupted") is None:
            return Stage(name, what, tuple(argv), done=True)
    if run_dir.is_dir() and list_checkpoints(run_dir):
        return Stage(name, what + " (resuming)", (*argv, "--resume"), done=False)
    return Stage(name, what, tuple(argv), done=False)


def _train_items(data: Path) -> int | None:
    """The training split's size from a built icon dataset's dataset.json (None before it is built)."""
    path = data / "dataset.json"
    if not path.is_file():
        return None
    return int(json.loads(path.read_text(encoding="utf-8"))["counts"]["train"])


def _trainer_options(kind: str, setup: DemoSetup, budget: float | None, train_items: int | None,
                     train_overrides: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """A trainer's options after its data and run folders (the device left to the caller), and notes on
    what the demo chose: the preset, its share of the time `budget`, the overrides for it, and a batch
    lowered to what the training split's `train_items` hold."""
    assignments = []
    for assignment in (*setup.overrides.get(kind, ()), *train_overrides):
        target, _, rest = assignment.partition(":")
        if rest and "=" not in target:
            if target not in TRAINER_KINDS:
                raise ValueError(f"override {assignment!r}: {target!r} is not one of {', '.join(TRAINER_KINDS)}")
            if target != kind:
                continue
            assignment = rest
        assignments.append(assignment)
    given = {assignment.partition("=")[0].strip() for assignment in assignments}
    out, notes = ["--preset", setup.train_preset], []
    if budget is not None and setup.shares and not given & {"train.steps", "train.minutes"}:
        stage_minutes = f"{budget * setup.shares[kind]:.2f}".rstrip("0").rstrip(".")
        out += ["--minutes", stage_minutes]
        notes.append(f"{stage_minutes} minutes")
    batch = trainer_preset(kind, setup.train_preset)["train"]["batch_size"]
    if train_items is not None and "train.batch_size" not in given and 0 < train_items < batch:
        fitted = 2 ** (train_items.bit_length() - 1)  # the largest power of two the split holds
        assignments.append(f"train.batch_size={fitted}")
        notes.append(f"batch lowered from {batch} to {fitted}: the training split has {train_items} items")
    for assignment in assignments:
        out += ["--set", assignment]
    return out, notes


def plan(
    work: Path,
    preset: str = "quick",
    device: str = "auto",
    limit: int | None = None,
    train_overrides: tuple[str, ...] = (),
    eval_prompts: int | None = None,
    minutes: float | None = None,
) -> list[Stage]:
    """The demo's stages over the folder `work`, with what is already done marked.

    `train_overrides` (``key=value``) go to all three trainers, e.g. ``train.steps=200``; with a
    kind in front (``dalle:model.n_layer=2``) to that trainer only. `minutes` is the demo's time budget
    (default: the preset's); a trainer whose overrides fix train.steps or train.minutes keeps them. Planned
    again once the dataset is built, a trainer's batch is lowered to what the training split holds."""
    if preset not in DEMO_SETUPS:
        raise ValueError(f"unknown demo preset {preset!r}; presets: {', '.join(DEMO_SETUPS)}")
    if minutes is not None and not minutes > 0:
        raise ValueError(f"--minutes must be above 0, got {minutes:g}")
    setup = DEMO_SETUPS[preset]
    budget = minutes if minutes is not None else setup.minutes
    icon_limit = limit if limit is not None else setup.icon_limit
    data = work / "icons"
    runs = work / "runs"
    vae, dalle, clip = runs / "vae", runs / "dalle", runs / "clip"
    index, report = work / "index", work / "report"
    dev = ["--device", device]

    data_argv = ["data", "icons", str(data), "--size", str(setup.image_size), "--colors", str(setup.colors)]
    if icon_limit is not None:
        data_argv += ["--limit", str(icon_limit)]
    data_done = (data / "dataset.json").is_file() and (data / "captions.jsonl").is_file()
    stages = [Stage("dataset", f"icon dataset, {setup.image_size} px x {setup.colors} colours", tuple(data_argv), data_done)]

    train_items = _train_items(data)

    def training_stage(kind: str, what: str, inputs: list[str], run_dir: Path) -> Stage:
        extra, notes = _trainer_options(kind, setup, budget, train_items, train_overrides)
        extra += dev
        what = f"{what} ({'; '.join(notes)})" if notes else what
        return _training_stage(kind, what, ["train", kind, "--data", str(data), *inputs, "--out", str(run_dir),
                                            *extra], run_dir)

    stages.append(training_stage("vae", "discrete VAE", [], vae))
    stages.append(training_stage("dalle", "DALL-E transformer", ["--vae", str(vae)], dalle))
    stages.append(training_stage("clip", "CLIP", [], clip))

    # The index build is incremental: over a finished index it only rescans (no re-embedding).
    stages.append(Stage(
        "index", "search index over the icons",
        ("index", "build", str(data), "--clip", str(clip), "--out", str(index), "--quiet"),
        done=False,
    ))
    # the report samples as `duomodal generate` does by default (eval's defaults are the same
    # SamplingOptions): it shows what a user of the demo gets
    eval_argv = ["eval", "--data", str(data), "--vae", str(vae), "--dalle", str(dalle), "--clip", str(clip),
                 "--out", str(report), "--prompts", str(eval_prompts or setup.eval_prompts)]
    if device != "auto":
        eval_argv += ["--device", device]
    stages.append(Stage("eval", "evaluation report", tuple(eval_argv), (report / "metrics.json").is_file()))
    return stages


def serve_argv(work: Path, host: str, port: int) -> list[str]:
    return ["serve", "--index", str(work / "index"), "--clip", str(work / "runs" / "clip"),
            "--dalle", str(work / "runs" / "dalle"), "--host", host, "--port", str(port)]
