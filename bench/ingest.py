"""Ingest benchmark, side by side in one run; the LAST line printed is one JSON object.

(a) gs:// ingest of hymenoptera_data from the GCS emulator behind a proxy adding a
    fixed round trip per request (a real bucket's latency; the emulator alone
    serves one request at a time), against a sequential one-object-at-a-time gcsfs
    loop through the same proxy doing the same work (download, full decode, RGB,
    hash, store). ``gs_ratio`` = baseline seconds / ingest seconds (target >= 4).
(b) local ingest files/s against a plain sequential loop doing the same work
    (read, full decode, RGB conversion, SHA-256, copy). ``local_ratio`` (target >= 1.7).

Usage: CVPIPE_REAL_DATA=../shared/data python bench/ingest.py [--delay-ms 30] [--repeat 2] [--local-repeat 9] [--work-dir DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from PIL import Image, ImageOps  # noqa: E402
from servers import delay_proxy, gcs_emulator, upload_tree  # noqa: E402

from cvpipe.core.config import load_params  # noqa: E402
from cvpipe.core.console import set_quiet  # noqa: E402
from cvpipe.ingest.stage import run as ingest_run  # noqa: E402


def plain_work(data: bytes, out_dir: Path) -> None:
    """What any loader must do per file: full decode, upright RGB, hash, copy."""
    sha = hashlib.sha256(data).hexdigest()
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        ImageOps.exif_transpose(img).convert("RGB")
    except Exception:
        return
    (out_dir / sha).write_bytes(data)


def cpu_seconds() -> float:
    """CPU time of this process and its reaped children (the decode workers)."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def decode_speedup(blobs: list[bytes], workers: int) -> float:
    """How much *workers* threads speed up bare full decodes (OpenCV, GIL released) on this machine right now:
    the ceiling for any parallel ingest here, since decoding is most of its work (a quiet 2-core machine
    gives ~2; a VM whose second core is busy elsewhere, less)."""
    import cv2
    import numpy as np

    def dec(b: bytes) -> None:
        cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR)

    t = time.perf_counter()
    for b in blobs:
        dec(b)
    one = time.perf_counter() - t
    with ThreadPoolExecutor(workers) as pool:
        t = time.perf_counter()
        list(pool.map(dec, blobs))
        many = time.perf_counter() - t
    return one / many


def baseline_local(files: list[Path], out_dir: Path) -> float:
    t = time.perf_counter()
    for f in files:
        plain_work(f.read_bytes(), out_dir)
    return time.perf_counter() - t


def baseline_gcs(url: str, out_dir: Path) -> tuple[float, int]:
    import gcsfs

    t = time.perf_counter()
    fs = gcsfs.GCSFileSystem(token="anon", skip_instance_cache=True)
    paths = sorted(fs.find(url[len("gs://"):]))
    for p in paths:  # one object at a time
        plain_work(fs.cat_file(p), out_dir)
    return time.perf_counter() - t, len(paths)


def run_ingest(work: Path, source: str, **ingest) -> tuple[float, object]:
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    overrides = [f"ingest.source={source}", f"paths.raw={work / 'raw'}", f"paths.metrics={work / 'metrics'}",
                 f"paths.reports={work / 'reports'}",
                 f"ingest.state_dir={work / 'state'}"] + [f"ingest.{k}={v}" for k, v in ingest.items()]
    from cvpipe.core.config import parse_override

    params = load_params(ROOT / "params.yaml", dict(parse_override(o) for o in overrides))
    t = time.perf_counter()
    report = ingest_run(params)
    return time.perf_counter() - t, report


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--delay-ms", type=float, default=30.0)
    ap.add_argument("--repeat", type=int, default=2, help="gs:// runs of each side; the best is kept")
    ap.add_argument("--local-repeat", type=int, default=9,
                    help="local runs of each side, interleaved; the best is kept (a run is ~1 s, and a "
                         "neighbour's burst on a 2-core machine hits single runs)")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--work-dir", default=None,
                    help="where both sides write (default: the system temp folder); e.g. /dev/shm to take the "
                         "filesystem's write costs out of the comparison")
    args = ap.parse_args()
    data_root = Path(os.environ.get("CVPIPE_REAL_DATA", ROOT.parent / "shared" / "data")) / "hymenoptera_data"
    if not data_root.is_dir():
        sys.exit(f"hymenoptera_data not found under CVPIPE_REAL_DATA ({data_root})")
    set_quiet(True)
    files = sorted(p for p in data_root.rglob("*") if p.is_file())
    total_bytes = sum(p.stat().st_size for p in files)
    tmp = Path(tempfile.mkdtemp(prefix="cvpipe-bench-", dir=args.work_dir))
    os.environ["CVPIPE_CACHE"] = str(tmp / "cache")
    result: dict = {}
    try:
        # (b) local
        base_local, ing_local, base_cpu, ing_cpu, ceiling = [], [], [], [], []
        jpegs = [b for b in (p.read_bytes() for p in files) if b[:2] == b"\xff\xd8"]
        # every run writes into a fresh folder, and the runs' outputs are deleted only after the
        # last one: deleting the previous run's ~400 files right before the next run makes ext4
        # check each freed inode's deletion time when it allocates new ones (perf: the kernel's
        # recently_deleted under ext4_create and ext4_mkdir), a cost of this loop, not of either side
        for k in range(args.local_repeat):
            ceiling.append(decode_speedup(jpegs, os.cpu_count() or 1))
            out = tmp / f"plain-{k}"
            out.mkdir()
            c = cpu_seconds()
            base_local.append(baseline_local(files, out))
            base_cpu.append(cpu_seconds() - c)
            c = cpu_seconds()
            secs, rep = run_ingest(tmp / f"local-{k}", str(data_root))
            ing_cpu.append(cpu_seconds() - c)
            ing_local.append(secs)
        rerun_secs, rerun = run_ingest_rerun(tmp / f"local-{args.local_repeat - 1}", str(data_root))
        result["local"] = {
            "files": len(files), "bytes": total_bytes,
            "baseline_s": round(min(base_local), 3), "baseline_files_per_s": round(len(files) / min(base_local), 1),
            "ingest_s": round(min(ing_local), 3), "ingest_files_per_s": round(len(files) / min(ing_local), 1),
            "ingest_mib_per_s": round(total_bytes / min(ing_local) / 2**20, 1),
            "rerun_s": round(rerun_secs, 3), "rerun_ratio": round(rerun_secs / min(ing_local), 4),
            "rerun_transferred": rerun.transferred, "rerun_decoded": rerun.decoded,
            # CPU seconds spent by each side: on a machine shared with other work the wall-clock
            # ratio understates what the pool gets on idle cores; this shows ingest's extra work
            "baseline_cpu_s": round(min(base_cpu), 3), "ingest_cpu_s": round(min(ing_cpu), 3),
            # the ratio of each interleaved pair, middle value: less flattering than best-of, and
            # what a run on a busy machine is more likely to show
            "pairwise_median_ratio": round(statistics.median(b / i for b, i in zip(base_local, ing_local)), 2),
            # what the cores gave bare decodes during the same runs (median, range): local_ratio's ceiling
            "decode_parallel_speedup": round(statistics.median(ceiling), 2),
            "decode_parallel_speedup_range": [round(min(ceiling), 2), round(max(ceiling), 2)],
        }
        local_ratio = min(base_local) / min(ing_local)

        # (a) gs:// through the emulator behind a delay proxy
        with gcs_emulator(tmp / "gcs") as endpoint:
            upload_tree(endpoint, data_root, "bench", "hymenoptera")
            with delay_proxy(endpoint, args.delay_ms / 1000) as proxy:
                os.environ["STORAGE_EMULATOR_HOST"] = proxy
                url = "gs://bench/hymenoptera"
                base_gs, ing_gs = [], []
                for _ in range(args.repeat):
                    out = tmp / "plain-gs"
                    shutil.rmtree(out, ignore_errors=True)
                    out.mkdir()
                    secs, n = baseline_gcs(url, out)
                    base_gs.append(secs)
                    secs, rep = run_ingest(tmp / "gs", url, gcs_token="anon", transfer_concurrency=args.concurrency)
                    assert rep.transferred == n, (rep.transferred, n)
                    ing_gs.append(secs)
        result["gs"] = {
            "delay_ms": args.delay_ms, "concurrency": args.concurrency, "objects": len(files),
            "baseline_sequential_s": round(min(base_gs), 3), "ingest_s": round(min(ing_gs), 3),
            "ingest_files_per_s": round(len(files) / min(ing_gs), 1),
        }
        gs_ratio = min(base_gs) / min(ing_gs)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result["machine"] = {
        "cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "loadavg_1m": round(os.getloadavg()[0], 2), "work_dir": str(tmp.parent),
    }
    result["gs_ratio"] = round(gs_ratio, 2)
    result["local_ratio"] = round(local_ratio, 2)
    result["targets"] = {"gs_ratio": 4.0, "local_ratio": 1.7}
    print(json.dumps(result))


def run_ingest_rerun(work: Path, source: str) -> tuple[float, object]:
    from cvpipe.core.config import parse_override

    overrides = [f"ingest.source={source}", f"paths.raw={work / 'raw'}", f"paths.metrics={work / 'metrics'}",
                 f"paths.reports={work / 'reports'}",
                 f"ingest.state_dir={work / 'state'}"]
    params = load_params(ROOT / "params.yaml", dict(parse_override(o) for o in overrides))
    t = time.perf_counter()
    report = ingest_run(params)
    return time.perf_counter() - t, report


if __name__ == "__main__":
    main()
