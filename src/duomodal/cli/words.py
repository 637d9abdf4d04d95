"""The words-in-images parts of `duomodal index` and `duomodal search`: the --ocr option, the OCR
line of the build report, and hybrid results (words + CLIP) as a table or JSON."""

from __future__ import annotations

import argparse
import json


def add_ocr_option(parser: argparse.ArgumentParser, keep_recorded: bool) -> None:
    # lazy: loaded when this command runs (the CLI starts without torch, faiss or an OCR engine)
    from duomodal.search.ocr import DEFAULT_OCR_ENGINE, OCR_ENGINES

    parser.add_argument(
        "--ocr", nargs="?", const=DEFAULT_OCR_ENGINE, default=None, choices=OCR_ENGINES, metavar="ENGINE",
        help=f"also read the words in the images, searchable with the pictures: {' or '.join(OCR_ENGINES)} "
        f"(default {DEFAULT_OCR_ENGINE}; see docs/search.md)"
        + (" (default: as recorded)" if keep_recorded else " (default: off)"),
    )


def add_text_weight_option(parser: argparse.ArgumentParser) -> None:
    # lazy: loaded when this command runs (the CLI starts without torch, faiss or an OCR engine)
    from duomodal.search.hybrid import DEFAULT_TEXT_WEIGHT, MAX_TEXT_WEIGHT

    parser.add_argument(
        "--text-weight", type=float, default=DEFAULT_TEXT_WEIGHT, metavar="W",
        help="in an index with words (--ocr), the weight of the words' ranking against CLIP's in the "
        f"fusion (0 to {MAX_TEXT_WEIGHT:g}; 0: pictures only; default {DEFAULT_TEXT_WEIGHT:g})",
    )


def ocr_engine_for(requested: str | None, recorded: dict[str, str] | None):
    """The OCR engine a run reads with: the one asked for, else the one the index records, else None.
    Raises OcrUnavailable (one line saying how to install it) when it is not installed."""
    # lazy: loaded when this command runs (the CLI starts without torch, faiss or an OCR engine)
    from duomodal.search.ocr import open_engine
    from duomodal.search.text_index import OCR_META_KEY

    kind = requested or (recorded or {}).get(OCR_META_KEY)
    return open_engine(kind) if kind else None


def ocr_report_line(report) -> str:
    if report is None:
        return ""
    rate = report.read / report.seconds if report.seconds > 0 else 0.0
    return (f"; words read in {report.read} images ({rate:.1f}/s), {report.copied} copied, "
            f"{len(report.skipped)} unreadable")


def hybrid_groups(args: argparse.Namespace, index, embedder, images):
    """Hybrid hits for the search command, or None when the search is on pictures only: no text
    query, an index without words, --dedup, or --text-weight 0."""
    # lazy: loaded when this command runs (the CLI starts without torch, faiss or an OCR engine)
    from duomodal.search.hybrid import check_text_weight, hybrid_search, split_query
    from duomodal.search.query import parse_query, query_vector
    from duomodal.search.text_index import TextIndex

    check_text_weight(args.text_weight)
    if args.query is None or args.dedup is not None or args.text_weight == 0:
        return None
    with TextIndex(index.index_dir) as text_index:
        if not text_index.engine():
            return None
        query = split_query(args.query)
        vector = query_vector(embedder, parse_query(query.clip_text), images)
        return hybrid_search(index, text_index, vector, query, args.k, args.text_weight, filters_from_args(args))


def match_dict(hit) -> dict:
    """Why a hybrid hit matched, as the CLI's JSON and the REST API give it."""
    return {"fused": round(hit.fused, 6), "clip_rank": hit.clip_rank, "text_rank": hit.text_rank,
            "matched_words": list(hit.matched), "words": hit.text, "why": hit.reason}


def print_hybrid(args: argparse.Namespace, hits, source, image_paths: list[str]) -> int:
    if args.json:
        results = [
            {"rank": rank, "id": h.hit.id, "score": round(h.hit.score, 6), "path": h.hit.path,
             "file": source.display(h.hit.path), "width": h.hit.width, "height": h.hit.height,
             "caption": h.hit.caption, **match_dict(h)}
            for rank, h in enumerate(hits, start=1)
        ]
        print(json.dumps({"index": str(args.index_dir), "query": args.query, "images": image_paths,
                          "text_weight": args.text_weight, "results": results}, indent=2))
        return 0
    if not hits:
        print("no results (no image's words hold the quoted phrase)" if '"' in args.query
              else "no results (no image passes the filters)" if filters_from_args(args).active
              else "no results (the index is empty)")
        return 0
    print(f"{'rank':>4}  {'score':>7}  path  [why]")
    for rank, h in enumerate(hits, start=1):
        words = f'  words: "{_short(h.text)}"' if h.text else ""
        print(f"{rank:>4}  {h.hit.score:>7.4f}  {source.display(h.hit.path)}  [{h.reason}]{words}")
    return 0


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def add_filter_options(parser: argparse.ArgumentParser) -> None:
    # lazy: loaded when this command runs (the CLI starts without torch, faiss or an OCR engine)
    from duomodal.search.filters import FORMATS, SORTS

    group = parser.add_argument_group("filters and cut-off (applied before the top k is taken)")
    group.add_argument("--folder", metavar="DIR", help="only images under DIR, relative to the indexed folder")
    group.add_argument("--after", metavar="DATE", help="only files modified at or after DATE (2024-05-01[T13:30])")
    group.add_argument("--before", metavar="DATE", help="only files modified before DATE")
    group.add_argument("--min-size", metavar="SIZE", help="only files of at least SIZE (bytes, or 250k, 2M)")
    group.add_argument("--max-size", metavar="SIZE", help="only files of at most SIZE")
    group.add_argument("--format", action="append", default=[], metavar="FMT",
                       help=f"only these formats ({', '.join(FORMATS)}; repeat or comma-separate)")
    group.add_argument("--min-score", type=float, default=None, metavar="S",
                       help="only results whose CLIP score (cosine similarity) is at least S "
                       "(fewer than k when few are)")
    group.add_argument("--sort", choices=SORTS, default="score",
                       help="order of the results: score, or date (newest first)")


def filters_from_args(args: argparse.Namespace):
    # lazy: loaded when this command runs (the CLI starts without torch, faiss or an OCR engine)
    from duomodal.search.filters import filters_from_text

    return filters_from_text(args.folder, args.after, args.before, args.min_size, args.max_size, args.format,
                             args.min_score, args.sort)
