"""Vector search benchmark: build time, memory, query latency p50/p99 (single queries and batches)
and recall@10 against exact search, for each index type duomodal uses, in each vector store (faiss
in process; milvus-lite in process; a Milvus standalone server started by this script), on
synthetic 512-d unit vectors. The Milvus stores are built and queried as duomodal's Milvus store
builds and queries them (its index params, insert chunks, flush and index wait, `MilvusVectors`).

The data: `n` points around n/1000 random centres (at least 100) with isotropic noise, normalised,
which is how image embeddings behave (they cluster); queries are held-out points from the same
distribution. `--data iid` uses plain Gaussian vectors instead, the worst case for any ANN index.

Run (heavy: take the lock):
    flock /tmp/duomodal-heavy.lock timeout 3000 .venv/bin/python benchmarks/search.py \
        --sizes 10000,100000,1000000 --json work/bench/search.json
    # faiss beside milvus-lite and a Milvus server at 100k vectors:
    nice -n 19 flock /tmp/duomodal-heavy.lock .venv/bin/python benchmarks/search.py \
        --sizes 100000 --stores faiss,milvus-lite,milvus-server --json work/bench/search-milvus.json
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import resource
import sys
import time
from pathlib import Path

import faiss
import numpy as np

from duomodal.search.vectors.base import FaissParams
from duomodal.search.vectors.faiss_store import make_faiss_index, search_params
from this_machine import print_header


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def index_bytes(index: faiss.Index, index_type: str, n: int, dim: int) -> int:
    """Bytes held by the index's own structures (vectors, graph links, id map, centroids)."""
    vectors = n * dim * 4
    if index_type == "flat":
        return vectors + n * 8
    if index_type == "hnsw":
        hnsw = faiss.downcast_index(index.index).hnsw
        links = hnsw.neighbors.size() * 4 + hnsw.offsets.size() * 8 + hnsw.levels.size() * 4
        return vectors + links + n * 8
    return vectors + n * 8 + index.nlist * dim * 4


def synthetic(n: int, dim: int, kind: str, spread: float, seed: int) -> np.ndarray:
    """(n, dim) float32 unit vectors, generated in chunks (bounded temporary memory)."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), dtype=np.float32)
    centres = rng.standard_normal((max(100, n // 1000), dim)).astype(np.float32) / np.sqrt(dim)
    for start in range(0, n, 100_000):
        m = min(100_000, n - start)
        x = rng.standard_normal((m, dim)).astype(np.float32) / np.sqrt(dim)
        if kind == "clustered":
            x = centres[rng.integers(0, len(centres), m)] + spread * x
        out[start : start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def rss_mb() -> float:
    """This process's resident memory now (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def directory_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def search_settings_params(index_type: str, params: FaissParams, setting: int) -> FaissParams:
    if index_type == "hnsw":
        return dataclasses.replace(params, hnsw_ef_search=setting)
    if index_type == "ivf":
        return dataclasses.replace(params, ivf_nprobe=setting)
    return params


def setting_label(index_type: str, setting: int) -> str:
    return {"hnsw": f"ef_search={setting}", "ivf": f"nprobe={setting}"}.get(index_type, "exact")


def batches(queries: np.ndarray, size: int) -> list[np.ndarray]:
    """Overlapping windows of `size` queries, stepping by 4 (enough batches for a p99 on 200 queries)."""
    if size <= 1:
        return []
    return [queries[i : i + size] for i in range(0, max(1, len(queries) - size + 1), 4)]


def time_queries(search_one, search_many, queries, batch_size, truth):
    """(p50 ms, p99 ms, recall@10) of single queries, then (p50 ms, p99 ms) of batches."""
    for q in queries[:5]:
        search_one(q[None])  # warm up
    latencies, found = [], []
    for q in queries:
        t = time.perf_counter()
        found.append(search_one(q[None]))
        latencies.append(time.perf_counter() - t)
    recall = 1.0
    if truth is not None:
        recall = float(np.mean([len(set(t) & set(f)) / 10 for t, f in zip(truth, found)]))
    batch_latencies = []
    for batch in batches(queries, batch_size):
        t = time.perf_counter()
        search_many(batch)
        batch_latencies.append(time.perf_counter() - t)
    row = {
        "p50_ms": round(percentile_ms(latencies, 50), 3),
        "p99_ms": round(percentile_ms(latencies, 99), 3),
        "recall_at_10": round(recall, 4),
        "batch_p50_ms": round(percentile_ms(batch_latencies, 50), 3) if batch_latencies else None,
        "batch_p99_ms": round(percentile_ms(batch_latencies, 99), 3) if batch_latencies else None,
    }
    return row, found


def bench_milvus(kind, index_type, data, queries, truth, params, search_settings, workdir: Path, batch_size: int,
                 server=None):
    """The measurements through a Milvus collection built and searched as duomodal's Milvus store
    does. kind "lite": milvus-lite in this process (memory: the growth of this process's RSS, and
    its files); kind "server": `server`, a LocalMilvusServer (memory: the growth of the server's RSS)."""
    import shutil

    from pymilvus import DataType, MilvusClient

    from duomodal.search.vectors import milvus_store as store
    from duomodal.search.vectors.milvus_target import MilvusTarget

    gc.collect()
    if kind == "lite":
        path = workdir / f"milvus-{index_type}-{len(data)}.db"
        shutil.rmtree(path, ignore_errors=True)
        target = MilvusTarget(str(path), "bench")
        rss_before = rss_mb()
    else:
        target = MilvusTarget.parse(server.spec(f"bench_{index_type}_{len(data)}"))
        rss_before = server.rss_mb()
    started = time.perf_counter()
    client = MilvusClient(uri=target.uri) if kind == "lite" else MilvusClient(uri=target.uri, dedicated=True)
    calls = store._Calls(target)
    if client.has_collection(target.collection):
        client.drop_collection(target.collection)
    build_params, _ = store.index_params(index_type, params, len(data))
    schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=data.shape[1])
    index_params = client.prepare_index_params()
    index_params.add_index("vector", index_type=store._MILVUS_TYPES[index_type], metric_type="IP",
                           params=build_params)
    client.create_collection(target.collection, schema=schema, index_params=index_params,
                             consistency_level="Strong", timeout=calls.wait)
    for start in range(0, len(data), store.INSERT_CHUNK):
        chunk = data[start : start + store.INSERT_CHUNK]
        client.insert(target.collection, [{"id": start + i, "vector": v.tolist()} for i, v in enumerate(chunk)],
                      timeout=calls.request)
    insert_s = time.perf_counter() - started
    store._flush(client, target.collection, calls)  # as a sync ends: sealed, persisted, indexed
    rows = []
    for n_setting, setting in enumerate(search_settings):
        _, search = store.index_params(index_type, search_settings_params(index_type, params, setting), len(data))
        vectors = store.MilvusVectors(client, target, index_type, search, len(data))
        vectors.search(queries[:1], 10)  # the first search loads what the index node built: part of the build
        if n_setting == 0:
            build_s = time.perf_counter() - started
            memory = (rss_mb() if kind == "lite" else server.rss_mb()) - rss_before
        row, found = time_queries(
            lambda q: [i for i, _ in vectors.search(q, 10)], lambda b: vectors.search_batch(b, 10),
            queries, batch_size, truth,
        )
        rows.append(({
            "setting": setting_label(index_type, setting),
            "build_s": round(build_s, 2),
            "insert_s": round(insert_s, 2),
            "index_memory_mb": round(memory, 1),
            **({"disk_mb": round(directory_mb(path), 1)} if kind == "lite" else
               {"server_rss_mb": round(server.rss_mb(), 1)}),
            **row,
            "peak_rss_mb": round(peak_rss_mb(), 1),
        }, found))
    if kind == "lite":
        client.close()
        shutil.rmtree(path, ignore_errors=True)
    else:
        client.drop_collection(target.collection)
        client.close()
    gc.collect()
    return rows


def percentile_ms(seconds: list[float], q: float) -> float:
    return float(np.percentile(np.array(seconds) * 1000, q))


def bench_type(index_type, data, queries, truth, params, train_size, search_settings, batch_size):
    """Build one faiss index, then time queries under each search setting (ef_search or nprobe)."""
    started = time.perf_counter()
    train = None
    if index_type == "ivf":
        rng = np.random.default_rng(1)
        train = data[np.sort(rng.choice(len(data), min(len(data), train_size), replace=False))]
    index = make_faiss_index(index_type, data.shape[1], params, train_vectors=train)
    ids = np.arange(len(data), dtype=np.int64)
    for start in range(0, len(data), 50_000):
        index.add_with_ids(data[start : start + 50_000], ids[start : start + 50_000])
    build_s = time.perf_counter() - started
    memory = index_bytes(index, index_type, len(data), data.shape[1])
    rows = []
    for setting in search_settings:
        search = search_params(index_type, search_settings_params(index_type, params, setting), 10)
        row, found = time_queries(
            lambda q: index.search(q, 10, params=search)[1][0], lambda b: index.search(b, 10, params=search),
            queries, batch_size, truth,
        )
        rows.append(({
            "setting": setting_label(index_type, setting),
            "build_s": round(build_s, 2),
            "index_memory_mb": round(memory / 2**20, 1),
            **row,
            "peak_rss_mb": round(peak_rss_mb(), 1),
        }, found))
    del index
    gc.collect()
    return rows


def machine() -> str:
    """CPU model, SIMD level, cores and load: every figure names the machine it was measured on."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    simd = "AVX512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else ["?"]
    return f"{model}, {simd}, {os.cpu_count()} cores, load average {' '.join(load)}"


def parse_args(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--types", default="flat,hnsw,ivf", help="faiss index types (exact search is always the truth)")
    parser.add_argument("--milvus-types", default=None, help="index types in the Milvus stores (default: --types)")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--batch", type=int, default=32, help="queries per batched call (0: no batches)")
    parser.add_argument("--data", choices=("clustered", "iid"), default="clustered")
    parser.add_argument("--spread", type=float, default=1.0, help="noise scale around the centres (clustered)")
    parser.add_argument("--hnsw-m", type=int, default=FaissParams.hnsw_m)
    parser.add_argument("--ef-construction", type=int, default=FaissParams.hnsw_ef_construction)
    parser.add_argument("--ef-search", default=str(FaissParams.hnsw_ef_search),
                        help="hnsw search widths to try, comma-separated")
    parser.add_argument("--nlist", type=int, default=0, help="ivf lists (0 = 4*sqrt(n))")
    parser.add_argument("--nprobe", default=str(FaissParams.ivf_nprobe), help="ivf probes to try, comma-separated")
    parser.add_argument("--ivf-train", type=int, default=100_000, help="ivf training sample size")
    parser.add_argument("--threads", type=int, default=0, help="faiss OpenMP threads (0 = all)")
    parser.add_argument("--stores", default="faiss",
                        help="vector stores to measure, comma-separated: faiss, milvus-lite, milvus-server")
    parser.add_argument("--workdir", type=Path, default=Path("work/bench/milvus"),
                        help="where milvus-lite and the Milvus server keep their files (removed after the run)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    unknown = set(args.stores.split(",")) - {"faiss", "milvus-lite", "milvus-server"}
    if unknown:
        parser.error(f"--stores: unknown {', '.join(sorted(unknown))}; choose from faiss, milvus-lite, milvus-server")
    return args


def measure_size(n, args, params, settings, types, milvus_types, server) -> list[dict]:
    """Every store and index type on `n` vectors: one printed line and one result row per setting."""
    stores = args.stores.split(",")
    results = []
    everything = synthetic(n + args.queries, args.dim, args.data, args.spread, seed=n)
    data, queries = everything[:n], everything[n:]
    exact = faiss.IndexFlatIP(args.dim)
    exact.add(data)
    truth = [list(row) for row in exact.search(queries, 10)[1]]
    del exact
    for index_type in dict.fromkeys(["flat", *types, *milvus_types]):
        measured = []
        if "faiss" in stores and index_type in types:
            measured.append(("faiss", bench_type(index_type, data, queries, truth, params, args.ivf_train,
                                                 settings[index_type], args.batch)))
        for kind in ("lite", "server"):
            if f"milvus-{kind}" in stores and index_type in milvus_types:
                args.workdir.mkdir(parents=True, exist_ok=True)
                measured.append((f"milvus-{kind}", bench_milvus(
                    kind, index_type, data, queries, truth, params, settings[index_type], args.workdir,
                    args.batch, server)))
        for store, store_rows in measured:
            for row, _ in store_rows:
                row = {"n": n, "store": store, "type": index_type, **row}
                results.append(row)
                batch = [f"{row[k]:>9.3f}" if row[k] is not None else f"{'-':>9}"
                         for k in ("batch_p50_ms", "batch_p99_ms")]
                print(f"{n:>9}  {store:<13}  {index_type:<5}  {row['setting']:<13}  {row['build_s']:>8.2f}  "
                      f"{row['index_memory_mb']:>8.1f}  {row['p50_ms']:>8.3f}  {row['p99_ms']:>8.3f}  "
                      f"{row['recall_at_10']:>9.4f}  {batch[0]}  {batch[1]}  {row['peak_rss_mb']:>11.0f}",
                      flush=True)
    del everything, data, queries
    gc.collect()
    return results


def main(argv=None) -> int:
    args = parse_args(argv)
    stores = args.stores.split(",")
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    # in a child process: the probe's matrices would raise the peak RSS this benchmark reports
    print_header("fp32 vectors (faiss and Milvus; no torch model)", "cpu", separate_process=True)
    params = FaissParams(
        hnsw_m=args.hnsw_m,
        hnsw_ef_construction=args.ef_construction,
        ivf_nlist=args.nlist,
    )
    settings = {
        "flat": [0],
        "hnsw": [int(x) for x in args.ef_search.split(",")],
        "ivf": [int(x) for x in args.nprobe.split(",")],
    }
    types = args.types.split(",")
    milvus_types = (args.milvus_types or args.types).split(",")
    results = []
    print(f"machine: {machine()}")
    print(f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads, dim {args.dim}, {args.data} data, "
          f"{args.queries} single-vector queries and batches of {args.batch}, k=10; {params}")
    server = None
    if "milvus-server" in stores:
        import shutil

        from duomodal.search.milvus_server import LocalMilvusServer

        shutil.rmtree(args.workdir / "milvus-server", ignore_errors=True)
        server = LocalMilvusServer(args.workdir / "milvus-server").start()
        print(f"Milvus server {server.uri} (the milvus package's standalone, default settings), "
              f"RSS {server.rss_mb():.0f} MB idle")
    print(f"{'n':>9}  {'store':<13}  {'type':<5}  {'setting':<13}  {'build s':>8}  {'mem MB':>8}  {'p50 ms':>8}  "
          f"{'p99 ms':>8}  {'recall@10':>9}  {'batch p50':>9}  {'batch p99':>9}  {'peak RSS MB':>11}")
    try:
        for n in (int(s) for s in args.sizes.split(",")):
            results += measure_size(n, args, params, settings, types, milvus_types, server)
    finally:
        if server is not None:
            server.stop(timeout=10)
    print(f"machine at the end: {machine()}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": machine(), "params": vars(params),
                                         "args": {k: str(v) for k, v in vars(args).items()},
                                         "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
