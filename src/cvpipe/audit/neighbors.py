"""Approximate nearest neighbours for the audit's k-NN above ``HNSW_ABOVE`` images: scikit-learn's
``KNeighborsClassifier`` with its neighbour search replaced by faiss's HNSW graph.

Why: scikit-learn's exact search is brute force on these features (it picks ``brute`` above 15
dimensions, and the pixel PCA has 32), so one cross-fitting fold costs (fitted rows) x (held-out rows)
distances: O(n^2). HNSW inserts and queries in O(log n) each. Measured by bench/audit.py on this 2-core
VM (the whole learner, 5 folds, 32-d clustered features, k 15; microseconds per image):

    images     exact   HNSW    same label   exact's suspects HNSW flags too
    50,000       176    238      0.99992        0.9992
    100,000      245    267      0.99995        0.9996
    200,000      343    295      0.99992        0.9987
    400,000      551    361      0.99996        0.9984

The exact search's cost per image grows with n (2.25x from 100k to 400k), HNSW's by log n (1.35x).
They break even near ``HNSW_ABOVE``, so ``audit.knn_index: auto`` keeps the exact search below it and
every smaller dataset's audit is exactly what it was; ``hnsw``/``exact`` force either.

Why faiss's HNSW and not another index: IVF (inverted lists) needs a k-means fit and still scans
n/nlist vectors per query (O(n^1.5) overall); HNSW needs no training. faiss (Meta; wheels for every
platform the train image runs on) over hnswlib or pynndescent: the library the field uses, no numba JIT.
Graph settings, measured at 160k fitted / 40k queries: links 16 and construction depth 40 build in 6 s
with recall@15 0.97 at search depth 64 (links 32 / depth 64: 11 s for 0.99); the search depth is raised
to 128 since queries are the cheap part. The audit's output barely moves: bench/audit.py.

Why a subclass: the distance-weighted vote, the classes and the probabilities stay scikit-learn's;
only :meth:`kneighbors` (which ``predict_proba`` calls for ``weights="distance"``) is faiss's.
Determinism: the graph is built on one thread (faiss inserts in parallel in a thread-dependent order
otherwise) with faiss's fixed level seed, so a rerun gives the same neighbours; queries use every
thread (each query's answer does not depend on the others).
"""

from __future__ import annotations

import numpy as np
from sklearn.neighbors import KNeighborsClassifier

HNSW_ABOVE = 150_000  # audited images above which ``audit.knn_index: auto`` picks HNSW (the break-even, measured above)
LINKS = 16  # HNSW's M: graph links per vector
EF_CONSTRUCTION = 40  # candidates kept while inserting (faiss's default)
EF_SEARCH = 128  # candidates kept while searching; at least n_neighbors


def knn_index(setting: str, images: int) -> str:
    """``exact`` or ``hnsw`` for ``audit.knn_index`` *setting* (auto/exact/hnsw) and *images* audited."""
    if setting != "auto":
        return setting
    return "hnsw" if images > HNSW_ABOVE else "exact"


class HNSWKNeighborsClassifier(KNeighborsClassifier):
    """Distance-weighted k-NN classifier whose neighbours come from a faiss HNSW graph (Euclidean)."""

    def __init__(self, n_neighbors: int = 5, *, links: int = LINKS, ef_construction: int = EF_CONSTRUCTION,
                 ef_search: int = EF_SEARCH):
        # brute: scikit-learn's own fit only stores X (no tree built for nothing); distance weights: the
        # vote that goes through kneighbors (the uniform vote has a brute-force fast path that does not)
        super().__init__(n_neighbors=n_neighbors, weights="distance", algorithm="brute")
        self.links = links
        self.ef_construction = ef_construction
        self.ef_search = ef_search

    def fit(self, X, y):
        import faiss

        X = np.ascontiguousarray(X, dtype=np.float32)
        super().fit(X, y)
        index = faiss.IndexHNSWFlat(X.shape[1], self.links)
        index.hnsw.efConstruction = self.ef_construction
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)  # a deterministic graph: insertion order fixed
        try:
            index.add(X)
        finally:
            faiss.omp_set_num_threads(threads)
        self.index_ = index
        return self

    def kneighbors(self, X=None, n_neighbors=None, return_distance=True):
        """scikit-learn's contract: (distances, indices) of each row's *n_neighbors* nearest fitted rows,
        nearest first; with X None, those of every fitted row but itself."""
        k = self.n_neighbors if n_neighbors is None else n_neighbors
        if k > self.n_samples_fit_ - (X is None):
            raise ValueError(f"Expected n_neighbors <= n_samples_fit, but n_neighbors = {k}, n_samples_fit = {self.n_samples_fit_}")
        queries = self._fit_X if X is None else np.ascontiguousarray(X, dtype=np.float32)
        sq, ids = self._search(queries, k + (X is None))
        if X is None:  # drop each row itself (or, among exact duplicates, the farthest entry)
            own = ids == np.arange(len(ids))[:, None]
            own[~own.any(axis=1), -1] = True
            sq, ids = sq[~own].reshape(len(ids), k), ids[~own].reshape(len(ids), k)
        dist = np.sqrt(np.maximum(sq, 0)).astype(np.float64)  # faiss returns squared L2
        return (dist, ids) if return_distance else ids

    def _search(self, X: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """faiss's graph search; a row it leaves short (-1 ids: a tiny or badly connected graph) is
        answered by the exact brute-force search this class inherits (``algorithm="brute"``)."""
        self.index_.hnsw.efSearch = max(self.ef_search, k)
        sq, ids = self.index_.search(X, k)
        short = (ids < 0).any(axis=1)
        if short.any():
            dist, ids[short] = super().kneighbors(X[short], k)
            sq[short] = dist**2
        return sq, ids.astype(np.intp)
