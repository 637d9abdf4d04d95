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
    pass


def _add_data_icons(data_sub: argparse._SubParsersAction) -> None:
    pass


# --- train ---------------------------------------------------------------------------------------


def _add_train_commands(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser("train", help="train a VAE, DALL-E or CLIP model (also under torchrun)")
    train_sub = train.add_subparsers(dest="model_kind", metavar="MODEL", required=True)
    _add_train_vae(train_sub)
    _add_train_dalle(train_sub)
    _add_train_clip(train_sub)


# --- vae -----------------------------------------------------------------------------------------


def _add_train_vae(train_sub: argparse._SubParsersAction) -> None:
    pass


def _add_vae_commands(sub: argparse._SubParsersAction) -> None:
    pass


# --- dalle ---------------------------------------------------------------------------------------


def _add_train_dalle(train_sub: argparse._SubParsersAction) -> None:
    pass


def _add_dalle_commands(sub: argparse._SubParsersAction) -> None:
    pass


# --- clip ----------------------------------------------------------------------------------------


def _add_train_clip(train_sub: argparse._SubParsersAction) -> None:
    pass


def _add_clip_commands(sub: argparse._SubParsersAction) -> None:
    pass


# --- search and serve --------------------------------------------------------------------------


def _add_search_commands(sub: argparse._SubParsersAction) -> None:
    pass


def _add_serve_commands(sub: argparse._SubParsersAction) -> None:
    pass


# --- demo and eval -------------------------------------------------------------------------------


def _add_demo_commands(sub: argparse._SubParsersAction) -> None:
    pass


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
