"""The stage images, built and run for real (Docker engine required; CI starts one).

* every folder with a Dockerfile builds (ingest, preprocess, train, evaluate, and app once it exists);
* each image: non-root user, ENTRYPOINT ``cvpipe <stage>``, OCI labels, no torch in ingest/preprocess/app;
* the app image (#20): under 1 GB, exactly the lock's "packages app" pins, no torch; run with the
  promoted model of the local pipeline mounted at /models/best it turns healthy (its own
  HEALTHCHECK), answers /predict through ONNX Runtime with the probabilities evaluate computed,
  classifies a real photo, and stops gracefully on SIGTERM as PID 1;
* a stale Pipfile.lock fails the build; .dockerignore keeps data, venvs, caches and keys out;
* ingest -> preprocess -> train -> evaluate through the containers (docker-shell.sh) gives the
  same prepared data and metrics as the same params run locally (deterministic, same seed);
* secrets passed at run time (WANDB_API_KEY, the GOOGLE_APPLICATION_CREDENTIALS key file) appear
  neither in ``docker history`` nor anywhere in the image filesystem;
* ``docker-compose run`` (v1; ``docker compose`` v2 when v1 is absent) of the pipeline;
* ``CVPIPE_RUNNER=docker dvc repro`` runs the chain in containers and a second call is a no-op.

No docker client at all -> skipped, unless CVPIPE_REQUIRE_DOCKER=1 (CI), where it fails.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, cvpipe, make_digits_slice, write_params

pytestmark = [pytest.mark.container, pytest.mark.slow]

STAGES = ["ingest", "preprocess", "train", "evaluate"]
TAG = "test"
PER_CLASS = 30


def _docker_bin() -> str | None:
    if os.environ.get("DOCKER"):
        return os.environ["DOCKER"]
    # the distribution's client talks to the local engine; an older stand-alone one may come first on PATH
    return "/usr/bin/docker" if Path("/usr/bin/docker").exists() else shutil.which("docker")


DOCKER = _docker_bin()


def _sh(cmd: list[str], *, env: dict | None = None, cwd: Path | None = None, timeout: float = 1800, check: bool = True,
        input: bytes | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env={**os.environ, **(env or {})}, cwd=cwd, capture_output=True, timeout=timeout, input=input)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout.decode()[-4000:]}\n{proc.stderr.decode()[-4000:]}")
    return proc


@pytest.fixture(scope="session")
def docker() -> str:
    if DOCKER is None:
        if os.environ.get("CVPIPE_REQUIRE_DOCKER") == "1":
            pytest.fail("CVPIPE_REQUIRE_DOCKER=1 but no docker client found")
        pytest.skip("no docker client")
    proc = subprocess.run([DOCKER, "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(f"docker client {DOCKER} cannot reach an engine: {proc.stderr.strip()}")
    return DOCKER


def _stage_dirs() -> list[str]:
    return sorted(p.parent.name for p in REPO.glob("*/Dockerfile"))


def _env(docker: str, **extra) -> dict:
    return {"DOCKER": docker, "CVPIPE_IMAGE_TAG": TAG, "PYPI_URL": _index_url(), **extra}


def _index_url() -> str:
    return subprocess.run(["sh", str(REPO / "scripts/index_url.sh")], capture_output=True, text=True,
                          env={**os.environ, "PYTHON": sys.executable}, check=True).stdout.strip()


@pytest.fixture(scope="session")
def images(docker) -> dict[str, str]:
    """Build every stage image (cvpipe-<stage>:test) with docker-shell.sh; returns stage -> image."""
    t0 = time.monotonic()
    _sh([str(REPO / "docker-shell.sh"), "all", "--build-only"], env=_env(docker), timeout=3600)
    print(f"\n[containers] built {_stage_dirs()} in {time.monotonic() - t0:.1f}s")
    return {s: f"cvpipe-{s}:{TAG}" for s in _stage_dirs()}


def _inspect(docker: str, image: str) -> dict:
    return json.loads(_sh([docker, "image", "inspect", image]).stdout)[0]


def test_every_stage_folder_with_a_dockerfile_builds(docker, images):
    assert set(STAGES) <= set(images)
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    for stage, image in images.items():
        info = _inspect(docker, image)
        cfg = info["Config"]
        if stage in STAGES:
            assert cfg["Entrypoint"] == ["cvpipe", stage]
        else:  # app: its own cvpipe command
            assert cfg["Entrypoint"][0] == "cvpipe"
        assert cfg["User"] not in ("", "root", "0", "0:0")
        labels = cfg["Labels"]
        assert labels["org.opencontainers.image.title"] == f"cvpipe-{stage}"
        assert "org.opencontainers.image.source" in labels
        if head:
            assert labels["org.opencontainers.image.revision"] == head
        print(f"[containers] {image}: {info['Size'] / 1e9:.2f} GB")


def test_images_run_as_non_root_and_carry_only_their_stage(docker, images):
    for stage, image in images.items():
        uid = _sh([docker, "run", "--rm", "--entrypoint", "id", image, "-u"]).stdout.decode().strip()
        assert uid != "0", image
        probe = ("import importlib.util as u, json; "
                 "print(json.dumps({m: u.find_spec(m) is not None for m in ['torch', 'pytest', 'dvc', 'cvpipe', 'gcsfs']}))")
        have = json.loads(_sh([docker, "run", "--rm", "--entrypoint", "python", image, "-c", probe]).stdout)
        assert have["cvpipe"] and not have["pytest"] and not have["dvc"], (image, have)  # no dev or pipeline tools
        assert have["torch"] == (stage in ("train", "evaluate")), (image, have)  # app serves through ONNX Runtime
        # ingest reads gs:// sources; the app fetches a gs:// model (`cvpipe serve --model gs://...`)
        assert have["gcsfs"] == (stage in ("ingest", "app")), (image, have)
        # the CLI works as the entrypoint
        assert "Usage" in _sh([docker, "run", "--rm", image, "--help"]).stdout.decode()
    # the torch images are the CUDA build (they use GPUs under --gpus all) and degrade to CPU here
    out = _sh([docker, "run", "--rm", "--entrypoint", "python", images["train"], "-c",
               "import torch; print(torch.version.cuda is not None, torch.cuda.is_available())"]).stdout.decode().split()
    assert out[0] == "True"


def test_train_evaluate_share_the_torch_layer(docker, images):
    """The ~6 GB torch/CUDA layer is built once: train's and evaluate's layer lists share it (app has no torch)."""
    base = _inspect(docker, "python:3.11-slim-bookworm")["RootFS"]["Layers"]
    torch_images = ["train", "evaluate"]
    layer_lists = [_inspect(docker, images[s])["RootFS"]["Layers"] for s in torch_images]
    shared = set(layer_lists[0]).intersection(*map(set, layer_lists[1:]))
    # base + (venv, user) + torch.txt + the torch install
    assert len(shared) >= len(base) + 3, (torch_images, len(shared), len(base))
    assert all(lst[: len(base) + 3] == layer_lists[0][: len(base) + 3] for lst in layer_lists)


def test_stale_lock_fails_the_build(docker, tmp_path):
    ctx = tmp_path / "ctx"
    (ctx / "ingest").mkdir(parents=True)
    for name in ("Pipfile", "Pipfile.lock", ".dockerignore", "ingest/Dockerfile"):
        shutil.copy(REPO / name, ctx / name)
    shutil.copytree(REPO / "docker", ctx / "docker")
    args = [docker, "build", "--target", "lock", "-f", str(ctx / "ingest/Dockerfile"), "--build-arg", f"PIP_INDEX_URL={_index_url()}"]
    _sh(args + ["-t", "cvpipe-locktest:ok", str(ctx)])  # the real lock passes
    with open(ctx / "Pipfile", "a") as fh:
        fh.write('\n[ingest-extra]\nrequests = "*"\n')
    proc = _sh(args + ["-t", "cvpipe-locktest:stale", str(ctx)], check=False)
    assert proc.returncode != 0
    assert b"out-of-date" in proc.stdout + proc.stderr
    _sh([docker, "rmi", "cvpipe-locktest:ok"], check=False)


def test_dockerignore_keeps_data_venvs_caches_and_keys_out(docker, tmp_path):
    ctx = tmp_path / "ctx"
    files = {
        "Pipfile": "ok", "pyproject.toml": "ok", "src/cvpipe/x.py": "ok", "docker/lock-requirements.sh": "ok",
        "data/raw/a.png": "no", "models/resnet18/seed42/best.pt": "no", ".venv/bin/python": "no", ".dvc/cache/ab/cd": "no",
        ".env": "no", "gcp-key-prod.json": "no", "sa.json.key": "no", "src/cvpipe/__pycache__/x.cpython-311.pyc": "no",
        "src/.env": "no", "wandb/run/x": "no", ".git/HEAD": "no", "notes/secret.txt": "no", ".pytest_cache/x": "no",
    }
    for rel, _ in files.items():
        (ctx / rel).parent.mkdir(parents=True, exist_ok=True)
        (ctx / rel).write_text(rel)
    shutil.copy(REPO / ".dockerignore", ctx / ".dockerignore")
    (ctx / "Dockerfile.ctx").write_text("FROM python:3.11-slim-bookworm\nCOPY . /ctx\n")
    _sh([docker, "build", "-q", "-f", str(ctx / "Dockerfile.ctx"), "-t", "cvpipe-ctxtest", str(ctx)])
    listed = _sh([docker, "run", "--rm", "--entrypoint", "find", "cvpipe-ctxtest", "/ctx", "-type", "f"]).stdout.decode().split()
    seen = {p.removeprefix("/ctx/") for p in listed}
    assert {r for r, v in files.items() if v == "ok"} <= seen
    assert not {r for r, v in files.items() if v == "no"} & seen, seen
    _sh([docker, "rmi", "cvpipe-ctxtest"], check=False)


# ---- the pipeline through the containers -------------------------------------------------------

PARAMS = {
    "ingest.source": "data/source",  # relative to the project (/work in the containers)
    "ingest.workers": 2,
    "preprocess.workers": 2,
    "train.epochs": 2,
    "train.warmup_epochs": 1,
    "train.deterministic": True,
    "train.seed": 7,
    "bakeoff.seeds": [7],  # dvc repro's cell: the same run, resnet18/seed7, as `cvpipe train` with train.seed 7
}
RUN = "resnet18/seed7"  # the run folder under models/ metrics/ plots/ exports/ reports/ (cvpipe.core.config.run_name)


@pytest.fixture(scope="module")
def digits_slice(tmp_path_factory) -> Path:
    return make_digits_slice(tmp_path_factory, PER_CLASS)


def _new_project(root: Path, digits_slice: Path) -> Path:
    root.mkdir(parents=True)
    write_params(root, PARAMS)
    shutil.copytree(digits_slice, root / "data" / "source")
    return root


def _norm(data: bytes, project: Path) -> bytes:
    """Source URIs are absolute: the same project is /work inside the containers."""
    return data.replace(str(project).encode() + b"/", b"<project>/").replace(b"/work/", b"<project>/")


def _tree_hash(folder: Path, project: Path) -> dict[str, str]:
    out = {}
    for p in sorted(folder.rglob("*")):
        if not p.is_file():
            continue
        data = _norm(p.read_bytes(), project)
        if p.name == "meta.json":  # its fingerprint hashes the index, i.e. the absolute source URIs
            meta = json.loads(data)
            meta.pop("fingerprint")
            data = json.dumps(meta, sort_keys=True).encode()
        out[p.relative_to(folder).as_posix()] = hashlib.sha256(data).hexdigest()
    return out


STABLE_TRAIN = ["arch", "epochs_run", "best_epoch", "best_val_acc", "best_val_loss", "final_train_loss",
                "final_val_acc", "final_val_loss", "device", "amp", "params_m"]
# (dataset_hash covers the prepared index, whose source URIs are absolute paths: compared normalized below)


def _results(project: Path) -> dict:
    train = json.loads((project / f"reports/{RUN}/train.json").read_text())
    # source URIs are absolute (normalized); data_version hashes them (like meta.json's
    # fingerprint); cost holds this machine's latency/throughput timings
    # the full report (metrics/ holds the headline, with this machine's latency and throughput)
    ev = json.loads(_norm((project / f"reports/{RUN}/evaluate.json").read_bytes(), project))
    for k in ("data_version", "cost"):
        ev.pop(k, None)
    history = (project / f"plots/{RUN}/history.csv").read_text().splitlines()
    cols = history[0].split(",")
    keep = [i for i, c in enumerate(cols) if c not in ("img_per_s", "seconds")]
    assert {"epoch", "train_loss", "val_loss", "val_acc"} <= {cols[i] for i in keep}
    return {
        "prepared": _tree_hash(project / "data/prepared", project),
        "dataset": {k: v for k, v in json.loads((project / "reports/dataset.json").read_text()).items()
                    if k not in ("seconds", "images_per_second")},
        "train": {k: train[k] for k in STABLE_TRAIN},
        "evaluate": {k: v for k, v in ev.items() if k not in ("seconds", "img_per_s")},
        "history": [[row.split(",")[i] for i in keep] for row in history],
        "predictions": _norm((project / f"plots/{RUN}/predictions.csv").read_bytes(), project),
    }


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, digits_slice) -> dict:
    project = _new_project(tmp_path_factory.mktemp("local") / "p", digits_slice)
    t0 = time.monotonic()
    for stage in STAGES:
        cvpipe(stage, "--quiet", cwd=project)
    print(f"\n[containers] local pipeline: {time.monotonic() - t0:.1f}s")
    return {**_results(project), "project": project}  # the project: the app tests promote its model


def test_pipeline_in_containers_equals_local_run_and_leaks_no_secret(docker, images, local_run, digits_slice, tmp_path):
    project = _new_project(tmp_path / "p", digits_slice)
    wandb_key = "wk" + secrets.token_hex(20)  # 42 chars, the shape of a W&B key
    gcp_secret = "gcpsecret" + secrets.token_hex(16)
    key_file = tmp_path / "key" / "sa.json"
    key_file.parent.mkdir()
    key_file.write_text(json.dumps({"type": "service_account", "private_key": gcp_secret, "client_email": "x@y.z"}))
    env = _env(docker, CVPIPE_PROJECT_DIR=str(project), CVPIPE_NO_BUILD="1", WANDB_API_KEY=wandb_key,
               WANDB_MODE="offline", GOOGLE_APPLICATION_CREDENTIALS=str(key_file))
    t0 = time.monotonic()
    proc = _sh([str(REPO / "docker-shell.sh"), "all", "--quiet"], env=env, timeout=1800)
    print(f"\n[containers] pipeline through docker-shell.sh: {time.monotonic() - t0:.1f}s")
    assert (project / f"metrics/{RUN}/evaluate.json").exists(), proc.stderr.decode()
    got = _results(project)
    for key in ("prepared", "dataset", "train", "evaluate", "history", "predictions"):
        assert got[key] == local_run[key], key
    # the container saw the key file read-only at the path it was told
    out = _sh([str(REPO / "docker-shell.sh"), "ingest", "--shell", "-c",
               'test -r "$GOOGLE_APPLICATION_CREDENTIALS" && ! test -w "$GOOGLE_APPLICATION_CREDENTIALS" && echo ro'],
              env=env).stdout.decode()
    assert out.strip().endswith("ro")
    # the credentials `cvpipe init` names as ${CVPIPE_SOURCE_*} in ingest.source reach the container, by name
    token = "srctoken" + secrets.token_hex(16)
    out = _sh([str(REPO / "docker-shell.sh"), "ingest", "--shell", "-c", 'echo "got:$CVPIPE_SOURCE_TOKEN"'],
              env={**env, "CVPIPE_SOURCE_TOKEN": token}).stdout.decode()
    assert out.strip().endswith(f"got:{token}")

    for image in images.values():
        hist = _sh([docker, "history", "--no-trunc", image]).stdout.decode()
        meta = _sh([docker, "image", "inspect", image]).stdout.decode()
        for secret in (wandb_key, gcp_secret):
            assert secret not in hist and secret not in meta
        # every byte of the image's filesystem, streamed through grep
        cid = _sh([docker, "create", image]).stdout.decode().strip()
        try:
            exp = subprocess.Popen([docker, "export", cid], stdout=subprocess.PIPE)
            grep = subprocess.run(["grep", "-c", "-a", "-F", "-e", wandb_key, "-e", gcp_secret],
                                  stdin=exp.stdout, capture_output=True, text=True)
            exp.stdout.close()
            assert exp.wait() == 0
            assert grep.stdout.strip() == "0", f"a run-time secret is inside {image}"
        finally:
            _sh([docker, "rm", cid], check=False)


def _compose_cmd(docker: str) -> list[str]:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    pytest.fail("neither docker-compose (v1) nor the docker compose plugin (v2) is installed")


def test_compose_run_of_the_pipeline(docker, images, local_run, digits_slice, tmp_path):
    project = _new_project(tmp_path / "p", digits_slice)
    for d in ("data", "models", "metrics", "plots", "wandb", ".cvpipe"):
        (project / d).mkdir(exist_ok=True)
    name = f"cvpipetest{secrets.token_hex(3)}"
    compose = _compose_cmd(docker) + ["-f", str(REPO / "docker-compose.yml"), "-p", name]
    env = {"CVPIPE_PROJECT_DIR": str(project), "CVPIPE_IMAGE_TAG": TAG, "CVPIPE_UID": str(os.getuid()),
           "CVPIPE_GID": str(os.getgid()), "WANDB_MODE": "offline"}
    t0 = time.monotonic()
    try:
        # evaluate's depends_on chain runs ingest, preprocess and train first, each after the previous exits 0
        _sh(compose + ["run", "--rm", "evaluate", "--quiet"], env=env, cwd=REPO, timeout=1800)
    finally:
        _sh(compose + ["down", "--remove-orphans"], env=env, cwd=REPO, check=False)
    print(f"\n[containers] docker-compose run evaluate: {time.monotonic() - t0:.1f}s")
    got = _results(project)
    for key in ("prepared", "train", "evaluate", "predictions"):
        assert got[key] == local_run[key], key


def test_dvc_repro_through_containers_then_no_op(docker, images, digits_slice, tmp_path):
    # a copy of the tracked project (what a clone holds), as its own DVC repo
    work = tmp_path / "clone"
    files = subprocess.run(["git", "-C", str(REPO), "ls-files"], capture_output=True, text=True, check=True).stdout.split()
    for rel in files:
        src = REPO / rel
        if src.is_file() and not rel.startswith(("metrics/", "plots/", ".dvc/")) and rel != "dvc.lock":
            (work / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, work / rel)
    write_params(work, PARAMS)
    shutil.copytree(digits_slice, work / "data" / "source")
    dvc = str(Path(sys.executable).with_name("dvc"))
    # no cvpipe on PATH: the local runner could not run a stage, only the containers can
    env = {**_env(docker), "CVPIPE_RUNNER": "docker", "PATH": "/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin",
           "WANDB_MODE": "offline", "DVC_NO_ANALYTICS": "1"}
    _sh([dvc, "init", "--no-scm", "-q"], cwd=work, env=env)
    t0 = time.monotonic()
    first = _sh([dvc, "repro"], cwd=work, env=env, timeout=1800)
    print(f"\n[containers] CVPIPE_RUNNER=docker dvc repro: {time.monotonic() - t0:.1f}s")
    log = (first.stdout + first.stderr).decode()
    for stage in STAGES:
        assert f"Running stage '{stage}" in log, log  # train@<arch>-<seed>, evaluate@<arch>-<seed> under matrix
        assert f"building cvpipe-{stage}:{TAG}" in log, log
    assert json.loads((work / f"metrics/{RUN}/evaluate.json").read_text())["n_test"] > 0
    second = _sh([dvc, "repro"], cwd=work, env=env)
    log2 = (second.stdout + second.stderr).decode()
    assert "Running stage" not in log2 and "building" not in log2, log2
    # a Dockerfile edit makes its stage (and what follows) stale
    with open(work / "train/Dockerfile", "a") as fh:
        fh.write("# edited\n")
    status = _sh([dvc, "status"], cwd=work, env=env).stdout.decode()
    assert "train/Dockerfile" in status and "ingest:" not in status, status


# ---- the app image: torch-free, serving through ONNX Runtime (#20) -----------------------------

APP_IMAGE_MAX_BYTES = 1_000_000_000  # the torch image was 6.5 GB for a 45 MB model


def _pins(lines: list[str]) -> dict[str, str]:
    """name -> version of ``name==version`` lines (pip freeze, or the lock's export with its markers and hashes)."""
    out = {}
    for line in lines:
        if "==" in line and not line.startswith((" ", "#", "-")):
            name, version = line.split(";")[0].split()[0].split("==")
            # the export names extras (google-api-core[grpc]); pip freeze names the distribution
            out[name.split("[")[0].lower().replace("_", "-")] = version
    return out


def test_app_image_is_small_torch_free_and_exactly_the_lock(docker, images):
    info = _inspect(docker, images["app"])
    print(f"\n[containers] {images['app']}: {info['Size'] / 1e6:.0f} MB")
    assert info["Size"] < APP_IMAGE_MAX_BYTES, info["Size"]
    assert info["Config"]["Healthcheck"]["Test"][0] == "CMD"
    proc = _sh([docker, "run", "--rm", "--entrypoint", "python", images["app"], "-c", "import torch"], check=False)
    assert proc.returncode != 0 and b"No module named 'torch'" in proc.stderr, proc.stderr
    frozen = _sh([docker, "run", "--rm", "--entrypoint", "pip", images["app"], "list", "--format=freeze"]).stdout.decode()
    installed = _pins(frozen.splitlines())
    installed.pop("cvpipe")  # the package itself, installed --no-deps from the context
    locked = _pins((REPO / "docker/requirements/app.txt").read_text().splitlines())
    for tool in ("pip", "setuptools", "wheel"):  # the venv's own, not the lock's
        installed.pop(tool, None)
    assert installed == locked
    assert not {"torch", "torchvision", "timm", "triton"} & set(installed)


@pytest.fixture(scope="module")
def promoted(local_run) -> Path:
    """The local pipeline's model, promoted by ``cvpipe compare`` to <project>/models/best (with model.onnx)."""
    project = local_run["project"]
    cvpipe("compare", "--quiet", cwd=project)
    best = project / "models" / "best"
    assert (best / "model.onnx").is_file()
    return best


def _state(docker: str, name: str) -> dict:
    return json.loads(_sh([docker, "inspect", "--format", "{{json .State}}", name]).stdout)


@pytest.fixture(scope="module")
def app_container(docker, images, promoted):
    """The app image run as a user would (its CMD, promoted folder read-only at /models/best), once healthy.

    Only the healthcheck's interval is shortened (1 s instead of 30 s): the command Docker runs is the image's own."""
    name = f"cvpipe-apptest-{secrets.token_hex(3)}"
    _sh([docker, "run", "-d", "--name", name, "-p", "127.0.0.1::8000", "-v", f"{promoted}:/models/best:ro",
         "--health-interval", "1s", "--health-start-period", "60s", images["app"]])
    try:
        t0 = time.monotonic()
        while (state := _state(docker, name))["Health"]["Status"] != "healthy":
            if not state["Running"] or time.monotonic() - t0 > 120:
                logs = _sh([docker, "logs", name], check=False)
                pytest.fail(f"app container not healthy ({state['Health']['Status']}, running={state['Running']}):\n"
                            f"{(logs.stdout + logs.stderr).decode()[-4000:]}")
            time.sleep(0.5)
        print(f"\n[containers] app container healthy after {time.monotonic() - t0:.1f}s")
        port = _sh([docker, "port", name, "8000/tcp"]).stdout.decode().split()[0].rsplit(":", 1)[1]
        yield {"name": name, "url": f"http://127.0.0.1:{port}"}
    finally:
        _sh([docker, "rm", "-f", name], check=False)


def test_app_container_serves_the_promoted_model_through_onnx_runtime(docker, app_container, local_run, promoted):
    """The container (ORT on the uint8 graph, the image's locked decoders) gives the probabilities torch eager
    fp32 gives here on the same folder's model.pt. (Not predictions.csv: evaluate scores under train.amp, bf16
    where the CPU has it, which moves probabilities by ~1e-3; the export's parity is checked against fp32.)"""
    import httpx

    from cvpipe.serve.model import load_model

    url = app_container["url"]
    assert _sh([docker, "exec", app_container["name"], "id", "-u"]).stdout.decode().strip() != "0"
    model = httpx.get(f"{url}/model", timeout=10).json()
    assert model["backend"]["name"] == "onnxruntime", model  # auto: the folder's uint8-pixel model.onnx
    assert httpx.get(f"{url}/healthz", timeout=10).json()["backend"] == "onnxruntime"
    eager = load_model(str(promoted), backend="torch")
    k = len(model["classes"])
    with open(local_run["project"] / f"plots/{RUN}/predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))[:12]  # stored test images
    for row in rows:
        data = Path(row["source_uri"]).read_bytes()
        r = httpx.post(f"{url}/predict", params={"top_k": k}, files={"file": ("x.png", data, "image/png")}, timeout=30)
        assert r.status_code == 200, r.text
        got = {t["label"]: t["probability"] for t in r.json()["top_k"]}
        want = {t["label"]: t["probability"] for t in eager.predict_bytes(data, k=k, max_pixels=10**8).top_k}
        assert got.keys() == want.keys()
        assert max(abs(got[c] - want[c]) for c in want) < 1e-4, (row["source_uri"], got, want)
    # bad input is a 4xx from the container too
    r = httpx.post(f"{url}/predict", files={"file": ("x.jpg", b"not an image at all", "image/jpeg")}, timeout=30)
    assert r.status_code == 415, r.text


@pytest.mark.realdata
def test_app_container_classifies_a_real_photo(app_container, real_data):
    import httpx
    from PIL import Image, ImageOps

    photo = sorted((real_data / "hymenoptera_data/val/bees").glob("*.jpg"))[0]
    r = httpx.post(f"{app_container['url']}/predict", files={"file": (photo.name, photo.read_bytes(), "image/jpeg")},
                   timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    classes = httpx.get(f"{app_container['url']}/model", timeout=10).json()["classes"]
    assert body["label"] in classes and 0.0 < body["probability"] <= 1.0
    with Image.open(photo) as im:
        width, height = ImageOps.exif_transpose(im).size
    assert (body["image"]["width"], body["image"]["height"]) == (width, height)
    assert body["latency_ms"]["inference"] > 0


def test_app_container_stops_gracefully_as_pid_1(docker, images, promoted):
    """No tini in the image: ``cvpipe serve`` is PID 1 (exec form) and uvicorn's SIGTERM handler ends it
    cleanly; the kernel would otherwise ignore SIGTERM for PID 1 and ``docker stop`` would SIGKILL after -t."""
    name = f"cvpipe-apptest-{secrets.token_hex(3)}"
    _sh([docker, "run", "-d", "--name", name, "-v", f"{promoted}:/models/best:ro",
         "--health-interval", "1s", images["app"]])
    try:
        t0 = time.monotonic()
        while _state(docker, name)["Health"]["Status"] != "healthy":
            assert time.monotonic() - t0 < 120 and _state(docker, name)["Running"]
            time.sleep(0.5)
        cmdline = _sh([docker, "exec", name, "cat", "/proc/1/cmdline"]).stdout.split(b"\0")
        assert cmdline[1].endswith(b"/cvpipe") and b"serve" in cmdline, cmdline
        t0 = time.monotonic()
        _sh([docker, "stop", "-t", "30", name])
        stopped_in = time.monotonic() - t0
        state = _state(docker, name)
        print(f"\n[containers] app container stopped in {stopped_in:.1f}s, exit code {state['ExitCode']}")
        assert stopped_in < 15 and state["ExitCode"] == 0, (stopped_in, state)
    finally:
        _sh([docker, "rm", "-f", name], check=False)
