"""`duomodal train vae|dalle|clip`: the shared training options and the one training run."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from duomodal.cli.common import _is_main_process
from duomodal.config import merge, override, preset, to_dict


def _add_train_commands(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser("train", help="train a VAE, DALL-E or CLIP model (also under torchrun)")
    train_sub = train.add_subparsers(dest="model_kind", metavar="MODEL", required=True)
    _add_train_vae(train_sub)
    _add_train_dalle(train_sub)
    _add_train_clip(train_sub)


def _add_train_options(parser: argparse.ArgumentParser) -> None:
    """The options every `duomodal train KIND` shares."""
    parser.add_argument("--data", required=True, help="folder of captioned images (see `duomodal data check`)")
    parser.add_argument("--out", required=True, help="run directory: checkpoints, metrics, samples, final weights")
    parser.add_argument("--preset", default=None, help="named setup to start from: quick or seed")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set train.steps=2000 --set model.codebook_size=256 "
                        "(repeatable)")
    parser.add_argument("--minutes", type=float, default=None, metavar="M",
                        help="train for about M minutes of wall-clock time, data preparation included: a short probe "
                        "times this machine and fixes the steps (written to the run; same as --set train.minutes=M)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1 ...")


def _resolve_run_config(cls: type, kind: str, args: argparse.Namespace):
    """The run config: dataclass defaults, then --preset, then each --set, in that order."""
    config = cls()
    if args.preset:
        config = merge(config, preset(kind, args.preset))
    minutes = [] if args.minutes is None else [f"train.minutes={args.minutes!r}"]
    return override(config, [*args.overrides, *minutes])


def _run_training(task, train_config, args: argparse.Namespace, run_config: dict | None = None) -> int:
    """Run the training loop for `task` into args.out and print a summary (rank 0 only)."""
    # Imported here: the CLI builds its parser, and runs other commands, without loading torch
    from duomodal.train.loop import train

    result = train(task, train_config, Path(args.out), resume=args.resume, run_config=run_config,
                   device=args.device)
    if not _is_main_process():
        return 0
    if result["interrupted"]:
        print(
            f"interrupted ({result['interrupted']}) at step {result['step']}; checkpoint saved to "
            f"{result['checkpoint']}; continue with the same command plus --resume",
            file=sys.stderr,
        )
        return 130
    val = ", ".join(f"{k[4:]} {v:.4g}" for k, v in result.items() if k.startswith("val_"))
    print(
        f"trained {task.kind} for {result['step']} steps in {result['wall_time_s']:.0f} s "
        f"({result['items_per_s']:.0f} items/s, {result['world_size']} process(es), {result['precision']}); "
        f"final train loss {result['loss']:.4g}"
    )
    if val:
        print(f"validation: {val}")
    if result["dropped"]:
        print(f"skipped {result['dropped']} unreadable image(s) during training")
    print(f"run directory: {result['run_dir']} (weights, metrics.jsonl, samples/, loss.png)")
    plan = result["plan"]
    if plan is not None:
        revisions = plan.get("revisions", ())
        from duomodal.train.budget import StepPlan  # (torch-free module; the CLI starts without it)

        bought = StepPlan.from_dict(plan).first_steps
        revised = "".join(f", re-planned to {after} at step {at} as steps took {step_s:.3f} s"
                          for at, _, after, step_s in revisions)
        print(f"time budget: {plan['minutes']:g} minutes bought {bought} steps on this machine "
              f"({plan['step_s']:.3f} s a step in the probe{revised}); reached step {result['step']} in "
              f"{plan['before_s'] + result['wall_time_s']:.0f} s, {result['items_per_s']:.0f} images/s")
    return 0


def _add_train_vae(train_sub: argparse._SubParsersAction) -> None:
    parser = train_sub.add_parser(
        "vae", help="train the discrete VAE (image <-> grid of codebook tokens)",
        description="Train the discrete VAE. Presets: quick (32 px, 8x8 grid, minutes on a CPU), "
        "seed (128 px, 512 codes, 16x16 grid). Run under `torchrun --nproc_per_node N` for DDP.",
    )
    _add_train_options(parser)
    parser.set_defaults(func=_cmd_train_vae)


def _cmd_train_vae(args: argparse.Namespace) -> int:
    # Imported here: the CLI builds its parser, and runs other commands, without loading torch
    from duomodal.train.vae_task import VAERunConfig, VAETask

    config = _resolve_run_config(VAERunConfig, "vae", args)
    run_config = {"kind": "vae", "data_dir": str(args.data), **to_dict(config)}
    return _run_training(VAETask(config, args.data), config.train, args, run_config)


def _add_train_dalle(train_sub: argparse._SubParsersAction) -> None:
    parser = train_sub.add_parser(
        "dalle", help="train DALL-E (a transformer over caption + VAE image tokens) on a trained VAE",
        description="Train DALL-E on the tokens of a frozen VAE (encoded once, cached on disk and reused "
        "until the VAE or the images change). Presets: quick (32 px icons, minutes on a CPU), seed (128 px, "
        "512 codes, 32 text tokens). Validation: loss in bits per image token on the val and heldout splits; "
        "sample grids for fixed prompts in RUN_DIR/samples/. Run under `torchrun --nproc_per_node N` for DDP.",
    )
    _add_train_options(parser)
    parser.add_argument("--vae", required=True, help="trained VAE directory (`duomodal train vae` run)")
    parser.set_defaults(func=_cmd_train_dalle)


def _cmd_train_dalle(args: argparse.Namespace) -> int:
    # Imported here: the CLI builds its parser, and runs other commands, without loading torch
    from duomodal.train.dalle_task import DALLERunConfig, DALLETask

    config = _resolve_run_config(DALLERunConfig, "dalle", args)
    config = replace(config, vae=str(args.vae))
    task = DALLETask(config, args.data, args.out, resume=args.resume, show_progress=_is_main_process())
    run_config = {"kind": "dalle", "data_dir": str(args.data), **to_dict(task.config)}
    return _run_training(task, task.config.train, args, run_config)


def _add_train_clip(train_sub: argparse._SubParsersAction) -> None:
    parser = train_sub.add_parser(
        "clip", help="train a CLIP model (image and text encoders) from scratch",
        description="Train CLIP with the symmetric contrastive loss. Presets: quick (32 px, small ViT, "
        "minutes on a CPU), seed (64 px, wider). Validation: recall@1/5/10 both ways and zero-shot "
        "accuracy on each label field of the manifest. Run under `torchrun --nproc_per_node N` for DDP "
        "(features are gathered across processes: the global batch gives the negatives).",
    )
    _add_train_options(parser)
    parser.set_defaults(func=_cmd_train_clip)


def _cmd_train_clip(args: argparse.Namespace) -> int:
    # Imported here: the CLI builds its parser, and runs other commands, without loading torch
    from duomodal.text.tokenizer import Tokenizer
    from duomodal.train.clip_task import ClipRunConfig, ClipTask
    from duomodal.train.distributed import init_distributed, shutdown

    config = _resolve_run_config(ClipRunConfig, "clip", args)
    tokenizer = None
    if args.resume and (Path(args.out) / "tokenizer.json").is_file():
        tokenizer = Tokenizer.load(Path(args.out) / "tokenizer.json")
    info = init_distributed(args.device)  # joined before the task: every rank takes rank 0's tokenizer
    try:
        task = ClipTask(config, args.data, tokenizer=tokenizer)
        run_config = {"kind": "clip", "data_dir": str(args.data), **to_dict(task.config)}
        return _run_training(task, task.config.train, args, run_config)
    finally:
        shutdown(info)
