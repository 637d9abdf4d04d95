"""`duomodal index watch INDEX_DIR` and `duomodal serve --watch`: follow the indexed folder and
update the index when its files change (duomodal.search.watch)."""

from __future__ import annotations

import argparse
import sys
import threading
from collections.abc import Callable


def add_watch_options(parser: argparse.ArgumentParser) -> None:
    # lazy: loaded when this command runs (the CLI starts without torch, faiss or an OCR engine)
    from duomodal.search.watch import WatchOptions

    defaults = WatchOptions()
    parser.add_argument("--interval", type=float, default=defaults.interval_s, metavar="S",
                        help=f"seconds between two looks at the folder (default {defaults.interval_s:g})")
    parser.add_argument("--settle", type=float, default=defaults.settle_s, metavar="S",
                        help="a change is indexed once the folder has been quiet this long, so a burst of "
                        f"new files is one update (default {defaults.settle_s:g})")


def add_watch_command(index_sub: argparse._SubParsersAction, handler: Callable) -> None:
    watch = index_sub.add_parser(
        "watch", help="follow the indexed folder: update the index whenever its images change (Ctrl+C stops)")
    watch.add_argument("index_dir", metavar="INDEX_DIR")
    watch.add_argument("--clip", metavar="CLIP_DIR", help="CLIP directory (default: the one recorded in the index)")
    watch.add_argument("--device", default="cpu", help="device for CLIP (default cpu)")
    add_watch_options(watch)
    watch.set_defaults(func=handler)


def print_update(report) -> None:
    # lazy: loaded when this command runs (the CLI starts without torch, faiss or an OCR engine)
    from duomodal.cli.words import ocr_report_line

    print(f"{report.index_dir}: {report.count} images; {report.embedded} embedded, {report.reused} reused, "
          f"{report.moved} moved, {report.removed} removed, {len(report.skipped)} skipped in {report.seconds:.1f} s"
          + ocr_report_line(report.ocr), flush=True)


def print_wait(reason: str) -> None:
    print(f"duomodal: {reason}", file=sys.stderr, flush=True)


def watch_until_stopped(args: argparse.Namespace, embedder, stop: threading.Event) -> None:
    """Watch the index of `args` (index_dir or index) with `embedder` and its recorded OCR engine."""
    # lazy: loaded when this command runs (the CLI starts without torch, faiss or an OCR engine)
    from duomodal.cli.words import ocr_engine_for
    from duomodal.search.build import update_index
    from duomodal.search.store import MetadataStore
    from duomodal.search.watch import WatchOptions, watch_index

    index_dir = getattr(args, "index_dir", None) or args.index
    options = WatchOptions(args.interval, args.settle)
    store = MetadataStore.open(index_dir)
    recorded = store.meta()
    store.close()
    ocr = ocr_engine_for(None, recorded)

    def update():
        return update_index(index_dir, embedder, progress=False, ocr=ocr)

    watch_index(index_dir, update, stop, options, on_update=print_update, on_wait=print_wait)


def start_serve_watch(args: argparse.Namespace, embedder) -> threading.Event | None:
    """With `serve --watch`, a thread that follows the folder; returns its stop event (None without)."""
    if not args.watch:
        return None
    stop = threading.Event()
    threading.Thread(target=watch_until_stopped, args=(args, embedder, stop), name="duomodal-watch",
                     daemon=True).start()
    return stop
