"""DVC with a gs:// remote, for real: dvc-gs/gcsfs against the GCS emulator on 127.0.0.1.

A throwaway git + DVC repo versions a small image dataset (the digits sample) in two
tagged versions, pushes both to ``gs://<bucket>/dvcstore``, wipes the local cache and
workspace, pulls, and switches between the versions with ``git checkout`` + ``dvc checkout``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import REPO
from servers import gcs_emulator

from cvpipe.data import sample

BUCKET = "cvpipe-dvc-test"
DVC = str(Path(sys.executable).with_name("dvc"))


def _run(*cmd: str, cwd: Path, env: dict) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def _tree(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_repo_keeps_a_local_default_remote():
    out = subprocess.run([DVC, "config", "--project", "--list"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert "core.remote=local" in out.splitlines()
    # ../.dvc-storage in .dvc/config, resolved by dvc relative to .dvc/
    assert f"remote.local.url={REPO / '.dvc-storage'}" in out.splitlines()


def test_gs_remote_push_pull_and_switch_versions(tmp_path):
    digits = sample.materialize("digits", tmp_path / "digits")
    repo = tmp_path / "repo"
    repo.mkdir()
    env = {
        **os.environ,
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # else gcsfs stalls ~60 s per call on the emulator
        "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t",
    }
    env.pop("STORAGE_EMULATOR_HOST", None)  # dvc-gs must get the endpoint from the remote's config

    with gcs_emulator(tmp_path / "gcs") as endpoint:
        os.environ["STORAGE_EMULATOR_HOST"] = endpoint
        try:
            import gcsfs

            fs = gcsfs.GCSFileSystem(token="anon")
            fs.mkdir(BUCKET)
        finally:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)

        run = lambda *c: _run(*c, cwd=repo, env=env)  # noqa: E731
        run("git", "init", "-q", "-b", "main")
        run(DVC, "init", "-q")
        run(DVC, "config", "core.analytics", "false")
        run(DVC, "config", "--local", "core.site_cache_dir", str(tmp_path / "site-cache"))
        # what docs/data-versioning.md tells a team to do, plus the emulator endpoint (local config)
        run(DVC, "remote", "add", "-d", "store", f"gs://{BUCKET}/dvcstore")
        run(DVC, "remote", "modify", "--local", "store", "endpointurl", endpoint)
        run(DVC, "remote", "modify", "--local", "store", "allow_anonymous_login", "true")

        # v1: classes 0-2, 20 images each
        ds = repo / "data" / "images"
        for cls in ("0", "1", "2"):
            (ds / cls).mkdir(parents=True)
            for f in sorted((digits / cls).iterdir())[:20]:
                shutil.copy(f, ds / cls / f.name)
        run(DVC, "add", "-q", "data/images")
        run("git", "add", "-A")
        run("git", "commit", "-qm", "dataset v1")
        run("git", "tag", "-a", "data-v1", "-m", "dataset v1")
        v1 = _tree(ds)
        run(DVC, "push")

        # v2: a fourth class, one image of class 0 replaced by another, one removed
        (ds / "3").mkdir()
        for f in sorted((digits / "3").iterdir())[:20]:
            shutil.copy(f, ds / "3" / f.name)
        first0 = sorted((ds / "0").iterdir())[0]
        first0.write_bytes(sorted((digits / "0").iterdir())[25].read_bytes())
        sorted((ds / "1").iterdir())[0].unlink()
        run(DVC, "add", "-q", "data/images")
        run("git", "add", "-A")
        run("git", "commit", "-qm", "dataset v2")
        run("git", "tag", "-a", "data-v2", "-m", "dataset v2")
        v2 = _tree(ds)
        assert v2 != v1 and len(v2) == len(v1) + 20 - 1
        run(DVC, "push")

        # the objects really are in the bucket
        os.environ["STORAGE_EMULATOR_HOST"] = endpoint
        try:
            fs.invalidate_cache()
            stored = [p for p in fs.find(f"{BUCKET}/dvcstore") if "/files/md5/" in p]
        finally:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        assert len(stored) >= len(set(v1.values()) | set(v2.values()))

        # a new machine: no cache, no data
        shutil.rmtree(repo / ".dvc" / "cache")
        shutil.rmtree(ds)
        out = run(DVC, "status", "-c")
        assert "deleted" in out or "missing" in out or "new" in out, out
        run(DVC, "pull")
        assert _tree(ds) == v2

        # roll back to v1 and forward again; v1's objects come from the remote too
        run("git", "checkout", "-q", "data-v1")
        run(DVC, "pull")  # fetches what v1 needs, then checks it out
        assert _tree(ds) == v1
        run("git", "checkout", "-q", "data-v2")
        run(DVC, "checkout")  # everything is in the cache now: no remote needed
        assert _tree(ds) == v2
        run("git", "checkout", "-q", "data-v1")
        run(DVC, "checkout")
        assert _tree(ds) == v1
        assert "up to date" in run(DVC, "status").lower()
