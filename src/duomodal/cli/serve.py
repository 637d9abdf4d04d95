"""`duomodal serve`: the web page and the REST API over an index (and a DALL-E run).

Tests replace `_serve_run` in this module, and `_search_load_clip` in cli/search.py."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys

import duomodal.cli.search as search_cli  # (a module reference: tests replace its CLIP loader)
from duomodal.cli.common import _add_precision_option
from duomodal.cli.watch import add_watch_options, start_serve_watch


def _add_serve_commands(sub: argparse._SubParsersAction) -> None:
    from duomodal.serve.config import ServeConfig  # lazy: the server's modules load FastAPI

    serve = sub.add_parser(
        "serve",
        help="web page and REST API: search an index; generate images with a DALL-E run",
        description="Serve a web page (at /) and a REST API (OpenAPI schema at /openapi.json) that search "
        "INDEX_DIR by text, by an uploaded image or by an indexed image, and, with --dalle, generate "
        "images reranked by the CLIP and edit image regions.",
    )
    serve.add_argument("--index", required=True, metavar="INDEX_DIR", help="index made by `duomodal index build`")
    serve.add_argument("--clip", metavar="CLIP_DIR", help="CLIP directory (default: the one recorded in the index)")
    serve.add_argument("--dalle", metavar="RUN_DIR", help="DALL-E run directory: turns on /api/generate and /api/edit")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default 127.0.0.1, this machine only; any other address turns "
                       "on the access token)")
    serve.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                       help="a Host name the server answers to besides localhost/127.0.0.1/::1 (repeatable), "
                       "e.g. the machine's LAN name or address when serving with --host 0.0.0.0")
    serve.add_argument("--token", default=None,
                       help="access token to require (default: a random one when --host is not loopback, "
                       "none on loopback); the environment variable DUOMODAL_TOKEN works too")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    serve.add_argument("--device", default=None, help="device for the models: cpu, cuda... (default: CUDA when available)")
    _add_precision_option(serve, "the models (search and generation)")
    for flag, name, default, help in ServeConfig.flags():
        metavar = "SECONDS" if isinstance(default, float) else "N"
        serve.add_argument(flag, dest=name, type=type(default), default=default, metavar=metavar,
                           help=f"{help} (default {default:g})")
    serve.add_argument("--torch-threads", type=int, default=None, metavar="N",
                       help="CPU threads per torch (and faiss) operation (default: 1 without --dalle, since a query's "
                       "tensors are tiny and concurrent requests use the cores; torch's default with --dalle)")
    serve.add_argument("--watch", action="store_true",
                       help="follow the indexed folder: new, changed, renamed and deleted images are indexed as "
                       "they come (with the recorded OCR engine) while the server answers")
    add_watch_options(serve)
    serve.set_defaults(func=_cmd_serve)


def _serve_config(args: argparse.Namespace):
    """The ServeConfig of the flags (it checks them), after the checks only the command line has."""
    from duomodal.serve.config import ServeConfig  # lazy: the server's modules load FastAPI

    if not 1 <= args.port <= 65535:
        raise ValueError(f"--port must be from 1 to 65535, got {args.port}")
    limits = {f.name: getattr(args, f.name) for f in dataclasses.fields(ServeConfig) if hasattr(args, f.name)}
    if args.watch:  # the watch's updates show in search within a second of being written
        limits["reload_check_s"] = min(args.interval, 1.0)
    return ServeConfig(**limits, access=_access_policy(args))


def _set_threads(args: argparse.Namespace) -> None:
    threads = args.torch_threads if args.torch_threads is not None else (None if args.dalle else 1)
    if threads is None:
        return
    if threads < 1:
        raise ValueError(f"--torch-threads must be at least 1, got {threads}")
    # lazy: only a server that sets threads needs them loaded here
    import faiss
    import torch

    torch.set_num_threads(threads)
    # The same for faiss's OpenMP threads: a batch of queries is small, and idle OpenMP threads
    # spin on the core that the HTTP side needs.
    faiss.omp_set_num_threads(threads)


def _cmd_serve(args: argparse.Namespace) -> int:
    # lazy: torch, faiss and FastAPI load only when serving
    from duomodal.search.index import ImageIndex
    from duomodal.serve.app import create_app
    from duomodal.serve.security import is_loopback

    config = _serve_config(args)
    _set_threads(args)
    index = ImageIndex.open(args.index)
    clip = args.clip or index.clip_path
    if not clip:
        raise ValueError(f"{args.index} records no CLIP directory; pass --clip CLIP_DIR")
    embedder = search_cli._search_load_clip(clip, args.device, args.precision)
    index.check_model(embedder.model_id)
    generator = None
    if args.dalle:
        # lazy: only a server with a DALL-E loads the model code
        from duomodal.models.dalle import load_dalle
        from duomodal.serve.generator import DalleGenerator

        dalle = load_dalle(args.dalle, device=args.device)
        generator = DalleGenerator(dalle, scorer=embedder, max_num=config.max_generate, precision=args.precision)
    app = create_app(index, embedder, generator, config, reopen_index=functools.partial(ImageIndex.open, args.index))
    # with --watch: a thread that updates the index as the folder changes (a daemon: it ends with the server)
    app.state.watch_stop = start_serve_watch(args, embedder)
    what = f"{index.count} images" + (" and generation" if generator else "")
    shown_host = f"[{args.host}]" if ":" in args.host else args.host
    access = config.access
    url = f"http://{shown_host}:{args.port}/" + (f"?token={access.token}" if access.token else "")
    print(f"duomodal: serving {what} at {url} (Ctrl+C stops)", file=sys.stderr)
    if not is_loopback(args.host):
        names = ", ".join(sorted(access.allowed_hosts))
        print(f"duomodal: listening beyond this machine; answering Host names {names} (add more with "
              "--allow-host) and only with the token above", file=sys.stderr)
    _serve_run(app, args.host, args.port)
    return 0


def _access_policy(args: argparse.Namespace):
    # Imported here: the CLI starts without loading torch, faiss or FastAPI (lazy by design)
    from duomodal.serve.security import AccessPolicy, is_loopback, new_token

    token = args.token or os.environ.get("DUOMODAL_TOKEN") or None
    if token is None and not is_loopback(args.host):
        token = new_token()
    hosts = list(args.allow_host)
    if not is_loopback(args.host) and args.host not in ("0.0.0.0", "::"):
        hosts.append(args.host)  # a specific address: the browser will send it as the Host
    return AccessPolicy.make(hosts, token)


def _serve_run(app, host: str, port: int) -> None:
    """Run the app until interrupted (tests replace this to get the app)."""
    # Imported here: the CLI starts without loading torch, faiss or FastAPI (lazy by design)
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="info")
