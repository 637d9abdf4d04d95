"""The `duomodal` command line. The only place that prints for the user and exits.

Each area registers its subcommands in its own section below (``_add_*_commands``); a command
handler takes the parsed args and returns an exit status. Library code raises; `main` turns a
ValueError/OSError into one stderr line (set DUOMODAL_DEBUG=1 for the traceback).
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Sequence

from duomodal import __version__


def _error(message: str) -> None:
    print(f"duomodal: error: {message}", file=sys.stderr)


# --- data --------------------------------------------------------------------------------------


def _add_data_commands(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="check captioned-image datasets; build the icon dataset")
    data_sub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    _add_data_check(data_sub)
    _add_data_icons(data_sub)


def _add_data_check(data_sub: argparse._SubParsersAction) -> None:
    from duomodal.data.images import DEFAULT_MAX_PIXELS

    check = data_sub.add_parser(
        "check",
        help="scan a captioned-image folder and report what is wrong in it",
        description="Scan DIR (sub-folders too) for images (jpg, jpeg, png, webp, bmp, gif) and their "
        "captions (a sidecar .txt per image, or a captions.jsonl / captions.csv manifest with 'file' and "
        "'caption'), decode every image, and print one line per bad item (image without caption, caption "
        "without image, unreadable/corrupt/truncated or zero-byte file, image over the pixel limit, "
        "duplicate content) and a summary. Exit status 0 when at least one captioned image decodes "
        "(the dataset is usable), 1 when none does, 2 when DIR is not a folder.",
    )
    check.add_argument("dir", metavar="DIR", help="the dataset folder")
    check.add_argument(
        "--max-pixels",
        type=_positive_int,
        default=DEFAULT_MAX_PIXELS,
        metavar="N",
        help="refuse images whose header claims more pixels than this, before decoding "
        f"(decompression-bomb guard; default {DEFAULT_MAX_PIXELS})",
    )
    check.add_argument("--json", action="store_true", help="print the report as one JSON object instead")
    check.set_defaults(func=_data_check)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _data_check(args: argparse.Namespace) -> int:
    import json

    from duomodal.data.scan import check_dataset, report_lines

    report = check_dataset(args.dir, max_pixels=args.max_pixels, progress=sys.stderr.isatty())
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, ensure_ascii=False))
    else:
        print("\n".join(report_lines(report)))
    return 0 if report.usable else 1


def _add_data_icons(data_sub: argparse._SubParsersAction) -> None:
    p = data_sub.add_parser(
        "icons",
        help="build the icon dataset (Material Design Icons in a palette of colours)",
        description="Render the Material Design Icons (material-design-icons-pack) in a fixed palette "
        "of colours on white, with several captions per image and a held-out set of (icon, colour) "
        "pairs for testing compositional generalisation. Writes OUT/images/<icon>__<colour>.png, "
        "OUT/captions.jsonl and OUT/dataset.json. Re-running is idempotent; an interrupted build resumes.",
    )
    p.add_argument("out", metavar="OUT", help="output directory (created if needed)")
    p.add_argument("--size", type=int, default=128, help="image side in pixels (default: 128)")
    p.add_argument(
        "--colors", type=int, default=8,
        help="number of palette colours, the first K of red, green, blue, black, yellow, purple, "
        "orange, pink (default: 8)",
    )
    p.add_argument(
        "--heldout-fraction", type=float, default=0.05,
        help="fraction of (icon, colour) pairs kept out of training (default: 0.05)",
    )
    p.add_argument(
        "--val-fraction", type=float, default=0.05,
        help="fraction of the other images in the validation split, by path hash (default: 0.05)",
    )
    p.add_argument("--limit", type=int, default=None, help="only the first N icons by name (quick subsets)")
    p.add_argument("--include-deprecated", action="store_true", help="also render deprecated icons")
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out choice (default: 0)")
    p.add_argument(
        "--workers", type=int, default=None, help="rendering processes (default: up to 2, one per core)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--overwrite", action="store_true",
        help="rebuild OUT when it holds a dataset built with other options (otherwise an error)",
    )
    p.set_defaults(func=_cmd_data_icons)


def _cmd_data_icons(args: argparse.Namespace) -> int:
    from duomodal.data.icons import build_icon_dataset

    summary = build_icon_dataset(
        args.out,
        size=args.size,
        colors=args.colors,
        heldout_fraction=args.heldout_fraction,
        val_fraction=args.val_fraction,
        limit=args.limit,
        include_deprecated=args.include_deprecated,
        seed=args.seed,
        workers=args.workers,
        progress=not args.no_progress,
        overwrite=args.overwrite,
    )
    for line in summary["skipped"]:
        print(f"skipped {line}", file=sys.stderr)
    print(
        f"icon dataset in {summary['out']}: {summary['icons']} icons x {summary['colors']} colours = "
        f"{summary['images']} images of {summary['size']}x{summary['size']} px"
    )
    print(f"  splits: train {summary['train']}, val {summary['val']}, heldout {summary['heldout']}")
    print(
        f"  rendered {summary['rendered']}, reused {summary['reused']}, removed {summary['removed']}, "
        f"skipped {len(summary['skipped'])}; {summary['seconds']:.1f} s"
    )
    return 0 if summary["images"] > 0 else 1


# --- train ---------------------------------------------------------------------------------------


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
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1 ...")


def _resolve_run_config(cls: type, kind: str, args: argparse.Namespace):
    """The run config: dataclass defaults, then --preset, then each --set, in that order."""
    from duomodal.config import merge, override, preset

    config = cls()
    if args.preset:
        config = merge(config, preset(kind, args.preset))
    return override(config, args.overrides)


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _run_training(task, train_config, args: argparse.Namespace, run_config: dict | None = None) -> int:
    """Run the training loop for `task` into args.out and print a summary (rank 0 only)."""
    from pathlib import Path

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
    return 0


# --- vae -----------------------------------------------------------------------------------------


def _add_train_vae(train_sub: argparse._SubParsersAction) -> None:
    parser = train_sub.add_parser(
        "vae", help="train the discrete VAE (image <-> grid of codebook tokens)",
        description="Train the discrete VAE. Presets: quick (32 px, 8x8 grid, minutes on a CPU), "
        "seed (128 px, 512 codes, 16x16 grid). Run under `torchrun --nproc_per_node N` for DDP.",
    )
    _add_train_options(parser)
    parser.set_defaults(func=_cmd_train_vae)


def _cmd_train_vae(args: argparse.Namespace) -> int:
    from duomodal.config import to_dict
    from duomodal.train.vae_task import VAERunConfig, VAETask

    config = _resolve_run_config(VAERunConfig, "vae", args)
    run_config = {"kind": "vae", "data_dir": str(args.data), **to_dict(config)}
    return _run_training(VAETask(config, args.data), config.train, args, run_config)


def _add_vae_commands(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "reconstruct", help="encode images to VAE tokens and decode them back into a comparison grid",
        description="Originals (top rows) above their reconstructions through the VAE's codebook.",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a VAE run or model directory")
    parser.add_argument("images", metavar="IMAGES", nargs="+", help="image files")
    parser.add_argument("--out", required=True, help="grid picture to write (.png or .jpg)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, auto")
    parser.set_defaults(func=_cmd_reconstruct)


def _cmd_reconstruct(args: argparse.Namespace) -> int:
    from duomodal.data.images import ImageError, load_image
    from duomodal.models.vae import load_vae
    from duomodal.reconstruct import reconstruct, save_reconstruction_grid
    from duomodal.train.distributed import resolve_device

    vae = load_vae(args.run_dir, resolve_device(args.device))
    images, names = [], []
    for path in args.images:
        try:
            images.append(load_image(path))
            names.append(path)
        except ImageError as e:
            print(f"skipping {e}", file=sys.stderr)
    if not images:
        _error("none of the images could be read")
        return 1
    result = reconstruct(vae, images)
    save_reconstruction_grid(result, args.out)
    for name, value in zip(names, result.psnr):
        print(f"{value:6.2f} dB  {name}")
    mean = sum(result.psnr) / len(result.psnr)
    skipped = len(args.images) - len(images)
    print(f"wrote {args.out}: {len(images)} image(s), mean PSNR {mean:.2f} dB"
          + (f", skipped {skipped}" if skipped else ""))
    return 0


# --- dalle ---------------------------------------------------------------------------------------


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
    from dataclasses import replace

    from duomodal.config import to_dict
    from duomodal.train.dalle_task import DALLERunConfig, DALLETask

    config = _resolve_run_config(DALLERunConfig, "dalle", args)
    config = replace(config, vae=str(args.vae))
    task = DALLETask(config, args.data, args.out, resume=args.resume, show_progress=_is_main_process())
    run_config = {"kind": "dalle", "data_dir": str(args.data), **to_dict(task.config)}
    return _run_training(task, task.config.train, args, run_config)


def _add_sampling_options(parser: argparse.ArgumentParser, num: int, keep: int) -> None:
    parser.add_argument("--out", required=True, help="grid picture to write (.png); the kept images and a "
                        "JSON of prompt, seeds and scores are written beside it")
    parser.add_argument("--num", type=int, default=num, help=f"images to generate (default {num}, at most "
                        "1024)")
    parser.add_argument("--keep", type=int, default=None, help=f"best images to keep (default {keep}, or --num "
                        "when that is fewer)")
    parser.set_defaults(default_keep=keep)
    parser.add_argument("--clip", default=None, metavar="CLIP_DIR",
                        help="rerank with this CLIP model (duomodal or Hugging Face CLIP directory)")
    parser.add_argument("--temperature", type=float, default=1.0, help="softmax temperature; 0 = greedy")
    parser.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest image tokens")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1]")
    parser.add_argument("--guidance", type=float, default=1.0,
                        help="classifier-free guidance scale (1 = off; 2-4 follows the prompt more closely)")
    parser.add_argument("--seed", type=int, default=0, help="image i uses seed + i (default 0)")
    parser.add_argument("--batch-size", type=int, default=16, help="images sampled at once (default 16)")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                        help="auto: bf16 on CUDA, fp32 on the CPU (measured faster there)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda")


def _add_dalle_commands(sub: argparse._SubParsersAction) -> None:
    generate = sub.add_parser(
        "generate", help="generate images from a text prompt with a trained DALL-E",
        description="Sample --num images for the prompt (image i from seed + i), optionally rerank them "
        "with a CLIP model, keep the --keep best. Writes the grid to --out, each kept image beside it "
        "(<out>-01.png ...) and <out>.json with the prompt, seeds and scores.",
    )
    generate.add_argument("run_dir", metavar="RUN_DIR", help="a DALL-E run or model directory")
    generate.add_argument("prompt", metavar="PROMPT", help='e.g. "a red heart icon"')
    _add_sampling_options(generate, num=16, keep=8)
    generate.set_defaults(func=_cmd_generate)

    edit = sub.add_parser(
        "edit", help="regenerate a rectangle of an image for a prompt, keeping the rest",
        description="The tokens of the VAE cells that the box touches are sampled again (in raster order, "
        "each conditioned on the prompt and all tokens before it); everything outside keeps the original "
        "pixels. Without --clip the candidates are ranked by how well they fit the unchanged tokens after "
        "the box. A square image of another size is resized to the model's size (with a note; the box is "
        "in the original image's pixels); a non-square image is an error.",
    )
    edit.add_argument("run_dir", metavar="RUN_DIR", help="a DALL-E run or model directory")
    edit.add_argument("image", metavar="IMAGE", help="image file to edit")
    edit.add_argument("prompt", metavar="PROMPT", help="what the whole image should show")
    edit.add_argument("--box", required=True, metavar="X0,Y0,X1,Y1",
                      help="rectangle to regenerate, in pixels of IMAGE (x1, y1 exclusive)")
    _add_sampling_options(edit, num=8, keep=4)
    edit.set_defaults(func=_cmd_edit)


def _parse_box(text: str) -> tuple[int, int, int, int]:
    parts = text.split(",")
    try:
        values = tuple(int(p.strip()) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 4:
        raise ValueError(f"--box {text!r} must be four integers x0,y0,x1,y1 (pixels), e.g. --box 8,8,24,24")
    return values  # type: ignore[return-value]


def _load_dalle_for_cli(args: argparse.Namespace):
    """The model and scorer, after checking the counts, sampling options and prompt (errors come first)."""
    from duomodal.generate import check_counts, check_sampling, encode_prompt
    from duomodal.models.dalle import load_dalle
    from duomodal.train.distributed import resolve_device

    if args.keep is None:
        args.keep = min(args.default_keep, args.num) if args.num >= 1 else args.default_keep
    check_counts(args.num, args.keep, args.batch_size)
    check_sampling(args.temperature, args.top_k, args.top_p, args.guidance)
    device = resolve_device(args.device)
    dalle = load_dalle(args.run_dir, device)
    encode_prompt(dalle, args.prompt)
    _note_prompt(dalle, args.prompt)
    scorer = None
    if args.clip:
        from duomodal.models.clip import load_clip

        scorer = load_clip(args.clip, device)
    return dalle, scorer


def _note_prompt(dalle, prompt: str) -> None:
    from duomodal.generate import unseen_words

    unseen = unseen_words(dalle, prompt)
    if unseen:
        print(f"note: no training caption has the word(s) {', '.join(unseen)}; the model has not learnt them",
              file=sys.stderr)


def _write_generation(result, args: argparse.Namespace, extra: dict, first=None) -> None:
    import json
    import time
    from pathlib import Path

    import torch

    from duomodal.config import atomic_write_text
    from duomodal.data.images import save_grid, to_tensor

    out = Path(args.out)
    images = ([first] if first is not None else []) + list(result.images)
    size = max(image.size[0] for image in images)
    grid = torch.stack([to_tensor(image.convert("RGB"), size) for image in images])
    save_grid(grid, out, nrow=min(len(images), 8))
    entries = []
    for rank, (image, seed, index) in enumerate(zip(result.images, result.seeds, result.indices), start=1):
        path = out.with_name(f"{out.stem}-{rank:02d}.png")
        image.save(path)
        entries.append({"file": path.name, "seed": seed, "index": index,
                        "score": result.scores[rank - 1] if result.scores is not None else None})
    record = {
        "prompt": result.prompt, "run_dir": str(args.run_dir), "num": args.num, "keep": args.keep,
        "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, "guidance": args.guidance,
        "seed": args.seed, "clip": args.clip, "score_kind": result.score_kind, "images": entries,
        "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **extra,
    }
    atomic_write_text(out.with_suffix(".json"), json.dumps(record, indent=2) + "\n")


def _progress_bar(total: int, desc: str):
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit="img", file=sys.stderr, dynamic_ncols=True)

    def update(done: int, _total: int) -> None:
        bar.update(done - bar.n)

    return bar, update


def _cmd_generate(args: argparse.Namespace) -> int:
    import time

    from duomodal.generate import generate_images

    dalle, scorer = _load_dalle_for_cli(args)
    started = time.perf_counter()
    bar, update = _progress_bar(args.num, "generate")
    try:
        result = generate_images(
            dalle, args.prompt, num=args.num, keep=args.keep, scorer=scorer, temperature=args.temperature,
            top_k=args.top_k, top_p=args.top_p, guidance=args.guidance, seed=args.seed,
            batch_size=args.batch_size, progress=update, precision=args.precision,
        )
    finally:
        bar.close()
    seconds = time.perf_counter() - started
    _write_generation(result, args, {"seconds": round(seconds, 3)})
    scores = ""
    if result.scores is not None:
        scores = f"; CLIP scores {result.scores[0]:.3f} (best) to {result.scores[-1]:.3f}"
    print(f"wrote {args.out}: kept {len(result.images)} of {args.num} images in {seconds:.1f} s (seeds "
          f"{', '.join(map(str, result.seeds))}){scores}")
    return 0


def _cmd_edit(args: argparse.Namespace) -> int:
    import time

    from duomodal.data.images import load_image
    from duomodal.generate import edit_image

    box = _parse_box(args.box)
    dalle, scorer = _load_dalle_for_cli(args)
    image = load_image(args.image)
    S = dalle.config.image_size
    if image.size != (S, S):
        width, height = image.size
        if width != height:
            raise ValueError(f"{args.image} is {width}x{height} pixels; edit needs a square image (the model "
                             f"works on {S}x{S}): crop it to a square first")
        print(f"note: {args.image} is {width}x{height}; resized to {S}x{S} for the model (the box is scaled "
              "with it)", file=sys.stderr)
        x0, y0, x1, y1 = box
        if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
            raise ValueError(f"--box {args.box} must satisfy 0 <= x0 < x1 <= {width} and 0 <= y0 < y1 <= {height}")
        scale = S / width
        box = (int(x0 * scale), int(y0 * scale), max(int(x0 * scale) + 1, round(x1 * scale)),
               max(int(y0 * scale) + 1, round(y1 * scale)))
        image = image.resize((S, S), resample=3)  # bicubic
    started = time.perf_counter()
    bar, update = _progress_bar(args.num, "edit")
    try:
        result = edit_image(
            dalle, image, box, args.prompt, num=args.num, keep=args.keep, scorer=scorer,
            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, guidance=args.guidance,
            seed=args.seed, batch_size=args.batch_size, progress=update, precision=args.precision,
        )
    finally:
        bar.close()
    seconds = time.perf_counter() - started
    _write_generation(result, args, {"image": str(args.image), "box": list(box), "seconds": round(seconds, 3)},
                      first=image)
    print(f"wrote {args.out}: the image (first) and {len(result.images)} edit(s) of {args.num}, ranked by "
          f"{'CLIP score' if result.score_kind == 'scorer' else 'fit to the unchanged tokens'}, in {seconds:.1f} s")
    return 0


# --- clip ----------------------------------------------------------------------------------------


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
    from pathlib import Path

    from duomodal.config import to_dict
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


def _add_clip_commands(sub: argparse._SubParsersAction) -> None:
    from duomodal.classify import TEMPLATE_SETS

    parser = sub.add_parser(
        "classify", help="zero-shot classify images with a CLIP model and a list of labels",
        description="Each label is embedded through one or more prompt templates (averaged: prompt "
        "ensembling); each image gets the softmax over labels. True labels come from sub-folder names "
        "(DIR/<label>/image.png) or, with --label-field, a manifest field; then accuracy is printed "
        "and a confusion matrix PNG written.",
    )
    parser.add_argument("clip_dir", metavar="CLIP_DIR", help="duomodal CLIP run/model dir or Hugging Face CLIP dir")
    parser.add_argument("inputs", metavar="IMAGES_OR_DIR", nargs="+", help="image files and/or folders")
    parser.add_argument("--labels", default=None, help="comma-separated labels, e.g. red,green,blue")
    parser.add_argument("--labels-file", default=None, help="file with one label per line")
    parser.add_argument("--template", dest="templates", action="append", default=[],
                        help="prompt template with {} for the label, e.g. 'a {} icon' (repeatable)")
    parser.add_argument("--templates", dest="template_set", default=None, choices=sorted(TEMPLATE_SETS),
                        help="a built-in template set (added to any --template)")
    parser.add_argument("--top-k", type=int, default=5, help="labels shown per image (default 5)")
    parser.add_argument("--csv", default=None, help="write the predictions to this CSV file")
    parser.add_argument("--confusion", default=None,
                        help="confusion matrix PNG when true labels are known (default: confusion.png beside "
                        "--csv, else in the current folder)")
    parser.add_argument("--label-field", default=None,
                        help="read true labels from this manifest field of a dataset folder (e.g. color)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda")
    parser.set_defaults(func=_cmd_classify)

    clip = sub.add_parser("clip", help="CLIP utilities: export to Hugging Face format, evaluate on a dataset split")
    clip_sub = clip.add_subparsers(dest="clip_command", metavar="ACTION", required=True)
    export = clip_sub.add_parser(
        "export", help="write a duomodal CLIP as a Hugging Face CLIP directory",
        description="The directory loads with transformers' CLIPModel, AutoTokenizer and AutoImageProcessor.",
    )
    export.add_argument("run_dir", metavar="RUN_DIR", help="duomodal CLIP run or model directory")
    export.add_argument("hf_dir", metavar="HF_DIR", help="new directory to write")
    export.set_defaults(func=_cmd_clip_export)
    evaluate = clip_sub.add_parser(
        "eval", help="recall@1/5/10 and zero-shot accuracy of a CLIP model on a dataset split",
        description="Images of the split are paired with their first caption; recall counts a hit when "
        "a retrieved item has the same caption. Zero-shot accuracy is measured for each manifest label field "
        "over all of that field's values in the dataset.",
    )
    evaluate.add_argument("clip_dir", metavar="CLIP_DIR", help="duomodal CLIP run/model dir or Hugging Face CLIP dir")
    evaluate.add_argument("--data", required=True, help="dataset folder")
    evaluate.add_argument("--split", default="val", choices=["train", "val", "heldout"], help="default val")
    evaluate.add_argument("--templates", dest="template_set", default="icon", choices=sorted(TEMPLATE_SETS),
                          help="template set for zero-shot (default icon)")
    evaluate.add_argument("--limit", type=int, default=0, help="evaluate at most this many images (0 = all)")
    evaluate.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda")
    evaluate.set_defaults(func=_cmd_clip_eval)


def _resolve_labels(args: argparse.Namespace, known: list[str]) -> list[str]:
    from pathlib import Path

    from duomodal.classify import ClassifyError, parse_labels

    if args.labels and args.labels_file:
        raise ClassifyError("give --labels or --labels-file, not both")
    if args.labels:
        return parse_labels(args.labels.split(","))
    if args.labels_file:
        path = Path(args.labels_file)
        if not path.is_file():
            raise ClassifyError(f"labels file {path} does not exist")
        return parse_labels(path.read_text(encoding="utf-8").splitlines())
    if len(known) >= 2:
        return known
    raise ClassifyError("give the labels with --labels a,b,c or --labels-file FILE")


def _cmd_classify(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tqdm import tqdm

    from duomodal.classify import (
        classify_images,
        find_images,
        resolve_templates,
        save_confusion_png,
        write_predictions_csv,
    )
    from duomodal.models.clip import load_clip
    from duomodal.train.distributed import resolve_device

    images = find_images(args.inputs, args.label_field)
    labels = _resolve_labels(args, sorted({label for _, label in images if label is not None}))
    templates = resolve_templates(args.templates, args.template_set)
    embedder = load_clip(args.clip_dir, resolve_device(args.device))
    with tqdm(total=len(images), desc="classify", unit="image", file=sys.stderr, disable=len(images) < 256) as bar:
        result = classify_images(
            embedder, images, labels, templates, top_k=args.top_k,
            on_skip=lambda path, reason: print(f"skipping {path}: {reason}", file=sys.stderr),
            progress=bar.update,
        )
    for prediction in result.predictions:
        shown = ", ".join(f"{label} {p:.3f}" for label, p in prediction.top)
        truth = f"  (true: {prediction.true_label})" if prediction.true_label is not None else ""
        print(f"{prediction.path}: {shown}{truth}")
    print(f"classified {len(result.predictions)} image(s) over {len(labels)} labels with {len(templates)} "
          f"template(s); skipped {len(result.skipped)} unreadable")
    if args.csv:
        write_predictions_csv(result.predictions, args.csv)
        print(f"wrote {args.csv}")
    if result.accuracy is not None and result.confusion is not None:
        counted = int(result.confusion.sum())
        print(f"accuracy {result.accuracy:.4f} ({round(result.accuracy * counted)}/{counted} images with a known label)")
        confusion = args.confusion or str((Path(args.csv).parent if args.csv else Path(".")) / "confusion.png")
        save_confusion_png(result.confusion, labels, confusion, title=f"accuracy {result.accuracy:.3f}")
        print(f"wrote {confusion}")
    return 0 if result.predictions else 1


def _cmd_clip_export(args: argparse.Namespace) -> int:
    from duomodal.models.clip import export_hf

    path = export_hf(args.run_dir, args.hf_dir)
    print(f"wrote Hugging Face CLIP directory {path} (CLIPModel, tokenizer, image processor)")
    return 0


def _cmd_clip_eval(args: argparse.Namespace) -> int:
    import time

    from duomodal.classify import TEMPLATE_SETS, evaluate_records, label_classes_of
    from duomodal.data.records import filter_split, load_records
    from duomodal.models.clip import load_clip
    from duomodal.train.distributed import resolve_device

    records = load_records(args.data)
    chosen = filter_split(records, args.split)
    if args.limit > 0:
        chosen = chosen[: args.limit]
    if not chosen:
        _error(f"{args.data} has no images in the {args.split} split")
        return 1
    embedder = load_clip(args.clip_dir, resolve_device(args.device))
    started = time.perf_counter()
    figures = evaluate_records(
        embedder, chosen, label_classes_of(records), TEMPLATE_SETS[args.template_set],
        on_skip=lambda path, reason: print(f"skipping {path}: {reason}", file=sys.stderr),
    )
    print(f"{args.split}: {int(figures.pop('count'))} images ({int(figures.pop('skipped'))} skipped), "
          f"model {embedder.model_id}, {time.perf_counter() - started:.1f} s")
    for name, value in figures.items():
        print(f"  {name:<20} {value:.4f}")
    return 0


# --- search and serve --------------------------------------------------------------------------


def _add_search_commands(sub: argparse._SubParsersAction) -> None:
    index = sub.add_parser("index", help="build or update a searchable index of an image collection")
    index_sub = index.add_subparsers(dest="index_command", metavar="ACTION", required=True)
    build = index_sub.add_parser(
        "build",
        help="index the images under DIR (resumes an interrupted build; under torchrun, shards the work)",
    )
    build.add_argument("dir", metavar="DIR", help="directory of images (searched recursively)")
    build.add_argument("--clip", required=True, metavar="CLIP_DIR", help="CLIP model directory")
    build.add_argument("--out", required=True, metavar="INDEX_DIR", help="index directory to write")
    _add_index_options(build)
    build.set_defaults(func=_cmd_index_build)
    update = index_sub.add_parser("update", help="embed new/changed images, drop deleted ones, follow moves")
    update.add_argument("index_dir", metavar="INDEX_DIR")
    update.add_argument("--clip", metavar="CLIP_DIR", help="CLIP directory (default: the one recorded in the index)")
    _add_index_options(update, keep_recorded=True)
    update.set_defaults(func=_cmd_index_update)

    search = sub.add_parser("search", help="search an index by text, by image, or both")
    search.add_argument("index_dir", metavar="INDEX_DIR")
    search.add_argument(
        "query", nargs="?", default=None,
        help="text query; '-word' subtracts, 'W*words' weights a term: \"2*beach -people\"",
    )
    search.add_argument(
        "--image", action="append", default=None, metavar="[W*]PATH",
        help="query image (repeatable); a weight W may prefix the path, negative to subtract: -1*dog.jpg",
    )
    search.add_argument("-k", type=int, default=10, help="number of results (1 to 1000; default 10)")
    search.add_argument("--dedup", type=float, default=None, metavar="THRESHOLD",
                        help="group near-duplicate results whose cosine similarity >= THRESHOLD (e.g. 0.95)")
    search.add_argument("--json", action="store_true", help="print results as JSON")
    search.add_argument("--clip", metavar="CLIP_DIR", help="CLIP directory (default: the one recorded in the index)")
    search.add_argument("--device", default="cpu", help="device for the CLIP model (default cpu)")
    search.set_defaults(func=_cmd_search)


def _add_index_options(parser: argparse.ArgumentParser, keep_recorded: bool = False) -> None:
    default_note = "default: as recorded" if keep_recorded else "default: auto"
    parser.add_argument(
        "--index-type", choices=("auto", "flat", "hnsw", "ivf"), default=None if keep_recorded else "auto",
        help=f"faiss index: flat (exact), hnsw or ivf (approximate), auto = flat up to 50k images ({default_note})",
    )
    parser.add_argument("--batch-size", type=int, default=64, help="images per embedding batch (default 64)")
    parser.add_argument("--hnsw-m", type=int, default=None, help="hnsw graph degree (default 32)")
    parser.add_argument("--ef-construction", type=int, default=None, help="hnsw build width (default 80)")
    parser.add_argument("--ef-search", type=int, default=None, help="hnsw search width (default 128)")
    parser.add_argument("--nlist", type=int, default=None, help="ivf lists (default 4*sqrt(n))")
    parser.add_argument("--nprobe", type=int, default=None, help="ivf lists probed per query (default 32)")
    parser.add_argument("--device", default=None, help="device for CLIP (default: this rank's GPU if any, else cpu)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _search_load_clip(path: str, device: str | None):
    """The CLIP embedder at `path` (tests replace this to inject a small embedder)."""
    from duomodal.models.clip import load_clip

    return load_clip(path, device=device)


def _index_device(args: argparse.Namespace) -> str | None:
    if args.device:
        return args.device
    import torch

    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return "cpu"


def _index_options(args: argparse.Namespace, recorded: dict[str, str] | None):
    import dataclasses
    import json

    from duomodal.search.build import BuildOptions
    from duomodal.search.index import FaissParams

    changes = {
        "hnsw_m": args.hnsw_m,
        "hnsw_ef_construction": args.ef_construction,
        "hnsw_ef_search": args.ef_search,
        "ivf_nlist": args.nlist,
        "ivf_nprobe": args.nprobe,
    }
    changes = {k: v for k, v in changes.items() if v is not None}
    base = FaissParams(**json.loads(recorded.get("faiss_params", "{}"))) if recorded else FaissParams()
    index_type = args.index_type or (recorded or {}).get("index_type_option", "auto")
    return BuildOptions(index_type=index_type, batch_size=args.batch_size,
                        faiss=dataclasses.replace(base, **changes))


def _print_skip(path: str, reason: str) -> None:
    from tqdm import tqdm

    tqdm.write(f"skipped {path}: {reason}", file=sys.stderr)


def _print_build_report(report) -> None:
    if int(os.environ.get("RANK", "0")) != 0:
        return
    print(
        f"{report.index_dir}: {report.count} images ({report.index_type} index) in {report.seconds:.1f} s; "
        f"{report.embedded} embedded, {report.reused} reused, {report.moved} moved, {report.refreshed} refreshed, "
        f"{report.removed} removed, {report.unchanged} unchanged, {len(report.skipped)} skipped"
    )


def _cmd_index_build(args: argparse.Namespace) -> int:
    from duomodal.search.build import build_index

    options = _index_options(args, None)
    embedder = _search_load_clip(args.clip, _index_device(args))
    report = build_index(args.dir, args.out, embedder, clip_path=args.clip, options=options,
                         on_skip=_print_skip, progress=not args.quiet)
    _print_build_report(report)
    return 0


def _cmd_index_update(args: argparse.Namespace) -> int:
    from duomodal.search.build import update_index
    from duomodal.search.store import MetadataStore

    store = MetadataStore.open(args.index_dir)
    recorded = store.meta()
    store.close()
    clip = args.clip or recorded.get("clip_path")
    if not clip:
        raise ValueError(f"{args.index_dir} records no CLIP directory; pass --clip CLIP_DIR")
    options = _index_options(args, recorded)
    embedder = _search_load_clip(clip, _index_device(args))
    report = update_index(args.index_dir, embedder, options=options, on_skip=_print_skip, progress=not args.quiet)
    _print_build_report(report)
    return 0


def _parse_image_terms(values: list[str]) -> list[tuple[float, str]]:
    import re

    terms = []
    for value in values:
        match = re.fullmatch(r"(-?\d+(?:\.\d*)?|-?\.\d+)\*(.+)", value)
        weight, path = (float(match.group(1)), match.group(2)) if match else (1.0, value)
        if weight == 0.0:
            raise ValueError(f"--image {value!r} has weight 0; drop it or give a non-zero weight")
        terms.append((weight, path))
    return terms


def _cmd_search(args: argparse.Namespace) -> int:
    import json

    from duomodal.data.images import load_image
    from duomodal.search.dedup import check_threshold, search_grouped
    from duomodal.search.index import MAX_K, ImageIndex
    from duomodal.search.query import parse_query, query_vector

    if not 1 <= args.k <= MAX_K:
        raise ValueError(f"-k must be from 1 to {MAX_K}, got {args.k}")
    if args.dedup is not None:
        check_threshold(args.dedup)
    if args.query is None and not args.image:
        raise ValueError("give a text query, --image PATH, or both")
    texts = parse_query(args.query) if args.query is not None else []
    image_terms = _parse_image_terms(args.image or [])
    images = [(weight, load_image(path)) for weight, path in image_terms]
    with ImageIndex.open(args.index_dir) as index:
        clip = args.clip or index.clip_path
        if not clip:
            raise ValueError(f"{args.index_dir} records no CLIP directory; pass --clip CLIP_DIR")
        embedder = _search_load_clip(clip, args.device)
        index.check_model(embedder.model_id)
        vector = query_vector(embedder, texts, images)
        if args.dedup is not None:
            groups = [(g.hit, g.duplicates) for g in search_grouped(index, vector, args.k, args.dedup)]
        else:
            groups = [(hit, []) for hit in index.search(vector, args.k)]
        root = index.root

    def as_dict(hit) -> dict:
        return {"id": hit.id, "score": round(hit.score, 6), "path": hit.path, "file": str(root / hit.path),
                "width": hit.width, "height": hit.height, "caption": hit.caption}

    if args.json:
        results = []
        for rank, (hit, duplicates) in enumerate(groups, start=1):
            item = {"rank": rank, **as_dict(hit)}
            if args.dedup is not None:
                item["duplicates"] = [as_dict(d) for d in duplicates]
            results.append(item)
        print(json.dumps({"index": str(args.index_dir), "query": args.query, "images": [p for _, p in image_terms],
                          "results": results}, indent=2))
        return 0
    if not groups:
        print("no results (the index is empty)")
        return 0
    print(f"{'rank':>4}  {'score':>7}  path")
    for rank, (hit, duplicates) in enumerate(groups, start=1):
        extra = f"  (+{len(duplicates)} near-duplicate{'s' if len(duplicates) != 1 else ''})" if duplicates else ""
        print(f"{rank:>4}  {hit.score:>7.4f}  {root / hit.path}{extra}")
    return 0


def _add_serve_commands(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser(
        "serve",
        help="web page and REST API: search an index; generate images with a DALL-E run",
        description="Serve a web page (at /) and a REST API (OpenAPI schema at /openapi.json) that search "
        "INDEX_DIR by text, by an uploaded image or by an indexed image, and, with --dalle, generate "
        "images reranked by the CLIP and edit image regions.",
    )
    serve.add_argument("--index", required=True, metavar="INDEX_DIR", help="index made by `duomodal index build`")
    serve.add_argument("--clip", metavar="CLIP_DIR", help="CLIP directory (default: the one recorded in the index)")
    serve.add_argument("--dalle", metavar="RUN_DIR", help="DALL-E run directory: turns on /api/generate and /api/edit")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default 127.0.0.1; the API has no login, so expose it with care)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    serve.add_argument("--device", default=None, help="device for the models: cpu, cuda... (default: CUDA when available)")
    serve.add_argument("--max-generate", type=int, default=64, metavar="N",
                       help="most images one generation request may ask for (default 64)")
    serve.add_argument("--torch-threads", type=int, default=None, metavar="N",
                       help="CPU threads per torch operation (default: 1 without --dalle, since a query's tensors "
                       "are tiny and concurrent requests use the cores; torch's default with --dalle)")
    serve.set_defaults(func=_cmd_serve)


def _cmd_serve(args: argparse.Namespace) -> int:
    import functools

    from duomodal.search.index import ImageIndex
    from duomodal.serve.app import create_app

    if not 1 <= args.port <= 65535:
        raise ValueError(f"--port must be from 1 to 65535, got {args.port}")
    if args.max_generate < 1:
        raise ValueError(f"--max-generate must be at least 1, got {args.max_generate}")
    threads = args.torch_threads if args.torch_threads is not None else (None if args.dalle else 1)
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--torch-threads must be at least 1, got {threads}")
        import torch

        torch.set_num_threads(threads)
    index = ImageIndex.open(args.index)
    clip = args.clip or index.clip_path
    if not clip:
        raise ValueError(f"{args.index} records no CLIP directory; pass --clip CLIP_DIR")
    embedder = _search_load_clip(clip, args.device)
    index.check_model(embedder.model_id)
    generator = None
    if args.dalle:
        from duomodal.models.dalle import load_dalle
        from duomodal.serve.generator import DalleGenerator

        dalle = load_dalle(args.dalle, device=args.device)
        generator = DalleGenerator(dalle, scorer=embedder, max_num=args.max_generate)
    app = create_app(index, embedder, generator, reopen_index=functools.partial(ImageIndex.open, args.index))
    what = f"{index.count} images" + (" and generation" if generator else "")
    print(f"duomodal: serving {what} at http://{args.host}:{args.port}/ (Ctrl+C stops)", file=sys.stderr)
    _serve_run(app, args.host, args.port)
    return 0


def _serve_run(app, host: str, port: int) -> None:
    """Run the app until interrupted (tests replace this to get the app)."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="info")


# --- demo and eval -------------------------------------------------------------------------------


def _add_demo_commands(sub: argparse._SubParsersAction) -> None:
    from pathlib import Path

    from duomodal.demo import DEMO_SETUPS

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
    demo.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda...")
    demo.add_argument("--train-set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a training setting in all three trainers, e.g. train.steps=200, or in one: "
                      "dalle:model.n_layer=2 (repeatable)")
    demo.add_argument("--eval-prompts", type=_positive_int, metavar="N", help="prompts per split in the report")
    demo.add_argument("--no-serve", action="store_true", help="stop after the report instead of starting the web app")
    demo.add_argument("--host", default="127.0.0.1", help="web app address (default 127.0.0.1)")
    demo.add_argument("--port", type=int, default=8000, help="web app port (default 8000)")
    demo.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    import time

    from duomodal.config import save_json
    from duomodal.demo import DEMO_SETUPS, plan, serve_argv

    stages = plan(args.work, args.preset, args.device, args.limit, tuple(args.train_set), args.eval_prompts)
    print(f"duomodal demo ({args.preset}): {DEMO_SETUPS[args.preset].estimate}; everything goes to {args.work}",
          file=sys.stderr)
    timings_path = args.work / "timings.json"
    timings = {}
    if timings_path.is_file():
        import json

        timings = json.loads(timings_path.read_text(encoding="utf-8"))
    for number, stage in enumerate(stages, 1):
        header = f"[{number}/{len(stages)}] {stage.name}: {stage.what}"
        if stage.done:
            print(f"{header}: already done, reusing it", file=sys.stderr)
            continue
        print(f"{header}\n  $ duomodal {' '.join(stage.argv)}", file=sys.stderr)
        started = time.perf_counter()
        status = main(list(stage.argv))
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
    return main(serve_argv(args.work, args.host, args.port))


def _add_eval_commands(sub: argparse._SubParsersAction) -> None:
    from pathlib import Path

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
    ev.add_argument("--temperature", type=float, default=1.0, help="DALL-E sampling temperature; default 1")
    ev.add_argument("--top-k", type=_positive_int, default=None, help="sample among the K likeliest image tokens")
    ev.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold in (0, 1]")
    ev.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale; default 1 (off)")
    ev.add_argument("--device", help="cpu, cuda, cuda:1... (default: CUDA when available)")
    ev.set_defaults(func=_cmd_eval)


def _cmd_eval(args: argparse.Namespace) -> int:
    from duomodal.evaluate import EvalOptions, headline, run_evaluation

    options = EvalOptions(
        data=args.data, out=args.out, vae=args.vae, dalle=args.dalle, clip=args.clip, judge_clip=args.judge_clip,
        prompts=args.prompts, samples_per_prompt=args.samples_per_prompt, rerank_from=args.rerank_from,
        seed=args.seed, max_images=args.max_images, batch_size=args.batch_size, device=args.device,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, guidance=args.guidance,
    )
    result = run_evaluation(options, log=lambda message: print(message, file=sys.stderr))
    for what, value in headline(result.metrics):
        print(f"{what}: {value}")
    print(f"report: {result.paths['html']}")
    print(f"        {result.paths['markdown']}")
    print(f"metrics: {result.paths['metrics']}")
    return 0


# --- main ----------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="duomodal",
        description="Train your own small DALL-E and CLIP on captioned images, generate images "
        "from text, and search an image collection by what it shows.",
    )
    parser.add_argument("--version", action="version", version=f"duomodal {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_data_commands(sub)
    _add_train_commands(sub)
    _add_vae_commands(sub)
    _add_dalle_commands(sub)
    _add_clip_commands(sub)
    _add_search_commands(sub)
    _add_serve_commands(sub)
    _add_demo_commands(sub)
    _add_eval_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        _error("interrupted")
        return 130
    except (ValueError, OSError) as e:
        if os.environ.get("DUOMODAL_DEBUG"):
            traceback.print_exc()
        _error(str(e))
        return 2
