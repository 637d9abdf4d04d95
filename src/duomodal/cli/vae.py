"""`duomodal reconstruct`: images through the VAE's codebook and back."""

from __future__ import annotations

import argparse
import sys

from duomodal.cli.common import _error


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
    # Imported here: the CLI builds its parser, and runs other commands, without loading torch
    from duomodal.data.images import ImageError, load_image
    from duomodal.device import resolve_device
    from duomodal.models.vae import load_vae
    from duomodal.reconstruct import reconstruct, save_reconstruction_grid

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
