"""`duomodal generate` and `duomodal edit`: sampling images from a trained DALL-E."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from duomodal.cli.common import _add_precision_option, _add_sampling_arguments, _progress_bar, _sampling_values
from duomodal.models.sampling import SAMPLING, SEED, SETTING, sampling_settings

# what `generate` and `edit` let the user choose (precision aside: its flag also covers CLIP)
SETTINGS = (*sampling_settings(SAMPLING, SEED), SETTING["batch_size"])


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
    _add_sampling_arguments(parser, SETTINGS)
    _add_precision_option(parser, "sampling and CLIP reranking")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda")


def _add_dalle_commands(sub: argparse._SubParsersAction) -> None:
    generate = sub.add_parser(
        "generate", help="generate images from a text prompt with a trained DALL-E",
        description="Sample --num images for the prompt (image i from seed + i), optionally rerank them "
        "with a CLIP model, keep the --keep best. Writes the grid to --out, each kept image beside it "
        "(<out>-01.png ...) and <out>.json with the prompt, seeds and scores. With --prime IMAGE --prime-rows R "
        "each image keeps the first R rows of IMAGE's VAE tokens and samples the rest (image completion); "
        "IMAGE is shown first in the grid.",
    )
    generate.add_argument("run_dir", metavar="RUN_DIR", help="a DALL-E run or model directory")
    generate.add_argument("prompt", metavar="PROMPT", help='e.g. "a red heart icon"')
    _add_sampling_options(generate, num=16, keep=8)
    generate.add_argument("--prime", default=None, metavar="IMAGE",
                          help="complete this image: keep its top --prime-rows token rows, sample the rest "
                          "(fitted to the model as training saw images: the centre square, resized)")
    generate.add_argument("--prime-rows", type=int, default=None, metavar="R",
                          help="token rows of --prime to keep, from 1 to the token grid's rows - 1")
    generate.set_defaults(func=_cmd_generate)

    edit = sub.add_parser(
        "edit", help="regenerate a rectangle of an image for a prompt, keeping the rest",
        description="The tokens of the VAE cells that the box touches are sampled again (in raster order, "
        "each conditioned on the prompt and all tokens before it); everything outside keeps the original "
        "pixels. Without --clip the candidates are ranked by how well they fit the unchanged tokens after "
        "the box. An image of another size is fitted to the model as training saw images: its centre square, "
        "resized (with a note; the box is in the original image's pixels and moves with it).",
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
    return values


def _model_image(path: str, size: int, box=None, note: str = ""):
    """The image at `path` fitted to the model's `size` (duomodal.generate.fit_to_model, with a note
    when that changes it), and `box` moved with it (checked against the image first)."""
    # Imported here: the CLI starts without loading torch, faiss or FastAPI (lazy by design)
    from duomodal.data.images import load_image
    from duomodal.generate import fit_to_model

    image = load_image(path)
    width, height = image.size
    if box is not None:
        x0, y0, x1, y1 = box
        if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
            raise ValueError(f"box {x0},{y0},{x1},{y1} must satisfy 0 <= x0 < x1 <= {width} and "
                             f"0 <= y0 < y1 <= {height} (pixels of {path})")
    if (width, height) != (size, size):
        what = "resized" if width == height else "its centre square resized"
        print(f"note: {path} is {width}x{height}; {what} to {size}x{size} for the model{note}", file=sys.stderr)
    return fit_to_model(image, size, box)


def _load_dalle_for_cli(args: argparse.Namespace):
    """The DALL-E run, the scorer and the sampling options, after checking the counts, sampling options and
    prompt (errors come before the slow loading)."""
    # Imported here: the CLI starts without loading torch, faiss or FastAPI (lazy by design)
    from duomodal.device import resolve_device
    from duomodal.generate import check_counts, encode_prompt
    from duomodal.models.dalle import load_dalle
    from duomodal.models.sampling import SamplingOptions

    if args.keep is None:
        args.keep = min(args.default_keep, args.num) if args.num >= 1 else args.default_keep
    check_counts(args.num, args.keep)
    options = SamplingOptions(**_sampling_values(args, SETTINGS), precision=args.precision)
    device = resolve_device(args.device)
    run = load_dalle(args.run_dir, device)
    encode_prompt(run, args.prompt, options.unseen_words)
    _note_prompt(run, args.prompt, options.unseen_words)
    scorer = None
    if args.clip:
        # lazy: only a reranked run loads CLIP
        from duomodal.models.clip import load_clip

        scorer = load_clip(args.clip, device, args.precision)
    return run, scorer, options


def _note_prompt(run, prompt: str, unseen_mode: str) -> None:
    # Imported here: the CLI starts without loading torch, faiss or FastAPI (lazy by design)
    from duomodal.generate import conditioning_text, unseen_words

    unseen = unseen_words(run, prompt)
    if not unseen:
        return
    note = f"note: no training caption has the word(s) {', '.join(unseen)}; the model has not learnt them"
    text = conditioning_text(run, prompt)
    if unseen_mode == "drop" and text != prompt:
        note += f": left out, the model reads {text!r} (--keep-unseen-words to keep them)"
    print(note, file=sys.stderr)


def _write_generation(result, args: argparse.Namespace, options, extra: dict, first=None) -> None:

    # Imported here: the CLI starts without loading torch, faiss or FastAPI (lazy by design)
    import torch

    from duomodal.data.images import save_grid, to_tensor
    from duomodal.files import atomic_write_text

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
        **options.public(), "seed": options.seed, "clip": args.clip, "score_kind": result.score_kind, "images": entries,
        "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **extra,
    }
    atomic_write_text(out.with_suffix(".json"), json.dumps(record, indent=2) + "\n")


def _cmd_generate(args: argparse.Namespace) -> int:

    # Imported here: the CLI starts without loading torch, faiss or FastAPI (lazy by design)
    from duomodal.generate import complete_image, generate_images

    if args.prime_rows is not None and args.prime is None:
        raise ValueError("--prime-rows needs --prime IMAGE, the image to complete")
    if args.prime is not None and args.prime_rows is None:
        raise ValueError("--prime needs --prime-rows R, the number of the image's token rows to keep")
    run, scorer, options = _load_dalle_for_cli(args)
    prime = None
    if args.prime is not None:
        G = run.config.image_grid_size
        if not 1 <= args.prime_rows < G:
            raise ValueError(f"--prime-rows must be from 1 to {G - 1} (this model's token grid has {G} rows), "
                             f"got {args.prime_rows}")
        prime, _ = _model_image(args.prime, run.config.image_size)
    started = time.perf_counter()
    bar, update = _progress_bar(args.num, "generate")
    counts = dict(num=args.num, keep=args.keep, scorer=scorer, options=options, progress=update)
    try:
        if prime is None:
            result = generate_images(run, args.prompt, **counts)
        else:
            result = complete_image(run, prime, args.prompt, rows=args.prime_rows, **counts)
    finally:
        bar.close()
    seconds = time.perf_counter() - started
    extra = {"prime": str(args.prime), "prime_rows": args.prime_rows} if prime is not None else {}
    _write_generation(result, args, options, {**extra, "seconds": round(seconds, 3)}, first=prime)
    scores = ""
    if result.scores is not None:
        scores = f"; CLIP scores {result.scores[0]:.3f} (best) to {result.scores[-1]:.3f}"
    seeds_and_scores = f"(seeds {', '.join(map(str, result.seeds))}){scores}"
    if prime is None:
        print(f"wrote {args.out}: kept {len(result.images)} of {args.num} images in {seconds:.1f} s {seeds_and_scores}")
    else:
        print(f"wrote {args.out}: the primed image (first) and {len(result.images)} of {args.num} completions of "
              f"its first {args.prime_rows} token rows, in {seconds:.1f} s {seeds_and_scores}")
    return 0


def _cmd_edit(args: argparse.Namespace) -> int:

    # Imported here: the CLI starts without loading torch, faiss or FastAPI (lazy by design)
    from duomodal.generate import edit_image

    box = _parse_box(args.box)
    run, scorer, options = _load_dalle_for_cli(args)
    image, box = _model_image(args.image, run.config.image_size, box, " (the box moves with it)")
    started = time.perf_counter()
    bar, update = _progress_bar(args.num, "edit")
    try:
        result = edit_image(run, image, box, args.prompt, num=args.num, keep=args.keep, scorer=scorer,
                            options=options, progress=update)
    finally:
        bar.close()
    seconds = time.perf_counter() - started
    _write_generation(result, args, options, {"image": str(args.image), "box": list(box),
                                              "seconds": round(seconds, 3)}, first=image)
    print(f"wrote {args.out}: the image (first) and {len(result.images)} edit(s) of {args.num}, ranked by "
          f"{'CLIP score' if result.score_kind == 'scorer' else 'fit to the unchanged tokens'}, in {seconds:.1f} s")
    return 0
