"""`duomodal data check`, `duomodal data icons` and `duomodal data pack`."""

from __future__ import annotations

import argparse
import json
import sys

from duomodal.cli.common import _positive_int
from duomodal.data.icons import build_icon_dataset


def _add_data_commands(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="check captioned-image datasets; build the icon dataset")
    data_sub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    _add_data_check(data_sub)
    _add_data_icons(data_sub)
    _add_data_pack(data_sub)


def _add_data_check(data_sub: argparse._SubParsersAction) -> None:
    # Imported here: the CLI builds its parser, and runs other commands, without loading torch
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
    check.add_argument("dir", metavar="DIR",
                       help="the dataset folder, or WebDataset shards: a packed folder, shards/{00000..00099}.tar, "
                       "or URLs")
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


def _data_check(args: argparse.Namespace) -> int:
    # Imported here: the CLI builds its parser, and runs other commands, without loading torch
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


def _add_data_pack(data_sub: argparse._SubParsersAction) -> None:
    p = data_sub.add_parser(
        "pack",
        help="write a folder dataset as WebDataset tar shards",
        description="Write the captioned images of the folder dataset DIR (the icon dataset included) as "
        "WebDataset shards in OUT: one series per split (OUT/train-000000.tar, OUT/val-000000.tar, "
        "OUT/heldout-000000.tar), each sample an image, a .txt of its captions and a .json of its file, "
        "captions, split and labels; then OUT/shards.json. Every command that takes a dataset folder "
        "takes OUT (or a shard pattern) instead. Images are copied byte for byte.",
    )
    p.add_argument("dir", metavar="DIR", help="the dataset folder")
    p.add_argument("out", metavar="OUT", help="output directory for the shards (created if needed)")
    p.add_argument("--shard-size", type=_positive_int, default=1000, metavar="N",
                   help="samples per shard (default 1000)")
    p.add_argument("--val-fraction", type=float, default=0.05,
                   help="share of images in val where the dataset gives no split (default 0.05, as training)")
    p.set_defaults(func=_cmd_data_pack)


def _cmd_data_pack(args: argparse.Namespace) -> int:
    # Imported here: the CLI builds its parser, and runs other commands, without loading torch
    from duomodal.data.pack import pack_dataset

    summary = pack_dataset(args.dir, args.out, args.shard_size, args.val_fraction,
                           on_skip=lambda path, reason: print(f"skipped {path}: {reason}", file=sys.stderr))
    counts, shards = summary["counts"], summary["shards"]
    splits = ", ".join(f"{s} {counts[s]} in {shards[s]} shard{'s' if shards[s] != 1 else ''}" for s in counts)
    print(f"packed {sum(counts.values())} images into {summary['out']}: {splits}; "
          f"{len(summary['skipped'])} skipped")
    return 0
