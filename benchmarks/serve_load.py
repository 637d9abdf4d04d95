"""Load test of `duomodal serve`: N concurrent clients for T seconds against a server this script
starts on 127.0.0.1, over an index of synthetic vectors; prints requests/s, latency p50/p90/p99,
the server's own embed+search time and the error count, for each client count given (one server,
one run, so the ratio of the figures is measured side by side), then optionally the server's
memory while clients upload large images at once.

    flock /tmp/duomodal-heavy.lock .venv/bin/python benchmarks/serve_load.py --images 100000 \\
        --clients 1,8 --seconds 20 --upload-clients 8
    # the index's vectors in a Milvus server this script starts (and stops):
    flock /tmp/duomodal-heavy.lock .venv/bin/python benchmarks/serve_load.py --images 1000000 \\
        --index-type ivf --store milvus-server --clients 1,8 --seconds 20

Without --clip the CLIP is the `quick` preset's architecture with random weights (the cost of a
query does not depend on what the weights learned); the index holds `--images` random unit
vectors of that CLIP's dimension under fake paths, written through the search library's store
and indexed by it (HNSW above 50k images with --index-type auto). Every request has a distinct
query, so the server's query cache never helps. Both are kept in --work between runs.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import io
import itertools
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import numpy as np

from this_machine import auto_precision, print_header

COLORS = ("red", "green", "blue", "yellow", "orange", "purple", "black", "grey")
NOUNS = (
    "heart", "star", "home", "house", "cat", "dog", "car", "bus", "train", "plane", "boat", "bike",
    "phone", "camera", "clock", "alarm", "bell", "book", "bookmark", "calendar", "cloud", "sun",
    "moon", "umbrella", "key", "lock", "folder", "file", "image", "music", "video", "mail", "send",
    "chat", "person", "group", "settings", "search", "trash", "pencil", "brush", "map", "pin",
    "flag", "gift", "cart", "bag", "wallet", "card", "shield", "bolt", "fire", "water", "leaf",
    "tree", "flower", "bug", "code", "terminal", "database", "server", "wifi", "bluetooth",
    "battery", "plug", "lamp", "cup", "coffee", "pizza", "cake", "apple", "fish", "bird", "paw",
    "rocket", "anchor", "compass", "trophy", "crown", "diamond",
)
TEMPLATES = ("a {c} {n} icon", "{n}, {c}", "{c} {n} outline", "the {n} in {c}", "{n} icon filled {c}")


def queries() -> list[str]:
    return [t.format(c=c, n=n) for t in TEMPLATES for c in COLORS for n in NOUNS]


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


# --- the CLIP and the index -------------------------------------------------------------------


def make_quick_clip(directory: Path) -> Path:
    """The quick preset's CLIP architecture with random weights, saved as a duomodal model dir."""
    import torch

    from duomodal.config import preset, to_dict
    from duomodal.modelfile import save_model
    from duomodal.models.clip import ClipConfig, ContrastiveClip
    from duomodal.text.tokenizer import Tokenizer

    if (directory / "model.safetensors").is_file():
        return directory
    torch.manual_seed(0)
    model_fields = dict(preset("clip", "quick")["model"])
    tokenizer = Tokenizer.train(queries() * 2, vocab_size=model_fields["vocab_size"], min_frequency=1)
    model_fields["vocab_size"] = tokenizer.vocab_size
    config = ClipConfig(**model_fields)
    save_model(directory, "clip", to_dict(config), ContrastiveClip.from_config(config).state_dict())
    tokenizer.save(directory / "tokenizer.json")
    return directory


def make_synthetic_index(directory: Path, clip_dir: Path, count: int, index_type: str,
                         vector_store: str = "faiss") -> tuple[Path, float]:
    """`count` random unit vectors in a duomodal index at `directory`, their vectors in `vector_store`
    (a store spec); returns (dir, seconds spent building or syncing the vector store)."""
    from duomodal import __version__
    from duomodal.models.clip import load_clip
    from duomodal.search.index import ImageIndex
    from duomodal.search.store import MetadataStore, NewImage

    embedder = load_clip(clip_dir, device="cpu")
    if directory.exists():
        with contextlib.closing(MetadataStore.open(directory)) as store:
            if store.count() != count or store.get_meta("clip_model_id") != embedder.model_id:
                raise SystemExit(f"{directory} exists but is not this benchmark's index: remove it")
            moved = store.get_meta("vector_store") != vector_store
            store.set_meta({"vector_store": vector_store})  # the next open syncs it there
        start = time.perf_counter()
        with ImageIndex.open(directory) as index:
            print(f"index: {index.count} vectors, {index.dim}-d, {index.index_type} in {index.vector_store}",
                  file=sys.stderr)
        return directory, (time.perf_counter() - start) if moved else 0.0
    start = time.perf_counter()
    meta = {
        "root": str(directory / "no-images"),
        "clip_model_id": embedder.model_id,
        "clip_path": str(clip_dir.resolve()),
        "dim": str(embedder.dim),
        "index_type_option": index_type,
        "faiss_params": "{}",
        "created_by": f"duomodal {__version__} benchmarks/serve_load.py",
        "vector_store": vector_store,
    }
    store = MetadataStore.create(directory, meta)
    rng = np.random.default_rng(0)
    chunk = 10_000
    for first in range(0, count, chunk):
        vectors = rng.standard_normal((min(chunk, count - first), embedder.dim)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        with store.transaction() as db:
            for offset, vector in enumerate(vectors):
                n = first + offset
                store.upsert(db, NewImage(
                    path=f"synthetic/{n:07d}.png", sha256=hashlib.sha256(str(n).encode()).hexdigest(),
                    size=1000, mtime_ns=0, width=32, height=32, caption=None, vector=vector,
                ))
    store.close()
    with ImageIndex.open(directory) as index:  # builds the faiss index or loads the Milvus collection
        print(f"index: {index.count} vectors, {index.dim}-d, {index.index_type} in {index.vector_store}",
              file=sys.stderr)
    return directory, time.perf_counter() - start


# --- the server ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(
    index_dir: Path, clip_dir: Path, port: int, device: str, log: Path, max_decodes: int = 2,
    extra: tuple[str, ...] = (),
) -> subprocess.Popen:
    """`duomodal serve` (with `extra` flags) in a process of its own, once it answers /health."""
    command = [
        sys.executable, "-m", "duomodal", "serve", "--index", str(index_dir), "--clip", str(clip_dir),
        "--host", "127.0.0.1", "--port", str(port), "--device", device, "--max-decodes", str(max_decodes),
        *extra,
    ]
    process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with {process.returncode}; see {log}")
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            connection.request("GET", "/health")
            if connection.getresponse().status == 200:
                return process
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit(f"the server did not answer /health within 300 s; see {log}")


def stop_server(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()


# --- the clients --------------------------------------------------------------------------------


class Results:
    def __init__(self):
        self.lock = threading.Lock()
        self.latencies: list[float] = []
        self.server_ms: list[float] = []
        self.errors: list[str] = []


def client_loop(port: int, paths, deadline: float, results: Results) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    while time.monotonic() < deadline:
        path = next(paths)
        start = time.perf_counter()
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            body = response.read()
            elapsed = time.perf_counter() - start
            took = json.loads(body).get("took_ms") if response.status == 200 else None
            error = None if response.status == 200 else f"{response.status} {body[:200]!r}"
        except (OSError, http.client.HTTPException, ValueError) as e:
            elapsed, took, error = time.perf_counter() - start, None, f"{type(e).__name__}: {e}"
            connection.close()
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        with results.lock:
            if error is None:
                results.latencies.append(elapsed)
                results.server_ms.append(float(took))
            else:
                results.errors.append(error)
    connection.close()


def request_paths(endpoint: str, k: int, image_count: int):
    """An endless, thread-safe supply of request paths: distinct text queries, or image ids."""
    lock = threading.Lock()
    if endpoint == "text":
        texts = queries()
        source = (f"/api/search?{urllib.parse.urlencode({'q': t, 'k': k})}" for t in itertools.cycle(texts))
    else:
        rng = np.random.default_rng(1)
        source = (f"/api/similar/{int(rng.integers(1, image_count + 1))}?k={k}" for _ in itertools.count())

    class Paths:
        def __next__(self) -> str:
            with lock:
                return next(source)

    return Paths()


def run_load(port: int, clients: int, seconds: float, endpoint: str, k: int, image_count: int) -> tuple[Results, float]:
    warmup = Results()
    client_loop(port, request_paths(endpoint, k, image_count), time.monotonic() + 2.0, warmup)
    if warmup.errors:
        raise SystemExit(f"warm-up requests failed: {warmup.errors[:3]}")
    results = Results()
    paths = request_paths(endpoint, k, image_count)
    deadline = time.monotonic() + seconds
    threads = [threading.Thread(target=client_loop, args=(port, paths, deadline, results)) for _ in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results, time.perf_counter() - start


# --- uploads: the server's memory ---------------------------------------------------------------


def large_upload(pixels: int) -> bytes:
    """A PNG of about `pixels` pixels, a smooth gradient: a few hundred KB on the wire (well under
    the upload limit) that decodes to 3 bytes per pixel, the cheap way to make a server allocate."""
    from PIL import Image

    side = int(pixels**0.5)
    ramp = np.linspace(0, 255, side, dtype=np.float32)
    picture = np.stack([ramp[None, :].repeat(side, 0), ramp[:, None].repeat(side, 1),
                        np.full((side, side), 128, np.float32)], axis=-1)
    buffer = io.BytesIO()
    Image.fromarray(picture.astype(np.uint8), "RGB").save(buffer, format="PNG", compress_level=9)
    return buffer.getvalue()


def rss_mib(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def upload_loop(port: int, body: bytes, boundary: str, deadline: float, results: Results) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    while time.monotonic() < deadline:
        start = time.perf_counter()
        try:
            connection.request("POST", "/api/search/image", body=body, headers=headers)
            response = connection.getresponse()
            text = response.read()
            error = None if response.status == 200 else f"{response.status} {text[:200]!r}"
        except (OSError, http.client.HTTPException) as e:
            error = f"{type(e).__name__}: {e}"
            connection.close()
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        with results.lock:
            if error is None:
                results.latencies.append(time.perf_counter() - start)
            else:
                results.errors.append(error)
    connection.close()


def run_uploads(server: subprocess.Popen, port: int, clients: int, seconds: float, image: bytes) -> dict:
    """`clients` clients upload `image` again and again; the server's RSS is sampled every 50 ms."""
    boundary = "duomodal-load-boundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + image + f"\r\n--{boundary}--\r\n".encode()
    results = Results()
    before = rss_mib(server.pid)
    deadline = time.monotonic() + seconds
    threads = [threading.Thread(target=upload_loop, args=(port, body, boundary, deadline, results))
               for _ in range(clients)]
    for thread in threads:
        thread.start()
    peak = before
    while any(thread.is_alive() for thread in threads):
        peak = max(peak, rss_mib(server.pid))
        time.sleep(0.05)
    return {"before": before, "peak": peak, "hwm": rss_mib(server.pid, "VmHWM"), "results": results}


def print_load(label: str, results: Results, elapsed: float) -> float:
    done = len(results.latencies)
    ms = [s * 1000 for s in results.latencies]
    print(f"{label}: {done} ok, {len(results.errors)} errors, {done / elapsed:.1f} requests/s, latency ms "
          f"p50 {percentile(ms, 50):.2f}  p90 {percentile(ms, 90):.2f}  p99 {percentile(ms, 99):.2f}  "
          f"max {max(ms) if ms else float('nan'):.2f}"
          + (f"; server p50 {statistics.median(results.server_ms):.2f} ms" if results.server_ms else ""))
    for error in results.errors[:5]:
        print(f"  error: {error}")
    return done / elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=100_000, help="vectors in the synthetic index (default 100000)")
    parser.add_argument("--clients", default="1,8",
                        help="concurrent clients, or a comma list run one after the other (default 1,8)")
    parser.add_argument("--seconds", type=float, default=20.0, help="how long each load runs (default 20)")
    parser.add_argument("--endpoint", choices=("text", "similar"), default="text",
                        help="text: GET /api/search?q=...; similar: GET /api/similar/{id} (default text)")
    parser.add_argument("-k", type=int, default=10, help="results per request (default 10)")
    parser.add_argument("--clip", type=Path, help="a CLIP directory (default: the quick preset, random weights)")
    parser.add_argument("--index-type", default="auto", choices=("auto", "flat", "hnsw", "ivf"))
    parser.add_argument("--device", default="cpu", help="the server's device for the CLIP (default cpu)")
    parser.add_argument("--upload-clients", type=int, default=0,
                        help="then: this many clients upload a large image for --upload-seconds (default 0: skip)")
    parser.add_argument("--upload-seconds", type=float, default=15.0)
    parser.add_argument("--upload-megapixels", type=float, default=36.0, help="pixels of the uploaded image")
    parser.add_argument("--max-decodes", type=int, default=2, help="the server's --max-decodes (default 2)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/duomodal-serve-load"),
                        help="where the CLIP and index are kept between runs")
    parser.add_argument("--store", choices=("faiss", "milvus-server"), default="faiss",
                        help="where the index keeps its vectors: faiss, or a Milvus server this script starts "
                        "in --work (default faiss)")
    args = parser.parse_args(argv)
    try:
        client_counts = [int(c) for c in args.clients.split(",")]
    except ValueError:
        parser.error(f"--clients {args.clients!r}: give numbers separated by commas, e.g. 1,8")
    if not all(1 <= c <= 64 for c in client_counts) or not 0 < args.seconds <= 600 \
            or not 1 <= args.images <= 10_000_000 or not 0 <= args.upload_clients <= 64:
        parser.error("need 1 <= --clients <= 64, 0 < --seconds <= 600, 1 <= --images <= 10000000, "
                     "0 <= --upload-clients <= 64")

    print_header(f"{auto_precision(args.device)} in the server's CLIP", args.device)
    args.work.mkdir(parents=True, exist_ok=True)
    clip_dir = args.clip or make_quick_clip(args.work / "clip-quick")
    tag = "quick" if args.clip is None else hashlib.sha256(str(args.clip.resolve()).encode()).hexdigest()[:8]
    milvus = None
    vector_store = "faiss"
    if args.store == "milvus-server":
        import shutil

        from duomodal.search.milvus_server import LocalMilvusServer

        shutil.rmtree(args.work / "milvus-server", ignore_errors=True)
        milvus = LocalMilvusServer(args.work / "milvus-server").start()
        vector_store = milvus.spec("serve_load")
    try:
        return run(args, clip_dir, tag, vector_store, milvus)
    finally:
        if milvus is not None:
            milvus.stop(timeout=10)


def run(args, clip_dir: Path, tag: str, vector_store: str, milvus) -> int:
    """Build or sync the index, start `duomodal serve` over it, run the loads; 1 if any request failed."""
    client_counts = [int(c) for c in args.clients.split(",")]
    index_dir, build_seconds = make_synthetic_index(
        args.work / f"index-{tag}-{args.images}-{args.index_type}", clip_dir, args.images, args.index_type,
        vector_store,
    )
    if build_seconds:
        print(f"built the synthetic index (its vectors in {vector_store}) in {build_seconds:.1f} s", file=sys.stderr)
    image = large_upload(int(args.upload_megapixels * 1e6)) if args.upload_clients else b""
    port = free_port()
    server = start_server(index_dir, clip_dir, port, args.device, args.work / "server.log", args.max_decodes)
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    print(f"serve_load: {args.endpoint} search, {args.images} images in {vector_store}, k={args.k}, "
          f"{args.seconds:.0f} s per load, cpu cores {os.cpu_count()}, load average {load}")
    if milvus is not None:
        print(f"Milvus server RSS {milvus.rss_mb():.0f} MB")
    throughputs: dict[int, float] = {}
    failed = False
    try:
        for clients in client_counts:
            results, elapsed = run_load(port, clients, args.seconds, args.endpoint, args.k, args.images)
            throughputs[clients] = print_load(f"{clients:>2} clients", results, elapsed)
            failed |= bool(results.errors) or not results.latencies
        if len(throughputs) > 1:
            first = client_counts[0]
            for clients in client_counts[1:]:
                print(f"throughput {clients} clients / {first} client(s): "
                      f"{throughputs[clients] / max(throughputs[first], 1e-9):.2f}x")
        if args.upload_clients:
            memory = run_uploads(server, port, args.upload_clients, args.upload_seconds, image)
            print_load(f"uploads, {args.upload_clients} clients, {len(image) / 2**20:.1f} MB PNG of "
                       f"{args.upload_megapixels:g} megapixels", memory["results"], args.upload_seconds)
            print(f"server memory: {memory['before']:.0f} MiB before, peak {memory['peak']:.0f} MiB sampled, "
                  f"VmHWM {memory['hwm']:.0f} MiB (--max-decodes {args.max_decodes})")
            failed |= bool(memory["results"].errors)
        if milvus is not None:
            print(f"Milvus server RSS {milvus.rss_mb():.0f} MB after the load")
    finally:
        stop_server(server)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
