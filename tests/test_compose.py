"""docker-compose.yml used as its header says (#16): the documented commands, run verbatim.

* (fast, no Docker) the header documents the composed pipeline: build, the evaluate chain, compare
  (which promotes models/best), the app's build and ``up``; its ``mkdir -p`` line creates every
  project folder a service mounts; compare runs ``cvpipe compare`` in evaluate's image after
  evaluate, with the stages' mounts; the app mounts ./models read-only at /models;
* (container, slow, real photos) in a scratch copy of the project (tracked and untracked-not-ignored
  files, no pipeline outputs) holding a tiny params.yaml over a slice of hymenoptera photos, the
  header's own lines are run through bash: ``docker compose build``, ``docker compose run --rm
  evaluate`` (ingest -> preprocess -> train -> evaluate through depends_on), ``docker compose run
  --rm --no-deps compare``, ``docker compose --profile app build app`` and ``docker compose
  --profile app up app``; the app then answers /healthz and classifies a held-out real photo
  POSTed to the published port on 127.0.0.1. ``down`` always runs afterwards.

The client is the README's ``docker compose`` (v2); without that plugin, v1 ``docker-compose``
(the header: "works with both"; CI installs v1). Images are tagged ``cvpipe-<stage>:compose``:
Docker's layer cache shares every layer with test_containers.py's ``:test`` builds (same
Dockerfiles, context and index), so the stages are built once per CI run; only the label layer differs.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO, write_params

COMPOSE_FILE = REPO / "docker-compose.yml"
TAG = "compose"
PHOTOS_PER_CLASS = 20  # of hymenoptera_data/train/<class>/: 14 train, 3 val, 3 test after the stratified split
HEALTH_TIMEOUT_S = 120
# the header's lines this test runs, verbatim (the first two are its set-up)
ENV_LINE = "export PYPI_URL=$(sh scripts/index_url.sh) CVPIPE_UID=$(id -u) CVPIPE_GID=$(id -g)"
MKDIR = "mkdir -p data models metrics plots exports reports wandb .cvpipe"
BUILD = "docker compose build"
CHAIN = "docker compose run --rm evaluate"
COMPARE = "docker compose run --rm --no-deps compare"
TRAIN = "docker compose run --rm train --epochs 3"  # one stage with its own args (its upstream ones rerun first)
APP_BUILD = "docker compose --profile app build app"
APP_UP = "docker compose --profile app up app"
RUN_IN_ORDER = [MKDIR, BUILD, CHAIN, COMPARE, TRAIN, APP_BUILD]
GPU_ONLY = "docker compose -f docker-compose.yml -f docker-compose.gpu.yml run --rm evaluate"  # needs NVIDIA
# tiny: two epochs of resnet18 at 64 px on 28 photos (every other key as the repo's params.yaml)
PARAMS = {
    "ingest.source": "data/source",  # relative to the project (/work in the containers)
    "ingest.workers": 2,
    "preprocess.workers": 2,
    "preprocess.image_size": 64,
    "train.epochs": 2,
    "train.warmup_epochs": 1,
    "train.batch_size": 16,
    "evaluate.latency_runs": 5,
}
# pipeline outputs a clone may hold (metrics, reports, ...) stay out of the scratch project: models/best must come
# from the composed chain. (exports/ holds only its .gitignore.)
OUTPUT_DIRS = {"data", "models", "metrics", "plots", "reports", "wandb", ".cvpipe", "experiments"}


def _documented() -> list[str]:
    """The usage lines of docker-compose.yml's header comment, without their trailing ``# ...`` remarks."""
    lines = []
    for line in COMPOSE_FILE.read_text().splitlines():
        if not line.startswith("#"):
            break
        if line.startswith("#   "):
            lines.append(re.sub(r"\s{2,}#.*$", "", line[4:]).strip())
    return lines


def _compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


# ---- fast: what the header documents matches the file ----------------------------------------------


def test_header_documents_the_composed_pipeline():
    documented = _documented()
    for cmd in [ENV_LINE, *RUN_IN_ORDER, APP_UP]:
        assert cmd in documented, (cmd, documented)
    # compose runs them in this order: the chain, then compare, then the app on what compare promoted
    order = [documented.index(c) for c in [BUILD, CHAIN, COMPARE, APP_UP]]
    assert order == sorted(order), documented
    # tests/docs_blocks.yaml skips this header in test_docs because this test runs it: every line but the GPU one
    assert set(documented) == {ENV_LINE, *RUN_IN_ORDER, APP_UP, GPU_ONLY}, documented


def test_mkdir_line_creates_every_mounted_project_folder():
    """Docker creates a missing bind-mount source as root; the header's mkdir must cover every one."""
    mounted = set()
    for svc in _compose()["services"].values():
        for vol in svc.get("volumes", []):
            m = re.match(r"\$\{CVPIPE_PROJECT_DIR:-\.\}/([^:]+):", vol)
            if m and not m.group(1).endswith(".yaml"):  # params.yaml is a file: it must exist anyway
                mounted.add(m.group(1))
    assert mounted and mounted <= set(MKDIR.split()[2:]), mounted


def test_compare_service_runs_in_evaluate_image_after_evaluate():
    services = _compose()["services"]
    compare, evaluate = services["compare"], services["evaluate"]
    assert compare["image"] == evaluate["image"] and "build" not in compare  # no image of its own (dvc.yaml's compare)
    assert compare["entrypoint"] == ["cvpipe", "compare"]
    assert compare["depends_on"] == {"evaluate": {"condition": "service_completed_successfully"}}
    for key in ("volumes", "user", "environment", "working_dir", "init"):
        assert compare[key] == evaluate[key], key  # the stages' anchor: params, exports/, models/, reports/
    assert "profiles" not in compare


def test_app_service_serves_the_promoted_folder_read_only():
    app = _compose()["services"]["app"]
    assert app["profiles"] == ["app"]
    assert app["volumes"] == ["${CVPIPE_PROJECT_DIR:-.}/models:/models:ro"]
    assert app["ports"] == ["${CVPIPE_APP_PORT:-8000}:8000"]
    # the image's CMD serves /models/best (compare's promoted folder)
    assert '"--model", "/models/best"' in (REPO / "app/Dockerfile").read_text()


# ---- the documented commands, for real --------------------------------------------------------------


def _docker_bin() -> str | None:
    if os.environ.get("DOCKER"):
        return os.environ["DOCKER"]
    return "/usr/bin/docker" if Path("/usr/bin/docker").exists() else shutil.which("docker")


@pytest.fixture(scope="module")
def compose_client() -> str:
    """What stands for ``docker compose`` in the header's lines: the v2 plugin of the engine's client, else v1."""
    docker = _docker_bin()
    if docker is None:
        if os.environ.get("CVPIPE_REQUIRE_DOCKER") == "1":
            pytest.fail("CVPIPE_REQUIRE_DOCKER=1 but no docker client found")
        pytest.skip("no docker client")
    info = subprocess.run([docker, "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True)
    if info.returncode != 0:
        pytest.fail(f"docker client {docker} cannot reach an engine: {info.stderr.strip()}")
    if subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return f"{docker} compose"
    if v1 := shutil.which("docker-compose"):
        return v1
    pytest.fail("neither the docker compose plugin (v2) nor docker-compose (v1) is installed")


def _scratch_project(root: Path, photos: Path) -> Path:
    """A copy of the working tree as a clone holds it (git's tracked and untracked-not-ignored files, without
    pipeline outputs), with the tiny params.yaml and PHOTOS_PER_CLASS photos of each class in data/source/."""
    listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "-co", "--exclude-standard"],
                            capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = REPO / rel
        if src.is_file() and rel.split("/")[0] not in OUTPUT_DIRS and rel != "dvc.lock":
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, root / rel)
    write_params(root, PARAMS)
    for cls in ("ants", "bees"):
        (root / "data/source" / cls).mkdir(parents=True)
        for f in sorted((photos / cls).glob("*.jpg"))[:PHOTOS_PER_CLASS]:
            shutil.copy(f, root / "data/source" / cls / f.name)
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Header:
    """Runs a header line with bash in the project, after the header's export line; ``docker compose`` -> *client*."""

    def __init__(self, project: Path, client: str, env: dict):
        self.project, self.client, self.env = project, client, {**os.environ, **env}

    def script(self, line: str) -> list[str]:
        line = re.sub(r"^docker compose\b", self.client, line)
        return ["bash", "-c", f"set -euo pipefail; {ENV_LINE}; {line}"]

    def run(self, line: str, timeout: float = 3600, check: bool = True) -> subprocess.CompletedProcess:
        t0 = time.monotonic()
        proc = subprocess.run(self.script(line), cwd=self.project, env=self.env, capture_output=True, text=True,
                              timeout=timeout)
        print(f"[compose] {line}: exit {proc.returncode} in {time.monotonic() - t0:.1f}s")
        if check and proc.returncode != 0:
            raise AssertionError(f"{line} exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
        return proc

    def start(self, line: str, log: Path) -> subprocess.Popen:
        with open(log, "wb") as fh:
            return subprocess.Popen(self.script(line), cwd=self.project, env=self.env, stdout=fh,
                                    stderr=subprocess.STDOUT, start_new_session=True)


def _wait_healthy(url: str, up: subprocess.Popen, log: Path) -> dict:
    """GET /healthz until it answers 200, for at most HEALTH_TIMEOUT_S; fails early when ``up`` exits."""
    import httpx

    t0 = time.monotonic()
    while time.monotonic() - t0 < HEALTH_TIMEOUT_S:
        if up.poll() is not None:
            pytest.fail(f"`{APP_UP}` exited {up.returncode} before serving:\n{log.read_text()[-4000:]}")
        try:
            r = httpx.get(f"{url}/healthz", timeout=5)
            if r.status_code == 200:
                print(f"[compose] app healthy after {time.monotonic() - t0:.1f}s")
                return r.json()
        except httpx.TransportError:
            pass
        time.sleep(1)
    pytest.fail(f"the composed app did not answer /healthz within {HEALTH_TIMEOUT_S}s:\n{log.read_text()[-4000:]}")


@pytest.mark.container
@pytest.mark.slow
@pytest.mark.realdata
def test_documented_compose_commands_serve_a_real_photo(compose_client, real_data, tmp_path):
    import httpx

    photos = real_data / "hymenoptera_data"
    project = _scratch_project(tmp_path / "project", photos / "train")
    port = _free_port()
    env = {"COMPOSE_PROJECT_NAME": f"cvpipecompose{secrets.token_hex(3)}", "CVPIPE_IMAGE_TAG": TAG,
           "CVPIPE_APP_PORT": f"127.0.0.1:{port}", "WANDB_MODE": "offline"}
    header = _Header(project, compose_client, env)
    log = tmp_path / "app.log"
    up = None
    t0 = time.monotonic()
    try:
        for line in RUN_IN_ORDER:
            header.run(line)
        best = project / "models/best"
        assert (best / "model.onnx").is_file(), sorted(p.name for p in project.joinpath("models").rglob("*"))
        classes = json.loads((best / "classes.json").read_text())
        assert sorted(classes) == ["ants", "bees"], classes
        up = header.start(APP_UP, log)
        url = f"http://127.0.0.1:{port}"
        health = _wait_healthy(url, up, log)
        assert health["backend"] == "onnxruntime", health  # the torch-free image serves model.onnx
        assert httpx.get(f"{url}/model", timeout=10).json()["classes"] == classes
        photo = sorted((photos / "val/bees").glob("*.jpg"))[0]  # held out: only train/ photos were ingested
        r = httpx.post(f"{url}/predict", files={"file": (photo.name, photo.read_bytes(), "image/jpeg")}, timeout=60)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["label"] in classes and 0.5 <= body["probability"] <= 1.0, body
        assert {t["label"] for t in body["top_k"]} == set(classes), body
    finally:
        header.run("docker compose --profile app down --remove-orphans", timeout=300, check=False)
        if up is not None:
            try:
                up.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(up.pid, 9)
                up.wait()
    print(f"[compose] documented commands end to end: {time.monotonic() - t0:.1f}s")
