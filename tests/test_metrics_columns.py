"""`dvc metrics show` stays readable (issue #16): the DVC metrics files carry headline figures only.

The budget (``MAX_COLUMNS``) is the number of metric columns of ``dvc metrics show``'s table: the union
of the keys of every metrics file, flattened the way DVC flattens them. DVC joins nested keys with dots
and shows strings and booleans, but drops lists, ``null`` values and empty objects (measured with DVC
3.67 on a scratch repository: :func:`test_column_rule_matches_dvc`). The row label column ``Path`` is
not a metric and is not counted. The end-to-end check on the sample is in ``tests/test_pipeline.py``
(``test_dvc_repro_reruns_only_what_changed``, after its ``dvc repro``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

MAX_COLUMNS = 25  # issue #16: `dvc metrics show` on the sample prints at most 25 columns
# the four metrics files of ingest, preprocess, audit and train share keys; together they get about 9 columns
# (convention I3: evaluate.json <= 10 numeric keys, compare.json <= 6 + the winner's name)
UPSTREAM_BUDGET = 9


def flatten_like_dvc(data: dict, prefix: str = "") -> set[str]:
    """The column names DVC derives from one metrics file: dotted paths to scalars; lists, nulls, {} dropped."""
    cols: set[str] = set()
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            cols |= flatten_like_dvc(value, name + ".")
        elif value is not None and not isinstance(value, list):
            cols.add(name)
    return cols


def json_columns(show_json: dict) -> dict[str, set[str]]:
    """``dvc metrics show --json`` -> {metrics file: its columns}, over every revision shown."""
    out: dict[str, set[str]] = {}
    for rev in show_json.values():
        for path, entry in (rev.get("data") or {}).items():
            out.setdefault(path, set()).update(flatten_like_dvc(entry.get("data") or {}))
    return out


def table_columns(table: str) -> list[str]:
    """The metric columns of ``dvc metrics show``'s plain table: its header row without ``Path``.

    Metric names contain no spaces (DVC's own keys, flattened with dots), so the header splits on blanks."""
    header = next(line for line in table.splitlines() if line.strip())
    names = header.split()
    assert names and names[0] == "Path", f"not a dvc metrics table header: {header!r}"
    return names[1:]


def describe(per_file: dict[str, set[str]]) -> str:
    """A failure message: every column and the files that contribute it."""
    union = sorted(set().union(*per_file.values())) if per_file else []
    lines = [f"{len(union)} columns (budget {MAX_COLUMNS}):"]
    for col in union:
        lines.append(f"  {col:40s} {', '.join(sorted(p for p, cols in per_file.items() if col in cols))}")
    return "\n".join(lines)


def dvc(args: list[str], cwd: Path) -> str:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"dvc {' '.join(args)}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def assert_readable_metrics(repo: Path) -> set[str]:
    """``dvc metrics show`` in *repo* (plain table and --json agree) has at most MAX_COLUMNS metric columns."""
    per_file = json_columns(json.loads(dvc(["metrics", "show", "--json"], repo)))
    union = set().union(*per_file.values())
    shown = table_columns(dvc(["metrics", "show"], repo))
    assert set(shown) == union, f"table {sorted(shown)} != json {sorted(union)}"
    assert len(shown) <= MAX_COLUMNS, describe(per_file)
    return union


def _scratch_repo(tmp_path: Path, files: dict[str, dict]) -> Path:
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    dvc(["init", "-q"], tmp_path)
    (tmp_path / "dvc.yaml").write_text("metrics:\n" + "".join(f"  - {name}\n" for name in files))
    for name, data in files.items():
        (tmp_path / name).write_text(json.dumps(data))
    return tmp_path


def test_column_rule_matches_dvc(tmp_path):
    """The counting rule is DVC's own: nested keys dotted, strings and booleans shown, lists/null/{} dropped."""
    files = {
        "a.json": {"n": 1, "s": "text", "b": True, "none": None, "l": [1, 2], "empty": {}, "d": {"x": 0.5, "y": {"z": 2}}},
        "b.json": {"n": 3, "only_b": 1.5, "d": {"q": None}},
    }
    repo = _scratch_repo(tmp_path, files)
    union = assert_readable_metrics(repo)
    assert union == {"n", "s", "b", "d.x", "d.y.z", "only_b"}
    assert union == set().union(*(flatten_like_dvc(d) for d in files.values()))


def test_column_budget_failure_lists_the_columns(tmp_path):
    """Over budget, the failure names every column and where it comes from."""
    repo = _scratch_repo(tmp_path, {"wide.json": {f"k{i}": i for i in range(MAX_COLUMNS + 1)}})
    try:
        assert_readable_metrics(repo)
    except AssertionError as exc:
        assert f"{MAX_COLUMNS + 1} columns" in str(exc) and "k25" in str(exc) and "wide.json" in str(exc)
    else:
        raise AssertionError("a 26-column metrics table passed")


def _upstream_headlines() -> dict[str, dict]:
    """The four upstream metrics files as their writers build them from full, realistic reports."""
    from cvpipe.audit.stage import headline as audit_headline
    from cvpipe.ingest.stage import IngestReport
    from cvpipe.preprocess.stage import headline as dataset_headline
    from cvpipe.train.stage import headline as train_headline

    classes = [str(d) for d in range(10)]
    ingest = IngestReport(accepted=1797, quarantined=3, per_class={c: 180 for c in classes}, rejections={"corrupt": 3},
                          per_split_hint={"none": 1797}, seconds=0.07, listed=1800, labels_relabelled=2,
                          images_excluded=1, review={"decisions": 3, "relabelled": [{"id": "a", "from": "1", "to": "7"}]})
    card = {"classes": classes, "images": 1797, "splits": {"train": {"count": 1258, "per_class": {c: 125 for c in classes}}},
            "per_class": {c: 180 for c in classes}, "mean": [0.3] * 3, "std": [0.3] * 3,
            "source_size": {"width": {"min": 8.0, "median": 8.0}}, "near_duplicates": {"groups": 33, "examples": [["a"]]},
            "seconds": {"decode_resize": 0.8, "total": 2.07}, "images_per_second": 2253.9}
    audit = {"images": 1530, "issues": 1, "issue_fraction": 0.00065, "estimated_noise_rate": 0.00065,
             "out_of_sample_accuracy": 0.978, "per_class": {c: {"images": 153, "issues": 0} for c in classes},
             "learner": {"features": "pixels 8x8"}, "folds": 5, "filter_by": "prune_by_noise_rate", "seconds": 2.14}
    train = {"arch": "resnet18", "epochs": 15, "epochs_run": 15, "monitor": "ema_val_acc", "best_epoch": 7,
             "best_val_acc": 0.985, "best_monitored_val_acc": 0.993, "img_per_s": 392.4, "seconds": 58.74,
             "device": "cpu", "amp": "bf16", "dataset_hash": "bc0a01e7171d4b0b", "best_ema_val_acc": 0.993}
    return {"metrics/ingest.json": ingest.headline(), "metrics/dataset.json": dataset_headline(card),
            "metrics/audit.json": audit_headline(audit), "metrics/resnet18/seed42/train.json": train_headline(train)}


def test_upstream_metrics_files_are_headline_numbers():
    """ingest, preprocess, audit and train write a few numbers each, sharing keys: about 9 columns together."""
    files = _upstream_headlines()
    for path, data in files.items():
        assert data and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in data.values()), (path, data)
    per_file = {p: flatten_like_dvc(d) for p, d in files.items()}
    assert len(set().union(*per_file.values())) <= UPSTREAM_BUDGET, describe(per_file)
    assert files["metrics/ingest.json"] == {"images": 1797, "quarantined": 3, "labels_relabelled": 2, "seconds": 0.07}
    assert files["metrics/dataset.json"] == {"images": 1797, "seconds": 2.07, "throughput_img_s": 2253.9}
    assert files["metrics/audit.json"] == {"images": 1530, "issues": 1, "seconds": 2.14}
    # val_acc is the accuracy of the weights best.pt was picked by (the EMA's under an ema_ monitor)
    assert files["metrics/resnet18/seed42/train.json"] == {"epochs": 15, "val_acc": 0.993, "throughput_img_s": 392.4,
                                                           "seconds": 58.74}
