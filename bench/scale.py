"""Does cost grow no faster than the data? ingest and preprocess at 2k, 20k and 200k images.

    python bench/scale.py [--sizes 2000 20000 200000] [--image-size 64] [--workdir DIR]
                          [--cache cold|warm] [--baseline-runs 3] [--default-size 224]

For each size the bench makes a labelled photo-like set itself (nothing is downloaded):
procedural JPEGs of 5 classes (each class a texture family: oriented gratings, rings, checks,
blobs, stripes, in random colours, at 160-400 px), of which 2 % are near-duplicates (a re-encoded,
slightly resized copy of another image of the same class, filed as a new image) and 3 % are
mislabels (filed under another class's folder). Then it runs the real ``cvpipe ingest`` and
``cvpipe preprocess`` on it, each in its own process, and records:

* seconds per image, from the stage's own timer (``reports/ingest.json`` ``seconds``,
  ``reports/dataset.json`` ``seconds.total``: the work, without interpreter start and imports)
  and from the wall clock of the process (everything);
* every stage starts in the same state whatever the size: after an untimed ``sync`` (the set
  generated just before it, 7 GB at 200k, is not written back on its time) and, with ``--cache cold``
  (the default), with the page cache dropped (``/proc/sys/vm/drop_caches``, root only; the JSON says
  when it could not be). Without that, the 200k stages ran with the 7 GB just generated filling the
  page cache: the kernel reclaimed ~2 GB of it during ingest (``pgscan`` 2.4 M pages) and the same run
  varied 0.79-0.98 ms per image with the machine's memory state, while the 2k set fits in free memory.
  Cold, both sizes read their images from disk, as a user's first ingest does;
* the pages the kernel scanned to reclaim memory during each stage (``/proc/vmstat`` ``pgscan_*``),
  which shows when a stage's time includes reclaim;
* peak memory of the stage's process tree (its worker processes included), sampled every
  0.1 s from /proc: ``VmRSS`` and the anonymous part (``RssAnon``: what the stage holds beyond
  the memory-mapped files it reads and writes, the figure the target is about).

The baseline is the same stages on the smallest set, run ``--baseline-runs`` times (a 2k ingest takes
~1 s, and one run of it varied 0.56-0.88 ms per image): the median of its runs. ``*_cost_ratio_200k``
= seconds per image at the largest size over those at the smallest (targets: <= 1.3), ``*_peak_gb`` =
peak anonymous memory at the largest size (target: < 2 GB). ``preprocess.image_size`` is 64 px here
(the default 224 px makes 30 GB of arrays at 200k; the per-image cost of the arrays is linear either
way); ``preprocess_peak_gb_224px`` is the smallest set preprocessed once more at ``--default-size``
(224), for the memory that grows with the image rather than the data (mean/std once held 1.2 GB there:
2.15 GB at 2k images). Disk: about 7 GB of JPEGs and 7 GB of ingested copies at 200k (generating the set took 9-13 min
on 2 cores), removed at the end unless ``--workdir`` is given.
Prints one line per stage and size, then ONE JSON object as its last line.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, env_with_src, machine, write_params  # noqa: E402

CLASSES = ["gratings", "rings", "checks", "blobs", "stripes"]
DUP_RATE, MISLABEL_RATE = 0.02, 0.03


def _texture(cls: int, rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    freq = rng.uniform(0.004, 0.03)  # coarse: a 64 px fit must not alias (near-duplicates must hash close)
    angle = rng.uniform(0, np.pi)
    u = x * np.cos(angle) + y * np.sin(angle)
    cx, cy = rng.uniform(0, w), rng.uniform(0, h)
    r = np.hypot(x - cx, y - cy)
    if cls == 0:
        field = np.sin(u * freq * 2 * np.pi)
    elif cls == 1:
        field = np.sin(r * freq * 2 * np.pi)
    elif cls == 2:
        field = np.sign(np.sin(x * freq * 2 * np.pi)) * np.sign(np.sin(y * freq * 2 * np.pi))
    elif cls == 3:
        field = np.cos(r / (w * rng.uniform(0.1, 0.3))) * np.exp(-r / w)
    else:
        field = np.sign(np.sin(u * freq * 2 * np.pi)) * 0.8
    a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    t = (field[..., None] + 1) / 2
    img = a * t + b * (1 - t) + rng.normal(0, 12, (h, w, 1))
    return np.clip(img, 0, 255).astype(np.uint8)


def _drawn(seed: int, i: int) -> tuple[np.random.Generator, bool, int, int]:
    """Image i's generator after its own draws: (rng, is a near-duplicate, width, height)."""
    rng = np.random.default_rng([seed, i])
    dup = rng.random() < DUP_RATE and i >= 50
    w, h = (int(v) for v in rng.integers(160, 401, 2))
    return rng, dup, w, h


def _make_chunk(root: str, start: int, stop: int, seed: int) -> None:
    """Images start..stop-1: image i depends on (seed, i) only, so a set is the same whatever the
    worker count; a near-duplicate re-draws an earlier image j of its class and re-encodes it smaller."""
    from PIL import Image

    for i in range(start, stop):
        cls = i % len(CLASSES)
        rng, dup, w, h = _drawn(seed, i)
        if dup:
            j = int(rng.integers(0, i // len(CLASSES))) * len(CLASSES) + cls
            src_rng, _, w, h = _drawn(seed, j)
            img = Image.fromarray(_texture(cls, src_rng, w, h)).resize((w * 9 // 10, h * 9 // 10))
            quality = 70
        else:
            img = Image.fromarray(_texture(cls, rng, w, h))
            quality = 90
        folder = CLASSES[cls]
        if rng.random() < MISLABEL_RATE:
            folder = CLASSES[(cls + 1 + int(rng.integers(0, len(CLASSES) - 1))) % len(CLASSES)]
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality)
        Path(root, folder, f"img{i:07d}.jpg").write_bytes(buf.getvalue())


def make_set(root: Path, n: int, workers: int, seed: int = 0) -> float:
    for c in CLASSES:
        (root / c).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    step = 500
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for f in [pool.submit(_make_chunk, str(root), s, min(n, s + step), seed) for s in range(0, n, step)]:
            f.result()
    return time.perf_counter() - t0


class TreeMemory:
    """Peak VmRSS and RssAnon (GiB) summed over a process and its descendants, sampled from /proc."""

    def __init__(self, pid: int, every: float = 0.1):
        self.pid, self.every = pid, every
        self.peak_rss = self.peak_anon = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _tree(self) -> list[int]:
        import psutil

        try:
            p = psutil.Process(self.pid)
            return [p.pid] + [c.pid for c in p.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def _loop(self) -> None:
        while not self._stop.is_set():
            rss = anon = 0
            for pid in self._tree():
                try:
                    status = Path(f"/proc/{pid}/status").read_text()
                except OSError:
                    continue
                fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
                rss += int(fields.get("VmRSS", "0 kB").split()[0])
                anon += int(fields.get("RssAnon", "0 kB").split()[0])
            self.peak_rss = max(self.peak_rss, rss / 2**20)
            self.peak_anon = max(self.peak_anon, anon / 2**20)
            self._stop.wait(self.every)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


DROP_CACHES = Path("/proc/sys/vm/drop_caches")


def settle(cache: str) -> str:
    """Before a stage: write back what is dirty and, for ``cold``, drop the page cache. Returns the state
    the stage starts in: ``cold``, or ``warm`` (asked for, or drop_caches not writable: not root)."""
    os.sync()
    if cache == "cold":
        try:
            DROP_CACHES.write_text("3\n")
            return "cold"
        except OSError:
            return "warm (drop_caches not writable)"
    return "warm"


def _reclaim_scans() -> int:
    """Pages the kernel has scanned to reclaim memory since boot (kswapd and direct reclaim)."""
    try:
        fields = dict(line.split() for line in Path("/proc/vmstat").read_text().splitlines())
    except OSError:
        return 0
    return sum(int(v) for k, v in fields.items() if k.startswith("pgscan_"))


def run_stage(stage: str, project: Path) -> dict:
    scans = _reclaim_scans()
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "cvpipe", stage, "--quiet"], cwd=project, env=env_with_src(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    mem = TreeMemory(proc.pid)
    out, _ = proc.communicate()
    mem.stop()
    wall = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"cvpipe {stage} failed in {project}:\n{out[-3000:]}")
    report = json.loads((project / "reports" / ("ingest.json" if stage == "ingest" else "dataset.json")).read_text())
    work = report["seconds"] if stage == "ingest" else report["seconds"]["total"]
    return {"wall_s": round(wall, 2), "work_s": round(float(work), 2),
            "peak_rss_gb": round(mem.peak_rss, 3), "peak_anon_gb": round(mem.peak_anon, 3),
            "reclaim_scanned_pages": _reclaim_scans() - scans}


def run_size(src: Path, project: Path, n: int, args: argparse.Namespace, runs: int) -> dict:
    """Ingest then preprocess on the set *src*, *runs* times (a fresh project each time): per stage, the run
    of median work seconds, with every run's per-image seconds beside it."""
    per_stage: dict[str, list[dict]] = {"ingest": [], "preprocess": []}
    for _ in range(runs):
        shutil.rmtree(project, ignore_errors=True)  # no earlier run's journal or outputs: every run does all the work
        write_params(project, {"ingest.source": str(src), "ingest.workers": args.workers, "ingest.overrides": None,
                               "preprocess.image_size": args.image_size, "preprocess.workers": args.workers})
        for stage in per_stage:
            cache = settle(args.cache)
            r = run_stage(stage, project)
            r["cache"] = cache
            r["work_s_per_image"] = r["work_s"] / n
            r["wall_s_per_image"] = r["wall_s"] / n
            per_stage[stage].append(r)
            print(f"{stage:10s} n={n:>7}: {r['work_s']:8.1f} s work ({1e3 * r['work_s_per_image']:.3f} ms/img), "
                  f"{r['wall_s']:8.1f} s wall, peak RSS {r['peak_rss_gb']:.2f} GB, anon {r['peak_anon_gb']:.2f} GB, "
                  f"{r['reclaim_scanned_pages']} pages scanned for reclaim, {cache}", flush=True)
    out: dict = {}
    for stage, rs in per_stage.items():
        median = sorted(rs, key=lambda r: r["work_s"])[len(rs) // 2]
        out[stage] = {**median, "peak_rss_gb": max(r["peak_rss_gb"] for r in rs),
                      "peak_anon_gb": max(r["peak_anon_gb"] for r in rs),
                      "runs_work_s_per_image": [round(r["work_s_per_image"], 7) for r in rs]}
    return out


def preprocess_at(src: Path, project: Path, size: int, args: argparse.Namespace) -> dict:
    """Preprocess the smallest set once more at *size* px (the stage's default, 224). A cost that grows with
    the image rather than the data shows here and hides at the 64 px of the sized runs: mean/std once held
    1.2 GB at 224 px whatever the number of images."""
    write_params(project, {"ingest.source": str(src), "ingest.workers": args.workers, "ingest.overrides": None,
                           "preprocess.image_size": size, "preprocess.workers": args.workers})
    cache = settle(args.cache)
    r = {**run_stage("preprocess", project), "cache": cache, "image_size": size}
    print(f"preprocess at {size} px: {r['work_s']:.1f} s work, peak anon {r['peak_anon_gb']:.2f} GB", flush=True)
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000, 200000])
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--workdir", type=Path, help="keep the sets here (default: a temp folder, removed); "
                    "a set already there is used again, its projects are made afresh")
    ap.add_argument("--cache", choices=["cold", "warm"], default="cold",
                    help="cold: drop the page cache before each stage (root); warm: leave it as it is")
    ap.add_argument("--baseline-runs", type=int, default=3, help="runs of the smallest size (the median is the baseline)")
    ap.add_argument("--default-size", type=int, default=224,
                    help="also preprocess the smallest set once at this size for its peak memory (0: skip)")
    args = ap.parse_args()
    if args.baseline_runs < 1:
        ap.error("--baseline-runs must be at least 1")
    tmp = None if args.workdir else tempfile.mkdtemp(prefix="cvpipe-scale-")
    work = args.workdir or Path(tmp)
    results: dict[int, dict] = {}
    try:
        for n in sorted(args.sizes):
            src, project = work / f"set-{n}", work / f"project-{n}"
            made = make_set(src, n, args.workers) if not src.is_dir() or not any(src.iterdir()) else 0.0
            runs = args.baseline_runs if n == min(args.sizes) else 1
            results[n] = {"generate_s": round(made, 1), **run_size(src, project, n, args, runs)}
            dataset = json.loads((project / "reports" / "dataset.json").read_text())
            results[n]["near_duplicate_groups"] = dataset.get("near_duplicates", {}).get("groups")
            if n == min(args.sizes) and args.default_size:
                results[n]["preprocess_at_default_size"] = preprocess_at(src, project, args.default_size, args)
            if not args.workdir:
                shutil.rmtree(project / "data", ignore_errors=True)
                shutil.rmtree(src, ignore_errors=True)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    small, big = min(results), max(results)
    ratio = {s: round(results[big][s]["work_s_per_image"] / results[small][s]["work_s_per_image"], 3)
             for s in ("ingest", "preprocess")}
    wall_ratio = {s: round(results[big][s]["wall_s_per_image"] / results[small][s]["wall_s_per_image"], 3)
                  for s in ("ingest", "preprocess")}
    label = f"{big // 1000}k"
    print(json.dumps({
        "bench": "scale", "sizes": sorted(results), "image_size": args.image_size, "workers": args.workers,
        "stages": {str(n): r for n, r in results.items()},
        f"ingest_cost_ratio_{label}": ratio["ingest"], f"preprocess_cost_ratio_{label}": ratio["preprocess"],
        f"ingest_wall_ratio_{label}": wall_ratio["ingest"], f"preprocess_wall_ratio_{label}": wall_ratio["preprocess"],
        "ingest_peak_gb": results[big]["ingest"]["peak_anon_gb"], "preprocess_peak_gb": results[big]["preprocess"]["peak_anon_gb"],
        "ingest_peak_rss_gb": results[big]["ingest"]["peak_rss_gb"],
        f"preprocess_peak_gb_{args.default_size}px": results[small].get("preprocess_at_default_size", {}).get("peak_anon_gb"),
        "preprocess_peak_rss_gb": results[big]["preprocess"]["peak_rss_gb"],
        "cache": args.cache, "baseline_runs": args.baseline_runs,
        "targets": {"cost_ratio_max": 1.3, "peak_gb_max": 2.0}, "repo": str(REPO), "machine": machine(),
    }))


if __name__ == "__main__":
    main()
