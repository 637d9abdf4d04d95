"""`duomodal demo`: the whole path of the seed post, as a plan of stages over one work folder.

dataset -> VAE -> DALL-E -> CLIP -> search index -> evaluation report (-> web app). Each stage is
a `duomodal` command line, so the demo does exactly what a user would type. A stage whose output
is complete is skipped; a training stage that stopped part-way resumes from its last checkpoint;
the dataset build and the index build resume on their own (and are no-ops when complete). The plan knows nothing of printing:
the CLI runs it and says what each stage is doing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from duomodal.models.sampling import DEFAULT_GUIDANCE, DEFAULT_TOP_K
from duomodal.train.checkpoints import list_checkpoints

TRAINER_KINDS = ("vae", "dalle", "clip")


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


DEMO_SETUPS = {
    "quick": DemoSetup(
        image_size=32, icon_limit=None, colors=8, train_preset="quick", eval_prompts=16,
        # VAE and CLIP train shorter than their presets' own runs so that the whole demo fits in ~14
        # minutes on 2 CPU cores (docs/RESULTS.md gives the figures of both); DALL-E gets its full quick
        # preset: shorter runs give colour blobs, not shapes.
        overrides={"vae": ("train.steps=350",),
                   "clip": ("train.steps=700", "train.val_every=350", "train.checkpoint_every=350")},
        estimate="about 14 minutes on 2 CPU cores, a few on a GPU",
    ),
    "seed": DemoSetup(
        image_size=128, icon_limit=None, colors=8, train_preset="seed", eval_prompts=32, overrides={},
        estimate="many hours on a CPU (the seed post's full setup); use a GPU",
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


def plan(
    work: Path,
    preset: str = "quick",
    device: str = "auto",
    limit: int | None = None,
    train_overrides: tuple[str, ...] = (),
    eval_prompts: int | None = None,
) -> list[Stage]:
    """The demo's stages over the folder `work`, with what is already done marked.

    `train_overrides` (``key=value``) go to all three trainers, e.g. ``train.steps=200``; with a
    kind in front (``dalle:model.n_layer=2``) to that trainer only."""
    if preset not in DEMO_SETUPS:
        raise ValueError(f"unknown demo preset {preset!r}; presets: {', '.join(DEMO_SETUPS)}")
    setup = DEMO_SETUPS[preset]
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

    def options(kind: str) -> list[str]:
        out = ["--preset", setup.train_preset]
        for assignment in (*setup.overrides.get(kind, ()), *train_overrides):
            target, _, rest = assignment.partition(":")
            if rest and "=" not in target:
                if target not in TRAINER_KINDS:
                    raise ValueError(f"override {assignment!r}: {target!r} is not one of {', '.join(TRAINER_KINDS)}")
                if target != kind:
                    continue
                assignment = rest
            out += ["--set", assignment]
        return out + dev

    stages.append(_training_stage(
        "vae", "discrete VAE", ["train", "vae", "--data", str(data), "--out", str(vae), *options("vae")], vae))
    stages.append(_training_stage(
        "dalle", "DALL-E transformer",
        ["train", "dalle", "--data", str(data), "--vae", str(vae), "--out", str(dalle), *options("dalle")], dalle))
    stages.append(_training_stage(
        "clip", "CLIP", ["train", "clip", "--data", str(data), "--out", str(clip), *options("clip")], clip))

    # The index build is incremental: over a finished index it only rescans (no re-embedding).
    stages.append(Stage(
        "index", "search index over the icons",
        ("index", "build", str(data), "--clip", str(clip), "--out", str(index), "--quiet"),
        done=False,
    ))
    # the report samples as `duomodal generate` does by default: it shows what a user of the demo gets
    eval_argv = ["eval", "--data", str(data), "--vae", str(vae), "--dalle", str(dalle), "--clip", str(clip),
                 "--out", str(report), "--prompts", str(eval_prompts or setup.eval_prompts),
                 "--top-k", str(DEFAULT_TOP_K), "--guidance", f"{DEFAULT_GUIDANCE:g}"]
    if device != "auto":
        eval_argv += ["--device", device]
    stages.append(Stage("eval", "evaluation report", tuple(eval_argv), (report / "metrics.json").is_file()))
    return stages


def serve_argv(work: Path, host: str, port: int) -> list[str]:
    return ["serve", "--index", str(work / "index"), "--clip", str(work / "runs" / "clip"),
            "--dalle", str(work / "runs" / "dalle"), "--host", host, "--port", str(port)]
