"""The bake-off through DVC: a 2-architecture foreach, reruns of only what changed, and its W&B runs.

One `dvc repro` in a temporary git+DVC copy of the repository (module fixture) on a
slice of the digits sample, with timm's tiny ``test_resnet`` and ``test_efficientnet``.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import copy_pipeline, write_params
from wandb_offline import find_runs, read_run

from cvpipe.data import sample

ARCHS = {"test_resnet": {"lr": 0.003}, "test_efficientnet": {"lr": 0.002}}
pytestmark = pytest.mark.slow


def _run(cmd, cwd, env):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def _ran(out: str) -> set[str]:
    return {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage '")}


@pytest.fixture(scope="module")
def bakeoff(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bakeoff")
    full = sample.materialize("digits", tmp / "digits-full")
    src = tmp / "digits"
    for cls in sorted(p for p in full.iterdir() if p.is_dir()):
        (src / cls.name).mkdir(parents=True)
        for f in sorted(cls.iterdir())[:20]:
            shutil.copy(f, src / cls.name / f.name)
    repo = copy_pipeline(tmp / "repo")
    write_params(repo, {
        "ingest.source": str(src), "ingest.workers": 1, "preprocess.workers": 1, "train.epochs": 2, "train.batch_size": 32,
        "train.arch": "test_resnet", "bakeoff.archs": ARCHS, "bakeoff.group": "bakeoff-test", "evaluate.latency_runs": 5,
    })
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1",
           "PYTHONPATH": str(repo / "src"), "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", "WANDB_MODE": "offline"}
    env.pop("WANDB_SERVICE", None)
    dvc = [sys.executable, "-m", "dvc"]
    _run(["git", "init", "-q"], repo, env)
    _run(dvc + ["init", "-q"], repo, env)
    _run(dvc + ["config", "core.site_cache_dir", str(tmp / "site-cache")], repo, env)
    first = _run(dvc + ["repro"], repo, env)
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-qm", "bake-off"], repo, env)
    return {"repo": repo, "env": env, "dvc": dvc, "first": first}


def test_dvc_repro_matrix_evaluates_each_arch_and_compares(bakeoff):
    repo = bakeoff["repo"]
    stages = {f"{s}@{a}" for s in ("train", "evaluate") for a in ARCHS} | {"ingest", "preprocess", "audit", "compare"}
    assert _ran(bakeoff["first"]) == stages
    # dvc.yaml runs the stages without --quiet: piped to a log, train prints one line per epoch and
    # compare its leaderboard table
    first = bakeoff["first"]  # stdout then stderr
    for e in (1, 2):
        assert first.count(f"epoch {e}/2: train_loss=") == len(ARCHS), first[-3000:]
    assert not [line for line in first.splitlines() if "━" in line and "epoch" in line]  # no train bars in a log
    assert "leaderboard by accuracy" in first and "throughput_img_s" in first  # the table, not squeezed to 80 columns
    evals = {a: json.loads((repo / f"metrics/{a}/evaluate.json").read_text()) for a in ARCHS}
    with open(repo / "reports/leaderboard.csv", newline="") as fh:
        board = list(csv.DictReader(fh))
    assert {r["arch"] for r in board} == set(ARCHS)
    for r in board:
        assert float(r["accuracy"]) == pytest.approx(evals[r["arch"]]["accuracy"])
        assert float(r["latency_ms"]) == pytest.approx(evals[r["arch"]]["cost"]["latency_ms"])
    winner = max(ARCHS, key=lambda a: (evals[a]["accuracy"], -evals[a]["cost"]["latency_ms"]))
    assert board[0]["arch"] == winner
    best = repo / "models/best"
    assert {p.name for p in best.iterdir()} >= {"model.pt", "model.onnx", "model.ts", "preprocess.json", "classes.json",
                                                  "card.json", "confusion_matrix.png", "leaderboard.md", "leaderboard.csv"}
    card = json.loads((best / "card.json").read_text())
    assert card["arch"] == winner and card["metrics"]["accuracy"] == evals[winner]["accuracy"]
    assert card["data_version"]["prepared_fingerprint"] == json.loads((repo / "data/prepared/meta.json").read_text())["fingerprint"]
    assert json.loads((best / "classes.json").read_text()) == [str(i) for i in range(10)]
    pre = json.loads((best / "preprocess.json").read_text())
    assert pre["image_size"] == 32 and len(pre["mean"]) == 3
    # per-arch overrides reached training: the checkpoint's resolved params carry them
    from cvpipe.torchkit.models import load_checkpoint

    for arch, ov in ARCHS.items():
        assert load_checkpoint(repo / f"models/{arch}/best.pt")["params"]["train"]["lr"] == ov["lr"]

    # nothing changed: nothing reruns; one architecture's override changed: only it (and compare) rerun
    env, dvc = bakeoff["env"], bakeoff["dvc"]
    assert _ran(_run(dvc + ["repro"], repo, env)) == set()
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["bakeoff"]["archs"]["test_efficientnet"]["lr"] = 0.004
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert _ran(_run(dvc + ["repro"], repo, env)) == {"train@test_efficientnet", "evaluate@test_efficientnet", "compare"}
    assert load_checkpoint(repo / "models/test_efficientnet/best.pt")["params"]["train"]["lr"] == 0.004
    metrics = json.loads(_run(dvc + ["metrics", "show", "--json"], repo, env))
    assert "top_k_accuracy" in json.dumps(metrics) and "winner" in json.dumps(metrics)


def test_offline_wandb_runs_of_a_bakeoff(bakeoff):
    repo = bakeoff["repo"]
    runs = [read_run(r) for r in find_runs(repo / "wandb")]
    first = [r for r in runs if r.job_type in ("train", "evaluate")]
    for arch in ARCHS:
        ev = json.loads((repo / f"metrics/{arch}/evaluate.json").read_text())
        tr = json.loads((repo / f"metrics/{arch}/train.json").read_text())
        train_runs = [r for r in first if r.job_type == "train" and r.config.get("arch") == arch]
        eval_runs = [r for r in first if r.job_type == "evaluate" and r.config.get("arch") == arch]
        assert train_runs and eval_runs, arch
        for r in train_runs + eval_runs:
            assert r.group == "bakeoff-test" and arch in r.tags and r.exit_code == 0
        # the latest runs of this arch hold the metrics now on disk
        assert train_runs[-1].summary["best_val_acc"] == pytest.approx(tr["best_val_acc"])
        from cvpipe.torchkit.models import load_checkpoint

        lr = load_checkpoint(repo / f"models/{arch}/best.pt")["params"]["train"]["lr"]
        assert train_runs[-1].config["train"]["lr"] == lr and train_runs[-1].config["arch"] == arch
        s = eval_runs[-1].summary
        assert s["test/accuracy"] == pytest.approx(ev["accuracy"])
        assert s["test/macro_f1"] == pytest.approx(ev["macro_f1"])
        assert s["test/ece"] == pytest.approx(ev["ece"])
        assert s["cost/latency_ms"] == pytest.approx(ev["cost"]["latency_ms"])
        assert s["export/onnx_max_abs_diff"] == pytest.approx(ev["export_parity"]["onnx_max_abs_diff"])
    compare = [r for r in runs if r.job_type == "compare"]
    assert compare and compare[-1].group == "bakeoff-test"
    assert compare[-1].summary["compare/winner"] == json.loads((repo / "reports/compare.json").read_text())["winner"]
