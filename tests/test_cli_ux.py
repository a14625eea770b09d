"""The command line's rough edges (#16, defect 5): --version, brackets in messages, library warnings
under --quiet, the training progress display (100 epochs on a terminal and in a log), compare's
table, and PID 1 in the containers."""

from __future__ import annotations

import io
import re
import warnings
from pathlib import Path

import pytest
import yaml
from conftest import cvpipe
from rich.console import Console

from cvpipe import __version__
from cvpipe.core import console as console_mod

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def captured(monkeypatch) -> io.StringIO:
    """The shared console writing to a buffer (no terminal), quiet off."""
    buf = io.StringIO()
    monkeypatch.setattr(console_mod, "console", Console(file=buf, width=200, force_terminal=False))
    monkeypatch.setattr(console_mod, "_quiet", False)
    return buf


def test_version_needs_no_command(tmp_path):
    proc = cvpipe("--version", cwd=tmp_path, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"cvpipe {__version__}" in proc.stdout + proc.stderr
    assert "Missing command" not in proc.stdout + proc.stderr


def test_brackets_in_messages_print_as_written(captured):
    console_mod.info("reading [train.lr] from data/[raw]/x.png")
    console_mod.warn("value [bold]not markup[/bold] and [1, 2]")
    out = captured.getvalue()
    assert "reading [train.lr] from data/[raw]/x.png" in out
    assert "warning: value [bold]not markup[/bold] and [1, 2]" in out


def test_brackets_in_an_error_line_survive(tmp_path):
    proc = cvpipe("train", "--params", "cfg[1].yaml", cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert "cfg[1].yaml" in proc.stdout + proc.stderr


def test_library_warnings_go_through_the_console_and_respect_quiet(captured, monkeypatch):
    with warnings.catch_warnings():  # restores warnings.showwarning after
        warnings.simplefilter("always")
        console_mod.route_warnings()
        warnings.warn("timm says [something]", UserWarning)
        assert "warning: UserWarning: timm says [something] (test_cli_ux.py:" in captured.getvalue()
        monkeypatch.setattr(console_mod, "_quiet", True)
        warnings.warn("hidden under --quiet", FutureWarning)
    assert "hidden under --quiet" not in captured.getvalue()


def test_library_log_warnings_go_through_the_console_and_respect_quiet(captured, monkeypatch):
    import logging

    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])  # as in the CLI process: nothing configured logging
    with warnings.catch_warnings():  # restores warnings.showwarning after
        console_mod.route_warnings()
        logging.getLogger("timm.models._builder").warning("Unexpected keys [head.fc] found")
        logging.getLogger("timm.models._builder").info("not a warning")
        monkeypatch.setattr(console_mod, "_quiet", True)
        logging.getLogger("timm").warning("hidden under --quiet")
    out = captured.getvalue()
    assert "warning: timm.models._builder: Unexpected keys [head.fc] found" in out
    assert "not a warning" not in out and "hidden under --quiet" not in out


def _drive(progress: console_mod.EpochProgress, epochs: int, batches: int = 4, batch: int = 16) -> None:
    with progress:
        for e in range(1, epochs + 1):
            progress.start_epoch(e, epochs, batches * batch)
            for _ in range(batches):
                progress.advance(batch)
            progress.end_epoch(e, f"epoch {e}/{epochs}: val_acc=0.5 [ok]")


def test_progress_on_a_terminal_stays_two_rows_for_100_epochs(monkeypatch):
    """A terminal capture of 100 epochs: rich redraws its live region by moving the cursor up over it;
    with one epoch bar and one batch bar that is never more than one line up (two rows), where a task
    per epoch grew to 100 rows. The per-epoch lines scroll above the bars."""
    monkeypatch.setattr(console_mod, "_quiet", False)
    term = Console(file=io.StringIO(), force_terminal=True, width=120, height=30)
    p = console_mod.EpochProgress(100, out=term)
    _drive(p, 100)
    out = term.file.getvalue()
    ups = [int(n) for n in re.findall(r"\x1b\[(\d+)A", out)]
    assert ups and max(ups) == 1, sorted(set(ups))
    assert len(p.live.tasks) == 2
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out)
    for e in (1, 50, 100):
        assert f"epoch {e}/100: val_acc=0.5 [ok]" in plain
    last_frame = plain.rsplit("epoch 100/100: val_acc=0.5 [ok]", 1)[1]
    assert re.search(r"epoch 100/100 .*100/100", last_frame) and re.search(r"epoch 100 .*64/64", last_frame)


def test_progress_in_a_log_is_one_plain_line_per_epoch_and_nothing_when_quiet(monkeypatch):
    monkeypatch.setattr(console_mod, "_quiet", False)
    log = Console(file=io.StringIO(), force_terminal=False, width=120)
    _drive(console_mod.EpochProgress(100, out=log), 100)
    lines = log.file.getvalue().splitlines()
    assert lines == [f"epoch {e}/100: val_acc=0.5 [ok]" for e in range(1, 101)]
    monkeypatch.setattr(console_mod, "_quiet", True)
    quiet = Console(file=io.StringIO(), force_terminal=True, width=120)
    _drive(console_mod.EpochProgress(100, out=quiet), 3)
    assert quiet.file.getvalue() == ""


def test_compare_table_ranks_and_marks_the_winner(monkeypatch):
    from cvpipe.compare.stage import leaderboard_table

    rows = [{"rank": 1, "arch": "resnet18", "accuracy": 0.91, "macro_f1": 0.9, "ece": 0.02, "params_m": 11.2, "size_mb": 44.7,
             "latency_ms": 3.2, "throughput_img_s": 800.0, "eligible": True, "pareto": True, "roc_auc": 0.97,
             "ci_low": 0.955, "ci_high": 0.985, "tie_group": "A", "p_adjusted": None},
            {"rank": 2, "arch": "[odd]net", "accuracy": 0.88, "macro_f1": 0.87, "ece": 0.04, "params_m": 5.0, "size_mb": 20.1,
             "latency_ms": 2.1, "throughput_img_s": 1200.0, "eligible": True, "pareto": True, "roc_auc": 0.95,
             "ci_low": 0.93, "ci_high": 0.97, "tie_group": "B", "p_adjusted": 0.0123}]
    log = Console(file=io.StringIO(), force_terminal=False)  # a log: rich assumes 80 columns
    monkeypatch.setattr(console_mod, "console", log)
    monkeypatch.setattr(console_mod, "_quiet", False)
    console_mod.print_table(leaderboard_table(rows, "roc_auc", "resnet18"))
    out = log.file.getvalue()
    assert "throughput_img_s" in out and "…" not in out  # not squeezed to 80 columns
    header = next(line for line in out.splitlines() if "arch" in line and "rank" in line)
    assert re.findall(r"\w+", header)[:7] == ["rank", "arch", "accuracy", "roc_auc", "ci", "tie", "p"]
    assert out.index("resnet18") < out.index("[odd]net")  # rank order; brackets in a name are not markup
    assert "0.9700" in out and "leaderboard by roc_auc" in out
    assert "[0.9550, 0.9850]" in out and "0.0123" in out  # the interval and the p-value against the best


def test_containers_run_under_an_init_and_the_app_mounts_what_its_cmd_serves():
    """PID 1 is Docker's tini in every compose service and in docker-shell.sh (docker stop ends the
    stage at once); the compose app mounts models/ where app/Dockerfile's CMD looks (--model /models/best)."""
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    for name, svc in compose["services"].items():
        assert svc.get("init") is True, name
    cmd = re.search(r"^CMD (\[.*\])$", (REPO / "app" / "Dockerfile").read_text(), re.M)
    served = yaml.safe_load(cmd.group(1))
    model = served[served.index("--model") + 1]
    targets = [v.rsplit(":", 2)[1] if v.endswith((":ro", ":rw")) else v.rsplit(":", 1)[1] for v in compose["services"]["app"]["volumes"]]
    assert any(model == t or model.startswith(t.rstrip("/") + "/") for t in targets), (model, targets)
    assert "run --rm --init " in (REPO / "docker-shell.sh").read_text()
