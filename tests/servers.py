"""Real servers on 127.0.0.1 for ingest tests and the benchmark: GCS emulator, static HTTP, delay proxy.

Nothing here mocks a client: gcsfs talks to ``gcp-storage-emulator`` over HTTP,
fsspec's HTTP filesystem talks to Python's ``http.server``.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

# gcsfs stalls ~60 s per call against the emulator without this (see shared/notes/environment.md)
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen | None = None, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def emulator_bin() -> str:
    exe = Path(sys.executable).with_name("gcp-storage-emulator")
    return str(exe) if exe.exists() else (shutil.which("gcp-storage-emulator") or "gcp-storage-emulator")


@contextlib.contextmanager
def gcs_emulator(data_dir: Path) -> Iterator[str]:
    """Start ``gcp-storage-emulator``; yield its endpoint ``http://127.0.0.1:PORT``."""
    port = free_port()
    proc = subprocess.Popen(
        [emulator_bin(), "-d", str(data_dir), "start", "--host=127.0.0.1", f"--port={port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        _wait_port(port, proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process(proc, timeout=10)


def stop_process(proc: subprocess.Popen, timeout: float) -> None:
    """SIGTERM *proc*, wait up to *timeout* s, then SIGKILL: a test's server never outlives it."""
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def upload_tree(endpoint: str, local: Path, bucket: str, prefix: str) -> int:
    """Create *bucket* and upload *local* under *prefix* through gcsfs; returns the object count."""
    os.environ["STORAGE_EMULATOR_HOST"] = endpoint
    import gcsfs

    fs = gcsfs.GCSFileSystem(token="anon")
    if not fs.exists(bucket):
        fs.mkdir(bucket)
    files = [p for p in sorted(local.rglob("*")) if p.is_file()]
    fs.pipe({f"{bucket}/{prefix}/{p.relative_to(local).as_posix()}": p.read_bytes() for p in files})
    fs.invalidate_cache()
    return len(files)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep test output clean
        pass


class _TokenHandler(_QuietHandler):
    token = ""

    def send_head(self):  # GET and HEAD: 403 unless the query carries token=<the token>
        if f"token={self.token}" not in self.path.partition("?")[2].split("&"):
            self.send_error(403, "token required")
            return None
        return super().send_head()


@contextlib.contextmanager
def http_server(folder: Path, token: str | None = None) -> Iterator[str]:
    """Serve *folder* with ``http.server`` on 127.0.0.1; yield the base URL. With *token*, a request
    whose query has no ``token=<token>`` gets 403 (a server that checks a credential)."""
    if token is None:
        handler = functools.partial(_QuietHandler, directory=str(folder))
    else:
        handler = functools.partial(type("Handler", (_TokenHandler,), {"token": token}), directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def delay_proxy(upstream: str, delay_s: float) -> Iterator[str]:
    """An aiohttp reverse proxy adding a fixed *delay_s* to every request (a real bucket's round trip).

    Requests are held concurrently (asyncio), then forwarded one at a time, since
    the emulator serves one request at a time anyway.
    """
    import asyncio

    from aiohttp import ClientSession, web

    port = free_port()
    ready = threading.Event()
    state: dict = {}

    async def main() -> None:
        session = ClientSession(auto_decompress=False)
        lock = asyncio.Lock()

        async def handle(request: web.Request) -> web.StreamResponse:
            await asyncio.sleep(delay_s)
            body = await request.read()
            headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
            async with lock:
                async with session.request(
                    request.method, upstream + request.path_qs, headers=headers, data=body or None,
                    allow_redirects=False,
                ) as resp:
                    payload = await resp.read()
                    out_headers = {
                        k: v for k, v in resp.headers.items()
                        if k.lower() not in ("content-length", "transfer-encoding", "connection", "content-encoding")
                    }
                    if "Content-Encoding" in resp.headers:
                        out_headers["Content-Encoding"] = resp.headers["Content-Encoding"]
            return web.Response(status=resp.status, body=payload, headers=out_headers)

        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        stop = asyncio.Event()
        state["loop"], state["stop"] = asyncio.get_running_loop(), stop
        ready.set()
        await stop.wait()
        await runner.cleanup()
        await session.close()

    thread = threading.Thread(target=lambda: asyncio.run(main()), daemon=True)
    thread.start()
    if not ready.wait(15):
        raise RuntimeError("delay proxy did not start")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        state["loop"].call_soon_threadsafe(state["stop"].set)
        thread.join(10)
