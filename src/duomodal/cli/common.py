"""Helpers every command area shares: the error line, argparse types, progress bars, the rank check."""

from __future__ import annotations

import argparse
import sys

from tqdm import tqdm

from duomodal.launch import launch_info


def _error(message: str) -> None:
    print(f"duomodal: error: {message}", file=sys.stderr)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _add_precision_option(parser: argparse.ArgumentParser, what: str) -> None:
    """--precision, with the choices and the default `auto` that duomodal.device declares."""
    # Imported here: the CLI builds its parser, and runs other commands, without loading torch
    from duomodal.device import PRECISIONS

    parser.add_argument("--precision", default="auto", choices=PRECISIONS,
                        help=f"precision of {what}: auto (default) is bf16 where the hardware computes it natively "
                        "(CUDA, CPUs with AMX or AVX512-BF16), fp16 on GPUs without bf16, fp32 elsewhere")


def _is_main_process() -> bool:
    return launch_info().is_main


def _progress_bar(total: int, desc: str):
    bar = tqdm(total=total, desc=desc, unit="img", file=sys.stderr, dynamic_ncols=True)

    def update(done: int, _total: int) -> None:
        bar.update(done - bar.n)

    return bar, update


def _add_sampling_arguments(parser: argparse.ArgumentParser, settings) -> None:
    """A flag for each sampling setting (duomodal.models.sampling.Setting), with its default and help."""
    for setting in settings:
        flag = "--" + setting.public_name.replace("_", "-")
        if setting.switch:
            parser.add_argument(flag, action="store_true", help=setting.help)
            continue
        default = setting.public(setting.default)
        shown = setting.off if default is None and setting.off is not None else default
        parser.add_argument(flag, type=setting.kind, default=default, choices=setting.choices or None,
                            help=f"{setting.help} (default {'none' if shown is None else shown})")


def _sampling_values(args: argparse.Namespace, settings) -> dict:
    """The SamplingOptions arguments of the flags `_add_sampling_arguments` added."""
    return {setting.name: setting.from_public(getattr(args, setting.public_name)) for setting in settings}
