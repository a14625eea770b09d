"""cvpipe serve: the API against a model trained by the real sample pipeline (digits slice, 2 epochs).

The app serves evaluate's export folder (exports/resnet18: a uint8-pixel model.onnx) on ONNX
Runtime; the bare checkpoint (models/resnet18/best.pt) on torch, and both give the same answers."""

from __future__ import annotations

import csv
import io
import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import cvpipe, make_digits_slice, write_params
from servers import stop_process
from fastapi.testclient import TestClient
from PIL import Image

from cvpipe.core.config import ServeParams
from cvpipe.core.errors import StageError
from cvpipe.serve.app import BackgroundServer, create_app
from cvpipe.serve.model import load_model

PER_CLASS = 20


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A project folder after ingest -> preprocess -> train (2 epochs) -> evaluate on a digits slice."""
    src = make_digits_slice(tmp_path_factory, PER_CLASS)
    proj = tmp_path_factory.mktemp("served-project")
    write_params(proj, {"ingest.source": str(src), "train.epochs": 2, "train.warmup_epochs": 1, "wandb.mode": "disabled"})
    for stage in ("ingest", "preprocess"):
        cvpipe(stage, "--quiet", cwd=proj)
    cvpipe("train", "--quiet", "--epochs", "2", cwd=proj)
    cvpipe("evaluate", "--quiet", cwd=proj)
    return proj


@pytest.fixture(scope="module")
def served(trained):
    """evaluate's export folder on the default backend: onnxruntime."""
    return load_model(str(trained / "exports/resnet18"), metrics_dir=str(trained / "metrics"),
                      plots_dir=str(trained / "plots"))


@pytest.fixture(scope="module")
def served_pt(trained):
    """The bare train checkpoint: the torch backend."""
    return load_model(str(trained / "models/resnet18/best.pt"), metrics_dir=str(trained / "metrics"),
                      plots_dir=str(trained / "plots"))


@pytest.fixture(scope="module")
def client(served):
    with TestClient(create_app(served, ServeParams()), raise_server_exceptions=False) as c:
        yield c


def _png(size=(32, 32), color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _test_rows(proj: Path) -> list[dict[str, str]]:
    with open(proj / "data/prepared/test/index.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _manifest(proj: Path) -> dict[str, str]:
    with open(proj / "data/raw/manifest.csv", newline="") as fh:
        return {r["id"]: r["path"] for r in csv.DictReader(fh)}


def test_healthz_docs_and_model_card(client, trained):
    h = client.get("/healthz")
    assert h.status_code == 200 and h.json()["status"] == "ok" and h.json()["model"] == "resnet18"
    assert h.json()["backend"] == "onnxruntime"

    m = client.get("/model").json()
    ev = json.loads((trained / "metrics/resnet18/evaluate.json").read_text())
    tr = json.loads((trained / "metrics/resnet18/train.json").read_text())
    assert m["arch"] == "resnet18" and m["classes"] == [str(i) for i in range(10)]
    assert m["test_metrics"]["accuracy"] == ev["accuracy"] and m["test_metrics"]["n_test"] == ev["n_test"]
    assert m["data_version"] == tr["dataset_hash"]
    assert m["params_summary"]["train"]["epochs"] == 2 and m["params_summary"]["train"]["arch"] == "resnet18"
    assert m["preprocess"]["image_size"] == 32 and m["preprocess"]["resize_mode"] == "shorter_side_center_crop"
    assert m["model_cost"]["params_m"] == pytest.approx(tr["params_m"], abs=1e-3)
    assert m["leaderboard"] is None and any("leaderboard" in n for n in m["notes"])
    assert m["layout"] == "folder" and m["backend"]["name"] == "onnxruntime" and m["backend"]["file"] == "model.onnx"
    assert m["backend"]["intra_op_threads"] >= 1 and m["backend"]["graph_optimization"] == "ORT_ENABLE_ALL"
    assert "pixels: uint8 NHWC" in m["backend"]["input"]
    assert not any("model.pt" in n for n in m["notes"])  # the torch backend's file is not missed

    png = client.get(m["confusion_matrix_url"])
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert png.content == (trained / "exports/resnet18/confusion_matrix.png").read_bytes()

    spec = client.get("/openapi.json").json()
    assert {"/predict", "/model", "/healthz"} <= set(spec["paths"])
    assert client.get("/docs").status_code == 200
    page = client.get("/")
    assert page.status_code == 200 and 'id="file-input"' in page.text
    assert client.get("/static/app.js").status_code == 200


def test_predict_is_the_evaluation_preprocessing_and_model(client, served, trained):
    """A stored test image posted to /predict gives the array preprocess wrote and the probabilities evaluate saw."""
    from cvpipe.data.prepared import PreparedDataset

    test = PreparedDataset(str(trained / "data/prepared")).split("test")
    paths = _manifest(trained)
    rows = _test_rows(trained)[:12]
    for i, row in enumerate(rows):
        data = (trained / "data/raw" / paths[row["id"]]).read_bytes()
        arr = served.to_array(served.decode(data, max_pixels=10**8), data)
        np.testing.assert_array_equal(arr, test.images[i])  # the very pixels evaluate saw

        r = client.post("/predict", files={"file": (f"{row['id']}.png", data, "image/png")}, params={"top_k": 10})
        assert r.status_code == 200, r.text
        body = r.json()
        expected = served.probabilities([np.asarray(test.images[i])])[0]
        got = {t["label"]: t["probability"] for t in body["top_k"]}
        assert len(got) == 10 and sum(got.values()) == pytest.approx(1.0, abs=1e-4)
        for c, p in zip(served.classes, expected):
            assert got[c] == pytest.approx(float(p), abs=1e-5)
        assert body["label"] == served.classes[int(expected.argmax())]
        assert [t["probability"] for t in body["top_k"]] == sorted(got.values(), reverse=True)
        lat = body["latency_ms"]
        assert 0 < lat["inference"] <= lat["total"] and lat["decode"] > 0


def test_top_k_defaults_and_caps(client):
    r = client.post("/predict", files={"file": ("x.png", _png(), "image/png")})
    assert r.status_code == 200 and len(r.json()["top_k"]) == ServeParams().top_k
    r = client.post("/predict", files={"file": ("x.png", _png(), "image/png")}, params={"top_k": 50})
    assert len(r.json()["top_k"]) == 10
    r = client.post("/predict", files={"file": ("x.png", _png(), "image/png")}, params={"top_k": 0})
    assert r.status_code == 422 and r.json()["error"] == "invalid_request"


EXPECTED_REJECTIONS = {
    "zero_bytes.jpg": (400, "empty_file"),
    "not_an_image.jpg": (415, "not_an_image"),
    "html_error_page.jpg": (415, "not_an_image"),
    "git_lfs_pointer.jpg": (415, "git_lfs_pointer"),
    "decompression_bomb_14000x14000.png": (413, "decompression_bomb"),
    "truncated_half.jpg": (422, "truncated"),
    "tiny_1x1.png": (422, "too_small"),
    "extreme_aspect_12x2000.jpg": (422, "extreme_aspect_ratio"),
}
EXPECTED_PREDICTIONS = {"progressive.jpg", "cmyk.jpg", "exif_orientation_6.jpg", "png_content_named.jpg",
                        "jpeg_content_named.png", "rgba_alpha.png", "gray_16bit.png", "ünïcødé_名前.jpg"}


def test_every_bad_input_gets_a_prediction_or_a_4xx_with_a_reason(client, served, real_data):
    files = sorted(p for p in (real_data / "bad_inputs").iterdir() if p.is_file())
    assert len(files) >= 30
    outcomes = {}
    for f in files:
        r = client.post("/predict", files={"file": (f.name, f.read_bytes(), "application/octet-stream")})
        assert r.status_code < 500, f"{f.name}: {r.status_code} {r.text}"
        body = r.json()
        if r.status_code == 200:
            assert body["label"] in served.classes and 0 <= body["probability"] <= 1
        else:
            assert 400 <= r.status_code < 500, f"{f.name}: {r.status_code}"
            assert body["error"] and len(body["detail"]) > 10, f"{f.name}: {body}"
        outcomes[f.name] = (r.status_code, body.get("error"))
    for name, expected in EXPECTED_REJECTIONS.items():
        assert outcomes[name] == expected, name
    for name in EXPECTED_PREDICTIONS:
        assert outcomes[name][0] == 200, (name, outcomes[name])
    assert client.get("/healthz").json()["status"] == "ok"  # still up


def test_request_errors_are_json_4xx(client):
    r = client.post("/predict")
    assert r.status_code == 400 and r.json()["error"] == "missing_file"
    r = client.post("/predict", data={"other": "x"})
    assert r.status_code == 400 and "file" in r.json()["detail"]
    r = client.get("/nope")
    assert r.status_code == 404 and r.json()["error"] == "http_error"
    r = client.get("/predict")
    assert r.status_code == 405 and "error" in r.json()


def test_upload_limit_by_header_and_by_stream(served):
    settings = ServeParams(max_upload_bytes=4000)
    big = np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(big).save(buf, format="PNG")
    data = buf.getvalue()
    assert len(data) > 100_000
    with TestClient(create_app(served, settings), raise_server_exceptions=False) as c:
        r = c.post("/predict", files={"file": ("big.png", data, "image/png")})
        assert r.status_code == 413 and r.json()["error"] == "too_large" and "4000" in r.json()["detail"]
        # a file just over the limit but within the multipart slack: caught after parsing
        r = c.post("/predict", files={"file": ("b.bin", b"\x89PNG" + b"0" * 5000, "image/png")})
        assert r.status_code == 413 and r.json()["error"] == "too_large"
        # chunked body (no Content-Length): cut off while streaming
        boundary = "xyz"
        payload = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n"
                   f"Content-Type: image/png\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()

        def chunks():
            for i in range(0, len(payload), 8192):
                yield payload[i:i + 8192]

        r = c.post("/predict", content=chunks(), headers={"content-type": f"multipart/form-data; boundary={boundary}"})
        assert r.status_code == 413 and r.json()["error"] == "too_large"
        assert c.post("/predict", files={"file": ("x.png", _png(), "image/png")}).status_code == 200


def _read_http_response(sock) -> str:
    """Read one whole HTTP/1.1 response: headers and body may arrive in separate TCP segments."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            return buf.decode("latin-1")
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return (head + b"\r\n\r\n" + body).decode("latin-1")


def test_slow_upload_times_out_and_server_stays_up(served):
    app = create_app(served, ServeParams(request_timeout_s=1.0))
    with BackgroundServer(app) as url:
        host, port = url.split("//")[1].split(":")
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                      b"Content-Length: 5000\r\n\r\n--b\r\n")
            t0 = time.monotonic()
            reply = _read_http_response(s)
            waited = time.monotonic() - t0
        assert reply.startswith("HTTP/1.1 408"), reply
        assert '"error":"request_timeout"' in reply and 0.8 < waited < 5
        r = httpx.post(f"{url}/predict", files={"file": ("x.png", _png(), "image/png")}, timeout=30)
        assert r.status_code == 200 and r.json()["label"] in served.classes
        assert httpx.get(f"{url}/healthz").json()["status"] == "ok"


def test_promoted_folder_layout_and_missing_optional_files(trained, tmp_path):
    best = tmp_path / "best"
    best.mkdir()
    shutil.copy(trained / "models/resnet18/best.pt", best / "model.pt")
    classes = [str(i) for i in range(10)]
    (best / "classes.json").write_text(json.dumps(classes))
    (best / "preprocess.json").write_text(json.dumps(
        {"image_size": 32, "resize_mode": "shorter_side_center_crop", "mean": [0.5] * 3, "std": [0.25] * 3}))
    (best / "card.json").write_text(json.dumps({
        "arch": "resnet18", "test_metrics": {"accuracy": 0.75, "macro_f1": 0.7, "n_test": 30},
        "data_version": "abc123", "model_cost": {"params_m": 11.2, "latency_ms": 3.0},
        "params_summary": {"train": {"epochs": 2}}}))
    (best / "leaderboard.csv").write_text("rank,arch,accuracy\n1,resnet18,0.75\n2,mobilenetv3_small_050,0.6\n")
    m = load_model(str(best), metrics_dir=str(tmp_path / "no-metrics"))
    assert m.layout == "folder" and m.mean == [0.5] * 3 and m.std == [0.25] * 3  # the saved config wins
    with TestClient(create_app(m, ServeParams())) as c:
        info = c.get("/model").json()
        assert info["test_metrics"]["accuracy"] == 0.75 and info["data_version"] == "abc123"
        assert info["leaderboard"][1]["arch"] == "mobilenetv3_small_050"
        assert info["files"]["confusion_matrix.png"] is False and info["confusion_matrix_url"] is None
        assert any(n.startswith("confusion_matrix.png missing") for n in info["notes"])
        assert any(n.startswith("model.onnx missing") for n in info["notes"])
        r = c.get("/model/confusion_matrix.png")
        assert r.status_code == 404 and "confusion matrix" in r.json()["detail"]
        assert c.post("/predict", files={"file": ("x.png", _png(), "image/png")}).status_code == 200

    (best / "classes.json").write_text(json.dumps(list(reversed(classes))))
    with pytest.raises(StageError, match="disagrees"):
        load_model(str(best))
    (best / "model.pt").unlink()
    with pytest.raises(StageError, match="without model.pt"):
        load_model(str(best))
    with pytest.raises(StageError, match="no model at"):
        load_model(str(tmp_path / "nothing"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_serve_end_to_end(trained):
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "cvpipe", "serve", "--quiet", "--model", "models/resnet18/best.pt", "--port", str(port),
         "--top-k", "3"],
        cwd=trained, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "cvpipe serve did not come up"
            time.sleep(0.3)
        r = httpx.post(f"http://127.0.0.1:{port}/predict", files={"file": ("x.png", _png(), "image/png")}, timeout=30)
        assert r.status_code == 200 and len(r.json()["top_k"]) == 3
        assert httpx.get(f"http://127.0.0.1:{port}/healthz").json()["backend"] == "torch"  # a bare .pt: torch
        m = httpx.get(f"http://127.0.0.1:{port}/model").json()  # card found via paths.metrics of the project
        assert m["test_metrics"]["accuracy"] == json.loads((trained / "metrics/resnet18/evaluate.json").read_text())["accuracy"]
    finally:
        stop_process(proc, timeout=20)

    bad = cvpipe("serve", "--model", "models/nothing.pt", cwd=trained, check=False)
    assert bad.returncode == 1 and "no model at models/nothing.pt" in bad.stdout + bad.stderr
    bad = cvpipe("serve", "--model", "models/resnet18/best.pt", "--backend", "onnx", cwd=trained, check=False)
    assert bad.returncode == 1 and "serve.backend is onnx, but models/resnet18/best.pt" in bad.stdout + bad.stderr
    bad = cvpipe("serve", "--backend", "tensorrt", cwd=trained, check=False)
    assert bad.returncode == 2 and "serve.backend" in bad.stdout + bad.stderr
    bad = cvpipe("serve", "-S", "serve.port=0", cwd=trained, check=False)
    assert bad.returncode == 2 and "serve.port" in bad.stdout + bad.stderr


@pytest.mark.slow
def test_load_from_gs_through_the_emulator(trained, tmp_path, monkeypatch):
    """serve.model may be gs://: a checkpoint and a promoted folder, fetched through gcsfs from the GCS emulator."""
    from servers import gcs_emulator, upload_tree

    folder = tmp_path / "best"
    folder.mkdir()
    shutil.copy(trained / "models/resnet18/best.pt", folder / "model.pt")
    (folder / "card.json").write_text(json.dumps({"test_metrics": {"accuracy": 0.5}, "data_version": "gs-v1"}))
    shutil.copy(trained / "plots/resnet18/confusion_matrix.png", folder / "confusion_matrix.png")
    monkeypatch.setenv("CVPIPE_CACHE", str(tmp_path / "cache"))
    with gcs_emulator(tmp_path / "gcs") as endpoint:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", endpoint)
        upload_tree(endpoint, folder, "cvpipe-models", "models/best")
        m = load_model("gs://cvpipe-models/models/best")
        assert m.layout == "folder" and m.card["data_version"] == "gs-v1" and m.files["confusion_matrix.png"] is not None
        c = load_model("gs://cvpipe-models/models/best/model.pt")
        assert c.layout == "checkpoint" and c.classes == m.classes
    with TestClient(create_app(m, ServeParams())) as client:
        assert client.get("/model/confusion_matrix.png").status_code == 200
        assert client.post("/predict", files={"file": ("x.png", _png(), "image/png")}).status_code == 200


# ---------------------------------------------------------------------- backends


def test_torch_backend_serves_the_bare_checkpoint_with_the_same_answers(served, served_pt, trained):
    from cvpipe.data.prepared import PreparedDataset

    assert served.backend.name == "onnxruntime" and served_pt.backend.name == "torch" and served_pt.layout == "checkpoint"
    with TestClient(create_app(served_pt, ServeParams())) as c:
        assert c.get("/healthz").json()["backend"] == "torch"
        assert c.get("/model").json()["backend"]["name"] == "torch"
        assert c.post("/predict", files={"file": ("x.png", _png(), "image/png")}).status_code == 200

    # the same folder (the evaluated weights: model.pt and model.onnx) on torch answers like onnxruntime
    images = list(np.asarray(PreparedDataset(str(trained / "data/prepared")).split("test").images))
    forced = load_model(str(trained / "exports/resnet18"), backend="torch", metrics_dir=str(trained / "metrics"))
    ort_p, pt_p = served.probabilities(images), forced.probabilities(images)
    assert forced.backend.name == "torch" and len(images) >= 20
    assert np.abs(ort_p - pt_p).max() <= 1e-5 and (ort_p.argmax(1) == pt_p.argmax(1)).all()
    with pytest.raises(StageError, match="serve.backend is onnx, but .*bare checkpoint has no model.onnx"):
        load_model(str(trained / "models/resnet18/best.pt"), backend="onnx")
    with pytest.raises(StageError, match="serve.backend must be one of auto, onnx, torch"):
        load_model(str(trained / "exports/resnet18"), backend="tensorrt")


def test_onnx_folder_needs_no_checkpoint_and_an_old_float_onnx_goes_to_torch(trained, tmp_path):
    """A folder with only the uint8 model.onnx (+ preprocess/classes) serves on onnxruntime; one whose
    model.onnx takes float NCHW (exported before #20) is served through torch under auto, refused under onnx."""
    import torch

    from cvpipe.torchkit.models import load_checkpoint, model_from_checkpoint

    only_onnx = tmp_path / "only-onnx"
    only_onnx.mkdir()
    for name in ("model.onnx", "preprocess.json", "classes.json"):
        shutil.copy(trained / "exports/resnet18" / name, only_onnx / name)
    m = load_model(str(only_onnx), metrics_dir=str(trained / "metrics"))
    assert m.backend.name == "onnxruntime" and m.arch == "resnet18" and m.card["model_cost"]["onnx_mb"] > 0
    assert m.card["trained_epochs"] == 2 and m.card["params_summary"]["train"]["arch"] == "resnet18"

    old = tmp_path / "old"
    shutil.copytree(trained / "exports/resnet18", old)
    ckpt = load_checkpoint(str(old / "model.pt"))
    torch.onnx.export(model_from_checkpoint(ckpt).eval(), (torch.zeros(1, 3, 32, 32),), str(old / "model.onnx"),
                      input_names=["input"], output_names=["logits"], dynamo=False)
    m = load_model(str(old), metrics_dir=str(trained / "metrics"))
    assert m.backend.name == "torch" and any("served through torch: model.onnx takes tensor(float)" in n for n in m.notes)
    with pytest.raises(StageError, match="serve.backend is onnx, but .*re-run cvpipe evaluate"):
        load_model(str(old), backend="onnx")
    (old / "model.pt").unlink()
    with pytest.raises(StageError, match="has no model.pt for the torch backend"):
        load_model(str(old))


# ---------------------------------------------------------------------- micro-batching


def test_batcher_routes_each_result_to_its_request_and_batches_arrivals_together():
    import threading

    from cvpipe.serve.batching import MicroBatcher

    calls = []

    def run(batch):  # row i -> the first pixel of item i, so every answer says whose it is
        calls.append(len(batch))
        return batch[:, 0, 0, :].astype(np.float32)

    b = MicroBatcher(run, window_ms=200, max_batch=8)
    out = {}

    def ask(i):
        out[i] = b.submit(np.full((4, 4, 3), i, np.uint8), timeout=10)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    b.close()
    assert {i: v.tolist() for i, v in out.items()} == {i: [i, i, i] for i in range(8)}
    assert sum(calls) == 8 and len(calls) < 8 and max(calls) <= 8  # arrivals within the window shared a batch


def test_batcher_isolates_a_failing_item_and_bounds_the_wait():
    import threading
    import time as _time

    from cvpipe.serve.batching import MicroBatcher

    def run(batch):
        if (batch[:, 0, 0, 0] == 13).any():
            raise ValueError("bad item")
        return batch[:, 0, 0, :].astype(np.float32)

    b = MicroBatcher(run, window_ms=100, max_batch=4)
    results = {}

    def ask(i):
        try:
            results[i] = b.submit(np.full((2, 2, 3), i, np.uint8), timeout=10)[0]
        except ValueError as exc:
            results[i] = str(exc)

    threads = [threading.Thread(target=ask, args=(i,)) for i in (11, 12, 13, 14)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {11: 11.0, 12: 12.0, 13: "bad item", 14: 14.0}
    b.close()

    gate = threading.Event()
    slow = MicroBatcher(lambda batch: (gate.wait(5), batch[:, 0, 0, :].astype(np.float32))[1], window_ms=1, max_batch=2)
    t0 = _time.monotonic()
    with pytest.raises(TimeoutError):
        slow.submit(np.zeros((2, 2, 3), np.uint8), timeout=0.3)
    assert _time.monotonic() - t0 < 2  # bounded: the caller is back well before the model
    gate.set()
    assert slow.submit(np.ones((2, 2, 3), np.uint8), timeout=10).tolist() == [1.0, 1.0, 1.0]  # still serving
    slow.close()


def test_micro_batched_app_gives_the_unbatched_answers(served, trained):
    import concurrent.futures

    paths = _manifest(trained)
    datas = [(trained / "data/raw" / paths[r["id"]]).read_bytes() for r in _test_rows(trained)[:8]]
    expected = [served.predict_bytes(d, k=3, max_pixels=10**8).top_k for d in datas]
    app = create_app(served, ServeParams(batch_window_ms=50, max_batch_size=8, inference_threads=4))
    with BackgroundServer(app) as url:
        def post(d):
            return httpx.post(f"{url}/predict", files={"file": ("x.png", d, "image/png")}, params={"top_k": 3}, timeout=30)

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(post, datas))
    for r, exp in zip(answers, expected):
        assert r.status_code == 200, r.text
        got = r.json()["top_k"]
        assert [t["label"] for t in got] == [t["label"] for t in exp]
        assert [t["probability"] for t in got] == pytest.approx([t["probability"] for t in exp], abs=1e-5)
    assert app.state.batcher.items >= 8 and app.state.batcher.batches < app.state.batcher.items
    app.state.batcher.close()


# ---------------------------------------------------------------------- thread settings


def test_onnx_sessions_with_a_thread_pool_do_not_spin(trained):
    """More than one intra-op thread: the session is built with allow_spinning 0 (ORT's workers would
    busy-wait between runs, doubling the CPU per request on a shared box); one thread has no pool to spin."""
    from cvpipe.serve.onnx_backend import OnnxBackend, session_options

    key = "session.intra_op.allow_spinning"
    assert session_options(2).get_session_config_entry(key) == "0"
    assert session_options(2).intra_op_num_threads == 2 and session_options(2).inter_op_num_threads == 1
    with pytest.raises(RuntimeError, match="does not have configuration"):  # ORT's default (spinning) left alone
        session_options(1).get_session_config_entry(key)
    backend = OnnxBackend(trained / "exports/resnet18/model.onnx", 2)
    built = backend.session.get_session_options()  # what the live session was given
    assert built.get_session_config_entry(key) == "0" and built.intra_op_num_threads == 2
    assert backend.describe()["intra_op_allow_spinning"] == "0"


def test_unset_thread_counts_share_the_cores_between_concurrent_runs(trained, monkeypatch):
    """serve.onnx_threads / serve.torch_threads 0: cores // concurrent runs for both backends (torch's own
    default, one thread per core for each run, oversubscribes the CPU when requests run at once)."""
    import torch

    from cvpipe.serve import model as model_mod

    monkeypatch.setattr(model_mod.os, "sched_getaffinity", lambda pid: set(range(4)), raising=False)
    assert [model_mod.auto_threads(n) for n in (1, 2, 3, 4, 8)] == [4, 2, 1, 1, 1]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)  # neither 2 nor 1: the load below must set it
        pt = load_model(str(trained / "models/resnet18/best.pt"), concurrent_runs=2, metrics_dir=str(trained / "metrics"))
        assert pt.backend.name == "torch" and torch.get_num_threads() == 2 and pt.info()["backend"]["torch_threads"] == 2
        load_model(str(trained / "models/resnet18/best.pt"), torch_threads=1, concurrent_runs=2,
                   metrics_dir=str(trained / "metrics"))
        assert torch.get_num_threads() == 1  # an explicit serve.torch_threads wins
        onnx = load_model(str(trained / "exports/resnet18"), concurrent_runs=4, metrics_dir=str(trained / "metrics"))
        assert onnx.backend.threads == 1 and onnx.info()["backend"]["intra_op_threads"] == 1
    finally:
        torch.set_num_threads(before)
