"""The bake-off through DVC: a 2-architecture x 2-seed matrix, reruns of only what changed, and its W&B runs.

One `dvc repro` in a temporary git+DVC copy of the repository (module fixture) on a
slice of the digits sample, with timm's tiny ``test_resnet`` and ``test_efficientnet``,
each trained and evaluated with seeds 42 and 43 (``bakeoff.seeds``: cells ``<arch>/seed<seed>``).
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
from conftest import write_params
from repo_files import copy_pipeline
from test_metrics_columns import assert_readable_metrics
from wandb_offline import find_runs, read_run

from cvpipe.data import sample

ARCHS = {"test_resnet": {"lr": 0.003}, "test_efficientnet": {"lr": 0.002}}
SEEDS = [42, 43]
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
        "train.arch": "test_resnet", "bakeoff.archs": ARCHS, "bakeoff.seeds": SEEDS, "bakeoff.group": "bakeoff-test", "evaluate.latency_runs": 5,
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
    stages = {f"{s}@{a}-{seed}" for s in ("train", "evaluate") for a in ARCHS for seed in SEEDS}
    assert _ran(bakeoff["first"]) == stages | {"ingest", "preprocess", "audit", "compare"}
    for a in ARCHS:
        for seed in SEEDS:  # every cell's outputs, in its <arch>/seed<seed> folders (cvpipe.core.config.run_name)
            for f in ("models/{}/best.pt", "models/{}/last.pt", "metrics/{}/train.json", "metrics/{}/evaluate.json",
                      "plots/{}/history.csv", "plots/{}/confusion.csv", "exports/{}/model.onnx", "exports/{}/evaluate.json"):
                assert (repo / f.format(f"{a}/seed{seed}")).is_file(), f.format(f"{a}/seed{seed}")
    # dvc.yaml runs the stages without --quiet: piped to a log, train prints one line per epoch and
    # compare its leaderboard table
    first = bakeoff["first"]  # stdout then stderr
    for e in (1, 2):
        assert first.count(f"epoch {e}/2: train_loss=") == len(ARCHS) * len(SEEDS), first[-3000:]
    assert not [line for line in first.splitlines() if "━" in line and "epoch" in line]  # no train bars in a log
    assert "leaderboard by accuracy" in first and "throughput_img_s" in first  # the table, not squeezed to 80 columns
    # the full evaluation of each cell is in its bundle, exports/<arch>/seed<seed>/evaluate.json
    evals = {(a, seed): json.loads((repo / f"exports/{a}/seed{seed}/evaluate.json").read_text()) for a in ARCHS for seed in SEEDS}
    with open(repo / "reports/leaderboard.csv", newline="") as fh:
        board = list(csv.DictReader(fh))
    cells = [r for r in board if r["kind"] == "seed"]  # one row per cell, beside each architecture's aggregate
    assert sorted((r["arch"], int(r["seed"])) for r in cells) == sorted(evals)
    assert {r["arch"] for r in board if r["kind"] == "arch"} == set(ARCHS)
    for r in cells:
        assert float(r["accuracy"]) == pytest.approx(evals[r["arch"], int(r["seed"])]["accuracy"])
        assert float(r["latency_ms"]) == pytest.approx(evals[r["arch"], int(r["seed"])]["cost"]["latency_ms"])
    best = repo / "models/best"
    assert {p.name for p in best.iterdir()} >= {"model.pt", "model.onnx", "model.ts", "preprocess.json", "classes.json",
                                                  "card.json", "confusion_matrix.png", "leaderboard.md", "leaderboard.csv"}
    card = json.loads((best / "card.json").read_text())
    winner = json.loads((repo / "reports/compare.json").read_text())["winner"]
    # the promotion rule: aggregated rows with intervals over the seeds, a tie verdict, the cheapest of the tie group
    archs = {r["arch"]: r for r in board if r["kind"] == "arch"}
    for r in archs.values():
        mine = [float(c["accuracy"]) for c in cells if c["arch"] == r["arch"]]
        assert float(r["accuracy"]) == pytest.approx(sum(mine) / len(mine))
        assert 0 <= float(r["ci_low"]) <= float(r["accuracy"]) <= float(r["ci_high"]) <= 1 and r["ci"] == "t, 2 seeds"
        assert r["tie_group"] in ("A", "B")
    headline = json.loads((repo / "reports/compare.json").read_text())
    assert set(headline) == {"winner", "value", "ci_low", "ci_high", "p_value", "candidates", "tied"}
    sel = card["selection"]
    tied = [a for a, r in archs.items() if r["tie_group"] == "A"]
    assert sorted(sel["tie_group"]) == sorted(tied) and headline["tied"] == len(tied) and archs[winner]["promoted"] == "True"
    assert winner == min(tied, key=lambda a: (float(archs[a]["latency_ms"]), -float(archs[a]["accuracy"])))
    (other,) = set(ARCHS) - {sel["best"]}
    assert sel["contenders"][other]["test"].startswith("sign-flip permutation") and 0 < sel["contenders"][other]["p_value"] <= 1
    assert (other in tied) == (sel["contenders"][other]["p_adjusted"] >= sel["alpha"]) and winner in sel["why"]
    assert json.loads((repo / "reports/selection.json").read_text())["why"] == sel["why"]
    assert card["arch"] == winner and card["seed"] in SEEDS and card["run"] == f"{winner}/seed{card['seed']}"
    # the promoted files are the promoted cell's bundle
    assert card["metrics"]["accuracy"] == evals[winner, card["seed"]]["accuracy"]
    assert (best / "model.onnx").read_bytes() == (repo / f"exports/{card['run']}/model.onnx").read_bytes()
    assert card["data_version"]["prepared_fingerprint"] == json.loads((repo / "data/prepared/meta.json").read_text())["fingerprint"]
    assert json.loads((best / "classes.json").read_text()) == [str(i) for i in range(10)]
    pre = json.loads((best / "preprocess.json").read_text())
    assert pre["image_size"] == 32 and len(pre["mean"]) == 3
    # per-arch overrides reached training: the checkpoint's resolved params carry them
    from cvpipe.torchkit.models import load_checkpoint

    for arch, ov in ARCHS.items():
        for seed in SEEDS:
            tp = load_checkpoint(repo / f"models/{arch}/seed{seed}/best.pt")["params"]["train"]
            assert (tp["lr"], tp["seed"]) == (ov["lr"], seed)

    # nothing changed: nothing reruns; one architecture's override changed: only it (and compare) rerun
    env, dvc = bakeoff["env"], bakeoff["dvc"]
    assert _ran(_run(dvc + ["repro"], repo, env)) == set()
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["bakeoff"]["archs"]["test_efficientnet"]["lr"] = 0.004
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert _ran(_run(dvc + ["repro"], repo, env)) == {
        f"{s}@test_efficientnet-{seed}" for s in ("train", "evaluate") for seed in SEEDS} | {"compare"}
    assert load_checkpoint(repo / "models/test_efficientnet/seed42/best.pt")["params"]["train"]["lr"] == 0.004
    metrics = json.loads(_run(dvc + ["metrics", "show", "--json"], repo, env))
    shown = metrics[""]["data"]  # every cell's headline evaluate.json and compare's verdict
    assert {f"metrics/{a}/seed{seed}/evaluate.json" for a in ARCHS for seed in SEEDS} <= set(shown)
    assert all("accuracy_ci_low" in shown[f"metrics/{a}/seed{seed}/evaluate.json"]["data"] for a in ARCHS for seed in SEEDS)
    assert "winner" in json.dumps(metrics)
    # issue #16: with several archs and seeds (compare's p_value is set) the table still fits 25 columns
    assert_readable_metrics(repo)


def test_offline_wandb_runs_of_a_bakeoff(bakeoff):
    repo = bakeoff["repo"]
    runs = [read_run(r) for r in find_runs(repo / "wandb")]
    first = [r for r in runs if r.job_type in ("train", "evaluate")]
    for arch, seed in ((a, seed) for a in ARCHS for seed in SEEDS):
        ev = json.loads((repo / f"exports/{arch}/seed{seed}/evaluate.json").read_text())  # the bundle's full evaluation
        tr = json.loads((repo / f"reports/{arch}/seed{seed}/train.json").read_text())
        mine = [r for r in first if r.config.get("arch") == arch and r.config["train"]["seed"] == seed]
        train_runs = [r for r in mine if r.job_type == "train"]
        eval_runs = [r for r in mine if r.job_type == "evaluate"]
        assert train_runs and eval_runs, (arch, seed)
        for r in train_runs + eval_runs:
            assert r.group == "bakeoff-test" and arch in r.tags and r.exit_code == 0
            assert r.name == f"{r.job_type}-{arch}-seed{seed}"  # W&B run names tell the cells apart
        # the latest runs of this cell hold the metrics now on disk
        assert train_runs[-1].summary["best_val_acc"] == pytest.approx(tr["best_val_acc"])
        from cvpipe.torchkit.models import load_checkpoint

        lr = load_checkpoint(repo / f"models/{arch}/seed{seed}/best.pt")["params"]["train"]["lr"]
        assert train_runs[-1].config["train"]["lr"] == lr and train_runs[-1].config["arch"] == arch
        s = eval_runs[-1].summary
        assert s["test/accuracy"] == pytest.approx(ev["accuracy"])
        assert s["test/macro_f1"] == pytest.approx(ev["macro_f1"])
        assert s["test/ece"] == pytest.approx(ev["ece"])
        # the intervals and the calibration are in the W&B summary too (test/<metric>_ci_low|high, calibration/*)
        assert s["test/accuracy_ci_low"] == pytest.approx(ev["intervals"]["accuracy"]["low"])
        assert s["test/macro_f1_ci_high"] == pytest.approx(ev["intervals"]["macro_f1"]["high"])
        assert s["calibration/temperature"] == pytest.approx(ev["temperature"])
        assert s["calibration/test_ece_before"] == pytest.approx(ev["calibration"]["test_ece_before"])
        assert s["cost/latency_ms"] == pytest.approx(ev["cost"]["latency_ms"])
        assert s["export/onnx_max_abs_diff"] == pytest.approx(ev["export_parity"]["onnx_max_abs_diff"])
    compare = [r for r in runs if r.job_type == "compare"]
    assert compare and compare[-1].group == "bakeoff-test"
    assert compare[-1].summary["compare/winner"] == json.loads((repo / "reports/compare.json").read_text())["winner"]
    # the verdict and the whole leaderboard (an aggregated row per architecture, then a row per run)
    assert compare[-1].summary["compare/why"] == json.loads((repo / "reports/selection.json").read_text())["why"]
    assert compare[-1].summary["compare/leaderboard/nrows"] == len(ARCHS) * (1 + len(SEEDS))


def test_adding_a_seed_reruns_only_the_new_cells(bakeoff):
    """bakeoff.seeds is a matrix axis: appending a seed makes exactly the new seed's train@/evaluate@ cells and
    compare (which tracks the whole bakeoff section) out of date; no existing cell tracks the list."""
    repo, env, dvc = bakeoff["repo"], bakeoff["env"], bakeoff["dvc"]
    _run(dvc + ["repro"], repo, env)  # whatever an earlier test changed is run first: the status below is the seed's alone
    assert json.loads(_run(dvc + ["status", "--json"], repo, env).strip().splitlines()[-1]) == {}
    original = (repo / "params.yaml").read_text()
    params = yaml.safe_load(original)
    params["bakeoff"]["seeds"] = [*SEEDS, 44]
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        status = json.loads(_run(dvc + ["status", "--json"], repo, env).strip().splitlines()[-1])
        new_cells = {f"{s}@{a}-44" for s in ("train", "evaluate") for a in ARCHS}
        assert set(status) == new_cells | {"compare"}, status
        for stage in new_cells:  # never run: not in dvc.lock, every output missing
            changes = {k: v for entry in status[stage] for k, v in entry.items()}
            assert changes["changed deps"]["params.yaml"] == "new", status[stage]
            outs = changes["changed outs"]
            assert set(outs.values()) == {"deleted"} and all("/seed44" in o for o in outs), status[stage]
        # compare tracks the whole bakeoff section: the seed list is its only change
        assert status["compare"] == [{"changed deps": {"params.yaml": {"bakeoff": "modified"}}}], status["compare"]
    finally:
        (repo / "params.yaml").write_text(original)
    assert json.loads(_run(dvc + ["status", "--json"], repo, env).strip().splitlines()[-1]) == {}
