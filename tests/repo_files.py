"""What `dvc repro` needs from this repository, for the scratch repositories the tests and bench/recipe.py
build: one derivation from dvc.yaml (the test modules and bench/recipe.py import :func:`copy_pipeline` from
here), so a dep added to a stage cannot be missing from either copy."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
# what `dvc repro` runs besides src/ and its deps (pipeline_files adds those, read from dvc.yaml)
PIPELINE_FILES = ["dvc.yaml", ".dvcignore", "scripts/stage", "docker-shell.sh", "Pipfile.lock"]


def pipeline_files(repo: Path = REPO) -> list[str]:
    """:data:`PIPELINE_FILES` and every git-tracked file under a dep that *repo*'s dvc.yaml names (each
    stage's Dockerfile, its image's pins, the reviewers' overrides...), ``${key}`` read from params.yaml.
    src/ is left out: :func:`copy_pipeline` copies it whole."""
    params = yaml.safe_load((repo / "params.yaml").read_text())

    def value(dotted: str) -> str:
        node = params
        for part in dotted.split("."):
            node = node[part]
        return str(node)

    deps = set()
    for stage in yaml.safe_load((repo / "dvc.yaml").read_text())["stages"].values():
        for dep in stage.get("deps", []):
            try:
                deps.add(re.sub(r"\$\{([^}]+)\}", lambda m: value(m.group(1)), dep).rstrip("/"))
            except (KeyError, TypeError):
                continue  # a matrix item (${item.arch}): an output of another stage, never a tracked file
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=repo, capture_output=True, text=True, check=True).stdout.split("\0")
    named = {f for f in tracked if not f.startswith("src/") and any(f == d or f.startswith(d + "/") for d in deps)}
    return sorted(set(PIPELINE_FILES) | named)


def copy_pipeline(dest: Path, repo: Path = REPO) -> Path:
    """Copy what `dvc repro` needs into *dest*: the code (src/, whole) and :func:`pipeline_files`."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copytree(repo / "src", dest / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for rel in pipeline_files(repo):
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(repo / rel, dest / rel)
    return dest
