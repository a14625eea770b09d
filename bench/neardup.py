"""Near-duplicate grouping at a million hashes: cvpipe's multi-index hashing beside its baselines.

Generates ``--n`` random 64-bit hashes (default 1,000,000) of which a fifth are copies of others
with up to 4 bits flipped (planted groups at distance <= 4, the default
``split.near_duplicate_distance``), and groups them with:

* ``cvpipe``: :func:`cvpipe.preprocess.near_duplicates.near_duplicate_groups` (numpy, one thread);
* ``brute``: the all-pairs blocks preprocess used before (``brute_force_groups``), run on
  ``--check-n`` hashes only (it is O(n^2): its million-hash time is extrapolated as (n/check_n)^2);
* ``faiss`` (when ``faiss`` is importable, e.g. ``pip install faiss-cpu``): ``IndexBinaryMultiHash``
  with 5 tables of 12 bits and ``range_search`` (the same pigeonhole search in C++, OpenMP threads),
  its links joined with the same connected components.

Each runs in its own process so its peak RSS (``ru_maxrss``, imports included) is its own. The
groups of all three are compared on the ``--check-n`` hashes. Targets (issue #17): the million in
under 60 s and under 1 GB.

    python bench/neardup.py            # last line: one JSON object
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from _common import env_with_src, machine  # noqa: E402

DISTANCE = 4


def planted_hashes(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    h = rng.integers(0, 2**64 - 1, n, dtype=np.uint64, endpoint=True)
    k = n // 5
    copies = h[rng.integers(0, n - k, k)]
    for _ in range(DISTANCE):  # up to DISTANCE bits flipped per copy
        flip = rng.random(k) < 0.75
        copies[flip] ^= np.uint64(1) << rng.integers(0, 64, k).astype(np.uint64)[flip]
    h[n - k:] = copies
    return rng.permutation(h)


def faiss_groups(h: np.ndarray) -> np.ndarray:
    import faiss

    from cvpipe.preprocess.near_duplicates import _canonical, _components

    codes = np.ascontiguousarray(h).view(np.uint8).reshape(-1, 8)
    index = faiss.IndexBinaryMultiHash(64, DISTANCE + 1, 12)  # 5 x 12 bits: a pair within 4 bits agrees on one
    index.nflip = 0
    index.add(codes)
    lims, _, ids = index.range_search(codes, DISTANCE + 1)  # distances < radius
    rows = np.repeat(np.arange(len(h)), np.diff(lims.astype(np.int64)))
    keep = ids > rows
    return _canonical(_components(len(h), rows[keep], ids[keep].astype(np.int64)))


def worker(method: str, n: int, out: Path) -> None:
    from cvpipe.preprocess.near_duplicates import brute_force_groups, near_duplicate_groups

    h = planted_hashes(n)
    t0 = time.perf_counter()
    if method == "cvpipe":
        groups = near_duplicate_groups(h, DISTANCE)
    elif method == "brute":
        groups = brute_force_groups(h, DISTANCE)
    else:
        groups = faiss_groups(h)
    seconds = time.perf_counter() - t0
    np.save(out, groups)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    print(json.dumps({"seconds": round(seconds, 2), "peak_gb": round(peak, 3),
                      "groups": int(groups.max()) + 1 if len(groups) else 0}))


def run(method: str, n: int, folder: Path) -> dict | None:
    out = folder / f"{method}-{n}.npy"
    proc = subprocess.run([sys.executable, __file__, "--worker", method, "--n", str(n), "--out", str(out)],
                          capture_output=True, text=True, env=env_with_src())
    if proc.returncode:
        if method == "faiss" and "No module named 'faiss'" in proc.stderr:
            return None
        sys.exit(f"{method} at {n} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["labels"] = np.load(out)
    return result


def main() -> None:
    import tempfile

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--check-n", type=int, default=50_000)
    ap.add_argument("--worker", choices=["cvpipe", "brute", "faiss"])
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, args.n, args.out)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        small = {m: run(m, args.check_n, folder) for m in ("cvpipe", "brute", "faiss")}
        big = {m: run(m, args.n, folder) for m in ("cvpipe", "faiss")}
    ref = small["brute"]["labels"]
    res = {
        "bench": "neardup", "n": args.n, "check_n": args.check_n, "distance": DISTANCE,
        "cvpipe_seconds": big["cvpipe"]["seconds"], "cvpipe_peak_gb": big["cvpipe"]["peak_gb"],
        "groups_with_copies": int((np.bincount(big["cvpipe"]["labels"]) > 1).sum()),
        "cvpipe_seconds_check_n": small["cvpipe"]["seconds"],
        "brute_seconds_check_n": small["brute"]["seconds"], "brute_peak_gb_check_n": small["brute"]["peak_gb"],
        "brute_seconds_extrapolated": round(small["brute"]["seconds"] * (args.n / args.check_n) ** 2, 1),
        "speedup_vs_brute_check_n": round(small["brute"]["seconds"] / max(small["cvpipe"]["seconds"], 1e-3), 1),
        "cvpipe_equals_brute_check_n": bool(np.array_equal(small["cvpipe"]["labels"], ref)),
        "under_60s_1gb": big["cvpipe"]["seconds"] < 60 and big["cvpipe"]["peak_gb"] < 1.0,
    }
    if big["faiss"] is not None:
        res.update({
            "faiss_seconds": big["faiss"]["seconds"], "faiss_peak_gb": big["faiss"]["peak_gb"],
            "faiss_over_cvpipe_seconds": round(big["faiss"]["seconds"] / big["cvpipe"]["seconds"], 2),
            "faiss_equals_brute_check_n": bool(np.array_equal(small["faiss"]["labels"], ref)),
            "faiss_equals_cvpipe": bool(np.array_equal(big["faiss"]["labels"], big["cvpipe"]["labels"])),
        })
    else:
        res["faiss"] = "not installed (pip install faiss-cpu to compare)"
    res["machine"] = machine()
    print(json.dumps(res))


if __name__ == "__main__":
    main()
