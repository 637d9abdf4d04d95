"""`duomodal index build|update` and `duomodal search` (`duomodal serve` is in cli/serve.py).

Tests replace `_search_load_clip` in this module (`duomodal serve` loads its CLIP through it too)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import threading

from duomodal.cli.common import _add_precision_option
from duomodal.cli.watch import add_watch_command, watch_until_stopped
from duomodal.cli.words import (
    add_filter_options,
    add_ocr_option,
    add_text_weight_option,
    filters_from_args,
    hybrid_groups,
    ocr_engine_for,
    ocr_report_line,
    print_hybrid,
)
from duomodal.launch import launch_info


def _add_search_commands(sub: argparse._SubParsersAction) -> None:
    index = sub.add_parser("index", help="build or update a searchable index of an image collection")
    index_sub = index.add_subparsers(dest="index_command", metavar="ACTION", required=True)
    build = index_sub.add_parser(
        "build",
        help="index the images under DIR (resumes an interrupted build; under torchrun, shards the work)",
    )
    build.add_argument("dir", metavar="DIR",
                       help="directory of images (searched recursively), or local WebDataset shards "
                       "(a folder made by `duomodal data pack`, or a pattern such as shards/{00000..00099}.tar)")
    build.add_argument("--clip", required=True, metavar="CLIP_DIR", help="CLIP model directory")
    build.add_argument("--out", required=True, metavar="INDEX_DIR", help="index directory to write")
    _add_index_options(build)
    build.set_defaults(func=_cmd_index_build)
    update = index_sub.add_parser("update", help="embed new/changed images, drop deleted ones, follow moves")
    update.add_argument("index_dir", metavar="INDEX_DIR")
    update.add_argument("--clip", metavar="CLIP_DIR", help="CLIP directory (default: the one recorded in the index)")
    _add_index_options(update, keep_recorded=True)
    update.set_defaults(func=_cmd_index_update)
    add_watch_command(index_sub, _cmd_index_watch)

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
    _add_precision_option(search, "the CLIP model")
    add_text_weight_option(search)
    add_filter_options(search)
    search.set_defaults(func=_cmd_search)


def _add_index_options(parser: argparse.ArgumentParser, keep_recorded: bool = False) -> None:
    default_note = "default: as recorded" if keep_recorded else "default: auto"
    parser.add_argument(
        "--index-type", choices=("auto", "flat", "hnsw", "ivf"), default=None if keep_recorded else "auto",
        help=f"faiss index: flat (exact), hnsw or ivf (approximate), auto = flat up to 50k images ({default_note})",
    )
    parser.add_argument(
        "--store", default=None if keep_recorded else "faiss", metavar="STORE",
        help="vector engine: faiss (a file in the index directory), milvus:PATH.db (milvus-lite) or "
        "milvus://HOST:PORT/[DB/]COLLECTION[?tls=1&ca=PATH&timeout=S] (a Milvus server; credentials from "
        "$MILVUS_TOKEN or $MILVUS_USER and $MILVUS_PASSWORD; see docs/search.md) "
        f"({default_note.replace('auto', 'faiss')})",
    )
    parser.add_argument("--batch-size", type=int, default=64, help="images per embedding batch (default 64)")
    parser.add_argument("--hnsw-m", type=int, default=None, help="hnsw graph degree (default 32)")
    parser.add_argument("--ef-construction", type=int, default=None, help="hnsw build width (default 80)")
    parser.add_argument("--ef-search", type=int, default=None, help="hnsw search width (default 128)")
    parser.add_argument("--nlist", type=int, default=None, help="ivf lists (default 4*sqrt(n))")
    parser.add_argument("--nprobe", type=int, default=None, help="ivf lists probed per query (default 32)")
    parser.add_argument("--device", default=None, help="device for CLIP (default: this rank's GPU if any, else cpu)")
    _add_precision_option(parser, "CLIP")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    add_ocr_option(parser, keep_recorded)


def _search_load_clip(path: str, device, precision: str = "auto"):
    """The CLIP embedder at `path` (tests replace this to inject a small embedder)."""
    # Imported here: the CLI starts without loading torch, faiss or FastAPI (lazy by design)
    from duomodal.models.clip import load_clip

    return load_clip(path, device=device, precision=precision)


def _index_options(args: argparse.Namespace, recorded: dict[str, str] | None):

    # Imported here: the CLI starts without loading torch, faiss or FastAPI (lazy by design)
    from duomodal.search.build import BuildOptions
    from duomodal.search.vectors import FaissParams

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
    store = args.store or (recorded or {}).get("vector_store") or "faiss"
    return BuildOptions(index_type=index_type, batch_size=args.batch_size,
                        faiss=dataclasses.replace(base, **changes), store=store)


def _print_skip(path: str, reason: str) -> None:
    # Imported here: the CLI starts without loading torch, faiss or FastAPI (lazy by design)
    from tqdm import tqdm

    tqdm.write(f"skipped {path}: {reason}", file=sys.stderr)


def _print_build_report(report) -> None:
    if not launch_info().is_main:
        return
    print(
        f"{report.index_dir}: {report.count} images ({report.index_type} index"
        f"{'' if report.vector_store == 'faiss' else ' in ' + report.vector_store}) in {report.seconds:.1f} s; "
        f"{report.embedded} embedded, {report.reused} reused, {report.moved} moved, {report.refreshed} refreshed, "
        f"{report.removed} removed, {report.unchanged} unchanged, {len(report.skipped)} skipped"
        + ocr_report_line(report.ocr)
    )


def _cmd_index_build(args: argparse.Namespace) -> int:
    # Imported here: the CLI starts without loading torch, faiss or FastAPI (lazy by design)
    from duomodal.device import resolve_device
    from duomodal.search.build import build_index

    options = _index_options(args, None)
    ocr = ocr_engine_for(args.ocr, None)  # fails now, before the CLIP loads, when the engine is missing
    embedder = _search_load_clip(args.clip, resolve_device(args.device), args.precision)
    report = build_index(args.dir, args.out, embedder, clip_path=args.clip, options=options,
                         on_skip=_print_skip, progress=not args.quiet, ocr=ocr)
    _print_build_report(report)
    return 0


def _cmd_index_update(args: argparse.Namespace) -> int:
    # Imported here: the CLI starts without loading torch, faiss or FastAPI (lazy by design)
    from duomodal.device import resolve_device
    from duomodal.search.build import update_index
    from duomodal.search.store import MetadataStore

    store = MetadataStore.open(args.index_dir)
    recorded = store.meta()
    store.close()
    clip = args.clip or recorded.get("clip_path")
    if not clip:
        raise ValueError(f"{args.index_dir} records no CLIP directory; pass --clip CLIP_DIR")
    options = _index_options(args, recorded)
    ocr = ocr_engine_for(args.ocr, recorded)
    embedder = _search_load_clip(clip, resolve_device(args.device), args.precision)
    report = update_index(args.index_dir, embedder, options=options, on_skip=_print_skip, progress=not args.quiet,
                          ocr=ocr)
    _print_build_report(report)
    return 0


def _cmd_index_watch(args: argparse.Namespace) -> int:

    # lazy: loaded when this command runs (the CLI starts without torch, faiss or an OCR engine)
    from duomodal.search.store import MetadataStore

    store = MetadataStore.open(args.index_dir)
    clip = args.clip or store.get_meta("clip_path")
    store.close()
    if not clip:
        raise ValueError(f"{args.index_dir} records no CLIP directory; pass --clip CLIP_DIR")
    embedder = _search_load_clip(clip, args.device, "auto")
    print(f"duomodal: watching the folder of {args.index_dir} (Ctrl+C stops)", file=sys.stderr, flush=True)
    watch_until_stopped(args, embedder, threading.Event())
    return 0


def _parse_image_terms(values: list[str]) -> list[tuple[float, str]]:

    terms = []
    for value in values:
        match = re.fullmatch(r"(-?\d+(?:\.\d*)?|-?\.\d+)\*(.+)", value)
        weight, path = (float(match.group(1)), match.group(2)) if match else (1.0, value)
        if weight == 0.0:
            raise ValueError(f"--image {value!r} has weight 0; drop it or give a non-zero weight")
        terms.append((weight, path))
    return terms


def _cmd_search(args: argparse.Namespace) -> int:

    # Imported here: the CLI starts without loading torch, faiss or FastAPI (lazy by design)
    from duomodal.data.images import load_image
    from duomodal.search.dedup import check_threshold, search_grouped
    from duomodal.search.filters import filtered_search
    from duomodal.search.index import MAX_K, ImageIndex
    from duomodal.search.query import parse_query, query_vector

    if not 1 <= args.k <= MAX_K:
        raise ValueError(f"-k must be from 1 to {MAX_K}, got {args.k}")
    if args.dedup is not None:
        check_threshold(args.dedup)
    filters = filters_from_args(args)  # a bad filter fails before the CLIP loads
    if args.query is None and not args.image:
        raise ValueError("give a text query, --image PATH, or both")
    texts = parse_query(args.query) if args.query is not None else []
    image_terms = _parse_image_terms(args.image or [])
    images = [(weight, load_image(path)) for weight, path in image_terms]
    with ImageIndex.open(args.index_dir) as index:
        clip = args.clip or index.clip_path
        if not clip:
            raise ValueError(f"{args.index_dir} records no CLIP directory; pass --clip CLIP_DIR")
        embedder = _search_load_clip(clip, args.device, args.precision)
        index.check_model(embedder.model_id)
        hybrid = hybrid_groups(args, index, embedder, images)  # None: no words in the index, or none asked
        if hybrid is not None:
            return print_hybrid(args, hybrid, index.source, [p for _, p in image_terms])
        vector = query_vector(embedder, texts, images)
        if args.dedup is not None:
            if filters.active:
                raise ValueError("--dedup does not combine with filters, --min-score or --sort yet; drop one")
            groups = [(g.hit, g.duplicates) for g in search_grouped(index, vector, args.k, args.dedup)]
        else:
            groups = [(hit, []) for hit in filtered_search(index, vector, args.k, filters)]
        source = index.source

    def as_dict(hit) -> dict:
        return {"id": hit.id, "score": round(hit.score, 6), "path": hit.path, "file": source.display(hit.path),
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
        print("no results (no image passes the filters)" if filters.active else "no results (the index is empty)")
        return 0
    print(f"{'rank':>4}  {'score':>7}  path")
    for rank, (hit, duplicates) in enumerate(groups, start=1):
        extra = f"  (+{len(duplicates)} near-duplicate{'s' if len(duplicates) != 1 else ''})" if duplicates else ""
        print(f"{rank:>4}  {hit.score:>7.4f}  {source.display(hit.path)}{extra}")
    return 0
