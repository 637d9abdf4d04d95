"""`duomodal classify` and `duomodal clip export|eval`."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from tqdm import tqdm

from duomodal.cli.common import _add_precision_option, _error
from duomodal.files import save_json


def _add_clip_commands(sub: argparse._SubParsersAction) -> None:
    # Imported here: the CLI builds its parser, and runs other commands, without loading torch
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
    _add_precision_option(parser, "CLIP")
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
    evaluate.add_argument("--templates", dest="template_sets", action="append", default=None,
                          choices=sorted(TEMPLATE_SETS),
                          help="template set for zero-shot, repeatable (default: icon, then unseen: wordings the "
                          "icon captions never use)")
    evaluate.add_argument("--json", default=None, help="also write the figures to this JSON file")
    evaluate.add_argument("--limit", type=int, default=0, help="evaluate at most this many images (0 = all)")
    evaluate.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda")
    _add_precision_option(evaluate, "CLIP")
    evaluate.set_defaults(func=_cmd_clip_eval)


def _resolve_labels(args: argparse.Namespace, known: list[str]) -> list[str]:
    # Imported here: the CLI builds its parser, and runs other commands, without loading torch
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
    # Imported here: the CLI builds its parser, and runs other commands, without loading torch
    from duomodal.classify import (
        classify_images,
        find_images,
        resolve_templates,
        save_confusion_png,
        write_predictions_csv,
    )
    from duomodal.device import resolve_device
    from duomodal.models.clip import load_clip

    images = find_images(args.inputs, args.label_field)
    labels = _resolve_labels(args, sorted({label for _, label in images if label is not None}))
    templates = resolve_templates(args.templates, args.template_set)
    embedder = load_clip(args.clip_dir, resolve_device(args.device), args.precision)
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
        correct, counted = int(result.confusion.trace()), int(result.confusion.sum())
        print(f"accuracy {result.accuracy:.4f} ({correct}/{counted} images with a known label)")
        confusion = args.confusion or str((Path(args.csv).parent if args.csv else Path(".")) / "confusion.png")
        save_confusion_png(result.confusion, labels, confusion, title=f"accuracy {result.accuracy:.3f}")
        print(f"wrote {confusion}")
    return 0 if result.predictions else 1


def _cmd_clip_export(args: argparse.Namespace) -> int:
    # Imported here: the CLI builds its parser, and runs other commands, without loading torch
    from duomodal.models.clip import export_hf

    path = export_hf(args.run_dir, args.hf_dir)
    print(f"wrote Hugging Face CLIP directory {path} (CLIPModel, tokenizer, image processor)")
    return 0


def _cmd_clip_eval(args: argparse.Namespace) -> int:
    # Imported here: the CLI builds its parser, and runs other commands, without loading torch
    from duomodal.classify import TEMPLATE_SETS, evaluate_records, label_classes_of
    from duomodal.data.records import filter_split, load_records
    from duomodal.device import resolve_device
    from duomodal.models.clip import load_clip

    records = load_records(args.data)
    chosen = filter_split(records, args.split)
    if args.limit > 0:
        chosen = chosen[: args.limit]
    if not chosen:
        _error(f"{args.data} has no images in the {args.split} split")
        return 1
    embedder = load_clip(args.clip_dir, resolve_device(args.device), args.precision)
    started = time.perf_counter()
    names = list(dict.fromkeys(args.template_sets or ["icon", "unseen"]))
    figures = evaluate_records(
        embedder, chosen, label_classes_of(records), {name: TEMPLATE_SETS[name] for name in names},
        on_skip=lambda path, reason: print(f"skipping {path}: {reason}", file=sys.stderr),
    )
    seconds = time.perf_counter() - started
    print(f"{args.split}: {int(figures['count'])} images ({int(figures['skipped'])} skipped), "
          f"model {embedder.model_id}, {seconds:.1f} s; zero-shot with the {names[0]!r} templates"
          + "".join(f", {name}/ with the {name!r} templates" for name in names[1:]))
    for name, value in figures.items():
        if name not in ("count", "skipped"):
            print(f"  {name:<32} {value:.4f}")
    if args.json:
        save_json({"split": args.split, "model_id": embedder.model_id, "seconds": seconds,
                   "templates": {name: list(TEMPLATE_SETS[name]) for name in names}, **figures}, args.json)
        print(f"wrote {args.json}")
    return 0
