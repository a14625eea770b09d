"""Docs as tests (issue #16): every shell command the documentation shows runs, and works.

tests/docs_blocks.py collects the blocks (README.md, */README.md, docs/*.md, the usage comments
of docker-compose.yml and docker-shell.sh); tests/docs_runner.py runs each one with
``bash -euo pipefail`` in a copy of a scratch clone of the working tree in which ``dvc repro``
has run once; tests/docs_blocks.yaml holds the few things a block needs that the docs leave to
the reader (placeholders, state from an earlier block, the reviewer's clicks) and the short list
of what cannot run here. A block added to the docs is collected and run with no extra work.

Every executed block is ``slow`` (it needs the built clone), the Docker ones ``container`` too;
the collector and runner rules, synopses and the "a broken command fails" property are fast.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import string
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, make_digits_slice
from docs_blocks import Block, collect, command_lines, markdown_blocks, synopsis_options, usage_comment_blocks
from docs_runner import VENV_BIN, Plan, copy_clone, make_clone, run_script, user_environ
from servers import free_port, gcs_emulator, http_server

PLAN_FILE = Path(__file__).with_name("docs_blocks.yaml")
PLAN = Plan.load(PLAN_FILE)
PATH_DIRS = [str(VENV_BIN), *os.environ.get("PATH", "").split(os.pathsep)]
BLOCKS = collect(REPO, path_dirs=PATH_DIRS)
BY_ID = {b.id: b for b in BLOCKS}
BLOCK_TIMEOUT = 600
GIT_ENV = {"GIT_AUTHOR_NAME": "docs test", "GIT_AUTHOR_EMAIL": "docs@test", "GIT_COMMITTER_NAME": "docs test",
           "GIT_COMMITTER_EMAIL": "docs@test"}


def _params(blocks: list[Block]) -> list:
    out = []
    for b in blocks:
        marks = [pytest.mark.slow] + ([pytest.mark.container] if b.container else [])
        out.append(pytest.param(b, id=b.id, marks=marks))
    return out


# ---- the environment of every block: emulator, HTTP server, images, ports, the built clone ------------
def new_bucket(env: dict) -> str:
    """A fresh bucket on the emulator, so no block sees another's objects."""
    import gcsfs  # after servers, which turns gcsfs's bucket-type probe off (it stalls on the emulator)

    name = f"cvpipe-docs-{next(_BUCKETS)}"
    os.environ["STORAGE_EMULATOR_HOST"] = env["DOCS_GCS_ENDPOINT"]
    try:
        gcsfs.GCSFileSystem(token="anon").mkdir(name)
    finally:
        os.environ.pop("STORAGE_EMULATOR_HOST", None)
    return name


_BUCKETS = itertools.count(1)


@pytest.fixture(scope="module")
def docs_env(tmp_path_factory):
    """Environment variables the blocks run with (see docs_blocks.yaml for the DOCS_* ones)."""
    root = tmp_path_factory.mktemp("docs")
    keep = user_environ(dict(os.environ))
    with gcs_emulator(root / "gcs") as endpoint:
        env = {
            **keep, **GIT_ENV,
            "PATH": os.pathsep.join(PATH_DIRS), "WANDB_MODE": "offline", "WANDB_SILENT": "true",
            "STORAGE_EMULATOR_HOST": endpoint, "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
            "CVPIPE_CACHE": str(root / "cache"), "MPLCONFIGDIR": str(root / "mpl"),
            "DOCS_IMAGES": str(make_digits_slice(tmp_path_factory, per_class=30)),
            "DOCS_GCS_ENDPOINT": endpoint,
            "DOCS_SERVE_PORT": str(free_port()), "DOCS_PORT2": str(free_port()),
            "DOCS_ROOT": str(root),
        }
        yield env


@pytest.fixture(scope="module")
def built_clone(docs_env):
    """The scratch clone after `dvc repro` (what `make run` does), and the HTTP server over its models/."""
    root = Path(docs_env["DOCS_ROOT"])
    env = dict(docs_env)
    clone = make_clone(REPO, root, PLAN, env)   # $DOCS_* in the plan's params come from env
    start = time.monotonic()
    proc = run_script(PLAN.clone_setup + "\ndvc repro\n", clone, env, timeout=BLOCK_TIMEOUT)
    assert proc.returncode == 0, f"dvc repro in the scratch clone failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    print(f"docs test: dvc repro in the scratch clone took {time.monotonic() - start:.0f} s")
    with http_server(clone / "models") as url:
        docs_env["DOCS_HTTP"] = url.removeprefix("http://")
        yield clone


# ---- every documented block ------------------------------------------------------------------------------
RUNNABLE = [b for b in BLOCKS if not b.synopsis]


@pytest.mark.parametrize("block", _params(RUNNABLE))
def test_documented_block_runs(block: Block, built_clone, docs_env, tmp_path):
    if block.id in PLAN.skip:
        pytest.skip(f"{block.id}: {PLAN.skip[block.id]} (tests/docs_blocks.yaml)")
    if block.container and not os.environ.get("CVPIPE_REQUIRE_DOCKER") and subprocess.run(
            ["docker", "info"], capture_output=True).returncode != 0:
        pytest.skip("no Docker engine (CI sets CVPIPE_REQUIRE_DOCKER=1 and has one)")
    env = {**docs_env, **{k: string.Template(str(v)).safe_substitute(docs_env) for k, v in PLAN.env.get(block.id, {}).items()},
           "DOCS_WHILE_SERVING": PLAN.while_serving.get(block.id, ""),
           "DOCS_ORIGIN": str(tmp_path / "origin.git"), "DOCS_BUCKET": new_bucket(docs_env),
           # every block's clone is at .../clone, and a passed block's folder name is reused by the next one:
           # under one compose project ("clone") compose would restart the previous block's containers,
           # bound to files that were deleted with its folder
           "COMPOSE_PROJECT_NAME": f"docs{os.getpid()}-{next(_BUCKETS)}"}
    work = copy_clone(built_clone, tmp_path / "clone", env)
    script = PLAN.script(block, BY_ID)
    start = time.monotonic()
    proc = run_script(script, work, env, timeout=BLOCK_TIMEOUT)
    print(f"docs test: {block.id} took {time.monotonic() - start:.0f} s")
    assert proc.returncode == 0, (
        f"{block.path}:{block.line} ({block.id}) exited {proc.returncode}\n--- script\n{script}\n"
        f"--- stdout\n{proc.stdout[-6000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    )


@pytest.mark.parametrize("block", [pytest.param(b, id=b.id) for b in BLOCKS if b.synopsis])
def test_documented_synopsis_matches_help(block: Block):
    """A usage synopsis (`cvpipe evaluate [--arch NAME] ...`) names only options its --help lists."""
    for words, options in synopsis_options(block.text):
        help_text = subprocess.run([*words, "--help"], capture_output=True, text=True, timeout=120,
                                   env={**os.environ, "PATH": os.pathsep.join(PATH_DIRS), "COLUMNS": "250",
                                        "TERM": "dumb", "NO_COLOR": "1"})
        assert help_text.returncode == 0, help_text.stderr
        missing = [o for o in options if not re.search(rf"(?<![\w-]){re.escape(o)}(?![\w-])", help_text.stdout)]
        assert not missing, f"{block.path}:{block.line}: {' '.join(words)} --help does not list {missing}"


# ---- the collector, the plan and the runner (fast) ------------------------------------------------------
def test_collects_every_doc_and_the_plan_names_only_existing_blocks():
    files = {b.path for b in BLOCKS}
    assert {"README.md", "docs/data-versioning.md", "docker-compose.yml", "docker-shell.sh"} <= files
    assert any(b.path.startswith("app/") for b in BLOCKS)
    assert not PLAN.unknown_ids(set(BY_ID)), f"{PLAN_FILE.name} names blocks no doc has: {PLAN.unknown_ids(set(BY_ID))}"
    assert len(PLAN.skip) + sum(map(len, PLAN.skip_lines.values())) <= 5, "the skip list must stay short"


def test_collector_rules():
    doc = "\n".join([
        "# Top", "```bash", "$ cvpipe ingest \\", "    --source x", "collected 3", "```",
        "## Part two", "```", "cvpipe preprocess   # untagged, starts with a program", "```",
        "```", "ingest ──> preprocess", "```",   # a diagram: text
        "```yaml", "train: {lr: 1}", "```", "```console", "$ dvc repro", "Running stage", "```",
        "```", "cvpipe evaluate [--arch NAME]", "    [--quiet]", "```",
    ])
    blocks = markdown_blocks("x.md", doc, path_dirs=[str(VENV_BIN)])
    assert [b.id for b in blocks] == ["x.md#top", "x.md#part-two", "x.md#part-two-2", "x.md#part-two-3"]
    assert blocks[0].text == "cvpipe ingest \\\n    --source x\n"   # prompt off, continuation kept, output dropped
    assert blocks[2].text == "dvc repro\n"
    assert blocks[3].synopsis and synopsis_options(blocks[3].text) == [(["cvpipe", "evaluate"], ["--arch", "--quiet"])]
    usage = usage_comment_blocks("s.sh", "#!/bin/bash\n# Run it.\n#\n#   ./s.sh a   does a   e.g. ignored\n"
                                 "#   ./s.sh b --x     e.g. ./s.sh b --y\n#   <dir>/file (read-only)\nset -e\n#   ./s.sh c\n")
    assert usage[0].id == "s.sh#usage" and command_lines(usage[0].text) == ["./s.sh a", "./s.sh b --x", "./s.sh b --y"]


def test_runner_fails_on_the_first_failing_command(tmp_path):
    env = {**os.environ, "PATH": os.pathsep.join(PATH_DIRS)}
    assert run_script("echo one | cat\n", tmp_path, env, 30).returncode == 0
    proc = run_script("false\necho after\n", tmp_path, env, 30)
    assert proc.returncode != 0 and "after" not in proc.stdout
    assert run_script("false | cat\n", tmp_path, env, 30).returncode != 0   # pipefail
    assert run_script("echo $UNSET_DOCS_VARIABLE\n", tmp_path, env, 30).returncode != 0   # nounset


def test_a_broken_readme_command_fails(tmp_path):
    """A temporary copy of README.md with one command broken: its block fails, the intact one passes."""
    readme = (REPO / "README.md").read_text()
    original = next(b for b in markdown_blocks("README.md", readme, PATH_DIRS) if "dvc metrics show" in b.text)
    broken_doc = tmp_path / "README.md"
    broken_doc.write_text(readme.replace("dvc metrics show", "dvc metrics shwo", 1))
    broken = next(b for b in markdown_blocks("README.md", broken_doc.read_text(), PATH_DIRS) if b.id == original.id)
    assert broken.text != original.text

    env = {**os.environ, **GIT_ENV, "PATH": os.pathsep.join(PATH_DIRS), "DOCS_SERVE_PORT": "8000"}
    clone = make_clone(REPO, tmp_path / "scratch", Plan(), env)   # committed metrics: no repro needed
    intact = run_script(Plan().script(original, {}), clone, env, 300)
    assert intact.returncode == 0, intact.stdout + intact.stderr
    failed = run_script(Plan().script(broken, {}), clone, env, 300)
    assert failed.returncode != 0
    assert "shwo" in failed.stderr + failed.stdout


def test_a_block_under_ci_make_runs_the_plans_make_test_not_cis(tmp_path):
    """.ci/run is `make test PYTEST_ARGS=...`; a parent make hands its command-line variables to every
    make below it through MAKEFLAGS, where they beat the environment. A block's `make test` (README
    quickstart) must run the plan's PYTEST_ARGS, not CI's whole suite again."""
    outer = tmp_path / "outer.mk"
    dump = tmp_path / "env.json"
    outer.write_text(f"all:\n\t@{sys.executable} -c 'import json, os; json.dump(dict(os.environ), open(\"{dump}\", \"w\"))'\n")
    subprocess.run(["make", "-s", "-f", str(outer), "PYTEST_ARGS=from-ci"], check=True, capture_output=True)
    under_ci = json.loads(dump.read_text())
    assert "PYTEST_ARGS=from-ci" in under_ci.get("MAKEFLAGS", "")

    def inner_make_test(environ: dict) -> str:
        env = {**environ, "PYTEST_ARGS": "from-plan", "PATH": os.pathsep.join(PATH_DIRS)}
        return subprocess.run(["make", "-n", "-C", str(REPO), "test"], env=env, capture_output=True,
                              text=True, check=True).stdout

    assert "pytest from-ci" in inner_make_test(under_ci)   # what the block ran before user_environ
    dry_run = inner_make_test(user_environ(under_ci))
    assert "pytest from-plan" in dry_run and "from-ci" not in dry_run
