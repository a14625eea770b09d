"""Ingest never loses or leaks what it does not own (issue #15, the ingest side).

Every test drives the real CLI in a subprocess (``python -m cvpipe ingest``), so each one also
runs against an older checkout (``PYTHONPATH=<old>/src``): each was written first and seen failing
there. Faults the machine cannot produce for real are injected into that subprocess by a
``sitecustomize`` (:func:`_faults_env`): ``os.scandir`` refusing a folder (as root a ``chmod 000``
does not), ``os.replace`` into the output failing with ``ENOSPC`` (when no small tmpfs can be
mounted). Nothing here depends on timing: the one test that races two real runs accepts either
interleaving and checks only what must hold for both.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import yaml
from conftest import cvpipe
from PIL import Image
from servers import http_server

CRASHERS = Path(__file__).parent / "data" / "decoder_crashers"
TMP_MARKER = ".cvpipe-tmp-"
LOCK_NAME = ".cvpipe-ingest.lock"


# -- helpers ----------------------------------------------------------------------------------------


def _ingest(cwd: Path, sources, out: Path, *sets: str, env: dict | None = None, timeout: float = 120):
    """``cvpipe ingest --quiet`` of *sources* into *out*, journal and metrics kept under *cwd*."""
    args = ["ingest", "--quiet", "--out", str(out)]
    for src in [sources] if isinstance(sources, (str, Path)) else sources:
        args += ["--source", str(src)]
    for s in (f"ingest.state_dir={cwd / 'state'}", f"paths.metrics={cwd / 'metrics'}", "ingest.workers=2", *sets):
        args += ["--set", s]
    return cvpipe(*args, cwd=cwd, env=env, check=False, timeout=timeout)


def _png(path: Path, color=(10, 20, 30), size=(24, 24)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def _noise_png(path: Path, side: int, seed: int) -> Path:
    """An incompressible PNG of about side*side*3 bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.frombytes("RGB", (side, side), random.Random(seed).randbytes(side * side * 3)).save(path, compress_level=0)
    return path


def _classes(root: Path, per_class: int = 2, classes=("ants", "bees"), shade: int = 0) -> Path:
    """*root*/<class>/<i>.png, every image a different colour (for another *shade*, too)."""
    for c, name in enumerate(classes):
        for i in range(per_class):
            _png(root / name / f"{i}.png", (c * 100 + i * 10, 50 + shade, 200 - c * 100))
    return root


def _read(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _tree(root: Path) -> dict[str, str]:
    """Every entry under *root* (links not followed): relative path -> content hash / kind."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            rel = p.relative_to(root).as_posix()
            if p.is_symlink():
                out[rel] = "link:" + os.readlink(p)
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _temp_files(*roots: Path) -> list[str]:
    return [str(p) for r in roots if r.exists() for p in r.rglob("*") if p.name.startswith(TMP_MARKER)]


_SITECUSTOMIZE = textwrap.dedent('''
    """Test faults for a cvpipe subprocess (tests/test_ingest_safety.py); inert without CVPIPE_TEST_FAULTS."""
    import errno
    import json
    import os

    _faults = json.loads(os.environ.get("CVPIPE_TEST_FAULTS") or "{}")
    if _faults.get("enospc_under"):
        _under, _replace = _faults["enospc_under"], os.replace

        def replace(src, dst, *args, **kwargs):
            if os.fspath(dst).startswith(_under):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(dst))
            return _replace(src, dst, *args, **kwargs)

        os.replace = replace
    if _faults.get("scandir_denied"):
        _denied, _scandir = set(_faults["scandir_denied"]), os.scandir

        def scandir(path="."):
            if os.fspath(path) in _denied:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
            return _scandir(path)

        os.scandir = scandir
''')


def _faults_env(tmp: Path, **faults) -> dict:
    """Environment for a subprocess whose sitecustomize injects *faults* (see :data:`_SITECUSTOMIZE`)."""
    folder = tmp / "faults"
    folder.mkdir(exist_ok=True)
    (folder / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    path = os.pathsep.join(p for p in (str(folder), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, "CVPIPE_TEST_FAULTS": json.dumps(faults)}


# -- 1. ingest owns its output and nothing else --------------------------------------------------------


def _overlap_case(tmp: Path, case: str) -> tuple[Path, Path]:
    photos = _classes(tmp / "x" / "photos")
    if case == "source_inside_output":  # the reported one: --source /x/raw/images --out /x/raw
        raw = tmp / "x" / "raw"
        shutil.move(str(photos), raw / "images")
        return raw / "images", raw
    if case == "output_is_source":
        return photos, photos
    if case == "output_inside_source":
        return photos, photos / "raw"
    if case == "output_is_a_link_to_the_source":
        (tmp / "x" / "link").symlink_to(photos, target_is_directory=True)
        return photos, tmp / "x" / "link"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["source_inside_output", "output_is_source", "output_inside_source",
                                  "output_is_a_link_to_the_source"])
def test_output_overlapping_a_source_is_refused_and_nothing_is_touched(tmp_path, case):
    source, out = _overlap_case(tmp_path, case)
    before = _tree(tmp_path / "x")
    for attempt in range(2):  # `--out` equal to the source used to fail only on the second run
        res = _ingest(tmp_path, source, out)
        assert res.returncode == 2, (case, attempt, res.returncode, res.stdout, res.stderr)
        assert "paths.raw" in res.stderr and "Nothing was written" in res.stderr, res.stderr
        assert "Traceback" not in res.stderr
        assert _tree(tmp_path / "x") == before, f"{case}: the refused run touched the folder"


def test_foreign_files_in_the_output_are_left_alone(tmp_path):
    src = _classes(tmp_path / "src", per_class=3)
    out = tmp_path / "out"
    foreign = {
        "images/notes.txt": b"my notes",
        "images/holiday/beach.jpg": b"not even a jpeg",
        "images/00/readme.txt": b"inside a folder named like a shard",
        "images/ab/" + "ab" + "0" * 62 + ".jpg": b"named like a stored image, never written by ingest",
    }
    for rel, data in foreign.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(data)
    res = _ingest(tmp_path, src, out)
    assert res.returncode == 0, res.stderr
    (src / "ants" / "0.png").unlink()  # its stored copy is ingest's own: pruned on the next run
    res = _ingest(tmp_path, src, out)
    assert res.returncode == 0, res.stderr
    for rel, data in foreign.items():
        assert (out / rel).read_bytes() == data, f"{rel} was removed or changed"
    assert "notes.txt" in res.stdout + res.stderr  # named in a warning
    rows = _read(out / "manifest.csv")
    stored = {p.relative_to(out).as_posix() for p in (out / "images").rglob("*") if p.is_file()}
    assert stored == {r["path"] for r in rows} | set(foreign)  # ingest's pruned image is gone, nothing else
    assert len(rows) == 5


# -- 2. output-side failures stop the stage --------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs at tmp_path/disk when it can be mounted (root), else a plain folder: ``(folder, mounted)``."""
    folder = tmp_path / "disk"
    folder.mkdir()
    mounted = False
    if hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("mount"):
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)],
                             capture_output=True, timeout=30)
        mounted = res.returncode == 0
    try:
        yield folder, mounted
    finally:
        if mounted:
            subprocess.run(["umount", str(folder)], capture_output=True, timeout=30)
            if os.path.ismount(folder):
                subprocess.run(["umount", "-l", str(folder)], capture_output=True, timeout=30)


def test_full_disk_stops_the_stage_naming_the_path_and_keeps_the_previous_manifest(tmp_path, small_disk):
    disk, mounted = small_disk
    src = _classes(tmp_path / "src", per_class=2)
    out = disk / "raw"
    res = _ingest(tmp_path, src, out)
    assert res.returncode == 0, res.stderr
    manifest, quarantine = (out / "manifest.csv").read_bytes(), (out / "quarantine.csv").read_bytes()

    for i in range(6):  # 6 x ~300 KB of incompressible pixels into 1 MiB (or every write refused)
        _noise_png(src / "bees" / f"noise{i}.png", 316, seed=i)
    env = None if mounted else _faults_env(tmp_path, enospc_under=str(out / "images"))
    res = _ingest(tmp_path, src, out, env=env)
    assert res.returncode == 1, (mounted, res.returncode, res.stdout, res.stderr)
    assert "No space left on device" in res.stderr and str(out) in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    assert (out / "manifest.csv").read_bytes() == manifest
    assert (out / "quarantine.csv").read_bytes() == quarantine  # no image quarantined for the disk's failure
    assert _temp_files(out) == []  # nothing half-written


# -- 3. no silent paths ---------------------------------------------------------------------------------


def test_symlinked_class_folder_is_followed_and_a_loop_is_named(tmp_path):
    src = _classes(tmp_path / "src", per_class=2, classes=("ants",))
    elsewhere = _classes(tmp_path / "elsewhere", per_class=2, classes=("bees",), shade=100)
    (src / "bees").symlink_to(elsewhere / "bees", target_is_directory=True)
    (src / "ants" / "again").symlink_to(src / "ants", target_is_directory=True)  # a loop
    res = _ingest(tmp_path, src, tmp_path / "out", timeout=60)
    assert res.returncode == 0, res.stderr
    rows = _read(tmp_path / "out" / "manifest.csv")
    assert sorted((r["label"], r["source_uri"].rsplit("/", 1)[1]) for r in rows) == [
        ("ants", "0.png"), ("ants", "1.png"), ("bees", "0.png"), ("bees", "1.png")]
    q = _read(tmp_path / "out" / "quarantine.csv")
    assert [(r["source_uri"].split("/src/", 1)[1], r["reason"]) for r in q] == [("ants/again/", "symlink_loop")]


def test_unreadable_class_folder_is_quarantined_with_its_reason(tmp_path):
    src = _classes(tmp_path / "src", per_class=2)
    bees = src / "bees"
    env = None
    if os.geteuid() == 0:  # root reads a chmod 000 folder anyway: make os.scandir refuse it
        env = _faults_env(tmp_path, scandir_denied=[os.path.realpath(bees)])
    else:
        bees.chmod(0)
    try:
        res = _ingest(tmp_path, src, tmp_path / "out", env=env)
    finally:
        bees.chmod(0o755)
    assert res.returncode == 0, res.stderr
    assert {r["label"] for r in _read(tmp_path / "out" / "manifest.csv")} == {"ants"}
    q = _read(tmp_path / "out" / "quarantine.csv")
    assert [(r["source_uri"].split("/src/", 1)[1], r["label"], r["reason"]) for r in q] == [
        ("bees/", "bees", "unreadable_folder")], q
    assert "Permission denied" in q[0]["detail"]


def test_fifo_in_a_class_folder_is_quarantined_not_waited_on(tmp_path):
    src = _classes(tmp_path / "src", per_class=2)
    os.mkfifo(src / "ants" / "pipe.jpg")  # opening it for reading would block until a writer comes
    try:
        res = _ingest(tmp_path, src, tmp_path / "out", timeout=90)
    except subprocess.TimeoutExpired:
        pytest.fail("ingest hung on a FIFO")
    assert res.returncode == 0, res.stderr
    q = _read(tmp_path / "out" / "quarantine.csv")
    assert [(Path(r["source_uri"]).name, r["reason"]) for r in q] == [("pipe.jpg", "not_a_regular_file")]
    assert "FIFO" in q[0]["detail"]
    assert len(_read(tmp_path / "out" / "manifest.csv")) == 4


def test_file_above_the_size_cap_is_quarantined_unread(tmp_path):
    src = _classes(tmp_path / "src", per_class=2)
    _noise_png(src / "bees" / "big.png", 700, seed=1)  # ~1.4 MiB
    with open(src / "bees" / "huge.jpg", "wb") as fh:  # 64 GiB, sparse: reading it whole would exhaust memory
        fh.truncate(64 * 1024**3)
    res = _ingest(tmp_path, src, tmp_path / "out", "ingest.max_file_mb=1")
    assert res.returncode == 0, res.stderr
    q = {Path(r["source_uri"]).name: r for r in _read(tmp_path / "out" / "quarantine.csv")}
    assert {n: r["reason"] for n, r in q.items()} == {"big.png": "too_large", "huge.jpg": "too_large"}
    assert "max_file_mb=1" in q["huge.jpg"]["detail"]
    assert json.loads((tmp_path / "reports" / "ingest.json").read_text())["decoded"] == 4


@pytest.mark.parametrize("kind", ["csv", "jsonl"])
def test_manifest_naming_a_uri_twice_under_different_labels_quarantines_every_naming(tmp_path, kind):
    imgs = tmp_path / "imgs"
    for i in range(3):
        _png(imgs / f"r{i}.png", (i * 60, 0, 0))
    rows = [("imgs/r0.png", "red"), ("imgs/r0.png", "blue"), ("imgs/r1.png", "red"), ("imgs/r1.png", "red"),
            ("imgs/r2.png", "blue")]
    if kind == "csv":
        (tmp_path / "rows.csv").write_text("uri,label\n" + "".join(f"{u},{lab}\n" for u, lab in rows))
    else:
        (tmp_path / "rows.jsonl").write_text("".join(json.dumps({"uri": u, "label": lab}) + "\n" for u, lab in rows))
    res = _ingest(tmp_path, tmp_path / f"rows.{kind}", tmp_path / "out")
    assert res.returncode == 0, res.stderr
    manifest = sorted((Path(r["source_uri"]).name, r["label"]) for r in _read(tmp_path / "out" / "manifest.csv"))
    assert manifest == [("r1.png", "red"), ("r2.png", "blue")]  # the same row twice counts once
    q = sorted((Path(r["source_uri"]).name, r["label"], r["reason"]) for r in _read(tmp_path / "out" / "quarantine.csv"))
    assert q == [("r0.png", "blue", "conflicting_labels"), ("r0.png", "red", "conflicting_labels")]


@pytest.mark.parametrize("label", [["x"], {"name": "x"}, True])
def test_jsonl_label_that_is_not_a_string_is_refused_with_its_line(tmp_path, label):
    _png(tmp_path / "imgs" / "a.png")
    _png(tmp_path / "imgs" / "b.png", (200, 0, 0))
    lines = [{"uri": "imgs/a.png", "label": "ok"}, {"uri": "imgs/b.png", "label": label}]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(o) + "\n" for o in lines))
    res = _ingest(tmp_path, tmp_path / "rows.jsonl", tmp_path / "out")
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert "line 2" in res.stderr and "label" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "out").exists()


# -- 4. one ingest at a time per output ----------------------------------------------------------------


def test_second_ingest_into_a_locked_output_exits_2_naming_the_holder(tmp_path):
    from filelock import FileLock

    src = _classes(tmp_path / "src")
    out = tmp_path / "out"
    assert _ingest(tmp_path, src, out).returncode == 0
    before = _tree(out)
    holder = FileLock(str(out / LOCK_NAME), timeout=0)
    holder.acquire()
    try:
        (out / LOCK_NAME).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": "then"}))
        before = _tree(out)
        res = _ingest(tmp_path, src, out)
    finally:
        holder.release()
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    assert f"pid {os.getpid()}" in res.stderr and socket.gethostname() in res.stderr, res.stderr
    assert _tree(out) == before  # the refused run changed nothing
    assert _ingest(tmp_path, src, out).returncode == 0  # released: the next run goes ahead


@pytest.mark.parametrize("then", ["names itself", "lets go", "stays nameless"])
def test_a_lock_held_under_no_name_is_waited_on_briefly(tmp_path, then):
    """The moments when the lock file is empty (just taken, or just truncated to let go) resolve within
    the wait: the second run names the holder, or goes ahead; only a holder nameless throughout is unnamed."""
    import threading

    from filelock import FileLock

    src = _classes(tmp_path / "src")
    out = tmp_path / "out"
    assert _ingest(tmp_path, src, out).returncode == 0
    holder = FileLock(str(out / LOCK_NAME), timeout=0, thread_local=False)  # the timer's thread lets go
    holder.acquire()
    name = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": "then"})
    act = {"names itself": lambda: (out / LOCK_NAME).write_text(name), "lets go": holder.release,
           "stays nameless": lambda: None}[then]
    timer = threading.Timer(0.5, act)
    timer.start()
    try:
        res = _ingest(tmp_path, src, out)
    finally:
        timer.join()
        holder.release()
    if then == "lets go":
        assert res.returncode == 0, res.stderr
        return
    assert res.returncode == 2 and "another ingest is writing" in res.stderr, res.stderr
    expected = f"pid {os.getpid()}" if then == "names itself" else "has not written its name yet"
    assert expected in res.stderr, res.stderr


def test_ingest_leaves_another_outputs_journal_write_in_the_shared_state_folder(tmp_path):
    """Two outputs, one ``ingest.state_dir`` (the default is shared): a run removes only its own journal's
    leftovers, never the temp file another output's run is writing right now."""
    src = _classes(tmp_path / "src")
    other = tmp_path / "state" / f"{TMP_MARKER}0123abcd-state-ffffffffffffffff.jsonl"
    other.parent.mkdir(parents=True)
    other.write_text('{"params_key": "x"}\n')
    assert _ingest(tmp_path, src, tmp_path / "out").returncode == 0
    assert other.exists()


@pytest.mark.slow
def test_two_real_ingests_into_one_output_never_crash(real_data, tmp_path):
    """Two runs started together: whichever interleaving happens, each exits 0 or 2 (naming the other),
    never with a traceback or a FileNotFoundError, and the output is the one a single run makes."""
    src = real_data / "hymenoptera_data"
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "cvpipe", "ingest", "--quiet", "--source", str(src), "--out", str(out),
           "--set", f"ingest.state_dir={tmp_path / 'state'}", "--set", f"paths.metrics={tmp_path / 'metrics'}"]
    procs = [subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True) for _ in range(2)]
    results = []
    for p in procs:
        try:
            results.append((p.wait(timeout=300), *p.communicate()))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            raise
    for rc, _, err in results:
        assert rc in (0, 2), err
        assert "FileNotFoundError" not in err and "Traceback" not in err
        if rc == 2:
            assert "another ingest is writing" in err and "pid" in err
    assert 0 in [r[0] for r in results]
    assert _ingest(tmp_path, src, out).returncode == 0
    assert len(_read(out / "manifest.csv")) == 398 and _temp_files(out, tmp_path / "state") == []


# -- 5. decoder failures of any type are journaled quarantine reasons ------------------------------------


def test_decoder_crash_of_any_exception_type_is_a_journaled_quarantine_reason(tmp_path):
    src = _classes(tmp_path / "src", per_class=2)
    crashers = sorted(p.name for p in CRASHERS.iterdir())
    assert len(crashers) >= 3
    for name in crashers:  # Pillow raises IndexError / TypeError / SyntaxError from n_frames on these
        shutil.copy(CRASHERS / name, src / "bees" / name)
    assert _ingest(tmp_path, src, tmp_path / "out").returncode == 0
    q = {Path(r["source_uri"]).name: r for r in _read(tmp_path / "out" / "quarantine.csv")}
    assert sorted(q) == crashers
    for name, row in q.items():
        assert row["reason"] == "corrupt", row  # not "unreadable": that one is transient, retried every run
        assert row["sha256"] and ":" in row["detail"]
    res = _ingest(tmp_path, src, tmp_path / "out")
    assert res.returncode == 0
    report = json.loads((tmp_path / "reports" / "ingest.json").read_text())
    assert (report["decoded"], report["reused"]) == (0, 4 + len(crashers))  # known from the journal


# -- 6. credentials in source URLs are never stored or printed -------------------------------------------

SECRETS = ["pa55w0rd-alice", "t0ken-value-1", "s1gnature-xyz", "hunter2-bob", "acc3ss-t0ken", "m1ssing-sig"]


def _files_with(secret_roots: list[Path], secrets: list[str]) -> list[str]:
    hits = []
    for root in secret_roots:
        for p in [root, *root.rglob("*")] if root.exists() else []:
            text = p.name + ("\n" + p.read_bytes().decode("utf-8", "replace") if p.is_file() else "")
            hits += [f"{p}: {s}" for s in secrets if s in text]
    return hits


def test_credentials_in_source_urls_are_never_stored_or_printed(tmp_path):
    served = tmp_path / "served"
    with zipfile.ZipFile(_mkdir(served) / "ds.zip", "w") as zf:
        for c, name in enumerate(("ants", "bees")):
            for i in range(2):
                p = _png(tmp_path / "zip-src" / name / f"{i}.png", (c * 90, i * 90, 7))
                zf.write(p, f"ds/{name}/{i}.png")
    _png(served / "img" / "a.png", (1, 2, 250))
    cache = tmp_path / "cache"
    with http_server(served) as base:
        host = base.split("://", 1)[1]
        archive = f"http://alice:{SECRETS[0]}@{host}/ds.zip?token={SECRETS[1]}&X-Amz-Signature={SECRETS[2]}&v=1"
        (tmp_path / "rows.csv").write_text(
            "uri,label\n"
            f"http://bob:{SECRETS[3]}@{host}/img/a.png?access_token={SECRETS[4]},ants\n"
            f"{base}/img/missing.png?sig={SECRETS[5]},bees\n"
        )
        res = _ingest(tmp_path, [archive, tmp_path / "rows.csv"], tmp_path / "out", env={"CVPIPE_CACHE": str(cache)})
        assert res.returncode == 0, res.stderr
        assert len(_read(tmp_path / "out" / "manifest.csv")) == 5
        q = _read(tmp_path / "out" / "quarantine.csv")
        assert [r["reason"] for r in q] == ["unreadable"] and "missing.png" in q[0]["detail"]  # kept, redacted
        bad = f"http://alice:{SECRETS[0]}@{host}/gone.zip?token={SECRETS[1]}"
        failed = _ingest(tmp_path, bad, tmp_path / "out2", env={"CVPIPE_CACHE": str(cache)})
    assert failed.returncode == 1 and "gone.zip" in failed.stderr
    uris = [r["source_uri"] for r in _read(tmp_path / "out" / "manifest.csv")]
    assert any("token=***" in u and "***@" in u for u in uris), uris  # the rest of the URL is kept
    leaks = _files_with([tmp_path / "out", tmp_path / "out2", tmp_path / "state", tmp_path / "metrics", cache], SECRETS)
    leaks += [f"output: {s}" for s in SECRETS if s in res.stdout + res.stderr + failed.stdout + failed.stderr]
    assert leaks == []


def test_init_writes_source_credentials_as_environment_variables_that_ingest_expands(tmp_path):
    """params.yaml is committed: `cvpipe init` of a credentialed URL writes ${CVPIPE_SOURCE_*} references,
    never the values; ingest refuses (exit 2, naming the variable) until they are set, then fetches with
    them -- the server checks the token, so the expanded value is what reached it."""
    served = tmp_path / "served"
    with zipfile.ZipFile(_mkdir(served) / "ds.zip", "w") as zf:
        for c, name in enumerate(("ants", "bees")):
            for i in range(6):
                zf.write(_png(tmp_path / "zip-src" / name / f"{i}.png", (c * 90, i * 40, 7)), f"ds/{name}/{i}.png")
    env = {"CVPIPE_CACHE": str(tmp_path / "cache")}  # init's; ingest's is another, so it must fetch again
    with http_server(served, token=SECRETS[1]) as base:
        host = base.split("://", 1)[1]
        url = f"http://alice:{SECRETS[0]}@{host}/ds.zip?v=1&token={SECRETS[1]}&X-Goog-Signature={SECRETS[2]}"
        assert cvpipe("ingest", "--quiet", "--source", url.replace(SECRETS[1], "wrong"), "--out", str(tmp_path / "x"),
                      cwd=tmp_path, env=env, check=False).returncode == 1  # the server does check the token
        init = cvpipe("init", url, "--params", str(tmp_path / "params.yaml"), "--no-estimate", cwd=tmp_path, env=env)
        text = (tmp_path / "params.yaml").read_text()
        source = yaml.safe_load(text)["ingest"]["source"]
        assert source == (f"http://alice:${{CVPIPE_SOURCE_PASSWORD}}@{host}/ds.zip?v=1&token=${{CVPIPE_SOURCE_TOKEN}}"
                          "&X-Goog-Signature=${CVPIPE_SOURCE_X_GOOG_SIGNATURE}")
        said = " ".join((init.stdout + init.stderr).split())
        assert "CVPIPE_SOURCE_PASSWORD, CVPIPE_SOURCE_TOKEN, CVPIPE_SOURCE_X_GOOG_SIGNATURE" in said
        env = {"CVPIPE_CACHE": str(tmp_path / "cache-ingest")}
        unset = _ingest(tmp_path, [], tmp_path / "out", env=env)
        assert unset.returncode == 2 and "CVPIPE_SOURCE_PASSWORD, which is not set" in " ".join(unset.stderr.split())
        assert not (tmp_path / "out").exists()
        secrets = {"CVPIPE_SOURCE_PASSWORD": SECRETS[0], "CVPIPE_SOURCE_TOKEN": SECRETS[1],
                   "CVPIPE_SOURCE_X_GOOG_SIGNATURE": SECRETS[2]}
        res = _ingest(tmp_path, [], tmp_path / "out", env={**env, **secrets})
    assert res.returncode == 0, res.stderr
    assert len(_read(tmp_path / "out" / "manifest.csv")) == 12
    roots = [tmp_path / "params.yaml", tmp_path / "out", tmp_path / "state", tmp_path / "cache", tmp_path / "cache-ingest"]
    leaks = _files_with(roots, SECRETS)
    leaks += [f"output: {s}" for s in SECRETS if s in init.stdout + init.stderr + unset.stderr + res.stdout + res.stderr]
    assert leaks == []


def test_env_references_round_trip_every_secret_part_of_a_url():
    from cvpipe.core.urls import expand_env_refs, redact_url, with_env_refs

    taken: dict[str, str] = {}
    for url in ("https://u:p%40ss@h/a.zip?Token=x%2Fy&page=2&X-Amz-Credential=a/b#sig=qq9q",
                "https://tok3n@h/b.tar.gz", "https://u2:other@h/c.zip?token=x%2Fy&key=${MY_KEY}"):
        ref, found = with_env_refs(url, taken=taken)
        assert expand_env_refs(ref, {**taken, "MY_KEY": ""}) == url.replace("${MY_KEY}", "")
        assert redact_url(ref) == redact_url(url) and not any(v in ref for v in found.values())
    assert taken == {"CVPIPE_SOURCE_PASSWORD": "p%40ss", "CVPIPE_SOURCE_TOKEN": "x%2Fy", "CVPIPE_SOURCE_X_AMZ_CREDENTIAL": "a/b",
                     "CVPIPE_SOURCE_SIG": "qq9q", "CVPIPE_SOURCE_USERINFO": "tok3n", "CVPIPE_SOURCE_PASSWORD_2": "other"}
    for plain in ("gs://b/p", "/local/${X}", "https://h/p?page=1&v=$HOME"):
        assert with_env_refs(plain) == (plain, {})
    with pytest.raises(KeyError, match="NOPE"):
        expand_env_refs("https://h/x?token=${NOPE}", {})
    assert expand_env_refs("a$b/${A}${A}/$A", {"A": "1"}) == "a$b/11/$A"


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def test_redaction_and_overlap_rules():
    """The two helpers the stage (and the app's model summary) rely on, case by case."""
    from cvpipe.core.urls import redact_text, redact_url
    from cvpipe.data.sources import overlaps, source_location

    assert redact_url("http://u:p@h:8/a/b.zip?Token=x&page=2&X-Goog-Signature=y#k") == \
        "http://***@h:8/a/b.zip?Token=***&page=2&X-Goog-Signature=***#k"
    assert redact_url("https://h/x.csv?X-Amz-Credential=a%2Fb&SIG=c&key=") == "https://h/x.csv?X-Amz-Credential=***&SIG=***&key="
    for plain in ("gs://bucket/a b/c.jpg", "/local/path@x/y?z", "sample://digits", "https://h/p?page=1"):
        assert redact_url(plain) == plain
    assert redact_text("GET url='https://u:pw1@h/x?api_key=k3y' failed for pw1", ["https://u:pw1@h/x?api_key=k3y"]) == \
        "GET url='https://***@h/x?api_key=***' failed for ***"
    assert overlaps(source_location("gs://b/data"), source_location("gs://b/data/raw"))
    assert overlaps(source_location("gs://b/data/"), source_location("gs://b/data"))
    assert not overlaps(source_location("gs://b/data"), source_location("gs://b/data2"))
    assert not overlaps(source_location("gs://b/data"), source_location("gs://c/data"))
    assert not overlaps(source_location("gs://b/data"), source_location("/b/data"))
    assert overlaps(source_location("/a/b"), source_location("/a/b/c")) and not overlaps(source_location("/a/b"), source_location("/a/bc"))
    assert source_location("sample://digits") is None and source_location("https://h/x.zip") is None
