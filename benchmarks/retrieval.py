"""Benchmark: index build time and search latency of exact search in TF against approximate libraries.

For N random embeddings (N = 10k and 1M, D = 128, L2-normalised Gaussian vectors) and queries that
are noisy copies of indexed vectors (the near-duplicate case `stp search` serves), it measures:

  - build: seconds to make the searcher (TF: one constant; faiss HNSW / IVF and hnswlib: the index),
  - latency: median and p99 ms of one query at a time (what `stp search VIDEO` does), k = 10,
  - batch: ms per query when 1000 queries go at once,
  - recall@10 against the exact top 10 (1.0 for the exact search by definition),
  - the speed-up of each approximate backend over exact TF search in the same run.

Random vectors are the hard case for graph and cluster indexes (no structure to exploit), so recall
here is a lower bound of what real embeddings give.

Run: python benchmarks/retrieval.py [--sizes 10000,1000000] [--dim 128] [--backends tf,faiss-hnsw,faiss-ivf,hnswlib]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import stpkeras  # noqa: F401  (first, before TensorFlow loads: it turns TensorFlow's oneDNN CPU kernels on)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

K = 10
SINGLE_QUERIES = 200
BATCH_QUERIES = 1000


def data(n: int, dim: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((n, dim), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    picks = rng.choice(n, BATCH_QUERIES, replace=False)
    queries = vectors[picks] + 0.3 / np.sqrt(dim) * rng.standard_normal((BATCH_QUERIES, dim), dtype=np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    return vectors, queries


def make_tf(vectors):
    from stpkeras.index import ExactSearch
    return ExactSearch(vectors)


def make_faiss_hnsw(vectors):
    from stpkeras.index import FaissSearch
    return FaissSearch.build(vectors)


class _Faiss:
    def __init__(self, index):
        self.index = index

    def search(self, q, k):
        return self.index.search(np.ascontiguousarray(q, np.float32), k)


def make_faiss_ivf(vectors):
    import faiss

    n, dim = vectors.shape
    nlist = int(4 * np.sqrt(n))
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.train(vectors[np.random.default_rng(1).choice(n, min(n, 64 * nlist), replace=False)])
    index.add(vectors)
    index.nprobe = 16
    return _Faiss(index)


class _Hnswlib:
    def __init__(self, index):
        self.index = index

    def search(self, q, k):
        labels, distances = self.index.knn_query(q, k=k)
        return 1.0 - distances, labels


def make_hnswlib(vectors):
    import hnswlib

    from stpkeras.index import HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH, HNSW_M

    index = hnswlib.Index(space="ip", dim=vectors.shape[1])
    index.init_index(max_elements=len(vectors), M=HNSW_M, ef_construction=HNSW_EF_CONSTRUCTION, random_seed=0)
    index.add_items(vectors, np.arange(len(vectors)))
    index.set_ef(HNSW_EF_SEARCH)
    return _Hnswlib(index)


BACKENDS = {"tf": make_tf, "faiss-hnsw": make_faiss_hnsw, "faiss-ivf": make_faiss_ivf, "hnswlib": make_hnswlib}


def measure(name, vectors, queries, truth):
    t = time.perf_counter()
    searcher = BACKENDS[name](vectors)
    build = time.perf_counter() - t
    searcher.search(queries[:1], K)  # warm-up (TF traces its function here)
    times = []
    for q in queries[:SINGLE_QUERIES]:
        t = time.perf_counter()
        searcher.search(q[None], K)
        times.append(time.perf_counter() - t)
    t = time.perf_counter()
    _, found = searcher.search(queries, K)
    batch = (time.perf_counter() - t) / len(queries)
    recall = np.mean([len(set(f) & set(g)) / K for f, g in zip(np.asarray(found), truth)])
    return {"build_s": build, "p50_ms": 1e3 * np.median(times), "p99_ms": 1e3 * np.percentile(times, 99),
            "batch_ms": 1e3 * batch, "recall@10": recall,
            "top1": float(np.mean(np.asarray(found)[:, 0] == truth[:, 0]))}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,1000000")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--backends", default="tf,faiss-hnsw,faiss-ivf,hnswlib")
    args = parser.parse_args(argv)
    import tensorflow as tf

    print(f"TF {tf.__version__}, {os.cpu_count()} CPU cores, D={args.dim}, k={K}; latency over "
          f"{SINGLE_QUERIES} single queries, batch of {BATCH_QUERIES}")
    for n in (int(s) for s in args.sizes.split(",")):
        vectors, queries = data(n, args.dim)
        truth = make_tf(vectors).search(queries, K)[1]
        rows = {}
        for name in args.backends.split(","):
            try:
                rows[name] = measure(name, vectors, queries, truth)
            except ImportError as e:
                print(f"  {name}: skipped ({e})")
                continue
            r = rows[name]
            ratio = (f"  {rows['tf']['p50_ms'] / r['p50_ms']:6.1f}x faster than tf (p50)"
                     if "tf" in rows and name != "tf" else "")
            print(f"N={n:>9,} {name:<11} build {r['build_s']:8.2f}s | p50 {r['p50_ms']:8.3f} ms  p99 "
                  f"{r['p99_ms']:8.3f} ms | batch {r['batch_ms']:7.4f} ms/query | recall@10 {r['recall@10']:.4f} "
                  f"top1 {r['top1']:.3f}{ratio}", flush=True)


if __name__ == "__main__":
    main()
