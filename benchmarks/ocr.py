"""OCR benchmark: on the rendered meme corpus (duomodal.data.memes), each OCR engine's indexing rate
(images/s on the given threads) and how often a remembered 3-word phrase finds its meme (recall@1
and @5) with the words alone, the words fused with CLIP (hybrid search), the phrase quoted, and
CLIP alone, side by side, in one run on one corpus.

The CLIP index is built once (its rate is printed too); each engine then reads the words into a
copy of it with `duomodal index update --ocr`'s code path (update_index with an engine).

Run (heavy: take the lock):
    flock /tmp/duomodal-heavy.lock timeout 3000 .venv/bin/python benchmarks/ocr.py \
        --clip work/runs/clip-t --memes 500 --textless 100 --json work/bench/ocr.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sqlite3
import tempfile
import time
from pathlib import Path

import torch

from this_machine import print_header

ENGINES = ("rapidocr", "tesseract", "tesseract-plain")  # tesseract-plain: without the caption mask


def make_engine(name: str, threads: int):
    from duomodal.search.ocr import TesseractEngine, open_engine

    if name == "tesseract-plain":
        return TesseractEngine(threads, preprocess="none")
    return open_engine(name, threads)


def ranks_of(found: list[list[int]], truth: list[int]) -> list[int | None]:
    return [hits.index(t) + 1 if t in hits else None for hits, t in zip(found, truth)]


def recall(ranks: list[int | None], k: int) -> float:
    return sum(r is not None and r <= k for r in ranks) / len(ranks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clip", required=True, help="CLIP directory (for CLIP alone and the hybrid search)")
    parser.add_argument("--memes", type=int, default=500, help="memes with text")
    parser.add_argument("--textless", type=int, default=100, help="images without text")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated, of {', '.join(ENGINES)}")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for OCR and CLIP")
    parser.add_argument("--text-weights", default="1", help="comma-separated fusion weights of the words")
    parser.add_argument("--work", default=None, help="folder for the corpus and indexes (default: a temporary one)")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()

    from duomodal.data.memes import write_corpus
    from duomodal.models.clip import load_clip
    from duomodal.search.build import build_index, update_index
    from duomodal.search.hybrid import hybrid_search, split_query
    from duomodal.search.index import ImageIndex
    from duomodal.search.text_index import TextIndex, letters

    torch.set_num_threads(args.threads)
    print_header("fp32", "cpu")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="duomodal-ocr-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / f"memes-{args.memes}-{args.textless}-{args.seed}"
    started = time.perf_counter()
    memes = write_corpus(corpus, args.memes, args.seed, args.textless)
    print(f"# corpus: {args.memes} memes + {args.textless} without text, seed {args.seed}, rendered in "
          f"{time.perf_counter() - started:.1f} s; {args.threads} threads; CLIP {args.clip}")

    embedder = load_clip(args.clip, device="cpu")
    clip_index = work / "index-clip"
    shutil.rmtree(clip_index, ignore_errors=True)
    report = build_index(corpus, clip_index, embedder, clip_path=args.clip, progress=False)
    clip_rate = report.count / report.seconds
    print(f"# CLIP indexing (no --ocr): {report.count} images in {report.seconds:.1f} s, {clip_rate:.1f} images/s")

    queries = [m for m in memes if m.phrase]
    with contextlib.closing(sqlite3.connect(clip_index / "index.sqlite")) as db:
        id_of = {path: i for i, path in db.execute("SELECT id, path FROM images")}
    truth = [id_of[m.file] for m in queries]
    vectors = torch.nn.functional.normalize(torch.as_tensor(embedder.embed_texts([m.phrase for m in queries])), dim=-1)
    vectors = vectors.detach().float().numpy()
    with ImageIndex.open(clip_index) as index:
        clip_ranks = ranks_of([[h.id for h in hits] for hits in index.search_batch(vectors, 5)], truth)
    rows = [{"engine": "CLIP alone", "images_per_s": clip_rate, "read": None,
             "r1": recall(clip_ranks, 1), "r5": recall(clip_ranks, 5)}]
    weights = [float(w) for w in args.text_weights.split(",")]
    for name in args.engines.split(","):
        engine = make_engine(name, args.threads)
        index_dir = work / f"index-{name}"
        shutil.rmtree(index_dir, ignore_errors=True)
        shutil.copytree(clip_index, index_dir)
        report = update_index(index_dir, embedder, progress=False, ocr=engine)
        rate = report.ocr.read / report.ocr.seconds
        with ImageIndex.open(index_dir) as index, TextIndex(index_dir) as text_index:
            texts = text_index.text_of(truth)
            # "read": the phrase's letters are in the image's (what matching uses; spaces ignored)
            read = sum(letters(m.phrase) in letters(texts.get(t, "")) for m, t in zip(queries, truth)) / len(queries)
            words = ranks_of([[x.image_id for x in text_index.search([m.phrase], [], 5)] for m in queries], truth)
            row = {"engine": engine.name, "images_per_s": rate, "read": read,
                   "words_r1": recall(words, 1), "words_r5": recall(words, 5)}
            for weight in weights:
                for quoted in (False, True):
                    found = []
                    for m, vector in zip(queries, vectors):
                        query = split_query(f'"{m.phrase}"' if quoted else m.phrase)
                        found.append([h.hit.id for h in hybrid_search(index, text_index, vector, query, 5, weight)])
                    ranks = ranks_of(found, truth)
                    key = f"{'quoted' if quoted else 'hybrid'}@{weight:g}"
                    row[f"{key}_r1"], row[f"{key}_r5"] = recall(ranks, 1), recall(ranks, 5)
        rows.append(row)
        print(f"# {engine.name}: {report.ocr.read} images read in {report.ocr.seconds:.1f} s", flush=True)

    keys = [k for k in rows[-1] if k.endswith("_r1")] if len(rows) > 1 else []
    header = ["engine", "OCR images/s", "phrase read"] + [k[:-3] + " R@1/R@5" for k in keys]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        cells = [row["engine"], f"{row['images_per_s']:.2f}", "" if row["read"] is None else f"{row['read']:.1%}"]
        for key in keys:
            r1, r5 = row.get(key), row.get(key[:-3] + "_r5")
            if row["engine"] == "CLIP alone":
                r1, r5 = row["r1"], row["r5"]
            cells.append("" if r1 is None else f"{r1:.1%} / {r5:.1%}")
        print("| " + " | ".join(cells) + " |")
    print(f"# {len(queries)} phrase queries; CLIP alone R@1/R@5 is the same in every column")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"memes": args.memes, "textless": args.textless, "seed": args.seed,
                                               "threads": args.threads, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
