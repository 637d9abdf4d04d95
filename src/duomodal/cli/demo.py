"""`duomodal demo` (every stage in one command) and `duomodal eval` (the report)."""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

from duomodal.cli.common import _add_precision_option, _add_sampling_arguments, _error, _positive_int, _sampling_values
from duomodal.files import save_json


def _add_demo_commands(sub: argparse._SubParsersAction, run_command: Callable[[list[str]], int]) -> None:
    """`duomodal demo`, which runs its stages as the commands `run_command` (the CLI's `main`) runs."""
    # Imported here: the CLI builds its parser without torch, and duomodal.demo imports the trainers.
    from duomodal.demo import DEMO_MINUTES, DEMO_SETUPS

    demo = sub.add_parser(
        "demo",
        help="the whole path in one command: icon dataset, VAE, DALL-E, CLIP, index, report, web app",
        description="Build the icon dataset, train the VAE, DALL-E and CLIP, index the icons, write the "
        "evaluation report and start the web app. Re-running reuses finished stages and resumes an "
        "interrupted one.",
    )
    demo.add_argument("--work", type=Path, default=Path("work/demo"), help="folder for everything (default work/demo)")
    demo.add_argument("--preset", choices=sorted(DEMO_SETUPS), default="quick",
                      help="quick: 32 px, minutes on a CPU (default); seed: the post's 128 px setup, hours on a CPU")
    demo.add_argument("--limit", type=_positive_int, help="use only the first N icons (a smaller, faster demo)")
    demo.add_argument("--minutes", type=float, metavar="M",
                      help=f"the demo's time budget: each training stage trains for its share of M minutes "
                      f"(quick default {DEMO_MINUTES:g}; the seed preset trains its presets' steps unless given)")
    demo.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda...")
    demo.add_argument("--train-set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a training setting in all three trainers, e.g. train.steps=200, or in one: "
                      "dalle:model.n_layer=2 (repeatable)")
    demo.add_argument("--eval-prompts", type=_positive_int, metavar="N", help="prompts per split in the report")
    demo.add_argument("--no-serve", action="store_true", help="stop after the report instead of starting the web app")
    demo.add_argument("--host", default="127.0.0.1", help="web app address (default 127.0.0.1)")
    demo.add_argument("--port", type=int, default=8000, help="web app port (default 8000)")
    demo.set_defaults(func=functools.partial(_cmd_demo, run_command=run_command))


def _cmd_demo(args: argparse.Namespace, run_command: Callable[[list[str]], int]) -> int:
    # Imported here: the CLI builds its parser without torch, and duomodal.demo imports the trainers.
    from duomodal.demo import DEMO_SETUPS, plan, serve_argv

    def current_plan():  # planned again before each stage: a finished dataset stage tells the batch it holds
        return plan(args.work, args.preset, args.device, args.limit, tuple(args.train_set), args.eval_prompts,
                    args.minutes)

    stages = current_plan()
    print(f"duomodal demo ({args.preset}): {DEMO_SETUPS[args.preset].estimate}; everything goes to {args.work}",
          file=sys.stderr)
    timings_path = args.work / "timings.json"
    timings = {}
    if timings_path.is_file():
        timings = json.loads(timings_path.read_text(encoding="utf-8"))
    for number, name in enumerate([stage.name for stage in stages], 1):
        stage = next(s for s in current_plan() if s.name == name)
        header = f"[{number}/{len(stages)}] {stage.name}: {stage.what}"
        if stage.done:
            print(f"{header}: already done, reusing it", file=sys.stderr)
            continue
        print(f"{header}\n  $ duomodal {' '.join(stage.argv)}", file=sys.stderr)
        started = time.perf_counter()
        status = run_command(list(stage.argv))
        if status != 0:
            _error(f"demo stage {stage.name!r} failed (exit {status}); fix the cause and run the demo again "
                   "to resume from there")
            return status
        elapsed = time.perf_counter() - started
        resumed = "--resume" in stage.argv
        timings[stage.name] = round(elapsed + (timings.get(stage.name, 0.0) if resumed else 0.0), 1)
        save_json(timings, timings_path)
    total = sum(timings.values())
    print(f"demo: all stages done; time per stage (s): {timings}; total {total:.0f} s", file=sys.stderr)
    print(f"report: {args.work / 'report' / 'report.html'}")
    if args.no_serve:
        return 0
    print(f"web app: http://{args.host}:{args.port}/ (Ctrl-C to stop)")
    return run_command(serve_argv(args.work, args.host, args.port))


def _add_eval_commands(sub: argparse._SubParsersAction) -> None:
    # Imported here: the CLI builds its parser without torch (duomodal.models.sampling loads it)
    from duomodal.models.sampling import sampling_settings

    ev = sub.add_parser(
        "eval",
        help="measure the trained models on a dataset and write a report (Markdown, HTML, JSON, figures)",
        description="Evaluate whichever of --vae, --dalle, --clip are given on the dataset --data and write "
        "REPORT_DIR/report.md, report.html, metrics.json and PNG figures. Components not given are skipped.",
    )
    ev.add_argument("--data", type=Path, required=True, help="dataset folder (an icon dataset gives colour/shape labels)")
    ev.add_argument("--out", type=Path, required=True, metavar="REPORT_DIR", help="where the report goes")
    ev.add_argument("--vae", type=Path, help="VAE model or run directory")
    ev.add_argument("--dalle", type=Path, help="DALL-E run directory")
    ev.add_argument("--clip", type=Path, help="CLIP directory: the CLIP figures, and the reranker of DALL-E samples")
    ev.add_argument("--judge-clip", type=Path, help="an independent CLIP (not --clip) that judges the shape "
                    "of generated images; without it shape accuracy is reported as not measured")
    ev.add_argument("--prompts", type=_positive_int, default=16, metavar="N", help="prompts per split (train, held-out); default 16")
    ev.add_argument("--samples-per-prompt", type=_positive_int, default=4, metavar="M", help="images kept per prompt; default 4")
    ev.add_argument("--rerank-from", type=_positive_int, default=16, metavar="R",
                    help="images generated per prompt, of which CLIP reranking keeps the best M; default 16")
    ev.add_argument("--max-images", type=_positive_int, default=256, metavar="N",
                    help="at most N images per split for the VAE, likelihood and CLIP figures; default 256")
    ev.add_argument("--batch-size", type=_positive_int, default=32)
    ev.add_argument("--seed", type=int, default=0, help="seed of the prompt choice and the sampling; default 0")
    _add_sampling_arguments(ev, sampling_settings())  # DALL-E's, as `duomodal generate` samples by default
    ev.add_argument("--device", help="cpu, cuda, cuda:1... (default: CUDA when available)")
    _add_precision_option(ev, "DALL-E sampling and CLIP")
    ev.set_defaults(func=_cmd_eval)


def _cmd_eval(args: argparse.Namespace) -> int:
    # Imported here: the CLI builds its parser, and runs other commands, without loading torch
    from duomodal.evaluate import EvalOptions, headline, run_evaluation
    from duomodal.models.sampling import SamplingOptions, sampling_settings

    options = EvalOptions(
        data=args.data, out=args.out, vae=args.vae, dalle=args.dalle, clip=args.clip, judge_clip=args.judge_clip,
        prompts=args.prompts, samples_per_prompt=args.samples_per_prompt, rerank_from=args.rerank_from,
        seed=args.seed, max_images=args.max_images, batch_size=args.batch_size, device=args.device,
        sampling=SamplingOptions(**_sampling_values(args, sampling_settings())), precision=args.precision,
    )
    result = run_evaluation(options, log=lambda message: print(message, file=sys.stderr))
    for what, value in headline(result.metrics):
        print(f"{what}: {value}")
    print(f"report: {result.paths['html']}")
    print(f"        {result.paths['markdown']}")
    print(f"metrics: {result.paths['metrics']}")
    return 0
