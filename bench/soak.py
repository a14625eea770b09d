"""Soak: ``cvpipe serve`` under minutes of mixed traffic from good, unlucky and hostile clients.

    CVPIPE_REAL_DATA=../shared/data python bench/soak.py [--seconds 180] [--model models/best]

In one run:

1. the model (``--model``, or else an untrained ``--arch`` checkpoint built here at
   ``--image-size``: the soak measures the server, not the model's accuracy) is served by
   ``cvpipe serve`` as a subprocess on 127.0.0.1 (the real CLI, uvicorn and its guards);
2. after a warm-up with real photos, its RSS is read (``/proc/<pid>/status``): *before*;
3. for ``--seconds``, all at once, to 127.0.0.1 only:

   * ``--good-clients`` clients posting real photos (hymenoptera_data) back to back;
   * one client cycling through every file of ``bad_inputs`` (answers: 200 or a 4xx);
   * one client posting a large image every ``--large-every`` s (a 40-megapixel PNG of a few
     hundred KB, and an upscaled 24-megapixel photo as JPEG, in turn);
   * ``--idle`` connections that never send a byte, each reopened as soon as the server
     closes it (so that many are open all the time);
   * ``--slow`` slow-header clients sending one header line every 2 s, reconnecting when cut;
   * a ``/healthz`` probe every 0.25 s, and an RSS sample every second;

4. the traffic stops, the sockets close, and after ``--settle`` s the RSS is read again: *after*.

Reported: requests served and their statuses, 5xx count, transport errors, p50/p99 latency of
the good requests, ``/healthz`` p99 and max, RSS before/peak/after, how many idle and
slow-header connections the server cut, whether a slow head was ever answered. Targets:
0 5xx, ``/healthz`` p99 under 1 s, RSS after within 1.5x of before; missing one makes the
exit code 1. The last stdout line is one JSON object (``soak_5xx``, ``healthz_p99_s``,
``rss_ratio``, the figures and ``machine``). Client and server share this machine's cores.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import io
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import REPO, free_port, start_server, stop_server  # noqa: E402  (bench/ is on sys.path)

sys.path.insert(0, str(REPO / "src"))

TARGETS = {"soak_5xx": 0, "healthz_p99_s": 1.0, "rss_ratio": 1.5}


def percentile(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(np.asarray(values), q)), 4) if values else None


def rss_mib(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} for pid {pid}")


def build_model(work: Path, arch: str, image_size: int) -> str:
    """An untrained cvpipe train checkpoint of *arch* (2 classes) at *image_size*."""
    import timm
    import torch

    net = timm.create_model(arch, pretrained=False, num_classes=2)
    path = work / "model.pt"
    torch.save({"arch": arch, "classes": ["ants", "bees"], "model": net.state_dict(), "image_size": image_size,
                "resize_mode": "shorter_side_center_crop",
                "normalize": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}}, path)
    return str(path)


def large_images(photo: Path) -> list[tuple[str, bytes]]:
    """A 40-megapixel PNG of blocky noise (a few hundred KB) and a real photo upscaled to 24 megapixels as JPEG."""
    from PIL import Image

    small = np.random.default_rng(0).integers(0, 255, (25, 25, 3), dtype=np.uint8)
    png = io.BytesIO()
    Image.fromarray(small).resize((6400, 6250), Image.NEAREST).save(png, format="PNG", compress_level=9)
    jpg = io.BytesIO()
    Image.open(photo).convert("RGB").resize((6000, 4000), Image.BILINEAR).save(jpg, format="JPEG", quality=85)
    return [("large_40mp.png", png.getvalue()), ("large_24mp.jpg", jpg.getvalue())]


class Soak:
    """The traffic and what it saw."""

    def __init__(self, url: str, port: int, pid: int, photos: list[Path], bad: list[Path],
                 large: list[tuple[str, bytes]], a: argparse.Namespace):
        self.url, self.port, self.pid, self.a = url, port, pid, a
        self.photos = [(p.name, p.read_bytes()) for p in photos]
        self.bad = [(p.name, p.read_bytes()) for p in bad]
        self.large = large
        self.statuses: collections.Counter = collections.Counter()  # (kind, status)
        self.good_latency: list[float] = []
        self.healthz_latency: list[float] = []
        self.transport_errors: collections.Counter = collections.Counter()
        self.first_5xx: list[str] = []
        self.rss: list[float] = []
        self.idle_cut = self.slow_cut = self.slow_answered = 0
        self.stop = asyncio.Event()

    # ------------------------------------------------------------------ HTTP clients
    async def _post(self, client, kind: str, name: str, data: bytes) -> None:
        import httpx

        t0 = time.perf_counter()
        try:
            r = await client.post(f"{self.url}/predict", files={"file": (name, data, "application/octet-stream")})
        except httpx.HTTPError as exc:
            self.transport_errors[f"{kind}: {type(exc).__name__}"] += 1
            return
        self._record(kind, r.status_code, f"{name}: {r.text[:200]}")
        if kind == "good" and r.status_code == 200:
            self.good_latency.append(time.perf_counter() - t0)

    def _record(self, kind: str, status: int, what: str) -> None:
        self.statuses[(kind, status)] += 1
        if status >= 500 and len(self.first_5xx) < 5:
            self.first_5xx.append(f"{kind} {status} {what}")

    async def good_client(self, i: int) -> None:
        import httpx

        rng = random.Random(i)
        async with httpx.AsyncClient(timeout=120) as client:
            while not self.stop.is_set():
                await self._post(client, "good", *rng.choice(self.photos))

    async def bad_client(self) -> None:
        import httpx

        async with httpx.AsyncClient(timeout=120) as client:
            i = 0
            while not self.stop.is_set():
                await self._post(client, "bad", *self.bad[i % len(self.bad)])
                i += 1

    async def large_client(self) -> None:
        import httpx

        async with httpx.AsyncClient(timeout=180) as client:
            i = 0
            while not self.stop.is_set():
                await self._post(client, "large", *self.large[i % len(self.large)])
                i += 1
                await self._sleep(self.a.large_every)

    async def healthz_probe(self) -> None:
        import httpx

        async with httpx.AsyncClient(timeout=30) as client:
            while not self.stop.is_set():
                t0 = time.perf_counter()
                try:
                    r = await client.get(f"{self.url}/healthz")
                    self._record("healthz", r.status_code, r.text[:200])
                except httpx.HTTPError as exc:
                    self.transport_errors[f"healthz: {type(exc).__name__}"] += 1
                self.healthz_latency.append(time.perf_counter() - t0)
                await self._sleep(0.25)

    # ------------------------------------------------------------------ raw sockets
    async def idle_connection(self) -> None:
        """One connection that never sends a byte, reopened whenever the server closes it."""
        while not self.stop.is_set():
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                await self._sleep(0.5)
                continue
            if await self._server_spoke(reader, None) is not None:  # b"": the server closed it
                self.idle_cut += 1
            writer.close()

    async def slow_header_client(self) -> None:
        """A request head sent one line every 2 s, never finished; reconnects when the server cuts it."""
        while not self.stop.is_set():
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.write(b"GET /healthz HTTP/1.1\r\nHost: soak\r\n")
                lines = iter(f"X-Slow-{i}: {'z' * 20}\r\n".encode() for i in range(10**6))
                reply = await self._server_spoke(reader, lambda: writer.write(next(lines)), every=2.0)
                if reply is not None and reply.startswith(b"HTTP/1.1 200"):
                    self.slow_answered += 1
                elif reply is not None:
                    self.slow_cut += 1
                writer.close()
            except OSError:
                if not self.stop.is_set():
                    self.slow_cut += 1
                await self._sleep(0.2)

    async def _server_spoke(self, reader: asyncio.StreamReader, tick, every: float = 1.0) -> bytes | None:
        """What the server sent (b"" when it closed) before the soak ended (None); *tick* runs every *every* s."""
        while not self.stop.is_set():
            try:
                return await asyncio.wait_for(reader.read(64), every)
            except asyncio.TimeoutError:
                if tick is not None:
                    tick()
            except ConnectionResetError:
                return b""
        return None

    async def rss_sampler(self) -> None:
        while not self.stop.is_set():
            self.rss.append(rss_mib(self.pid))
            await self._sleep(1)

    async def _sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self.stop.wait(), seconds)
        except asyncio.TimeoutError:
            pass

    async def run(self, seconds: float) -> None:
        tasks = [asyncio.ensure_future(c) for c in (
            *(self.good_client(i) for i in range(self.a.good_clients)), self.bad_client(), self.large_client(),
            *(self.idle_connection() for _ in range(self.a.idle)), *(self.slow_header_client() for _ in range(self.a.slow)),
            self.healthz_probe(), self.rss_sampler())]
        await asyncio.sleep(seconds)
        self.stop.set()
        await asyncio.wait(tasks, timeout=200)
        for t in tasks:
            t.cancel()


def warm_up(url: str, photos: list[Path], n: int = 10) -> None:
    import httpx

    for p in photos[:n]:
        r = httpx.post(f"{url}/predict", files={"file": (p.name, p.read_bytes(), "image/jpeg")}, timeout=120)
        if r.status_code != 200:
            sys.exit(f"warm-up request failed: {r.status_code} {r.text[:300]}")


def summarize(s: Soak, a: argparse.Namespace, rss_before: float, rss_after: float, wall: float, alive: bool) -> dict:
    by_kind = collections.defaultdict(dict)
    for (kind, status), n in sorted(s.statuses.items()):
        by_kind[kind][str(status)] = n
    served = sum(n for (kind, _), n in s.statuses.items() if kind != "healthz")
    five = sum(n for (_, status), n in s.statuses.items() if status >= 500)
    return {
        "bench": "soak", "seconds": round(wall, 1), "model": a.model or f"{a.arch} untrained, {a.image_size} px",
        "requests_served": served, "healthz_probes": len(s.healthz_latency), "statuses": by_kind,
        "soak_5xx": five, "transport_errors": dict(s.transport_errors), "first_5xx": s.first_5xx,
        "good_ok": len(s.good_latency), "good_p50_s": percentile(s.good_latency, 50),
        "good_p99_s": percentile(s.good_latency, 99),
        "healthz_p99_s": percentile(s.healthz_latency, 99),
        "healthz_max_s": round(max(s.healthz_latency), 4) if s.healthz_latency else None,
        "rss_before_mib": round(rss_before), "rss_peak_mib": round(max(s.rss, default=rss_before)),
        "rss_after_mib": round(rss_after), "rss_ratio": round(rss_after / rss_before, 3),
        "idle_connections": a.idle, "idle_cut_by_server": s.idle_cut,
        "slow_header_clients": a.slow, "slow_heads_cut": s.slow_cut, "slow_heads_answered": s.slow_answered,
        "server_alive_after": alive, "targets": TARGETS,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    "processor": platform.processor() or platform.machine(),
                    "loadavg_1m": round(os.getloadavg()[0], 2)},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=180, help="how long the mixed traffic runs")
    ap.add_argument("--model", help="promoted model folder or checkpoint; default: an untrained --arch built here")
    ap.add_argument("--arch", default="resnet18", help="timm architecture of the model built here")
    ap.add_argument("--image-size", type=int, default=224, help="input size of the model built here")
    ap.add_argument("--good-clients", type=int, default=2, help="clients posting real photos back to back")
    ap.add_argument("--idle", type=int, default=300, help="connections held open without a byte sent")
    ap.add_argument("--slow", type=int, default=20, help="slow-header clients (one line every 2 s)")
    ap.add_argument("--large-every", type=float, default=3.0, help="seconds between large-image requests")
    ap.add_argument("--settle", type=float, default=5.0, help="seconds after the traffic before RSS 'after'")
    ap.add_argument("--inference-threads", type=int, default=2, help="serve.inference_threads for the server")
    a = ap.parse_args()

    data = Path(os.environ.get("CVPIPE_REAL_DATA", REPO.parent / "shared" / "data"))
    photos = sorted((data / "hymenoptera_data").glob("*/*/*.jp*g"))
    bad = sorted(p for p in (data / "bad_inputs").iterdir() if p.is_file()) if (data / "bad_inputs").is_dir() else []
    if not photos or not bad:
        sys.exit(f"no photos or bad inputs under {data} (set CVPIPE_REAL_DATA)")

    with tempfile.TemporaryDirectory(prefix="cvpipe-bench-soak-") as tmp:
        work = Path(tmp)
        model = a.model or build_model(work, a.arch, a.image_size)
        large = large_images(photos[0])
        port = free_port()
        server = start_server(str(Path(model).resolve()) if Path(model).exists() else model, work, port,
                              a.inference_threads, timeout_s=180)
        url = f"http://127.0.0.1:{port}"
        try:
            import httpx

            warm_up(url, photos)
            rss_before = rss_mib(server.pid)
            soak = Soak(url, port, server.pid, photos, bad, large, a)
            print(f"soak: {a.seconds:g} s against {url} (pid {server.pid}, RSS {rss_before:.0f} MiB)", flush=True)
            t0 = time.monotonic()
            asyncio.run(soak.run(a.seconds))
            wall = time.monotonic() - t0
            time.sleep(a.settle)
            rss_after = rss_mib(server.pid)
            alive = httpx.get(f"{url}/healthz", timeout=5).status_code == 200
        finally:
            stop_server(server)

    summary = summarize(soak, a, rss_before, rss_after, wall, alive)
    print(f"{summary['requests_served']} requests served, {summary['soak_5xx']} 5xx; good p99 {summary['good_p99_s']} s; "
          f"/healthz p99 {summary['healthz_p99_s']} s; RSS {summary['rss_before_mib']} -> {summary['rss_after_mib']} MiB "
          f"(peak {summary['rss_peak_mib']}); cut: {summary['idle_cut_by_server']} idle, {summary['slow_heads_cut']} slow heads",
          flush=True)
    print(json.dumps(summary))
    missed = (summary["soak_5xx"] > TARGETS["soak_5xx"] or (summary["healthz_p99_s"] or 99) >= TARGETS["healthz_p99_s"]
              or summary["rss_ratio"] > TARGETS["rss_ratio"] or summary["slow_heads_answered"] or not alive)
    sys.exit(1 if missed else 0)


if __name__ == "__main__":
    main()
