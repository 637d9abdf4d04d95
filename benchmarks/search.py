"""Vector search benchmark: build time, memory, query latency p50/p99 and recall@10 against exact
search, for each index type duomodal uses, in each vector store (faiss in process; Milvus through
milvus-lite, queried as `ImageIndex` queries it), on synthetic 512-d unit vectors.

The data: `n` points around n/1000 random centres (at least 100) with isotropic noise, normalised,
which is how image embeddings behave (they cluster); queries are held-out points from the same
distribution. `--data iid` uses plain Gaussian vectors instead, the worst case for any ANN index.

Run (heavy: take the lock):
    flock /tmp/duomodal-heavy.lock timeout 3000 .venv/bin/python benchmarks/search.py \
        --sizes 10000,100000,1000000 --json work/bench/search.json
    # faiss beside Milvus (milvus-lite) at 100k vectors:
    nice -n 19 flock /tmp/duomodal-heavy.lock .venv/bin/python benchmarks/search.py \
        --sizes 100000 --stores faiss,milvus --json work/bench/search-milvus.json
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import resource
import sys
import time
from pathlib import Path

import faiss
import numpy as np

from duomodal.search.index import FaissParams, make_faiss_index, search_params
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


def bench_milvus(index_type, data, queries, truth, params, search_settings, workdir: Path):
    """The same measurements through a milvus-lite collection built and searched as duomodal's
    Milvus store does (its index params, insert chunks and `MilvusVectors.search`). Memory: the
    growth of this process's RSS (milvus-lite runs in process), and the size of its files."""
    import shutil

    from pymilvus import DataType, MilvusClient

    from duomodal.search.milvus import _MILVUS_TYPES, INSERT_CHUNK, MilvusTarget, MilvusVectors, _index_params

    path = workdir / f"milvus-{index_type}-{len(data)}.db"
    shutil.rmtree(path, ignore_errors=True)
    gc.collect()
    rss_before = rss_mb()
    started = time.perf_counter()
    client = MilvusClient(str(path))
    build_params, _ = _index_params(index_type, params, len(data))
    schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=data.shape[1])
    index_params = client.prepare_index_params()
    index_params.add_index("vector", index_type=_MILVUS_TYPES[index_type], metric_type="IP", params=build_params)
    client.create_collection("bench", schema=schema, index_params=index_params, consistency_level="Strong")
    for start in range(0, len(data), INSERT_CHUNK):
        chunk = data[start : start + INSERT_CHUNK]
        client.insert("bench", [{"id": start + i, "vector": v.tolist()} for i, v in enumerate(chunk)])
    client.flush("bench")  # as the store does after a sync
    target = MilvusTarget(str(path), "bench")
    rows = []
    for n_setting, setting in enumerate(search_settings):
        setting_params = params
        if index_type == "hnsw":
            setting_params = dataclasses.replace(params, hnsw_ef_search=setting)
        elif index_type == "ivf":
            setting_params = dataclasses.replace(params, ivf_nprobe=setting)
        _, search = _index_params(index_type, setting_params, len(data))
        vectors = MilvusVectors(client, target, index_type, search, len(data))
        vectors.search(queries[:1], 10)  # the first search loads and indexes: part of the build
        if n_setting == 0:
            build_s = time.perf_counter() - started
            memory = rss_mb() - rss_before
        for q in queries[1:5]:
            vectors.search(q[None], 10)  # warm up
        latencies, found = [], []
        for q in queries:
            t = time.perf_counter()
            hits = vectors.search(q[None], 10)
            latencies.append(time.perf_counter() - t)
            found.append([i for i, _ in hits])
        recall = 1.0
        if truth is not None:
            recall = float(np.mean([len(set(t) & set(f)) / 10 for t, f in zip(truth, found)]))
        rows.append(({
            "setting": {"hnsw": f"ef_search={setting}", "ivf": f"nprobe={setting}"}.get(index_type, "exact"),
            "build_s": round(build_s, 2),
            "index_memory_mb": round(memory, 1),
            "disk_mb": round(directory_mb(path), 1),
            "p50_ms": round(percentile_ms(latencies, 50), 3),
            "p99_ms": round(percentile_ms(latencies, 99), 3),
            "recall_at_10": round(recall, 4),
            "peak_rss_mb": round(peak_rss_mb(), 1),
        }, found))
    client.close()
    shutil.rmtree(path, ignore_errors=True)
    gc.collect()
    return rows


def percentile_ms(seconds: list[float], q: float) -> float:
    return float(np.percentile(np.array(seconds) * 1000, q))


def bench_type(index_type, data, queries, truth, params, train_size, search_settings):
    """Build one index, then time queries under each search setting (ef_search or nprobe)."""
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
        if index_type == "hnsw":
            setting_params = dataclasses.replace(params, hnsw_ef_search=setting)
        elif index_type == "ivf":
            setting_params = dataclasses.replace(params, ivf_nprobe=setting)
        else:
            setting_params = params
        search = search_params(index_type, setting_params, 10)
        index.search(queries[:5], 10, params=search)  # warm up
        latencies, found = [], []
        for q in queries:
            t = time.perf_counter()
            _, I = index.search(q[None], 10, params=search)
            latencies.append(time.perf_counter() - t)
            found.append(I[0])
        recall = 1.0
        if truth is not None:
            recall = float(np.mean([len(set(t) & set(f)) / 10 for t, f in zip(truth, found)]))
        rows.append(({
            "setting": {"hnsw": f"ef_search={setting}", "ivf": f"nprobe={setting}"}.get(index_type, "exact"),
            "build_s": round(build_s, 2),
            "index_memory_mb": round(memory / 2**20, 1),
            "p50_ms": round(percentile_ms(latencies, 50), 3),
            "p99_ms": round(percentile_ms(latencies, 99), 3),
            "recall_at_10": round(recall, 4),
            "peak_rss_mb": round(peak_rss_mb(), 1),
        }, found))
    del index
    gc.collect()
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--types", default="flat,hnsw,ivf")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=200)
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
    parser.add_argument("--stores", default="faiss", help="vector stores to measure: faiss,milvus (milvus-lite)")
    parser.add_argument("--workdir", type=Path, default=Path("work/bench/milvus"),
                        help="where milvus-lite writes its files (removed after each run)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
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
    results = []
    print(f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads, dim {args.dim}, {args.data} data, "
          f"{args.queries} single-vector queries, k=10; {params}")
    stores = args.stores.split(",")
    print(f"{'n':>9}  {'store':<6}  {'type':<5}  {'setting':<13}  {'build s':>8}  {'mem MB':>8}  {'p50 ms':>8}  "
          f"{'p99 ms':>8}  {'recall@10':>9}  {'peak RSS MB':>11}")
    for n in (int(s) for s in args.sizes.split(",")):
        everything = synthetic(n + args.queries, args.dim, args.data, args.spread, seed=n)
        data, queries = everything[:n], everything[n:]
        truth = None
        for index_type in ["flat"] + [t for t in types if t != "flat"]:
            rows = bench_type(index_type, data, queries, truth, params, args.ivf_train, settings[index_type])
            if index_type == "flat":
                truth = rows[0][1]
                if "flat" not in types:
                    continue
            measured = [("faiss", rows)] if "faiss" in stores else []
            if "milvus" in stores:
                args.workdir.mkdir(parents=True, exist_ok=True)
                measured.append(("milvus", bench_milvus(index_type, data, queries, truth, params,
                                                        settings[index_type], args.workdir)))
            for store, store_rows in measured:
                for row, _ in store_rows:
                    row = {"n": n, "store": store, "type": index_type, **row}
                    results.append(row)
                    print(f"{n:>9}  {store:<6}  {index_type:<5}  {row['setting']:<13}  {row['build_s']:>8.2f}  "
                          f"{row['index_memory_mb']:>8.1f}  {row['p50_ms']:>8.3f}  {row['p99_ms']:>8.3f}  "
                          f"{row['recall_at_10']:>9.4f}  {row['peak_rss_mb']:>11.0f}", flush=True)
        del everything, data, queries
        gc.collect()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"params": vars(params), "args": {k: str(v) for k, v in vars(args).items()},
                                         "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
