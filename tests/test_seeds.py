"""Seeds in the bake-off: every run lives in ``<arch>/seed<seed>`` (``cvpipe.core.config.run_name``).

Fast checks of the layout's pieces: dvc.yaml's matrix (stage names, per-cell paths and params, resolved by the
installed DVC), the ``--seed`` options, the params validation, compare's ``gather`` and serve's lookup of a
checkpoint's test metrics. The end-to-end ``dvc repro`` of 2 architectures x 2 seeds, and that appending a seed
makes only the new cells out of date, is ``tests/test_bakeoff.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import cvpipe, write_params
from repo_files import copy_pipeline

from cvpipe.core.config import Params, load_params, run_name
from cvpipe.core.errors import StageError

ARCHS = {"resnet18": {}, "mobilenetv3_small_050": {"lr": 0.01}}


def test_run_name_and_cells_follow_the_params_order():
    p = Params.model_validate({"train": {"arch": "resnet18", "seed": 7},
                               "bakeoff": {"archs": ARCHS, "seeds": [43, 42]}})
    assert p.run_name == run_name("resnet18", 7) == "resnet18/seed7"
    assert p.bakeoff.cells() == [("resnet18", 43), ("resnet18", 42), ("mobilenetv3_small_050", 43),
                                 ("mobilenetv3_small_050", 42)]


@pytest.mark.parametrize("bakeoff, message", [
    ({"seeds": []}, "at least one seed"),
    ({"seeds": [42, 42]}, "twice"),
    ({"seeds": [-1]}, "seeds must be in"),
    ({"archs": {"resnet18": {"seed": 3}}}, "seed is not an override; list the seeds in bakeoff.seeds"),
])
def test_bad_seeds_name_the_key(tmp_path, bakeoff, message):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"bakeoff": bakeoff}))
    proc = cvpipe("train", "--quiet", cwd=tmp_path, check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "bakeoff." in proc.stdout + proc.stderr and message in proc.stdout + proc.stderr


def test_train_and_evaluate_write_under_the_run_folder():
    from cvpipe.evaluate.stage import output_paths as evaluate_paths
    from cvpipe.train.stage import output_paths as train_paths

    p = Params.model_validate({"train": {"arch": "resnet18", "seed": 43}})
    assert train_paths(p) == {
        "model_dir": str(Path("models/resnet18/seed43")), "metrics": str(Path("metrics/resnet18/seed43/train.json")),
        "report": str(Path("reports/resnet18/seed43/train.json")), "history": str(Path("plots/resnet18/seed43/history.csv")),
    }
    out = evaluate_paths(p)
    assert out["export_dir"] == str(Path("exports/resnet18/seed43"))
    assert out["metrics"] == str(Path("metrics/resnet18/seed43/evaluate.json"))
    assert all(Path(v).parts[1:3] == ("resnet18", "seed43") for v in out.values())


def test_evaluate_seed_option_picks_that_runs_checkpoint(tmp_path):
    """``cvpipe evaluate --seed N`` reads models/<arch>/seed<N>/ (nothing trained here: the error names the path)."""
    write_params(tmp_path, {"wandb.mode": "disabled"})
    proc = cvpipe("evaluate", "--quiet", "--arch", "resnet18", "--seed", "43", cwd=tmp_path, check=False)
    assert proc.returncode == 1
    assert f"checkpoint not found: {Path('models/resnet18/seed43')}{os.sep}" in proc.stdout + proc.stderr  # evaluate.checkpoint .pt


def _write_bundle(folder: Path, accuracy: float) -> None:
    folder.mkdir(parents=True)
    (folder / "evaluate.json").write_text(json.dumps({
        "accuracy": accuracy, "top_k_accuracy": 1.0, "macro_f1": accuracy, "weighted_f1": accuracy, "roc_auc": 0.9,
        "ece": 0.05, "image_size": 32, "trained_epochs": 2,
        "cost": {"params_m": 1.0, "gflops": 0.1, "size_mb": 4.0, "latency_ms": 2.0, "throughput_img_s": 500.0},
    }))


def test_compare_gather_reads_one_bundle_per_cell(tmp_path):
    from cvpipe.compare.stage import gather

    p = Params.model_validate({"paths": {"exports": str(tmp_path / "exports")},
                               "bakeoff": {"archs": ARCHS, "seeds": [42, 43]}})
    for i, (arch, seed) in enumerate(p.bakeoff.cells()):
        _write_bundle(tmp_path / "exports" / arch / f"seed{seed}", 0.5 + i / 10)
    rows = gather(p)
    assert [(r["arch"], r["seed"], r["run"]) for r in rows] == [(a, s, f"{a}/seed{s}") for a, s in p.bakeoff.cells()]
    assert [r["_dir"] for r in rows] == [str(tmp_path / "exports" / a / f"seed{s}") for a, s in p.bakeoff.cells()]
    assert [r["accuracy"] for r in rows] == pytest.approx([0.5, 0.6, 0.7, 0.8])
    assert rows[0]["_eval"]["cost"]["latency_ms"] == 2.0

    p3 = p.model_copy(update={"bakeoff": p.bakeoff.model_copy(update={"seeds": [42, 43, 44]})})
    with pytest.raises(StageError, match=r"no evaluation of resnet18/seed44 .*cvpipe evaluate --arch resnet18 --seed 44"):
        gather(p3)


def test_serve_finds_a_checkpoints_metrics_in_its_run_folder(tmp_path):
    from cvpipe.serve.model import _run_folder, _test_metrics

    ckpt = tmp_path / "models" / "resnet18" / "seed43" / "best.pt"
    # the seed from the checkpoint's params, else from the path, else the arch alone (a model from before seeds)
    assert _run_folder("resnet18", {"params": {"train": {"seed": 43}}}, Path("/elsewhere/model.pt")) == "resnet18/seed43"
    assert _run_folder("resnet18", {}, ckpt) == "resnet18/seed43"
    assert _run_folder("resnet18", {}, tmp_path / "exports" / "resnet18" / "seed44") == "resnet18/seed44"
    assert _run_folder("resnet18", {}, tmp_path / "model.pt") == "resnet18"

    ev = tmp_path / "metrics" / "resnet18" / "seed43" / "evaluate.json"
    ev.parent.mkdir(parents=True)
    ev.write_text(json.dumps({"accuracy": 0.9, "n_test": 30}))
    png = tmp_path / "plots" / "resnet18" / "seed43" / "confusion_matrix.png"
    png.parent.mkdir(parents=True)
    png.write_bytes(b"\x89PNG")
    notes: list[str] = []
    # metrics_dir/plots_dir elsewhere: found beside the checkpoint's project (<project>/models/<arch>/seed<N>/best.pt)
    metrics, cm = _test_metrics({}, None, "checkpoint", ckpt, "resnet18/seed43", str(tmp_path / "nowhere"),
                                str(tmp_path / "nowhere"), notes)
    assert metrics == {"accuracy": 0.9, "n_test": 30} and cm == png and str(ev) in notes[0]


def test_dvc_yaml_matrix_is_one_stage_per_arch_and_seed(tmp_path):
    """dvc.yaml resolved by the installed DVC: a mapping (bakeoff.archs) is a matrix axis over its keys; each cell
    writes <paths.X>/<arch>/seed<seed> and tracks its own overrides, never the seeds list."""
    repo = copy_pipeline(tmp_path / "repo")
    write_params(repo, {"bakeoff.archs": ARCHS, "bakeoff.seeds": [42, 43]})
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    dvc = [sys.executable, "-m", "dvc"]
    subprocess.run(dvc + ["init", "--no-scm", "-q"], cwd=repo, env=env, check=True, capture_output=True)
    from dvc.repo import Repo

    with Repo(str(repo)) as r:
        stages = {s.name: s for s in r.index.stages}
    cells = load_params(repo / "params.yaml").bakeoff.cells()
    assert set(stages) == {"ingest", "preprocess", "audit", "compare"} | {
        f"{s}@{a}-{seed}" for s in ("train", "evaluate") for a, seed in cells}
    for arch, seed in cells:
        run = run_name(arch, seed)
        train, evaluate = stages[f"train@{arch}-{seed}"], stages[f"evaluate@{arch}-{seed}"]
        assert train.cmd == f"scripts/stage train --arch {arch} --seed {seed}"
        assert evaluate.cmd == f"scripts/stage evaluate --arch {arch} --seed {seed}"
        for stage in (train, evaluate):
            tracked = {k for dep in stage.deps if hasattr(dep, "params") for k in dep.params}
            assert f"bakeoff.archs.{arch}" in tracked and not any(k.startswith("bakeoff.seeds") for k in tracked)
            assert not {k for k in tracked if k.startswith("bakeoff.archs.")} - {f"bakeoff.archs.{arch}"}
        outs = {str(o.def_path) for o in train.outs}
        assert {f"models/{run}", f"metrics/{run}/train.json", f"plots/{run}/history.csv"} <= outs
        assert f"exports/{run}" in {str(o.def_path) for o in evaluate.outs}
        assert f"models/{run}" in {str(d.def_path) for d in evaluate.deps}
    compare_params = {k for dep in stages["compare"].deps if hasattr(dep, "params") for k in dep.params}
    assert "bakeoff" in compare_params  # a new seed reruns compare
    # the top-level plots point at the train.arch x train.seed run
    top = yaml.safe_load((repo / "dvc.yaml").read_text())["plots"]
    assert all("${paths.plots}/${train.arch}/seed${train.seed}/" in json.dumps(entry) for entry in top)
