"""Benchmark: the knn detector's exact search (faiss IndexFlatL2, and the chunked matmul + top-k fallback) vs
scikit-learn's NearestNeighbors, as oodbench used it before, on the same L2-normalised features.

Default sizes are the issue's: 50 000 × 512 training features, 10 000 queries, k = 50. Each side is timed from the
normalised bank to the k-th distances (index build included). The results are checked equal. Goal: >= 5x.

    python scripts/perf/bench_knn.py [--bank 50000] [--queries 10000] [--dim 512] [--k 50] [--device cpu]
"""
import argparse

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.neighbors import NearestNeighbors

from oodbench.detectors import method
from timing import timed


def ours(backend, bank, queries, k, device):
    det = method("knn", k=k, backend=backend).to(device)
    det.fit_reference({"features": bank, "labels": None})   # the bank as the reference outputs (no model pass)
    return det.score_outputs({"features": queries}).cpu().numpy()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bank", type=int, default=50000)
    parser.add_argument("--queries", type=int, default=10000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    bank = torch.randn(args.bank, args.dim, generator=g).relu()         # ReLU features, like a ResNet's
    queries = torch.randn(args.queries, args.dim, generator=g).relu()
    unit_bank = F.normalize(bank, dim=1).double().numpy()               # what the old code handed scikit-learn
    unit_q = F.normalize(queries, dim=1).double().numpy()

    def sklearn():
        index = NearestNeighbors(n_neighbors=args.k).fit(unit_bank)
        return index.kneighbors(unit_q)[0][:, -1]

    t_ref, ref = timed(sklearn)
    print(f"scikit-learn NearestNeighbors (float64, as before): {t_ref:.2f} s")
    backends = ["torch"]
    try:
        import faiss  # noqa: F401

        backends.insert(0, "faiss")
    except ImportError:
        print("faiss not installed: pip install 'oodbench[faiss]' to time it")
    device = torch.device(args.device)
    for backend in backends:
        b, q = bank.to(device), queries.to(device)
        t, got = timed(lambda: ours(backend, b, q, args.k, device))
        err = float(np.abs(got - ref).max())
        print(f"oodbench knn, {backend:5s} on {device.type}: {t:.2f} s  speed-up {t_ref / t:.1f}x "
              f"(goal >= 5x)  max |difference| {err:.1e}")


if __name__ == "__main__":
    main()
