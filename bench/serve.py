"""Serving bench: a bounded burst of concurrent /predict requests vs the model's raw batch-1 latency.

    CVPIPE_REAL_DATA=../shared/data python bench/serve.py [--model models/best] [--requests 200 --concurrency 8]

In one run:

1. the model (``--model``, or else a resnet18 trained here for 1 epoch at 64 px on a
   slice of hymenoptera_data by the real pipeline) is loaded in this process and its
   **raw batch-1 inference latency** is timed: a preprocessed (1, 3, H, W) tensor through
   the model, no HTTP, no decoding (median of ``--raw-iters`` after warm-up); the
   in-process pipeline (decode + preprocess + model) is timed too;
2. ``cvpipe serve`` is started as a subprocess on 127.0.0.1 (the real CLI and uvicorn);
3. ``--requests`` POST /predict requests with real photos (hymenoptera val JPEGs) are
   fired with at most ``--concurrency`` in flight (httpx AsyncClient), after a few
   warm-up requests;
4. p50/p95/p99 client-side latency, throughput and errors are reported beside the raw
   numbers. Any error (non-200 or transport failure) makes the exit code 1.

The last stdout line is one JSON object. Client and server share this machine's cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import REPO, cvpipe, free_port, start_server  # noqa: E402  (bench/ is on sys.path)
sys.path.insert(0, str(REPO / "src"))


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def train_small_model(data: Path, work: Path, per_class: int) -> Path:
    import shutil

    import yaml

    src = work / "slice"
    for cls in ("ants", "bees"):
        (src / cls).mkdir(parents=True)
        for f in sorted((data / "hymenoptera_data/train" / cls).iterdir())[:per_class]:
            shutil.copy(f, src / cls / f.name)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["ingest"]["source"] = str(src)
    params["preprocess"]["image_size"] = 64
    params["augment"]["train"] = [{"HorizontalFlip": {"p": 0.5}}]
    params["train"].update({"epochs": 1, "warmup_epochs": 0, "batch_size": 16})
    params["wandb"]["mode"] = "disabled"
    proj = work / "project"
    proj.mkdir()
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for stage in ("ingest", "preprocess", "train", "evaluate"):
        cvpipe([stage, "--quiet"], proj)
    return proj / "models/resnet18/best.pt"


def raw_latency(model_path: str, photos: list[Path], iters: int) -> dict[str, float]:
    from cvpipe.serve.model import load_model

    m = load_model(model_path)
    data = photos[0].read_bytes()
    x = m.to_tensor([m.to_array(m.decode(data, max_pixels=10**9), data)])
    for _ in range(10):
        m.forward(x)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        m.forward(x)
        times.append((time.perf_counter() - t0) * 1e3)
    pipeline = []
    for p in (photos * (1 + iters // max(1, len(photos))))[:iters]:
        b = p.read_bytes()
        t0 = time.perf_counter()
        m.predict_bytes(b, k=5, max_pixels=10**9)
        pipeline.append((time.perf_counter() - t0) * 1e3)
    import torch

    return {"arch": m.arch, "image_size": m.image_size, "torch_threads": torch.get_num_threads(),
            "raw_batch1_ms_p50": round(statistics.median(times), 3), "raw_batch1_ms_p95": round(percentile(times, 95), 3),
            "inprocess_pipeline_ms_p50": round(statistics.median(pipeline), 3)}


async def burst(url: str, photos: list[Path], n: int, concurrency: int, warmup: int) -> dict:
    import httpx

    payloads = [(p.name, p.read_bytes()) for p in photos]
    sem = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    server_inference: list[float] = []
    errors: list[str] = []

    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=concurrency)) as client:
        async def one(i: int, record: bool) -> None:
            name, data = payloads[i % len(payloads)]
            async with sem:
                t0 = time.perf_counter()
                try:
                    r = await client.post(f"{url}/predict", files={"file": (name, data, "image/jpeg")})
                except httpx.HTTPError as exc:
                    errors.append(f"{name}: {type(exc).__name__}: {exc}")
                    return
                dt = (time.perf_counter() - t0) * 1e3
            if r.status_code != 200:
                errors.append(f"{name}: HTTP {r.status_code} {r.text[:200]}")
                return
            if record:
                latencies.append(dt)
                server_inference.append(r.json()["latency_ms"]["inference"])

        await asyncio.gather(*(one(i, False) for i in range(warmup)))
        t0 = time.perf_counter()
        await asyncio.gather(*(one(i, True) for i in range(n)))
        wall = time.perf_counter() - t0
    return {"latencies": latencies, "server_inference": server_inference, "errors": errors, "wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="promoted model folder or checkpoint; default: train a small one here")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--raw-iters", type=int, default=100)
    ap.add_argument("--photos", type=int, default=40, help="distinct real photos cycled through")
    ap.add_argument("--inference-threads", type=int, default=2, help="serve.inference_threads for the server")
    ap.add_argument("--per-class", type=int, default=40, help="images per class for the model trained here")
    a = ap.parse_args()

    data = Path(os.environ.get("CVPIPE_REAL_DATA", REPO.parent / "shared" / "data"))
    photos = sorted((data / "hymenoptera_data/val").glob("*/*.jpg"))[: a.photos]
    if not photos:
        sys.exit(f"no photos under {data}/hymenoptera_data/val (set CVPIPE_REAL_DATA)")

    with tempfile.TemporaryDirectory(prefix="cvpipe-bench-serve-") as tmp:
        work = Path(tmp)
        model_path = a.model or str(train_small_model(data, work, a.per_class))
        raw = raw_latency(model_path, photos, a.raw_iters)
        print(f"raw batch-1 inference: p50 {raw['raw_batch1_ms_p50']} ms, p95 {raw['raw_batch1_ms_p95']} ms; "
              f"in-process decode+preprocess+model p50 {raw['inprocess_pipeline_ms_p50']} ms", flush=True)

        port = free_port()
        server = start_server(model_path, work, port, a.inference_threads, timeout_s=120)
        url = f"http://127.0.0.1:{port}"
        try:
            import httpx

            res = asyncio.run(burst(url, photos, a.requests, a.concurrency, a.warmup))
            alive = httpx.get(f"{url}/healthz", timeout=5).status_code == 200
        finally:
            server.terminate()
            server.wait(timeout=30)

    lat = res["latencies"]
    ok = len(lat)
    rps = ok / res["wall_s"] if res["wall_s"] > 0 else 0.0
    raw_ms = raw["raw_batch1_ms_p50"]
    summary = {
        "bench": "serve",
        "model": a.model or "resnet18 trained here (1 epoch, 64 px, hymenoptera slice)",
        "arch": raw["arch"], "image_size": raw["image_size"],
        "requests": a.requests, "concurrency": a.concurrency, "ok": ok, "errors": len(res["errors"]),
        "p50_ms": round(percentile(lat, 50), 2) if lat else None,
        "p95_ms": round(percentile(lat, 95), 2) if lat else None,
        "p99_ms": round(percentile(lat, 99), 2) if lat else None,
        "throughput_rps": round(rps, 2),
        "server_inference_ms_p50": round(statistics.median(res["server_inference"]), 3) if lat else None,
        **{k: raw[k] for k in ("raw_batch1_ms_p50", "raw_batch1_ms_p95", "inprocess_pipeline_ms_p50", "torch_threads")},
        "p50_over_raw": round(percentile(lat, 50) / raw_ms, 2) if lat else None,
        "throughput_vs_raw_serial": round(rps / (1000.0 / raw_ms), 3),  # 1.0 = one model call after another, nothing else
        "server_alive_after": alive,
        "cpus": os.cpu_count(), "python": platform.python_version(),
        "first_errors": res["errors"][:5],
    }
    print(f"{ok}/{a.requests} ok, concurrency {a.concurrency}: p50 {summary['p50_ms']} ms, p95 {summary['p95_ms']} ms, "
          f"p99 {summary['p99_ms']} ms, {summary['throughput_rps']} req/s (raw batch-1 {raw_ms} ms)", flush=True)
    print(json.dumps(summary))
    sys.exit(1 if res["errors"] or not alive else 0)


if __name__ == "__main__":
    main()
