"""The architecture, checked against the code (issue "One house with visible walls").

* **Import contracts** (pyproject.toml ``[tool.importlinter]``): ``lint-imports`` passes on the
  tree, and each contract fails when a forbidden import is planted in a temporary copy of the
  package.
* **dvc.yaml deps** cover each stage's import closure, computed statically with ``ast`` from the
  stage's entry module: every ``import``/``from ... import`` anywhere in a module (function-level
  ones too), ``from cvpipe.x import y`` counting ``cvpipe.x.y`` when that is a module, and every
  package's ``__init__.py`` on the way counting as imported. ``cvpipe/cli.py`` is not in any
  closure: it only parses flags into params and calls the stage's entry module, so editing it
  cannot change a stage's outputs. A stage also depends on its image (its Dockerfile and the pins
  in ``docker/requirements/<image>.txt``), never on the whole Pipfile.lock.
* **docker/requirements/<image>.txt** equal what pipenv exports from Pipfile.lock for the
  categories of that image's ``lock-requirements`` line (``make requirements`` rewrites them).
* **Third-party imports** of each stage are declared in its Pipfile category (or ``[packages]``)
  and in the pyproject extra of the same name (or ``dependencies``); the extras and the Pipfile
  categories list the same distributions. One explicit exception: ``IMAGE_EXCLUDED`` (the app
  image does not run ``cvpipe.serve.torch_backend``; import-linter keeps the rest of serve off torch).
* **The README's module map** is what ``scripts/module-map`` renders from the package.

Each check is a plain function returning a list of problems, and each test that uses one also
shows it reporting a planted fault in a temporary copy (never in the tree).
"""
from __future__ import annotations

import ast
import importlib.machinery
import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tomllib
from functools import lru_cache
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"
PIPENV = ROOT / ".tools" / "bin" / "pipenv"
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"

# --------------------------------------------------------------------------- import-linter

# the contracts by id, as pyproject.toml names them (names short enough never to wrap in the report)
CONTRACTS = {
    "layers": "Layers: cli > stages (independent) > torchkit > data > core",
    "torch-free": "Torch-free: ingest, preprocess, data and core",
    "serve-torch-free": "Torch-free: serve, except serve.torch_backend",
}


def run_lint_imports(src: Path, config_dir: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` from this venv on the package under ``src``, with config_dir's pyproject."""
    assert LINT_IMPORTS.is_file(), f"{LINT_IMPORTS} is missing: `make install` installs the dev category"
    env = {**os.environ, "PYTHONPATH": str(src), "COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"}
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=config_dir, env=env,
                          capture_output=True, text=True, timeout=300)


def contract_results(output: str) -> dict[str, str]:
    """{contract id: "KEPT" | "BROKEN"} read from a lint-imports report."""
    results = {}
    for cid, name in CONTRACTS.items():
        # a contract with ignore_imports adds "(N ignored imports)"
        found = re.findall(rf"^{re.escape(name)} (KEPT|BROKEN)(?: \(\d+ ignored imports?\))?\s*$", output, flags=re.M)
        assert len(found) == 1, f"contract {cid!r} ({name}) not reported once:\n{output}"
        results[cid] = found[0]
    return results


def copy_tree(tmp_path: Path) -> tuple[Path, Path]:
    """A copy of src/ and pyproject.toml under tmp_path: (src copy, folder holding the pyproject)."""
    src = tmp_path / "src"
    shutil.copytree(SRC / "cvpipe", src / "cvpipe", ignore=shutil.ignore_patterns("__pycache__", "static"))
    shutil.copy2(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return src, tmp_path


def plant(src: Path, module: str, code: str) -> None:
    """Append code to src/cvpipe/<module> (created, as a new module, when missing)."""
    path = src / "cvpipe" / module
    path.parent.mkdir(parents=True, exist_ok=True)
    old = path.read_text() if path.exists() else '"""A planted module."""\n'
    path.write_text(old + "\n\n" + code + "\n")


def test_contracts_in_pyproject_are_the_ones_tested():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    assert config["root_package"] == "cvpipe"
    assert {c["id"]: c["name"] for c in config["contracts"]} == CONTRACTS


def test_lint_imports_passes():
    result = run_lint_imports(SRC, ROOT)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert set(contract_results(output).values()) == {"KEPT"}


# (module to plant in, code planted, contracts it must break, what it shows)
PLANTS = [
    ("preprocess/splits.py", "from cvpipe.ingest import stage", {"layers"},
     "a stage imports another stage"),
    ("preprocess/splits.py", "from cvpipe.train import stage", {"layers", "torch-free"},
     "preprocess imports the train stage (and so torch)"),
    ("evaluate/metrics.py", "def _f():\n    from cvpipe.compare.stage import run", {"layers"},
     "a stage imports another, inside a function"),
    ("torchkit/runtime.py", "from cvpipe.evaluate import metrics", {"layers"},
     "the shared torch layer imports a stage"),
    ("data/manifest.py", "from cvpipe.ingest import stage", {"layers"},
     "the data layer imports a stage"),
    ("data/prepared.py", "import cvpipe.torchkit.models", {"layers", "torch-free"},
     "the data layer imports the torch layer (and so torch)"),
    ("core/errors.py", "from cvpipe.data import images", {"layers"},
     "the core imports the data layer"),
    ("core/storage.py", "from cvpipe import cli", {"layers", "torch-free", "serve-torch-free"},
     "the core imports the composition root (and through it torch)"),
    ("extra/__init__.py", "import cvpipe.core.errors", {"layers"},
     "a new subpackage in no layer (the contract is exhaustive)"),
    ("data/augment.py", "import torch", {"torch-free"},
     "the data layer imports torch"),
    ("ingest/stage.py", "def _f():\n    import timm", {"torch-free"},
     "ingest imports timm, inside a function"),
    ("core/tracking.py", "import torchvision.transforms", {"torch-free"},
     "the core imports torchvision"),
    ("preprocess/datacard.py", "from cvpipe.torchkit import runtime", {"torch-free"},
     "preprocess imports torch indirectly, through the torch layer"),
    ("serve/model.py", "def _f():\n    from cvpipe.torchkit import loaders", {"serve-torch-free"},
     "serve's onnxruntime path imports the torch layer, inside a function"),
    ("serve/app.py", "import torch", {"serve-torch-free"},
     "the app imports torch"),
]


@pytest.mark.parametrize("module,code,broken,what", PLANTS, ids=[p[3] for p in PLANTS])
def test_each_contract_fails_on_a_planted_import(tmp_path, module, code, broken, what):
    src, config_dir = copy_tree(tmp_path)
    plant(src, module, code)
    result = run_lint_imports(src, config_dir)
    output = result.stdout + result.stderr
    assert result.returncode != 0, f"{what}: lint-imports passed:\n{output}"
    assert contract_results(output) == {cid: "BROKEN" if cid in broken else "KEPT" for cid in CONTRACTS}
    planted_in = "cvpipe." + module.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
    assert planted_in in output, output


# --------------------------------------------------------------------------- import closures


def module_files(src: Path) -> dict[str, Path]:
    """{dotted module name: file} of every module of the cvpipe package under src."""
    out = {}
    for path in sorted((src / "cvpipe").rglob("*.py")):
        rel = path.relative_to(src).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        out[".".join(parts)] = path
    return out


@lru_cache(maxsize=None)
def _parse(path: Path, mtime_ns: int) -> ast.Module:
    return ast.parse(path.read_bytes(), filename=str(path))


def imports_of(module: str, path: Path) -> list[tuple[str, str | None, int]]:
    """(imported module, imported name or None, line number) for every import in the file,
    at any depth (function-level, ``try``, ``if TYPE_CHECKING``); relative ones resolved."""
    tree = _parse(path, path.stat().st_mtime_ns)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, None, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found += [(target, alias.name, node.lineno) for alias in node.names]
    return found


def import_closure(src: Path, entries: list[str], exclude: frozenset[str] = frozenset()) -> tuple[set[str], dict[str, set[str]]]:
    """(cvpipe modules, {third-party top-level import: importing modules}) reachable from entries.

    A module counts with every package above it (importing ``cvpipe.a.b`` runs ``cvpipe/__init__``
    and ``cvpipe/a/__init__``). The standard library is left out, and so are the modules in
    *exclude* (never entered: what only they import is not reached through them)."""
    files = module_files(src)
    missing = [e for e in entries if e not in files]
    assert not missing, f"entry modules not found under {src}: {missing}"
    seen: set[str] = set()
    third_party: dict[str, set[str]] = {}
    todo = list(entries)

    def push(name: str) -> None:
        parts = name.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts) + 1))

    while todo:
        name = todo.pop()
        if name in seen or name not in files or name in exclude:
            continue
        seen.add(name)
        push(name)
        for target, attr, _ in imports_of(name, files[name]):
            top = target.split(".")[0]
            if top == "cvpipe":
                if target in files:
                    push(target)
                if attr and f"{target}.{attr}" in files:
                    push(f"{target}.{attr}")
            elif top and top not in sys.stdlib_module_names:
                third_party.setdefault(top, set()).add(name)
    return seen, third_party


# the dvc.yaml stages and the modules `cvpipe <stage>` runs (the CLI calls exactly these)
STAGE_ENTRIES = {
    "ingest": ["cvpipe.ingest.stage"],
    "preprocess": ["cvpipe.preprocess.stage"],
    "train": ["cvpipe.train.stage"],
    "evaluate": ["cvpipe.evaluate.stage"],
    "compare": ["cvpipe.compare.stage"],
    "audit": ["cvpipe.audit.stage"],
}
# the image each dvc stage runs in under CVPIPE_RUNNER=docker (compare has none of its own)
STAGE_IMAGE = {"ingest": "ingest", "preprocess": "preprocess", "train": "train",
               "evaluate": "evaluate", "compare": "evaluate", "audit": "train"}


def _root_package_is_inert(src: Path, closure: set[str], files: dict[str, Path]) -> bool:
    """cvpipe/__init__.py holds only a docstring and ``__version__``, and nothing in the closure
    reads ``__version__``: then editing it (a version bump) cannot change the stage's outputs,
    and it need not be a dep (it is imported by every module, and would rerun every stage)."""
    tree = _parse(files["cvpipe"], files["cvpipe"].stat().st_mtime_ns)
    for i, node in enumerate(tree.body):
        docstring = i == 0 and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
        version = isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["__version__"]
        if not (docstring or version):
            return False
    return not any(target == "cvpipe" and attr == "__version__"
                   for m in closure for target, attr, _ in imports_of(m, files[m]))


def dvc_stage_deps(dvc_yaml: Path) -> dict[str, list[str]]:
    stages = yaml.safe_load(dvc_yaml.read_text())["stages"]
    return {name: list((body.get("do", body)).get("deps", [])) for name, body in stages.items()}


def check_dvc_deps(dvc_yaml: Path, src: Path = SRC) -> list[str]:
    """Problems with the code and image deps of every stage of dvc_yaml (empty when none)."""
    problems = []
    files = module_files(src)
    for stage, deps in dvc_stage_deps(dvc_yaml).items():
        if stage not in STAGE_ENTRIES:
            problems.append(f"{stage}: a stage tests/test_architecture.py does not know (add its entry module)")
            continue
        code_deps = [d.rstrip("/") for d in deps if d.startswith("src/")]
        closure, _ = import_closure(src, STAGE_ENTRIES[stage])
        covered_by = {d: [] for d in code_deps}
        for module in sorted(closure):
            rel = "src/" + files[module].relative_to(src).as_posix()
            hits = [d for d in code_deps if rel == d or rel.startswith(d + "/")]
            for d in hits:
                covered_by[d].append(module)
            if not hits and not (module == "cvpipe" and _root_package_is_inert(src, closure, files)):
                problems.append(f"{stage}: imports {module} ({rel}), which is under none of its deps")
        for d, modules in covered_by.items():
            if not (src.parent / d).exists():
                problems.append(f"{stage}: dep {d} does not exist")
            elif not modules:
                problems.append(f"{stage}: dep {d} holds no module the stage imports (a needless rerun)")
        image = STAGE_IMAGE[stage]
        for needed in (f"{image}/Dockerfile", f"docker/requirements/{image}.txt"):
            if needed not in deps:
                problems.append(f"{stage}: runs in the {image} image but does not depend on {needed}")
        if "Pipfile.lock" in deps:
            problems.append(f"{stage}: depends on the whole Pipfile.lock (use docker/requirements/{image}.txt)")
    return problems


def test_dvc_deps_cover_each_stage_import_closure():
    """Every module a dvc stage's entry module reaches is under one of the stage's deps.

    ``cvpipe/cli.py`` is not in the closure: it only parses flags into params and calls the
    entry module (``scripts/stage <stage>`` -> ``cvpipe <stage>``), and the params are deps of
    their own, so a CLI edit does not rerun the pipeline."""
    assert check_dvc_deps(ROOT / "dvc.yaml") == []


def test_the_cli_runs_the_entry_modules_the_check_starts_from():
    files = module_files(SRC)
    called = {f"{target}.{attr}" if f"{target}.{attr}" in files else target
              for target, attr, _ in imports_of("cvpipe.cli", files["cvpipe.cli"])
              if target.startswith("cvpipe.")}
    assert {e for entries in STAGE_ENTRIES.values() for e in entries} <= called


def test_train_closure_reaches_the_shared_layers():
    """The closure itself: function-level imports and package __init__s count."""
    closure, third_party = import_closure(SRC, ["cvpipe.train.stage"])
    assert {"cvpipe", "cvpipe.train", "cvpipe.torchkit", "cvpipe.data", "cvpipe.core",
            "cvpipe.torchkit.models", "cvpipe.data.prepared", "cvpipe.core.config"} <= closure
    assert "cvpipe.cli" not in closure
    assert not any(m.split(".")[1] in {"ingest", "preprocess", "evaluate", "compare", "serve", "init"}
                   for m in closure if m.count("."))
    assert "torch" in third_party  # imported inside functions only


def _removable_deps() -> list[tuple[str, str]]:
    return [(stage, dep) for stage, deps in dvc_stage_deps(ROOT / "dvc.yaml").items()
            for dep in deps if dep.startswith(("src/", "docker/requirements/")) or dep.endswith("/Dockerfile")]


@pytest.mark.parametrize("stage,dep", _removable_deps(), ids=lambda v: v)
def test_dvc_deps_check_reports_a_removed_line(tmp_path, stage, dep):
    lines = (ROOT / "dvc.yaml").read_text().splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if re.fullmatch(rf"  {stage}:\s*", line))
    at = next(i for i in range(start + 1, len(lines)) if lines[i].strip() == f"- {dep}")
    copy = tmp_path / "dvc.yaml"
    copy.write_text("".join(lines[:at] + lines[at + 1:]))
    problems = check_dvc_deps(copy)
    assert problems, f"removing {dep!r} from {stage} went unnoticed"
    assert all(p.startswith(f"{stage}: ") for p in problems), problems
    if dep.startswith("src/"):
        assert any(f"({dep}/" in p or f"({dep})" in p for p in problems), problems
    else:
        assert any(p.endswith(f"does not depend on {dep}") for p in problems), problems


def test_dvc_deps_check_reports_pipfile_lock_and_a_stale_dep(tmp_path):
    text = (ROOT / "dvc.yaml").read_text()
    copy = tmp_path / "dvc.yaml"
    copy.write_text(text.replace("      - src/cvpipe/ingest\n",
                                 "      - src/cvpipe/ingest\n      - Pipfile.lock\n      - src/cvpipe/serve\n", 1))
    assert check_dvc_deps(copy) == [
        "ingest: dep src/cvpipe/serve holds no module the stage imports (a needless rerun)",
        "ingest: depends on the whole Pipfile.lock (use docker/requirements/ingest.txt)",
    ]


def test_dvc_deps_check_reports_a_new_import(tmp_path):
    """An import added to a stage module reaches the closure (here: train starts using serve's code)."""
    src, _ = copy_tree(tmp_path)
    plant(src, "train/budget.py", "def _f():\n    from cvpipe.serve import model")
    problems = check_dvc_deps(ROOT / "dvc.yaml", src)
    assert "train: imports cvpipe.serve.model (src/cvpipe/serve/model.py), which is under none of its deps" in problems


def test_root_package_needs_no_dep_only_while_it_is_inert(tmp_path):
    src, _ = copy_tree(tmp_path)
    assert check_dvc_deps(ROOT / "dvc.yaml", src) == []
    plant(src, "__init__.py", "SEED = 1")
    problems = check_dvc_deps(ROOT / "dvc.yaml", src)
    assert {p.split(":")[0] for p in problems} == set(STAGE_ENTRIES)
    assert all("imports cvpipe (src/cvpipe/__init__.py)" in p for p in problems), problems


# --------------------------------------------------------------------------- image requirements


def image_categories() -> dict[str, str]:
    """{image: pipenv categories} from each <image>/Dockerfile's `lock-requirements "..."` line."""
    out = {}
    for dockerfile in sorted(ROOT.glob("*/Dockerfile")):
        found = re.findall(r'lock-requirements "([^"]+)"', dockerfile.read_text())
        if found:
            assert len(found) == 1, dockerfile
            out[dockerfile.parent.name] = found[0]
    return out


def pipenv(*args: str) -> str:
    assert PIPENV.is_file(), f"{PIPENV} is missing: `make install` (or `make test`) installs it"
    env = {**os.environ, "PIPENV_PIPFILE": str(ROOT / "Pipfile"), "PIPENV_VERBOSITY": "-1",
           "PIPENV_IGNORE_VIRTUALENVS": "1", "PYPI_URL": "unused"}
    result = subprocess.run([str(PIPENV), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"pipenv {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def exported_requirements(categories: str) -> str:
    """What docker/lock-requirements.sh writes to all.txt for these categories."""
    out = pipenv("requirements", "--hash", "--categories", categories)
    return "".join(line for line in out.splitlines(keepends=True) if not line.startswith("-i "))


def test_every_stage_image_is_exported():
    assert set(image_categories()) == {"ingest", "preprocess", "train", "evaluate", "app"}
    assert set(STAGE_IMAGE.values()) <= set(image_categories())
    committed = {p.stem for p in (ROOT / "docker" / "requirements").glob("*.txt")}
    assert committed == set(image_categories())


@pytest.mark.parametrize("image", sorted(image_categories()))
def test_image_requirements_match_the_lock(image):
    committed = (ROOT / "docker" / "requirements" / f"{image}.txt").read_text()
    assert committed == exported_requirements(image_categories()[image]), (
        f"docker/requirements/{image}.txt is stale: run `make requirements`")


def test_lock_matches_pipfile():
    """The requirements files are only as good as the lock: it must be the Pipfile's (`make lock`)."""
    pipenv("verify")


# --------------------------------------------------------------------------- third-party imports

# import name -> distribution, where they differ (else importlib.metadata, else the name itself)
DISTRIBUTION = {
    "cv2": "opencv-python-headless",
    "PIL": "pillow",
    "yaml": "pyyaml",
    "sklearn": "scikit-learn",
    "skimage": "scikit-image",
    "ruamel": "ruamel.yaml",
    "multipart": "python-multipart",
}
# the code each image runs: all of the stage's packages (`cvpipe train --find-lr` too), and what they import
IMAGE_PACKAGES = {
    "ingest": ["cvpipe.ingest"],
    "preprocess": ["cvpipe.preprocess"],
    "train": ["cvpipe.train", "cvpipe.audit"],  # audit runs in the train image
    "evaluate": ["cvpipe.evaluate", "cvpipe.compare"],  # compare runs in the evaluate image
    "app": ["cvpipe.serve"],
}
# modules of an image's packages that the image never runs, with why: the one reviewed exception to
# "every third-party import is declared for its image" (an entry here is not a loosened check: the
# rest of the package is still checked, and the reason must hold)
IMAGE_EXCLUDED = {
    "app": {
        # the torch backend (a bare .pt, serve.backend: torch) imports torch and timm, which the app
        # category dropped (#20): it runs in a dev install or the evaluate image. serve.model imports
        # it lazily, and import-linter's serve-torch-free contract breaks on any other path to torch.
        "cvpipe.serve.torch_backend": "torch backend: torch comes from a dev install or the evaluate image",
    },
}


def image_closure(src: Path, image: str) -> tuple[set[str], dict[str, set[str]]]:
    """import_closure of the image's packages, without the modules IMAGE_EXCLUDED says it never runs."""
    files = module_files(src)
    excluded = frozenset(IMAGE_EXCLUDED.get(image, {}))
    entries = [m for m in files if any(m == p or m.startswith(p + ".") for p in IMAGE_PACKAGES[image]) and m not in excluded]
    return import_closure(src, entries, excluded)


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@lru_cache(maxsize=None)
def _installed() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()


def distribution(import_name: str) -> str:
    if import_name in DISTRIBUTION:
        return normalize(DISTRIBUTION[import_name])
    dists = sorted(set(_installed().get(import_name, [])))
    return normalize(dists[0] if len(dists) == 1 else import_name)


def _requirement_name(spec: str) -> str:
    return normalize(re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", spec).group(1))


def declared(pipfile: Path, pyproject: Path) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """({Pipfile category: distributions}, {pyproject extra ("" = dependencies): distributions})."""
    pf = tomllib.loads(pipfile.read_text())
    categories = {cat: {normalize(n) for n in body} for cat, body in pf.items()
                  if cat not in ("source", "requires", "pipenv", "scripts")}
    project = tomllib.loads(pyproject.read_text())["project"]
    extras = {"": {_requirement_name(s) for s in project.get("dependencies", [])}}
    extras |= {x: {_requirement_name(s) for s in specs}
               for x, specs in project.get("optional-dependencies", {}).items()}
    return categories, extras


def check_third_party(src: Path = SRC, pipfile: Path = ROOT / "Pipfile",
                      pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    """Third-party imports of each image's code missing from its Pipfile category + [packages],
    or from its pyproject extra + dependencies."""
    categories, extras = declared(pipfile, pyproject)
    problems = []
    for image in IMAGE_PACKAGES:
        third_party = image_closure(src, image)[1]
        in_lock = categories.get("packages", set()) | categories.get(image, set())
        in_extra = extras[""] | extras.get(image, set())
        for name, importers in sorted(third_party.items()):
            dist = distribution(name)
            where = f"{image}: {name} ({dist}, imported by {', '.join(sorted(importers))})"
            if dist not in in_lock:
                problems.append(f"{where} is in neither Pipfile [packages] nor [{image}]")
            if dist not in in_extra:
                problems.append(f"{where} is in neither pyproject dependencies nor extra [{image}]")
    # the CLI's own module-level imports run in every image
    for name, importers in sorted(import_closure_toplevel(src, ["cvpipe.cli", "cvpipe.__main__"]).items()):
        dist = distribution(name)
        if dist not in categories.get("packages", set()) or dist not in extras[""]:
            problems.append(f"cli: {name} ({dist}, imported by {', '.join(sorted(importers))}) "
                            "must be in Pipfile [packages] and pyproject dependencies")
    return problems


def import_closure_toplevel(src: Path, modules: list[str]) -> dict[str, set[str]]:
    """Third-party imports at module level (not inside functions) of the given modules."""
    files = module_files(src)
    out: dict[str, set[str]] = {}
    for module in modules:
        tree = _parse(files[module], files[module].stat().st_mtime_ns)
        for node in tree.body:
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) and not node.level else [])
            for name in names:
                top = name.split(".")[0]
                if top != "cvpipe" and top not in sys.stdlib_module_names:
                    out.setdefault(top, set()).add(module)
    return out


def test_third_party_imports_are_declared_for_their_image():
    assert check_third_party() == []


def image_imports(src: Path, image: str) -> set[str]:
    """The distributions the image's code imports (its packages and all they reach)."""
    return {distribution(name) for name in image_closure(src, image)[1]}


def test_pyproject_extras_agree_with_pipfile_categories():
    """Each extra names the distributions of the Pipfile category of the same name, except the
    category's holds: exact ``==`` pins of distributions cvpipe does not import (they keep a
    re-lock from moving a transitive dependency, and mean nothing to a pip install)."""
    categories, extras = declared(ROOT / "Pipfile", ROOT / "pyproject.toml")
    pipfile = tomllib.loads((ROOT / "Pipfile").read_text())
    assert extras[""] == categories["packages"]
    for image in IMAGE_PACKAGES:
        assert extras[image] <= categories[image], (image, extras[image] - categories[image])
        specs = {normalize(name): spec for name, spec in pipfile[image].items()}
        imported = image_imports(SRC, image)
        for dist in sorted(categories[image] - extras[image]):
            spec = specs[dist] if isinstance(specs[dist], str) else specs[dist].get("version", "")
            assert spec.startswith("==") and dist not in imported, (
                f"[{image}] {dist} = {spec!r} is missing from pyproject's extra [{image}]")


def test_third_party_check_reports_a_planted_import(tmp_path):
    src, _ = copy_tree(tmp_path)
    plant(src, "train/budget.py", "def _f():\n    import selenium.webdriver")  # dev only
    plant(src, "data/resize.py", "def _g():\n    import onnxruntime")  # evaluate/app only
    problems = check_third_party(src)
    assert problems == [
        "preprocess: onnxruntime (onnxruntime, imported by cvpipe.data.resize) is in neither Pipfile [packages] nor [preprocess]",
        "preprocess: onnxruntime (onnxruntime, imported by cvpipe.data.resize) is in neither pyproject dependencies nor extra [preprocess]",
        "train: selenium (selenium, imported by cvpipe.train.budget) is in neither Pipfile [packages] nor [train]",
        "train: selenium (selenium, imported by cvpipe.train.budget) is in neither pyproject dependencies nor extra [train]",
    ]


def test_the_app_exception_is_only_the_torch_backend(tmp_path):
    """IMAGE_EXCLUDED names a real module that does need torch, and the rest of serve stays checked."""
    excluded = IMAGE_EXCLUDED["app"]
    assert set(excluded) == {"cvpipe.serve.torch_backend"} and set(IMAGE_EXCLUDED) == {"app"}
    assert "cvpipe.serve.torch_backend" in module_files(SRC)
    entries = [m for m in module_files(SRC) if m.startswith("cvpipe.serve")]
    assert {"torch", "timm"} <= set(import_closure(SRC, entries)[1])  # without the exception the check would fail
    assert not {"torch", "timm", "torchvision"} & set(image_closure(SRC, "app")[1])
    src, _ = copy_tree(tmp_path)
    plant(src, "serve/model.py", "def _f():\n    import timm")
    assert [p for p in check_third_party(src) if p.startswith("app:")] == [
        "app: timm (timm, imported by cvpipe.serve.model) is in neither Pipfile [packages] nor [app]",
        "app: timm (timm, imported by cvpipe.serve.model) is in neither pyproject dependencies nor extra [app]",
    ]


def test_third_party_check_reports_an_undeclared_distribution(tmp_path):
    pipfile, pyproject = tmp_path / "Pipfile", tmp_path / "pyproject.toml"
    pipfile.write_text(re.sub(r'(?m)^"ruamel\.yaml" = .*\n', "", (ROOT / "Pipfile").read_text()))
    pyproject.write_text((ROOT / "pyproject.toml").read_text().replace('"psutil", ', "", 1))
    problems = check_third_party(SRC, pipfile, pyproject)
    assert problems == [
        "train: psutil (psutil, imported by cvpipe.train.budget) is in neither pyproject dependencies nor extra [train]",
        "train: ruamel (ruamel-yaml, imported by cvpipe.train.lr_finder) is in neither Pipfile [packages] nor [train]",
    ]


# --------------------------------------------------------------------------- README module map


def _module_map_script():
    loader = importlib.machinery.SourceFileLoader("module_map", str(ROOT / "scripts" / "module-map"))
    spec = importlib.util.spec_from_loader("module_map", loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def test_readme_module_map_is_up_to_date():
    script = _module_map_script()
    rendered = script.render(SRC / "cvpipe", ROOT / "pyproject.toml")
    section = script.readme_section((ROOT / "README.md").read_text())
    assert section == rendered, "README.md's module map is out of date: run scripts/module-map"
    for module in module_files(SRC):
        leaf = module.split(".")[-1]
        assert f"`{leaf}.py`" in section or f"`{leaf}/`" in section, module


def test_module_map_changes_with_the_package(tmp_path):
    script = _module_map_script()
    src, config_dir = copy_tree(tmp_path)
    plant(src, "data/planted.py", '"""A planted module. More text."""')
    (src / "cvpipe" / "train" / "budget.py").unlink()
    rendered = script.render(src / "cvpipe", config_dir / "pyproject.toml")
    assert "    * `planted.py`: A planted module.\n" in rendered
    assert "budget.py" not in rendered
    assert rendered != script.readme_section((ROOT / "README.md").read_text())
