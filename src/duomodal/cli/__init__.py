"""The `duomodal` command line. The only place that prints for the user and exits.

Each area registers its subcommands in its own module of this package (``_add_*_commands`` in
data, train, vae, dalle, clip, search, serve, demo); a command handler takes the parsed args and returns
an exit status. Library code raises; `main` turns a ValueError/OSError into one stderr line (set
DUOMODAL_DEBUG=1 for the traceback), and a warning from duomodal's own code (e.g. a precision the
hardware only emulates) into one "duomodal: warning:" line, shown once per process.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
import warnings
from collections.abc import Sequence

from duomodal import __version__
from duomodal.cli.clip import _add_clip_commands
from duomodal.cli.common import _error
from duomodal.cli.dalle import _add_dalle_commands
from duomodal.cli.data import _add_data_commands
from duomodal.cli.demo import _add_demo_commands, _add_eval_commands
from duomodal.cli.search import _add_search_commands
from duomodal.cli.serve import _add_serve_commands
from duomodal.cli.train import _add_train_commands
from duomodal.cli.vae import _add_vae_commands

__all__ = ["build_parser", "main"]


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
    _add_demo_commands(sub, run_command=main)
    _add_eval_commands(sub)
    return parser


def _one_line_warnings(show):
    """`show` (warnings.showwarning) for others' warnings; duomodal's own as one line, without the source."""

    def showwarning(message, category, filename, lineno, file=None, line=None) -> None:
        if category.__module__.startswith("duomodal") and not os.environ.get("DUOMODAL_DEBUG"):
            print(f"duomodal: warning: {message}", file=file or sys.stderr)
        else:
            show(message, category, filename, lineno, file, line)

    return showwarning


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("once", module=r"duomodal\.")
            warnings.showwarning = _one_line_warnings(warnings.showwarning)
            return int(args.func(args) or 0)
    except KeyboardInterrupt:
        _error("interrupted")
        return 130
    except (ValueError, OSError) as e:
        if os.environ.get("DUOMODAL_DEBUG"):
            traceback.print_exc()
        _error(str(e))
        return 2
