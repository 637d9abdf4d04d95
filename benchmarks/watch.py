"""`duomodal serve --watch` under load: files copied one by one into the indexed folder while N
clients query; prints how long each copied file took to be returned by /api/search (p50, p95, max)
and the clients' requests, latency and errors over the same time.

The folder holds rendered memes (duomodal.data.memes); the copies are memes of another seed. The
server is `duomodal serve --watch` in a subprocess on 127.0.0.1 (the CLI as a user runs it).

    flock /tmp/duomodal-heavy.lock .venv/bin/python benchmarks/watch.py --clip work/runs/clip-t \\
        --images 300 --copies 20 --clients 8
"""

from __future__ import annotations

import argparse
import http.client
import shutil
import tempfile
import threading
import time
from pathlib import Path

from serve_load import Results, free_port, percentile, request_paths, start_server, stop_server
from this_machine import print_header


def client(port: int, paths, stop: threading.Event, results: Results) -> None:
    """Text queries one after another until `stop`; latencies and errors into `results`."""
    while not stop.is_set():
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        start = time.perf_counter()
        try:
            connection.request("GET", next(paths))
            response = connection.getresponse()
            body = response.read()
            error = None if response.status == 200 else f"{response.status} {body[:200]!r}"
        except (OSError, http.client.HTTPException) as e:
            error = f"{type(e).__name__}: {e}"
        finally:
            connection.close()
        with results.lock:
            if error is None:
                results.latencies.append(time.perf_counter() - start)
            else:
                results.errors.append(error)


def found(port: int, path: str, image: bytes) -> bool:
    """Whether searching by the copied image itself returns it first."""
    import httpx

    response = httpx.post(f"http://127.0.0.1:{port}/api/search/image", files={"file": ("q.png", image)},
                          data={"k": "1"}, timeout=30)
    return response.status_code == 200 and [h["path"] for h in response.json()["results"]] == [path]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clip", required=True, help="CLIP directory")
    parser.add_argument("--images", type=int, default=300, help="memes in the folder at the start (at most 900)")
    parser.add_argument("--copies", type=int, default=20, help="files copied in, one at a time")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--interval", type=float, default=1.0, help="the watch's --interval")
    parser.add_argument("--settle", type=float, default=0.5, help="the watch's --settle")
    parser.add_argument("--work", default=None)
    args = parser.parse_args()

    from duomodal.data.memes import render_meme, plan_memes, write_corpus
    from duomodal.models.clip import load_clip
    from duomodal.search.build import build_index

    print_header("fp32", "cpu")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="duomodal-watch-bench-"))
    shutil.rmtree(work / "folder", ignore_errors=True)
    shutil.rmtree(work / "index", ignore_errors=True)
    write_corpus(work / "folder", args.images, seed=0)
    build_index(work / "folder", work / "index", load_clip(args.clip, device="cpu"), clip_path=args.clip,
                progress=False)
    port = free_port()
    server = start_server(work / "index", Path(args.clip), port, "cpu", work / "server.log",
                          extra=("--watch", "--interval", str(args.interval), "--settle", str(args.settle)))
    results = Results()
    stop = threading.Event()
    paths = request_paths("text", 10, args.images)
    clients = [threading.Thread(target=client, args=(port, paths, stop, results)) for _ in range(args.clients)]
    delays = []
    try:
        time.sleep(2 * args.interval + 1)  # the watch's first look
        started = time.perf_counter()
        for thread in clients:
            thread.start()
        for n, meme in enumerate(plan_memes(args.copies, seed=1)):
            relative = f"copies/copy-{n:04d}.png"
            (work / "folder" / "copies").mkdir(exist_ok=True)
            staging = work / f"copy-{n:04d}.png"
            render_meme(meme).save(staging)
            image = staging.read_bytes()
            copied = time.monotonic()
            shutil.move(staging, work / "folder" / relative)  # appears whole (a rename)
            while not found(port, relative, image):
                if time.monotonic() - copied > 60:
                    raise SystemExit(f"{relative} was not searchable after 60 s; see {work / 'server.log'}")
                time.sleep(0.05)
            delays.append(time.monotonic() - copied)
            time.sleep(0.5)
        stop.set()
        for thread in clients:
            thread.join()
        elapsed = time.perf_counter() - started
    finally:
        stop.set()
        stop_server(server)
    latencies = results.latencies
    print(f"# {args.images} memes in the folder, {args.copies} copied one at a time, --interval {args.interval:g} "
          f"--settle {args.settle:g}, {args.clients} clients querying meanwhile")
    print(f"copied file searchable after: p50 {percentile(delays, 50):.2f} s, p95 {percentile(delays, 95):.2f} s, "
          f"max {max(delays):.2f} s")
    print(f"clients: {len(latencies)} requests in {elapsed:.1f} s ({len(latencies) / elapsed:.1f}/s), latency p50 "
          f"{percentile(latencies, 50) * 1000:.0f} ms, p95 {percentile(latencies, 95) * 1000:.0f} ms, "
          f"{len(results.errors)} errors" + (f": {results.errors[:3]}" if results.errors else ""))


if __name__ == "__main__":
    main()
