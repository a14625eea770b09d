"""Label review: a page and JSON API over the audit's suspects; decisions go to ``ingest.overrides``.

Mounted by ``cvpipe serve --review`` (or ``serve.review: true``) beside the model's routes:

* ``GET    /review``                      the keyboard-driven page (``static/review.html``)
* ``GET    /api/review/suspects``         ``${paths.reports}/label_issues.csv`` joined with the current decisions
* ``GET    /api/review/image/{id}``       the stored image of a suspect (``paths.raw``/its ``path``)
* ``POST   /api/review/decisions``        ``{id, action: keep|relabel|exclude, label?, reviewer?}``
* ``DELETE /api/review/decisions/{id}``   undo: the id has no decision again

The audit (``cvpipe audit``) writes the suspects; ingest applies the decisions on the next ``dvc repro``
(:mod:`cvpipe.ingest.overrides`). The overrides file holds the *latest* decision per id and is rewritten
whole and atomically (:func:`cvpipe.core.storage.write_csv`: temp file, fsync, rename) by a
read-modify-write under two locks: a :class:`threading.Lock` for this server's request threads and an
``fcntl.flock`` on a sidecar ``<overrides>.lock`` for other processes (a second server, a script), so two
reviewers deciding at the same moment lose nothing. Ids and image paths come from the suspects file
only: a request names an id, never a path, and the path is checked to stay inside ``paths.raw``.
"""

from __future__ import annotations

import csv
import fcntl
import mimetypes
import os
import threading
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any, Iterator, Literal, Optional

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, Field

from cvpipe.core import storage
from cvpipe.core.config import Params
from cvpipe.core.errors import StageError, UsageError
from cvpipe.data.manifest import OVERRIDE_COLUMNS, read_manifest, read_overrides

ISSUES_NAME = "label_issues.csv"
# the columns of the audit's label_issues.csv the review needs (the audit writes more)
NEEDED_COLUMNS = ("rank", "id", "path", "given_label", "suggested_label")
_STATIC = {"review.js": "text/javascript", "review.css": "text/css"}


class Decision(BaseModel):
    """A reviewer's decision on one suspect. A relabel without ``label`` takes the audit's suggestion."""

    id: str = Field(..., min_length=1, max_length=64)
    action: Literal["keep", "relabel", "exclude"]
    label: Optional[str] = Field(None, max_length=200)
    reviewer: str = Field("", max_length=100)


class ReviewError(Exception):
    def __init__(self, status: int, error: str, detail: str):
        super().__init__(detail)
        self.status, self.error, self.detail = status, error, detail


class ReviewStore:
    """The suspects (read again whenever the file changes) and the decisions file, with its locks."""

    def __init__(self, issues_path: str | Path, raw_dir: str | Path, overrides_path: str | Path):
        if storage.is_remote(overrides_path) or storage.is_remote(raw_dir):
            raise UsageError("the review writes a local overrides file and reads local images: "
                             "ingest.overrides and paths.raw must be local paths")
        self.issues_path, self.raw_dir, self.path = Path(issues_path), Path(raw_dir), Path(overrides_path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self._lock = threading.Lock()
        self._cache: tuple[Any, list[dict[str, str]], dict[str, dict[str, str]]] | None = None
        self._classes: tuple[Any, list[str]] | None = None

    @classmethod
    def from_params(cls, params: Params) -> "ReviewStore":
        if not params.ingest.overrides:
            raise UsageError("ingest.overrides is null: set it (e.g. labels/overrides.csv) to record review decisions")
        return cls(storage.join(params.paths.reports, ISSUES_NAME), params.paths.raw, params.ingest.overrides)

    def issues(self) -> tuple[list[dict[str, str]], dict[str, dict[str, str]]]:
        """The suspects in rank order and by id; read again when the file's mtime or size changes."""
        try:
            st = os.stat(self.issues_path)
        except OSError:
            raise ReviewError(404, "no_suspects", f"no {self.issues_path}: run the audit first (`dvc repro` or "
                              "`cvpipe audit`)") from None
        key = (st.st_mtime_ns, st.st_size)
        if self._cache is None or self._cache[0] != key:
            try:
                with open(self.issues_path, newline="", encoding="utf-8") as fh:
                    reader = csv.DictReader(fh)
                    missing = [c for c in NEEDED_COLUMNS if c not in (reader.fieldnames or [])]
                    rows = list(reader)
            except (OSError, UnicodeDecodeError, csv.Error) as exc:
                raise ReviewError(500, "bad_suspects", f"{self.issues_path}: {exc}") from None
            if missing:
                raise ReviewError(500, "bad_suspects", f"{self.issues_path} lacks the column(s) {', '.join(missing)}")
            rows.sort(key=lambda r: _rank(r["rank"]))
            self._cache = (key, rows, {r["id"]: r for r in rows})
        return self._cache[1], self._cache[2]

    def classes(self) -> list[str]:
        """The class names a relabel may choose: the manifest's labels and every label the suspects name."""
        manifest = self.raw_dir / "manifest.csv"
        try:
            st = os.stat(manifest)
            key: Any = (st.st_mtime_ns, st.st_size)
        except OSError:
            key = None
        if self._classes is None or self._classes[0] != key:
            labels: set[str] = set()
            if key is not None:
                labels = {r["label"] for r in read_manifest(str(self.raw_dir)) if r.get("label")}
            self._classes = (key, sorted(labels))
        rows, _ = self.issues()
        extra = {r[c] for r in rows for c in ("given_label", "suggested_label") if r.get(c)}
        return sorted(set(self._classes[1]) | extra)

    def decisions(self) -> dict[str, dict[str, str]]:
        try:
            return read_overrides(str(self.path))
        except StageError as exc:
            raise ReviewError(500, "bad_overrides", str(exc)) from None

    def suspects(self) -> dict[str, Any]:
        rows, _ = self.issues()
        decided = self.decisions()
        out = [{**r, "decision": decided.get(r["id"])} for r in rows]
        return {"total": len(out), "reviewed": sum(1 for r in out if r["decision"]), "classes": self.classes(),
                "overrides": str(self.path), "suspects": out}

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """This process's threads, then other processes (flock on the sidecar; released if the holder dies)."""
        with self._lock:
            self.lock_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.lock_path, "a+") as fh:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def _write(self, decided: dict[str, dict[str, str]]) -> None:
        """The whole file, sorted by id (stable diffs), atomically; a failed write leaves the previous file."""
        try:
            storage.write_csv(str(self.path), OVERRIDE_COLUMNS, [decided[k] for k in sorted(decided)])
        except OSError as exc:
            why = exc.strerror or str(exc)
            raise ReviewError(500, "write_failed", f"cannot write {self.path}: {why}; the decision was not recorded") from None

    def decide(self, d: Decision) -> dict[str, str]:
        """Record *d* as the id's latest decision; the row written."""
        _, by_id = self.issues()
        issue = by_id.get(d.id)
        if issue is None:
            raise ReviewError(404, "unknown_id", f"{d.id!r} is not among the suspects in {self.issues_path}")
        label = ""
        if d.action == "relabel":
            label = (d.label or issue["suggested_label"]).strip()
            if label not in self.classes():
                raise ReviewError(422, "unknown_label", f"{label!r} is not a class ({', '.join(self.classes())})")
        reviewer = d.reviewer.strip()
        if any(ord(ch) < 32 for ch in reviewer):
            raise ReviewError(422, "bad_reviewer", "the reviewer name contains a control character")
        row = {"id": d.id, "action": d.action, "label": label, "reviewer": reviewer,
               "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds")}
        with self._locked():
            decided = self.decisions()
            decided[d.id] = row
            self._write(decided)
        return row

    def undo(self, rid: str) -> dict[str, str]:
        """Remove the id's decision (it is undecided again); the row removed."""
        with self._locked():
            decided = self.decisions()
            row = decided.pop(rid, None)
            if row is None:
                raise ReviewError(404, "no_decision", f"{rid!r} has no decision to undo")
            self._write(decided)
        return row

    def image(self, rid: str) -> tuple[bytes, str]:
        """The stored bytes of a suspect's image and their media type; only ids of the suspects file, only
        files under ``paths.raw``."""
        _, by_id = self.issues()
        issue = by_id.get(rid)
        if issue is None:
            raise ReviewError(404, "unknown_id", f"{rid!r} is not among the suspects")
        root = self.raw_dir.resolve()
        path = (root / issue["path"]).resolve()
        if not path.is_relative_to(root):
            raise ReviewError(403, "outside_raw", f"the path of {rid!r} leaves {self.raw_dir}")
        try:
            data = path.read_bytes()
        except OSError:
            raise ReviewError(404, "image_missing", f"{issue['path']} is not in {self.raw_dir}: run ingest again") from None
        return data, mimetypes.guess_type(path.name)[0] or "application/octet-stream"


def _rank(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        return float("inf")


def _error(exc: ReviewError) -> JSONResponse:
    return JSONResponse({"error": exc.error, "detail": exc.detail}, status_code=exc.status)


def review_router(store: ReviewStore) -> APIRouter:
    """The page and API over *store*. Handlers are plain ``def``: FastAPI runs them in its thread pool,
    so file locks and reads never block the event loop."""
    router = APIRouter(tags=["review"])
    static = resources.files("cvpipe.serve") / "static"

    @router.get("/review", response_class=HTMLResponse, include_in_schema=False)
    def page():
        return HTMLResponse((static / "review.html").read_text(encoding="utf-8"))

    @router.get("/review/{name}", include_in_schema=False)
    def asset(name: str):
        if name not in _STATIC:
            return _error(ReviewError(404, "not_found", name))
        return Response((static / name).read_text(encoding="utf-8"), media_type=_STATIC[name])

    @router.get("/api/review/suspects")
    def suspects() -> Any:
        """The audit's suspects in rank order, each with its current decision (null when undecided)."""
        try:
            return store.suspects()
        except ReviewError as exc:
            return _error(exc)

    @router.get("/api/review/image/{rid}", response_class=Response)
    def image(rid: str):
        try:
            data, media = store.image(rid)
        except ReviewError as exc:
            return _error(exc)
        return Response(data, media_type=media, headers={"Cache-Control": "private, max-age=3600"})

    @router.post("/api/review/decisions")
    def decide(d: Decision) -> Any:
        """Keep, relabel (to ``label``, default the suggestion) or exclude one suspect; replaces its earlier decision."""
        try:
            return store.decide(d)
        except ReviewError as exc:
            return _error(exc)

    @router.delete("/api/review/decisions/{rid}")
    def undo(rid: str) -> Any:
        try:
            return {"undone": store.undo(rid)}
        except ReviewError as exc:
            return _error(exc)

    return router
