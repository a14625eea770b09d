"""The audit's cross-fitted k-NN at scale: faiss's HNSW search (``audit.knn_index: hnsw``) beside the exact
scikit-learn search it replaces above 150k images (``exact``, the baseline), on the same features.

Generates ``--sizes`` sets (default 50,000 and 200,000) of 32-d features shaped like the audit's PCA'd
pixels (ten clusters, a decaying spread per dimension), flips ``--flip`` of the labels (seeded, to
another class), and runs the audit's learner (:func:`cvpipe.audit.learner.out_of_sample_probs`, 5 folds,
k 15, the defaults) then cleanlab's :func:`~cvpipe.audit.stage.find_issues` with each search. The
features are made here rather than computed from images: this measures the search, which is the
part whose cost grows faster than n (pixel features are one linear pass, measured by bench/scale.py).

Printed per size and search: seconds, seconds per image, and the flagged images' precision and recall
against the flipped ones; per size: how often the two searches' probabilities name the same label
and the share of the exact search's suspects that HNSW flags too. Named figures (last line):
``exact_cost_ratio`` and ``hnsw_cost_ratio`` (seconds per image at the largest size over the
smallest: 1.0 is linear, the size ratio is quadratic), ``speedup_largest`` (exact / HNSW seconds at
the largest size), ``label_agreement_min`` and ``issue_overlap_min`` (worst size).

    python bench/audit.py                          # last line: one JSON object
    python bench/audit.py --sizes 100000 400000    # ~7 min here (the 400k exact search: 220 s)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from _common import machine  # noqa: E402


def features(n: int, flip: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features, noisy labels, flipped mask)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(10, 32)).astype(np.float32) * 3
    y = rng.integers(0, 10, n)
    x = centres[y] + rng.normal(size=(n, 32)).astype(np.float32) * np.linspace(2, 0.1, 32, dtype=np.float32)
    flipped = rng.random(n) < flip
    noisy = np.where(flipped, (y + rng.integers(1, 10, n)) % 10, y)
    return x, noisy, flipped


def run(x: np.ndarray, labels: np.ndarray, flipped: np.ndarray, search: str) -> dict:
    from cvpipe.audit.learner import out_of_sample_probs
    from cvpipe.audit.stage import find_issues
    from cvpipe.core.config import Params

    ap = Params.model_validate({}).audit
    t = time.perf_counter()
    probs = out_of_sample_probs(x, labels, np.arange(len(labels)), ap, 10, ap.folds, "pixels", search)
    seconds = time.perf_counter() - t
    ranked, *_ = find_issues(labels, probs, ap.filter_by)
    hits = int(flipped[ranked].sum())
    return {"seconds": round(seconds, 2), "us_per_image": round(seconds / len(labels) * 1e6, 1),
            "flagged": len(ranked), "precision": round(hits / max(len(ranked), 1), 4),
            "recall": round(hits / max(int(flipped.sum()), 1), 4), "_probs": probs, "_ranked": ranked}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[50_000, 200_000])
    ap.add_argument("--flip", type=float, default=0.05, help="share of labels flipped")
    args = ap.parse_args()
    if any(n < 1000 for n in args.sizes):
        ap.error("--sizes: at least 1000 images each")
    sizes = sorted(args.sizes)
    results: dict[str, dict] = {}
    for n in sizes:
        x, labels, flipped = features(n, args.flip)
        row = {s: run(x, labels, flipped, s) for s in ("exact", "hnsw")}
        e, h = row["exact"], row["hnsw"]
        row["label_agreement"] = round(float((e["_probs"].argmax(1) == h["_probs"].argmax(1)).mean()), 5)
        row["issue_overlap"] = round(len(set(e["_ranked"]) & set(h["_ranked"])) / max(len(e["_ranked"]), 1), 4)
        for s in ("exact", "hnsw"):
            del row[s]["_probs"], row[s]["_ranked"]
        results[str(n)] = row
        print(f"{n:>9,} images  exact {e['seconds']:8.1f} s ({e['us_per_image']} us/img, P {e['precision']} R {e['recall']})"
              f"  hnsw {h['seconds']:8.1f} s ({h['us_per_image']} us/img, P {h['precision']} R {h['recall']})"
              f"  same label {row['label_agreement']}, suspects shared {row['issue_overlap']}", flush=True)
    lo, hi = results[str(sizes[0])], results[str(sizes[-1])]
    print(json.dumps({
        "bench": "audit", "sizes": sizes, "flip": args.flip, "results": results,
        "exact_cost_ratio": round(hi["exact"]["us_per_image"] / lo["exact"]["us_per_image"], 3),
        "hnsw_cost_ratio": round(hi["hnsw"]["us_per_image"] / lo["hnsw"]["us_per_image"], 3),
        "speedup_largest": round(hi["exact"]["seconds"] / hi["hnsw"]["seconds"], 3),
        "label_agreement_min": min(r["label_agreement"] for r in results.values()),
        "issue_overlap_min": min(r["issue_overlap"] for r in results.values()),
        "machine": machine(),
    }))


if __name__ == "__main__":
    main()
