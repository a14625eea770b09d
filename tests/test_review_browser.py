"""The label review page in a real browser: headless Chromium (Selenium + chromedriver) reviews three
suspects with the keyboard only, undoes one decision, and the test reads labels/overrides.csv.

The page is served by the real router (:func:`cvpipe.serve.review.review_router`) under uvicorn
(:class:`cvpipe.serve.app.BackgroundServer`) over images a real ``ingest`` stored.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from conftest import make_digits_slice, write_params
from fastapi import FastAPI

from cvpipe.core.config import load_params
from cvpipe.ingest import stage as ingest
from cvpipe.serve.app import BackgroundServer
from cvpipe.serve.review import ReviewStore, review_router

pytestmark = [pytest.mark.browser, pytest.mark.slow]


@pytest.fixture
def review_project(tmp_path_factory, tmp_path, monkeypatch) -> Path:
    src = make_digits_slice(tmp_path_factory, per_class=3)
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path, {"ingest.source": str(src), "ingest.workers": 2, "wandb.mode": "disabled"})
    ingest.run(load_params("params.yaml"))
    with open(tmp_path / "data/raw/manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))[::3][:5]
    (tmp_path / "reports").mkdir(exist_ok=True)  # ingest wrote reports/ingest.json
    with open(tmp_path / "reports/label_issues.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["rank", "id", "path", "source_uri", "split", "given_label", "suggested_label", "self_confidence",
                    "mixed_label_group"])
        for rank, r in enumerate(rows, 1):
            w.writerow([rank, r["id"], r["path"], r["source_uri"], "train", r["label"], str((int(r["label"]) + 5) % 10),
                        "0.01", "false"])
    return tmp_path


def test_three_suspects_reviewed_with_the_keyboard(review_project, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    store = ReviewStore.from_params(load_params("params.yaml"))
    app = FastAPI()
    app.include_router(review_router(store))
    suspects = store.suspects()["suspects"]
    with BackgroundServer(app) as url:
        browser.get(url + "/review")
        wait = WebDriverWait(browser, 30)
        progress = lambda text: wait.until(lambda d: d.find_element(By.ID, "progress").text == text)  # noqa: E731
        progress("0 / 5 reviewed")
        wait.until(lambda d: d.execute_script("const i = document.getElementById('image');"
                                              "return i.complete && i.naturalWidth > 0"))
        assert browser.find_element(By.ID, "given").text == suspects[0]["given_label"]
        assert browser.find_element(By.ID, "suggested").text == suspects[0]["suggested_label"]
        body = browser.find_element(By.TAG_NAME, "body")
        body.send_keys("k")  # keep #1
        progress("1 / 5 reviewed")
        body.send_keys("a")  # accept the suggestion for #2
        progress("2 / 5 reviewed")
        body.send_keys("x")  # exclude #3
        progress("3 / 5 reviewed")
        body.send_keys(Keys.ARROW_UP, "u")  # back to #3 and undo the exclusion
        progress("2 / 5 reviewed")
        body.send_keys("3")  # relabel #3 to the third class, "2"
        progress("3 / 5 reviewed")
        assert browser.find_element(By.ID, "suspect-id").text == suspects[3]["id"]  # moved on to the next undecided
        rows = browser.find_elements(By.CSS_SELECTOR, "#list tbody tr")
        assert [r.find_elements(By.TAG_NAME, "td")[4].text for r in rows[:4]] == [
            "keep", f"relabel → {suspects[1]['suggested_label']}", "relabel → 2", ""]

    with open(review_project / "labels/overrides.csv", newline="") as fh:
        got = {r["id"]: (r["action"], r["label"]) for r in csv.DictReader(fh)}
    assert got == {suspects[0]["id"]: ("keep", ""), suspects[1]["id"]: ("relabel", suspects[1]["suggested_label"]),
                   suspects[2]["id"]: ("relabel", "2")}
