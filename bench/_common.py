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

import yaml

REPO = Path(__file__).resolve().parents[1]


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


def write_params(folder: Path, overrides: dict) -> None:
    """The repository's params.yaml with dotted *overrides*, written to ``folder/params.yaml``."""
    folder.mkdir(parents=True, exist_ok=True)
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    for dotted, value in overrides.items():
        node = data
        *parents, last = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    (folder / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, work: Path, port: int, inference_threads: int, timeout_s: float) -> subprocess.Popen:
    """``cvpipe serve`` on 127.0.0.1:*port* (log in ``work/serve.log``), once ``/healthz`` answers 200."""
    import httpx

    with open(work / "serve.log", "w") as log:  # the child keeps its own descriptor
        server = subprocess.Popen(
            [sys.executable, "-m", "cvpipe", "serve", "--quiet", "--model", model, "--host", "127.0.0.1",
             "--port", str(port), "-S", f"serve.inference_threads={inference_threads}"],
            cwd=work, env=env_with_src(), stdout=log, stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + timeout_s
    while True:
        if server.poll() is not None:
            sys.exit(f"cvpipe serve exited {server.returncode}:\n{(work / 'serve.log').read_text()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            server.kill()
            sys.exit(f"cvpipe serve did not come up within {timeout_s:.0f} s")
        time.sleep(0.3)
