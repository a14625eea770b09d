"""Run documented shell blocks (tests/docs_blocks.py) in a scratch clone of the repository.

* **Scratch clone**: the tracked and untracked-not-ignored files (``git ls-files -co
  --exclude-standard``, so uncommitted work is tested too) are copied into a folder, committed
  to a bare ``origin`` repository and cloned from it on branch ``main`` (``git push`` works);
  params.yaml gets the minimal overrides of tests/docs_blocks.yaml, committed. The project's
  venv stands in for ``make install``'s: ``.venv`` holds links to its ``bin``/``lib`` and its own
  ``.installed`` marker, so a documented ``make run`` finds the install done and never touches
  the real venv; ``.tools`` (pipenv) is linked when it exists.
* **Each block** runs as ``bash -euo pipefail`` in its own copy of a built clone, after the
  blocks it ``needs`` and its ``setup`` (and before its ``after`` check), with W&B offline, gcsfs pointed at the GCS emulator
  (``STORAGE_EMULATOR_HOST``), the placeholders of docs_blocks.yaml substituted and skipped
  lines replaced by a ``:`` that prints the reason.
* **Docker**: ``docker compose`` falls back to v1 ``docker-compose`` where the v2 plugin is missing
  (the README allows both). ``CVPIPE_DOCKER_ARGS`` etc. pass through from the environment.
* **Servers**: ``cvpipe serve ...`` (and ``docker compose ... up``, ``docker run ... -p``) run in
  the background until ``/healthz`` answers 200, then the block's ``while_serving`` snippet runs,
  ``/model`` is fetched, and the server is stopped: the documented command itself runs.
"""

from __future__ import annotations

import os
import shutil
import string
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from docs_blocks import Block

VENV_BIN = Path(sys.executable).parent

# what the suite's own launcher leaves in the environment that a user's shell would not have. A parent
# `make test PYTEST_ARGS=...` (CI's .ci/run) passes its command-line variables to every make below it
# through MAKEFLAGS, where they beat the environment: the README's `make test` in a block would then run
# the whole suite instead of the plan's PYTEST_ARGS (CI timed out on README.md#quickstart that way).
_NOT_A_USERS = ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES", "MAKE_TERMOUT", "MAKE_TERMERR")
_NOT_A_USERS_PREFIXES = ("WANDB_", "PYTEST_", "DOCS_")


def user_environ(environ: dict) -> dict:
    """``environ`` as a user's fresh shell would have it: without the parent make's flags and
    command-line variables, and without the W&B, pytest and docs-test settings of this run."""
    return {k: v for k, v in environ.items()
            if k not in _NOT_A_USERS and not k.startswith(_NOT_A_USERS_PREFIXES)}

# bash functions every block starts with: `cvpipe serve` / `docker compose up` / `docker run -p`
# start a server; it is checked through /healthz and /model, then stopped
PRELUDE = r'''
_docs_wait_serving() {  # pid port log: wait for /healthz, run while_serving, fetch /model, stop
  local pid=$1 port=$2 log=$3 ok=0
  export DOCS_URL="http://127.0.0.1:$port"
  for _ in $(seq 1 "${DOCS_SERVE_WAIT:-600}"); do
    if python -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' "$DOCS_URL/healthz" 2>/dev/null; then ok=1; break; fi
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.5
  done
  if [ "$ok" = 1 ]; then
    if [ -n "${DOCS_WHILE_SERVING:-}" ]; then bash -euo pipefail -c "$DOCS_WHILE_SERVING" || ok=0; fi
    python -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=30)' "$DOCS_URL/model" || ok=0
  fi
  kill -TERM "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  if [ "$ok" != 1 ]; then echo "docs test: the server did not serve on :$port; its log:" >&2; cat "$log" >&2; return 1; fi
  echo "docs test: served on :$port, /healthz and /model answered"
}
cvpipe() {
  if [ "${1:-}" != serve ]; then command cvpipe "$@"; return; fi
  local port=$DOCS_SERVE_PORT prev= a log
  for a in "$@"; do
    case "$prev" in --port) port=$a ;; esac
    case "$a" in --port=*) port=${a#--port=} ;; esac
    prev=$a
  done
  log=$(mktemp)
  command cvpipe "$@" >"$log" 2>&1 &
  _docs_wait_serving $! "$port" "$log"
}
docker() {
  local a port= prev= serving=0 log
  # the README's `docker compose` (v2) "or v1 docker-compose 1.29+": v1 where the plugin is missing
  if [ "${1:-}" = compose ] && ! command "${DOCKER:-docker}" compose version >/dev/null 2>&1; then
    shift; set -- _v1_compose "$@"
  fi
  for a in "$@"; do
    case "$a" in up) serving=1 ;; esac
    case "$prev" in -p|--publish) port=${a%%:*}; serving=1 ;; esac
    prev=$a
  done
  local client=("${DOCKER:-docker}")
  if [ "${1:-}" = _v1_compose ]; then shift; client=(docker-compose); fi
  if [ "$serving" != 1 ]; then command "${client[@]}" "$@"; return; fi
  log=$(mktemp)
  command "${client[@]}" "$@" >"$log" 2>&1 &
  _docs_wait_serving $! "${port:-${CVPIPE_APP_PORT:-8000}}" "$log"
}
'''


@dataclass
class Plan:
    """tests/docs_blocks.yaml: how blocks are run (see the comments in that file)."""

    params: dict = field(default_factory=dict)
    clone_setup: str = ""
    substitute: dict = field(default_factory=dict)
    skip: dict = field(default_factory=dict)
    skip_lines: dict = field(default_factory=dict)
    needs: dict = field(default_factory=dict)
    setup: dict = field(default_factory=dict)
    while_serving: dict = field(default_factory=dict)
    after: dict = field(default_factory=dict)
    env: dict = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> "Plan":
        data = yaml.safe_load(path.read_text()) or {}
        unknown = set(data) - set(cls.__dataclass_fields__)
        assert not unknown, f"{path}: unknown sections {sorted(unknown)}"
        empty = cls()
        return cls(**{k: getattr(empty, k) if v is None else v for k, v in data.items()})

    def unknown_ids(self, ids: set[str]) -> list[str]:
        """Block ids this plan names that no doc has any more (a renamed heading, a removed block)."""
        named = set(self.skip) | set(self.skip_lines) | set(self.needs) | set(self.setup)
        named |= set(self.while_serving) | set(self.after) | set(self.env) | (set(self.substitute) - {"*"})
        named |= {n for deps in self.needs.values() for n in deps}
        return sorted(named - ids)

    def script(self, block: Block, by_id: dict[str, Block]) -> str:
        """The bash script of *block*: prelude, needed blocks, setup, then the block itself."""
        parts = [PRELUDE]
        for dep in self.needs.get(block.id, []):
            parts += [f"# ---- needs {dep}", self.commands(by_id[dep])]
        if block.id in self.setup:
            parts += [f"# ---- setup of {block.id}", self.setup[block.id]]
        parts += [f"# ---- {block.id} ({block.path}:{block.line})", self.commands(block)]
        if block.id in self.after:
            parts += [f"# ---- after {block.id}", self.after[block.id]]
        return "\n".join(parts) + "\n"

    def commands(self, block: Block) -> str:
        """A block's text with placeholders substituted and skipped lines replaced by their reason."""
        text = block.text
        for scope in (block.id, "*"):  # a block's own placeholders first: they may contain a global one
            for key in sorted(self.substitute.get(scope, {}), key=len, reverse=True):
                text = text.replace(key, str(self.substitute[scope][key]))
        lines = text.splitlines()
        for needle, reason in self.skip_lines.get(block.id, {}).items():
            hits = [i for i, line in enumerate(lines) if needle in line]
            assert hits, f"{block.id}: no line contains {needle!r} (docs_blocks.yaml skip_lines is stale)"
            for i in hits:
                lines[i] = f": skipped in the docs test: {shell_quote(reason)}"
        return "\n".join(lines) + "\n"


def shell_quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def copy_tree_files(repo: Path, dest: Path) -> int:
    """Copy the tracked + untracked-not-ignored files of *repo* into *dest*; returns the count."""
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=repo,
                         capture_output=True, check=True).stdout.decode()
    n = 0
    for rel in filter(None, out.split("\0")):
        src = repo / rel
        if not src.is_file():  # deleted in the working tree, not yet committed
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / rel, follow_symlinks=False)
        n += 1
    return n


def link_environment(repo: Path, dest: Path) -> None:
    """``.venv`` and ``.tools`` of the clone stand for the project's (see the module docstring)."""
    venv = VENV_BIN.parent
    (dest / ".venv").mkdir()
    for name in ("bin", "lib", "lib64", "include", "pyvenv.cfg"):
        if (venv / name).exists():
            (dest / ".venv" / name).symlink_to(venv / name)
    (dest / ".venv" / ".installed").touch()
    if (repo / ".tools" / "bin" / "pipenv").exists():  # a folder (a link would escape .gitignore's `.tools/`)
        (dest / ".tools").mkdir()
        (dest / ".tools" / "bin").symlink_to(repo / ".tools" / "bin")


def git(*args: str, cwd: Path, env: dict) -> None:
    subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, timeout=120)


def make_clone(repo: Path, root: Path, plan: Plan, env: dict) -> Path:
    """The scratch clone (see the module docstring): ``root/origin.git`` and ``root/clone``."""
    src = root / "src-tree"
    src.mkdir(parents=True)
    copy_tree_files(repo, src)
    params = yaml.safe_load((src / "params.yaml").read_text())
    for dotted, value in plan.params.items():
        node = params
        *parents, last = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = yaml.safe_load(string.Template(str(value)).safe_substitute(env))
    (src / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git("init", "-q", "-b", "main", cwd=src, env=env)
    git("add", "-A", cwd=src, env=env)
    git("commit", "-q", "-m", "docs test: the working tree", cwd=src, env=env)
    git("clone", "-q", "--bare", str(src), str(root / "origin.git"), cwd=root, env=env)
    shutil.rmtree(src)
    git("clone", "-q", str(root / "origin.git"), str(root / "clone"), cwd=root, env=env)
    clone = root / "clone"
    for rel in ("Pipfile.lock", "pyproject.toml"):  # older than the marker, as after `make install`
        st = (clone / rel).stat()
        os.utime(clone / rel, (st.st_atime - 3600, st.st_mtime - 3600))
    link_environment(repo, clone)
    return clone


def run_script(script: str, cwd: Path, env: dict, timeout: float) -> subprocess.CompletedProcess:
    """``bash -euo pipefail`` on *script* in *cwd*; output captured, stdin empty."""
    return subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout)


def copy_clone(clone: Path, dest: Path, env: dict) -> Path:
    """A private copy of a built clone for one block (symlinks kept as links), with its own copy
    of the ``origin`` repository beside it (``dest.parent / "origin.git"``), so pushes stay private."""
    shutil.copytree(clone, dest, symlinks=True)
    origin = dest.parent / "origin.git"
    shutil.copytree(clone.parent / "origin.git", origin)
    git("remote", "set-url", "origin", str(origin), cwd=dest, env=env)
    return dest
