"""Label review (#19): the review API over the audit's suspects, the overrides file it writes, and ingest applying it.

The API tests run the real router (:func:`cvpipe.serve.review.review_router`) on real images stored
by a real ``ingest`` of a digits slice; the suspects file is written with the audit's columns. The
ingest tests apply decisions to that same data and read the manifest, the quarantine and the metrics.
"""

from __future__ import annotations

import csv
import json
import threading
from pathlib import Path

import pytest
from conftest import make_digits_slice, write_params
from fastapi import FastAPI
from fastapi.testclient import TestClient

from cvpipe.core.config import load_params
from cvpipe.core.errors import StageError
from cvpipe.data.manifest import EXCLUDED_BY_REVIEW, LABEL_ISSUE_COLUMNS, OVERRIDE_COLUMNS, read_overrides
from cvpipe.ingest import stage as ingest
from cvpipe.serve.review import ReviewStore, review_router



@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    return make_digits_slice(tmp_path_factory, per_class=6)


@pytest.fixture
def proj(digits, tmp_path, monkeypatch) -> Path:
    """An ingested project with a suspects file naming 8 of its images (suggestion: the next digit)."""
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path, {"ingest.source": str(digits), "ingest.workers": 2, "wandb.mode": "disabled"})
    ingest.run(load_params("params.yaml"))
    rows = _manifest(tmp_path)[:8]
    (tmp_path / "reports").mkdir(exist_ok=True)  # ingest wrote reports/ingest.json
    with open(tmp_path / "reports/label_issues.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(LABEL_ISSUE_COLUMNS)
        for rank, r in reversed(list(enumerate(rows, 1))):  # written out of order: the API sorts by rank
            w.writerow([rank, r["id"], r["path"], r["source_uri"], "train", r["label"], str((int(r["label"]) + 1) % 10),
                        f"{0.01 * rank:.3f}", "false"])
    return tmp_path


def _manifest(root: Path) -> list[dict[str, str]]:
    with open(root / "data/raw/manifest.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _client(root: Path) -> tuple[TestClient, ReviewStore]:
    store = ReviewStore.from_params(load_params(root / "params.yaml"))
    app = FastAPI()
    app.include_router(review_router(store))
    return TestClient(app), store


def _overrides(root: Path) -> list[dict[str, str]]:
    with open(root / "labels/overrides.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames == OVERRIDE_COLUMNS
        return list(reader)


def test_suspects_are_listed_in_rank_order_with_their_images(proj):
    client, _ = _client(proj)
    body = client.get("/api/review/suspects").json()
    assert body["total"] == 8 and body["reviewed"] == 0
    assert [int(s["rank"]) for s in body["suspects"]] == list(range(1, 9))
    assert all(s["decision"] is None for s in body["suspects"])
    assert body["classes"] == [str(d) for d in range(10)]
    first = body["suspects"][0]
    img = client.get(f"/api/review/image/{first['id']}")
    assert img.status_code == 200 and img.headers["content-type"] == "image/png"
    assert img.content == (proj / "data/raw" / first["path"]).read_bytes()
    page = client.get("/review")
    assert page.status_code == 200 and "/review/review.js" in page.text
    assert "keydown" in client.get("/review/review.js").text


def test_keep_relabel_exclude_and_undo_write_the_latest_decision_per_id(proj):
    client, _ = _client(proj)
    s = client.get("/api/review/suspects").json()["suspects"]
    a, b, c = s[0]["id"], s[1]["id"], s[2]["id"]
    assert client.post("/api/review/decisions", json={"id": a, "action": "keep", "reviewer": "ann"}).status_code == 200
    r = client.post("/api/review/decisions", json={"id": b, "action": "relabel", "reviewer": "bob"})  # = the suggestion
    assert r.status_code == 200 and r.json()["label"] == s[1]["suggested_label"]
    assert client.post("/api/review/decisions", json={"id": c, "action": "exclude"}).status_code == 200
    # a second decision on the same id replaces the first
    assert client.post("/api/review/decisions", json={"id": a, "action": "relabel", "label": "7"}).json()["label"] == "7"
    rows = {r["id"]: r for r in _overrides(proj)}
    assert set(rows) == {a, b, c}
    assert (rows[a]["action"], rows[a]["label"]) == ("relabel", "7")
    assert (rows[b]["action"], rows[b]["label"], rows[b]["reviewer"]) == ("relabel", s[1]["suggested_label"], "bob")
    assert (rows[c]["action"], rows[c]["label"]) == ("exclude", "")
    assert all(r["time"].endswith("+00:00") for r in rows.values())
    body = client.get("/api/review/suspects").json()
    assert body["reviewed"] == 3 and body["suspects"][2]["decision"]["action"] == "exclude"

    undone = client.delete(f"/api/review/decisions/{a}")
    assert undone.status_code == 200 and undone.json()["undone"]["label"] == "7"
    assert {r["id"] for r in _overrides(proj)} == {b, c}
    assert client.delete(f"/api/review/decisions/{a}").status_code == 404  # nothing left to undo
    assert client.get("/api/review/suspects").json()["reviewed"] == 2


def test_concurrent_decisions_lose_nothing(proj):
    """Two stores (two servers: each its own thread lock, only the file lock between them) and the API's
    thread pool decide on every suspect at once: every decision is in the file, the file always parses."""
    client, store = _client(proj)
    other = ReviewStore.from_params(load_params(proj / "params.yaml"))
    ids = [s["id"] for s in client.get("/api/review/suspects").json()["suspects"]]
    errors: list[BaseException] = []
    stop = threading.Event()

    def via_api(i: str) -> None:
        try:
            for _ in range(3):
                assert client.post("/api/review/decisions", json={"id": i, "action": "keep", "reviewer": "api"}).status_code == 200
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    def via_other(i: str) -> None:
        try:
            from cvpipe.serve.review import Decision

            for _ in range(3):
                other.decide(Decision(id=i, action="exclude", reviewer="other"))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    def reader() -> None:
        while not stop.is_set():
            try:
                read_overrides(str(proj / "labels/overrides.csv"))  # never a torn file
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)
                return

    threads = [threading.Thread(target=via_api, args=(i,)) for i in ids[:4]]
    threads += [threading.Thread(target=via_other, args=(i,)) for i in ids[4:]]
    watcher = threading.Thread(target=reader)
    watcher.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    stop.set()
    watcher.join(10)
    assert not errors, errors[0]
    rows = {r["id"]: r for r in _overrides(proj)}
    assert set(rows) == set(ids)
    assert {rows[i]["action"] for i in ids[:4]} == {"keep"} and {rows[i]["action"] for i in ids[4:]} == {"exclude"}
    assert not [p for p in (proj / "labels").iterdir() if p.name.startswith(".cvpipe-tmp-")]


def test_a_failed_write_leaves_the_previous_file(proj, monkeypatch):
    client, _ = _client(proj)
    ids = [s["id"] for s in client.get("/api/review/suspects").json()["suspects"]]
    client.post("/api/review/decisions", json={"id": ids[0], "action": "keep"})
    before = (proj / "labels/overrides.csv").read_bytes()

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("cvpipe.core.storage.os.replace", disk_full)
    r = client.post("/api/review/decisions", json={"id": ids[1], "action": "exclude"})
    assert r.status_code == 500 and r.json()["error"] == "write_failed" and "No space left" in r.json()["detail"]
    assert (proj / "labels/overrides.csv").read_bytes() == before
    assert not [p for p in (proj / "labels").iterdir() if p.name.startswith(".cvpipe-tmp-")]


def test_bad_requests_get_4xx_json(proj):
    client, _ = _client(proj)
    good = client.get("/api/review/suspects").json()["suspects"][0]["id"]
    cases = [
        ({"id": "0" * 16, "action": "keep"}, 404, "unknown_id"),
        ({"id": good, "action": "relabel", "label": "cat"}, 422, "unknown_label"),
        ({"id": good, "action": "keep", "reviewer": "a\nb"}, 422, "bad_reviewer"),
    ]
    for body, status, error in cases:
        r = client.post("/api/review/decisions", json=body)
        assert (r.status_code, r.json()["error"]) == (status, error), body
    assert client.post("/api/review/decisions", json={"id": good, "action": "delete"}).status_code == 422
    assert client.post("/api/review/decisions", json={"action": "keep"}).status_code == 422
    assert client.get("/api/review/image/..%2F..%2Fparams.yaml").status_code == 404
    assert client.get("/api/review/image/nope").json()["error"] == "unknown_id"
    assert not (proj / "labels/overrides.csv").exists()  # nothing bad was written

    # a suspects file whose path leaves paths.raw: refused, never read
    text = (proj / "reports/label_issues.csv").read_text().splitlines()
    row = text[1].split(",")
    row[2] = "../../params.yaml"
    (proj / "reports/label_issues.csv").write_text("\n".join([text[0], ",".join(row)]) + "\n")
    r = client.get(f"/api/review/image/{row[1]}")
    assert (r.status_code, r.json()["error"]) == (403, "outside_raw")
    (proj / "reports/label_issues.csv").unlink()
    r = client.get("/api/review/suspects")
    assert (r.status_code, r.json()["error"]) == (404, "no_suspects")


def test_ingest_applies_relabel_exclude_keep_and_reports_unknown_ids(proj):
    rows = _manifest(proj)
    a, b, c = rows[0], rows[1], rows[2]
    (proj / "labels").mkdir()
    with open(proj / "labels/overrides.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, OVERRIDE_COLUMNS)
        w.writeheader()
        w.writerow({"id": a["id"], "action": "relabel", "label": "9", "reviewer": "ann", "time": "2026-01-01T00:00:00+00:00"})
        w.writerow({"id": b["id"], "action": "exclude", "label": "", "reviewer": "bob", "time": "2026-01-01T00:00:01+00:00"})
        w.writerow({"id": c["id"], "action": "keep", "label": "", "reviewer": "", "time": ""})
        w.writerow({"id": "ffffffffffffffff", "action": "exclude", "label": "", "reviewer": "", "time": ""})
    report = ingest.run(load_params("params.yaml"))
    assert report.reused == len(rows) and report.decoded == 0  # the journal served every file: decisions still apply
    after = {r["id"]: r for r in _manifest(proj)}
    assert after[a["id"]]["label"] == "9" and a["label"] != "9"
    assert b["id"] not in after and after[c["id"]]["label"] == c["label"]
    assert len(after) == len(rows) - 1
    with open(proj / "data/raw/quarantine.csv", newline="") as fh:
        q = [r for r in csv.DictReader(fh) if r["reason"] == EXCLUDED_BY_REVIEW]
    assert [r["source_uri"] for r in q] == [b["source_uri"]] and "bob" in q[0]["detail"]
    assert json.loads((proj / "metrics/ingest.json").read_text())["labels_relabelled"] == 1  # the DVC headline
    m = json.loads((proj / "reports/ingest.json").read_text())
    assert (m["labels_relabelled"], m["images_excluded"], m["review"]["labels_kept"]) == (1, 1, 1)
    assert m["review"]["unknown_ids"] == ["ffffffffffffffff"]
    assert m["review"]["relabelled"] == [{"id": a["id"], "from": a["label"], "to": "9"}]
    summary = json.loads((proj / "data/raw/label_review.json").read_text())
    assert (summary["labels_corrected"], summary["images_excluded_since_previous"]) == (1, 1)

    # an unchanged rerun changes no file; undoing every decision restores the original manifest
    mtime = (proj / "data/raw/label_review.json").stat().st_mtime_ns
    ingest.run(load_params("params.yaml"))
    assert (proj / "data/raw/label_review.json").stat().st_mtime_ns == mtime
    (proj / "labels/overrides.csv").write_text(",".join(OVERRIDE_COLUMNS) + "\n")
    ingest.run(load_params("params.yaml"))
    assert _manifest(proj) == rows
    assert json.loads((proj / "data/raw/label_review.json").read_text())["labels_corrected"] == 1  # 9 -> original


def test_a_malformed_overrides_file_stops_ingest_naming_the_line(proj):
    (proj / "labels").mkdir()
    (proj / "labels/overrides.csv").write_text("id,action,label,reviewer,time\nabc,relabel,,x,\n")
    manifest_before = (proj / "data/raw/manifest.csv").read_bytes()
    with pytest.raises(StageError, match=r"overrides.csv line 2: a relabel needs the new label"):
        ingest.run(load_params("params.yaml"))
    (proj / "labels/overrides.csv").write_text("id,what\n")
    with pytest.raises(StageError, match="the header lacks action"):
        ingest.run(load_params("params.yaml"))
    assert (proj / "data/raw/manifest.csv").read_bytes() == manifest_before


def test_the_corrected_count_reaches_the_prepared_meta(proj):
    """ingest -> <raw>/label_review.json -> preprocess's meta.json (where evaluate, the card and W&B read it)."""
    from cvpipe.preprocess import stage as preprocess

    rows = _manifest(proj)  # sorted by label, 6 per class: swap the labels of one 0 and one 1, one 2 and one 3
    swaps = [(rows[0], "1"), (rows[6], "0"), (rows[12], "3"), (rows[18], "2")]  # class sizes stay what splits need
    (proj / "labels").mkdir()
    (proj / "labels/overrides.csv").write_text(
        ",".join(OVERRIDE_COLUMNS) + "\n" + "".join(f"{r['id']},relabel,{new},t,\n" for r, new in swaps))
    ingest.run(load_params("params.yaml"))
    preprocess.run(load_params("params.yaml", {"preprocess.workers": 1, "split.near_duplicate_distance": None,
                                               "split.train": 0.4, "split.val": 0.3, "split.test": 0.3}))  # 6 per class
    meta = json.loads((proj / "data/prepared/meta.json").read_text())
    assert meta["label_review"]["labels_corrected"] == 4 and meta["label_review"]["labels_relabelled"] == 4


def test_serve_review_without_an_overrides_path_exits_2_before_loading_a_model(tmp_path):
    from conftest import cvpipe

    write_params(tmp_path, {"ingest.overrides": None, "serve.model": str(tmp_path / "no-model")})
    proc = cvpipe("serve", "--review", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "ingest.overrides is null" in proc.stderr + proc.stdout
