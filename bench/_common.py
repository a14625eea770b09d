"""Helpers the benches share: run the real ``cvpipe`` CLI from this checkout, write a params.yaml,
and start ``cvpipe serve`` on a free loopback port. Not a bench itself (``python bench/<name>.py``
puts this folder first on ``sys.path``, so each bench imports it as ``_common``)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "src") not in sys.path:
    sys.path.insert(0, str(REPO / "src"))  # this checkout's cvpipe, for the helpers that import it


def env_with_src() -> dict[str, str]:
    """This process's environment with the checkout's ``src`` first on PYTHONPATH and W&B off."""
    return {**os.environ, "WANDB_MODE": "disabled",
            "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}


def cvpipe(args: list[str], cwd: Path) -> float:
    """Run ``cvpipe ARGS`` in *cwd*; the seconds it took. A failure ends the bench with the output's tail."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "cvpipe", *args], cwd=cwd, env=env_with_src(),
                          capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"cvpipe {' '.join(args)} failed in {cwd}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def write_params(folder: Path, overrides: dict, base: Path = REPO / "params.yaml") -> None:
    """*base* (the repository's params.yaml) with dotted *overrides* set as ``-S`` sets them
    (:func:`cvpipe.core.config.apply_overrides`), written to ``folder/params.yaml``."""
    from cvpipe.core.config import apply_overrides

    folder.mkdir(parents=True, exist_ok=True)
    data = apply_overrides(yaml.safe_load(base.read_text()), overrides)
    (folder / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, work: Path, port: int, inference_threads: int, timeout_s: float,
                 extra_args: Sequence[str] = (), log_name: str = "serve.log", poll_s: float = 0.3) -> subprocess.Popen:
    """``cvpipe serve`` on 127.0.0.1:*port* (log in ``work/<log_name>``), once ``/healthz`` answers 200.

    *extra_args* go to the CLI after the defaults (``--backend onnx``, ``-S serve.batch_window_ms=2``);
    *poll_s* is how often /healthz is tried (a bench timing the start polls faster)."""
    import httpx

    with open(work / log_name, "w") as log:  # the child keeps its own descriptor
        server = subprocess.Popen(
            [sys.executable, "-m", "cvpipe", "serve", "--quiet", "--model", model, "--host", "127.0.0.1",
             "--port", str(port), "-S", f"serve.inference_threads={inference_threads}", *extra_args],
            cwd=work, env=env_with_src(), stdout=log, stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + timeout_s
    while True:
        if server.poll() is not None:
            sys.exit(f"cvpipe serve exited {server.returncode}:\n{(work / log_name).read_text()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            server.kill()
            sys.exit(f"cvpipe serve did not come up within {timeout_s:.0f} s")
        time.sleep(poll_s)


def stop_server(server: subprocess.Popen, timeout_s: float = 30) -> None:
    """SIGTERM a server :func:`start_server` started, wait up to *timeout_s*, then SIGKILL."""
    server.terminate()
    try:
        server.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def machine() -> dict:
    """What a timing depends on: the CPU model (kernels differ per ISA), the cores this process may use,
    the load from other processes right now, and the versions of the runtimes that exist here."""
    import importlib.metadata as md
    import platform

    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), None)
    except OSError:
        cpu = None
    versions = {}
    for dist in ("torch", "onnxruntime", "uvicorn", "fastapi", "numpy"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            versions[dist] = None
    return {"cpu": cpu or platform.machine(), "cores": len(os.sched_getaffinity(0)),
            "loadavg_1m": round(os.getloadavg()[0], 2), "python": platform.python_version(), **versions}
