"""Serving bench: ONNX Runtime against torch eager behind the same ``cvpipe serve``, same model, same run.

    CVPIPE_REAL_DATA=../shared/data python bench/serve.py [--model models/best] [--requests 240 --concurrency 1,8]

In one run:

1. the promoted model folder (``--model``, or else a resnet18 trained here for 1 epoch at 64 px on a
   slice of hymenoptera_data by the real pipeline, ingest -> ... -> evaluate -> compare, so the
   folder holds evaluate's uint8-pixel model.onnx and the model.pt it was exported from) is loaded in
   this process on each backend and its **raw batch-1 latency** is timed: one preprocessed
   uint8 array through ``ServedModel.probabilities`` (no HTTP, no decoding; median of ``--raw-iters``);
2. **cold start**, per backend: ``cvpipe serve --backend onnx`` (then ``--backend torch``) is started
   as a subprocess on 127.0.0.1 and the seconds from ``Popen`` to the first answered ``POST /predict``
   are recorded (interpreter start, imports, model load, warm-up, uvicorn; /healthz is polled every
   50 ms and the first /predict is sent as soon as it answers). One server at a time, so neither
   start competes with the other;
3. both servers then stay up side by side and ``--rounds`` rounds are run; each round sends
   ``--requests / --rounds`` POST /predict requests with real photos (hymenoptera val JPEGs) to each
   backend at each ``--concurrency`` (httpx AsyncClient, at most that many in flight, after a few
   warm-up requests). Interleaving the backends round by round means a burst of load from another
   process on this shared machine hits both, not whichever happened to run then;
4. per backend and concurrency: p50/p95 client latency, requests/s (requests over the summed wall
   time of their bursts), errors, the server's own inference-time median; and ``ort_vs_torch_rps``,
   onnxruntime's requests/s over torch's at the highest concurrency (target >= 1.5 at 8).

Server settings are the params.yaml defaults (``serve.inference_threads``, ``serve.onnx_threads``,
``serve.torch_threads``, ``serve.batch_window_ms``) unless ``--set key=value`` overrides them for both.
Any error (non-200 or transport failure) makes the exit code 1. The last stdout line is one JSON
object. Client and servers share this machine's cores: the client's own CPU time is part of every
number, as it would be for a sidecar on a 2-core box.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import REPO, cvpipe, free_port, machine, start_server, stop_server  # noqa: E402  (bench/ is on sys.path)
sys.path.insert(0, str(REPO / "src"))

BACKENDS = ("onnx", "torch")  # `cvpipe serve --backend` values; onnx first: the ratio is onnx over torch
TARGET_RATIO = 1.5


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def train_small_model(data: Path, work: Path, per_class: int) -> Path:
    """A promoted model folder made by the real pipeline on a hymenoptera slice (64 px, 1 epoch)."""
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
    for stage in ("ingest", "preprocess", "train", "evaluate", "compare"):
        cvpipe([stage, "--quiet"], proj)
    return proj / "models/best"


def raw_latency(model_path: str, backend: str, photos: list[Path], iters: int, a) -> dict:
    """Batch-1 model time in this process on *backend*, with the servers' thread settings (the defaults or
    ``--set serve.torch_threads=/serve.onnx_threads=``): the floor under any request's latency."""
    from cvpipe.serve.model import load_model

    sets = dict(kv.split("=", 1) for kv in a.set)
    batched = float(sets.get("serve.batch_window_ms", 0)) > 0  # as the CLI: the batcher is one run at a time
    m = load_model(model_path, backend=backend, concurrent_runs=1 if batched else a.inference_threads,
                   torch_threads=int(sets.get("serve.torch_threads", 0)), onnx_threads=int(sets.get("serve.onnx_threads", 0)))
    data = photos[0].read_bytes()
    arr = m.to_array(m.decode(data, max_pixels=10**9), data)
    for _ in range(10):
        m.probabilities([arr])
    times = []
    cpu0 = time.process_time()
    for _ in range(iters):
        t0 = time.perf_counter()
        m.probabilities([arr])
        times.append((time.perf_counter() - t0) * 1e3)
    cpu_ms = (time.process_time() - cpu0) * 1e3 / iters  # all threads: what the call costs the machine
    return {"arch": m.arch, "image_size": m.image_size, "backend": m.backend.describe(),
            "raw_batch1_ms_p50": round(statistics.median(times), 3), "raw_batch1_ms_p95": round(percentile(times, 95), 3),
            "raw_batch1_cpu_ms": round(cpu_ms, 3)}


async def burst(url: str, payloads: list[tuple[str, bytes]], n: int, concurrency: int, warmup: int, offset: int) -> dict:
    """*n* POST /predict with at most *concurrency* in flight (after *warmup* unrecorded ones)."""
    import httpx

    sem = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    server_inference: list[float] = []
    errors: list[str] = []

    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=concurrency)) as client:
        async def one(i: int, record: bool) -> None:
            name, data = payloads[(offset + i) % len(payloads)]
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


def cold_start(model: str, backend: str, work: Path, payload: tuple[str, bytes], a) -> tuple:
    """(the server, its URL, seconds from process start to the first answered /predict)."""
    import httpx

    port = free_port()
    extra = ["--backend", backend, *(x for kv in a.set for x in ("-S", kv))]
    t0 = time.perf_counter()
    server = start_server(model, work, port, a.inference_threads, timeout_s=180, extra_args=extra,
                          log_name=f"serve-{backend}.log", poll_s=0.05)
    url = f"http://127.0.0.1:{port}"
    r = httpx.post(f"{url}/predict", files={"file": (payload[0], payload[1], "image/jpeg")}, timeout=60)
    seconds = time.perf_counter() - t0
    if r.status_code != 200:
        server.kill()
        sys.exit(f"first /predict on {backend}: HTTP {r.status_code} {r.text[:300]}")
    served = httpx.get(f"{url}/model", timeout=10).json()["backend"]
    return server, url, round(seconds, 3), served


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process *pid* so far (/proc/<pid>/stat, fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def summarize(runs: list[dict]) -> dict:
    """Latency percentiles over all rounds; req/s = requests / summed burst wall time; CPU ms per request
    of the server and of this client (what load from other processes cannot inflate much, unlike wall time)."""
    lat = [x for r in runs for x in r["latencies"]]
    inf = [x for r in runs for x in r["server_inference"]]
    wall = sum(r["wall_s"] for r in runs)
    errors = [e for r in runs for e in r["errors"]]
    return {"ok": len(lat), "errors": len(errors),
            "p50_ms": round(percentile(lat, 50), 2) if lat else None,
            "p95_ms": round(percentile(lat, 95), 2) if lat else None,
            "rps": round(len(lat) / wall, 2) if wall > 0 else 0.0,
            "server_inference_ms_p50": round(statistics.median(inf), 3) if inf else None,
            "server_cpu_ms_per_req": round(1e3 * sum(r["server_cpu_s"] for r in runs) / len(lat), 2) if lat else None,
            "client_cpu_ms_per_req": round(1e3 * sum(r["client_cpu_s"] for r in runs) / len(lat), 2) if lat else None,
            "first_errors": errors[:3]}


def measure(urls: dict[str, str], pids: dict[str, int], payloads: list[tuple[str, bytes]], a) -> dict[str, dict[int, list[dict]]]:
    """Round-robin bursts: for each round, each concurrency, each backend (see the module docstring)."""
    per_round = max(1, a.requests // a.rounds)
    runs: dict[str, dict[int, list[dict]]] = {b: {c: [] for c in a.concurrency} for b in urls}
    for rnd in range(a.rounds):
        for c in a.concurrency:
            order = list(urls) if rnd % 2 == 0 else list(reversed(urls))  # neither backend always goes first
            for b in order:
                server0, client0 = cpu_seconds(pids[b]), time.process_time()
                res = asyncio.run(burst(urls[b], payloads, per_round, c, a.warmup, offset=rnd * per_round))
                # the warm-up requests' CPU is in these too: scaled out by the share of recorded requests
                share = per_round / (per_round + a.warmup)
                res["server_cpu_s"] = (cpu_seconds(pids[b]) - server0) * share
                res["client_cpu_s"] = (time.process_time() - client0) * share
                runs[b][c].append(res)
                s = summarize([res])
                print(f"round {rnd + 1}/{a.rounds} {b:5s} c={c}: p50 {s['p50_ms']} ms, p95 {s['p95_ms']} ms, "
                      f"{s['rps']} req/s, {s['errors']} errors", flush=True)
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="promoted model folder (with a uint8-pixel model.onnx and model.pt); default: make one here")
    ap.add_argument("--requests", type=int, default=240, help="recorded requests per backend and concurrency (split over the rounds)")
    ap.add_argument("--concurrency", default="1,8", help="comma-separated in-flight limits; the ratio is taken at the last")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=8, help="unrecorded requests before each burst")
    ap.add_argument("--raw-iters", type=int, default=100)
    ap.add_argument("--photos", type=int, default=40, help="distinct real photos cycled through")
    ap.add_argument("--inference-threads", type=int, default=2, help="serve.inference_threads for both servers")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a params override for both servers (-S), e.g. serve.batch_window_ms=2; repeatable")
    ap.add_argument("--per-class", type=int, default=40, help="images per class for the model trained here")
    a = ap.parse_args()
    a.concurrency = [int(c) for c in a.concurrency.split(",")]

    data = Path(os.environ.get("CVPIPE_REAL_DATA", REPO.parent / "shared" / "data"))
    photos = sorted((data / "hymenoptera_data/val").glob("*/*.jpg"))[: a.photos]
    if not photos:
        sys.exit(f"no photos under {data}/hymenoptera_data/val (set CVPIPE_REAL_DATA)")
    payloads = [(p.name, p.read_bytes()) for p in photos]
    load_before = machine()

    with tempfile.TemporaryDirectory(prefix="cvpipe-bench-serve-") as tmp:
        work = Path(tmp)
        model = str(Path(a.model).resolve()) if a.model else str(train_small_model(data, work, a.per_class))
        raw = {b: raw_latency(model, b, photos, a.raw_iters, a) for b in BACKENDS}
        for b in BACKENDS:
            print(f"raw batch-1 {b}: p50 {raw[b]['raw_batch1_ms_p50']} ms, p95 {raw[b]['raw_batch1_ms_p95']} ms, "
                  f"{raw[b]['raw_batch1_cpu_ms']} CPU ms per call", flush=True)
        servers, urls, cold, served = {}, {}, {}, {}
        try:
            for b in BACKENDS:
                servers[b], urls[b], cold[b], served[b] = cold_start(model, b, work, payloads[0], a)
                print(f"cold start {b}: {cold[b]} s (process start to first answered /predict)", flush=True)
            runs = measure(urls, {b: s.pid for b, s in servers.items()}, payloads, a)
        finally:
            for s in servers.values():
                stop_server(s)

    results = {b: {f"c{c}": summarize(runs[b][c]) for c in a.concurrency} for b in BACKENDS}
    top = f"c{a.concurrency[-1]}"

    def ratio(key: str) -> float | None:
        torch_rps = results["torch"][key]["rps"]
        return round(results["onnx"][key]["rps"] / torch_rps, 3) if torch_rps else None

    summary = {
        "bench": "serve",
        "model": a.model or "resnet18 trained here (1 epoch, 64 px, hymenoptera slice), promoted by cvpipe compare",
        "arch": raw["onnx"]["arch"], "image_size": raw["onnx"]["image_size"],
        "requests_per_point": (a.requests // a.rounds) * a.rounds, "rounds": a.rounds, "concurrency": a.concurrency,
        "server_settings": {"inference_threads": a.inference_threads, "overrides": a.set,
                            "onnx": served["onnx"], "torch": served["torch"]},
        "results": results,
        "ort_vs_torch_rps": ratio(top),
        **{f"ort_vs_torch_rps_c{c}": ratio(f"c{c}") for c in a.concurrency},
        "target_ort_vs_torch_rps": TARGET_RATIO,
        "cold_start_s": cold,
        "raw_batch1_ms_p50": {b: raw[b]["raw_batch1_ms_p50"] for b in BACKENDS},
        "raw_batch1_ms_p95": {b: raw[b]["raw_batch1_ms_p95"] for b in BACKENDS},
        "raw_batch1_cpu_ms": {b: raw[b]["raw_batch1_cpu_ms"] for b in BACKENDS},
        "machine": {**load_before, "loadavg_1m_after": round(os.getloadavg()[0], 2)},
    }
    errors = sum(r["errors"] for per in results.values() for r in per.values())
    for b in BACKENDS:
        for key, r in results[b].items():
            print(f"{b:5s} {key}: {r['ok']} ok, p50 {r['p50_ms']} ms, p95 {r['p95_ms']} ms, {r['rps']} req/s; CPU per request: "
                  f"server {r['server_cpu_ms_per_req']} ms, client {r['client_cpu_ms_per_req']} ms", flush=True)
    print(f"ort_vs_torch_rps ({top}): {summary['ort_vs_torch_rps']} (target >= {TARGET_RATIO}); "
          f"cold start onnx {cold['onnx']} s, torch {cold['torch']} s", flush=True)
    print(json.dumps(summary))
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()
