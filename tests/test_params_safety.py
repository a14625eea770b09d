"""params.yaml refuses what it cannot run (issue #15, item 11).

Every case exits 2 before any stage works, naming the key (or the file), whether the
value comes from params.yaml or from ``-S key=value``. The probe command is
``cvpipe compare``: it validates every section, and with valid params in an empty
folder it stops at once with exit 1 (nothing evaluated), so "accepted" is visible as
exit 1 and nothing here trains or ingests anything.

The tests drive the CLI only (the in-process check imports inside the test), so the
same file runs against an older checkout: ``PYTHONPATH=<old>/src pytest ...``.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO, cvpipe, write_params

PROBE = "compare"  # loads and validates all of params.yaml, then exits 1 in an empty folder


def _params_with(folder: Path, key: str, value) -> Path:
    """The repository's params.yaml with *key* (dotted) set to *value*, written by a YAML dumper."""
    return write_params(folder, {key: value})


def _run(folder: Path, *args: str, timeout: float = 120):
    before = set(folder.iterdir())
    start = time.monotonic()
    proc = cvpipe(PROBE, *args, cwd=folder, check=False, timeout=timeout)
    proc.elapsed = time.monotonic() - start  # type: ignore[attr-defined]
    assert set(folder.iterdir()) == before, f"wrote {set(folder.iterdir()) - before}"
    return proc


def _refused(proc, *needles: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    for needle in needles:
        assert needle in proc.stderr, (needle, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr


def _bad_value(folder: Path, via: str, key: str, yaml_text: str):
    """Run the probe with *key* set to the YAML *yaml_text*, in params.yaml (via=file) or with -S (via=set)."""
    if via == "file":
        _params_with(folder, key, yaml.safe_load(yaml_text))
        return _run(folder)
    _params_with(folder, "train.epochs", 15)  # the repository's file, unchanged
    return _run(folder, "-S", f"{key}={yaml_text}")


VIA = ["file", "set"]


def test_probe_accepts_the_repository_params(tmp_path):
    """The baseline the other tests depend on: valid params -> exit 1 (nothing evaluated), never 2."""
    _params_with(tmp_path, "train.epochs", 15)
    proc = _run(tmp_path)
    assert proc.returncode == 1 and "evaluat" in proc.stderr, proc.stderr


# ----------------------------------------------------------------------------- the YAML itself


def _bomb(levels: int = 9, width: int = 9) -> str:
    """Billion laughs as one flow sequence: ``width ** levels`` strings from a few hundred bytes of anchors and aliases."""
    return "[" + ", ".join(
        f"&l{i} [" + ", ".join([f"*l{i - 1}" if i else "lol"] * width) + "]" for i in range(levels)
    ) + "]"


@pytest.mark.parametrize("via", VIA)
def test_yaml_alias_bomb_is_refused_quickly(tmp_path, via):
    """Aliases are refused where they appear: no expansion, a short message naming the file (or key) and line.

    The old loader expanded it while validating train.arch (a str) and formatting the error's value."""
    if via == "file":
        text = (REPO / "params.yaml").read_text().replace("  arch: resnet18 ", f"  arch: {_bomb()} ", 1)
        assert "&l8" in text
        (tmp_path / "params.yaml").write_text(text)
        proc = _run(tmp_path, timeout=10)
        _refused(proc, "params.yaml", "line", "alias")
    else:
        _params_with(tmp_path, "train.epochs", 15)
        proc = _run(tmp_path, "-S", f"train.arch={_bomb()}", timeout=10)
        _refused(proc, "train.arch", "alias")
    assert proc.elapsed < 5, proc.elapsed
    assert len(proc.stderr) < 2000, len(proc.stderr)


def test_yaml_anchor_is_refused_with_its_line(tmp_path):
    text = (REPO / "params.yaml").read_text().replace("  epochs: 15 ", "  epochs: &e 15 ", 1)
    assert "&e" in text
    (tmp_path / "params.yaml").write_text(text)
    _refused(_run(tmp_path), "params.yaml", "line", "anchor")


def test_a_key_given_twice_is_refused_with_both_lines(tmp_path):
    """PyYAML keeps the last of two equal keys silently: a second ``lr:`` lower in train: (or a second
    ``train:`` section) would undo the first without a word."""
    lines = (REPO / "params.yaml").read_text().splitlines(keepends=True)
    at = next(i for i, line in enumerate(lines) if line.startswith("  epochs: "))
    (tmp_path / "params.yaml").write_text("".join(lines[:at + 1] + ["  epochs: 3\n"] + lines[at + 1:]))
    _refused(_run(tmp_path), "params.yaml", f"line {at + 2}", "'epochs' is given twice", f"first at line {at + 1}")
    # the same key in different mappings is fine, and so is the file without the copy
    from cvpipe.core.config import parse_yaml

    assert parse_yaml("a: {x: 1}\nb: {x: 2}\n") == {"a": {"x": 1}, "b": {"x": 2}}


@pytest.mark.parametrize("via", VIA)
def test_deeply_nested_yaml_is_refused(tmp_path, via):
    """A few kilobytes of '[' must not blow the parser's recursion (exit 1 with RecursionError)."""
    deep = "[" * 5000 + "]" * 5000
    if via == "file":
        (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text() + f"deep: {deep}\n")
        _refused(_run(tmp_path), "params.yaml", "nest")
    else:
        _params_with(tmp_path, "train.epochs", 15)
        _refused(_run(tmp_path, "-S", f"augment.train={deep}"), "augment.train", "nest")


@pytest.mark.parametrize("via", VIA)
def test_huge_integer_literal_is_refused_naming_the_key(tmp_path, via):
    """Python refuses int('1' * 5000) with ValueError; that must not escape as an unexpected error."""
    digits = "1" * 5000
    if via == "file":
        text = (REPO / "params.yaml").read_text().replace("  epochs: 15 ", f"  epochs: {digits} ", 1)
        (tmp_path / "params.yaml").write_text(text)
        _refused(_run(tmp_path), "params.yaml", "line")
    else:
        _params_with(tmp_path, "train.epochs", 15)
        _refused(_run(tmp_path, "-S", f"train.epochs={digits}"), "train.epochs")


def test_oversized_params_file_is_refused(tmp_path):
    text = (REPO / "params.yaml").read_text() + ("# padding " + "x" * 100 + "\n") * 20_000  # ~2 MiB of comments
    (tmp_path / "params.yaml").write_text(text)
    proc = _run(tmp_path)
    _refused(proc, "params.yaml")
    assert re.search(r"larger than|too large|exceeds", proc.stderr), proc.stderr


def test_non_utf8_params_file_exit_2_naming_the_file(tmp_path):
    text = (REPO / "params.yaml").read_text().replace("resnet18", "resnet\xe918", 1)
    (tmp_path / "params.yaml").write_bytes(text.encode("latin-1"))
    _refused(_run(tmp_path), "params.yaml", "UTF-8")


def test_non_utf8_override_exit_2_naming_the_key(tmp_path):
    _params_with(tmp_path, "train.epochs", 15)
    _refused(_run(tmp_path, "-S", b"train.arch=resnet\xe918"), "train.arch", "UTF-8")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- error messages


@pytest.mark.parametrize("via", VIA)
def test_long_value_is_truncated_in_the_error(tmp_path, via):
    proc = _bad_value(tmp_path, via, "train.device", "x" * 100_000)
    _refused(proc, "train.device")
    assert len(proc.stderr) < 1000, len(proc.stderr)
    assert re.search(r"100,?000 characters", proc.stderr), proc.stderr


def test_long_unknown_key_is_truncated(tmp_path):
    _params_with(tmp_path, "train." + "k" * 100_000, 1)
    proc = _run(tmp_path)
    _refused(proc, "train.kkkk", "unknown key")
    assert len(proc.stderr) < 1000, len(proc.stderr)


def test_many_errors_are_capped(tmp_path):
    _params_with(tmp_path, "augment.train", [1] * 10_000)
    proc = _run(tmp_path)
    _refused(proc, "augment.train.0", "more")
    assert len(proc.stderr.splitlines()) < 40, len(proc.stderr.splitlines())


@pytest.mark.parametrize("via", VIA)
def test_rich_markup_in_a_value_is_shown_verbatim(tmp_path, via):
    """A value that looks like console markup must neither crash the error display nor vanish from it."""
    proc = _bad_value(tmp_path, via, "train.device", "'[/red] [bold]x'")
    _refused(proc, "train.device", "[/red] [bold]x")


# ----------------------------------------------------------------------------- values

# (id, dotted key, value as YAML text, text the message must contain)
BAD_VALUES = [
    ("weight_decay inf", "train.weight_decay", ".inf", "train.weight_decay"),
    ("weight_decay nan", "train.weight_decay", ".nan", "train.weight_decay"),
    ("min_lr inf", "train.min_lr", ".inf", "train.min_lr"),
    ("mixup_alpha inf", "train.mixup_alpha", ".inf", "train.mixup_alpha"),
    ("cutmix_alpha inf", "train.cutmix_alpha", ".inf", "train.cutmix_alpha"),
    ("early_stop_min_delta inf", "train.early_stop_min_delta", ".inf", "train.early_stop_min_delta"),
    ("clip_grad inf", "train.clip_grad", ".inf", "train.clip_grad"),
    ("ingest max_aspect_ratio inf", "ingest.max_aspect_ratio", ".inf", "ingest.max_aspect_ratio"),
    ("serve request_timeout_s inf", "serve.request_timeout_s", ".inf", "serve.request_timeout_s"),
    ("serve max_aspect_ratio inf", "serve.max_aspect_ratio", ".inf", "serve.max_aspect_ratio"),
    ("evaluate parity_tolerance inf", "evaluate.parity_tolerance", ".inf", "evaluate.parity_tolerance"),
    ("compare max_latency_ms inf", "compare.max_latency_ms", ".inf", "compare.max_latency_ms"),
    ("compare max_size_mb inf", "compare.max_size_mb", ".inf", "compare.max_size_mb"),
    ("compare alpha 0.7", "compare.alpha", "0.7", "compare.alpha"),
    ("compare cost unknown", "compare.cost", "flops", "compare.cost"),
    ("compare resamples 1e9", "compare.resamples", str(10**9), "compare.resamples"),
    ("augment argument inf", "augment.train", "[{Affine: {p: .inf}}]", "augment.train"),
    ("bakeoff override inf", "bakeoff.archs", "{resnet18: {weight_decay: .inf}}", "bakeoff.archs.resnet18.weight_decay"),
    ("split seed negative", "split.seed", "-1", "split.seed"),
    ("train seed negative", "train.seed", "-1", "train.seed"),
    ("train seed above 2**32-1", "train.seed", str(2**32), "train.seed"),
    # scikit-learn's random_state refuses it deep in the audit's cross-validation
    ("audit seed above 2**32-1", "audit.seed", str(2**32), "audit.seed"),
    ("evaluate bootstrap_seed above 2**32-1", "evaluate.bootstrap_seed", str(2**32), "evaluate.bootstrap_seed"),
    ("compare seed above 2**32-1", "compare.seed", str(2**32), "compare.seed"),
    ("batch_size 10**20", "train.batch_size", str(10**20), "train.batch_size"),
    ("batch_size 1e20 float", "train.batch_size", "1.0e+20", "train.batch_size"),
    ("evaluate batch_size 10**20", "evaluate.batch_size", str(10**20), "evaluate.batch_size"),
    ("throughput_batch 10**20", "evaluate.throughput_batch", str(10**20), "evaluate.throughput_batch"),
    ("ingest workers 1e8", "ingest.workers", str(10**8), "ingest.workers"),
    ("preprocess workers 1e8", "preprocess.workers", str(10**8), "preprocess.workers"),
    ("train workers 1e8", "train.workers", str(10**8), "train.workers"),
    ("serve torch_threads 1e8", "serve.torch_threads", str(10**8), "serve.torch_threads"),
    ("train device cuda:abc", "train.device", "cuda:abc", "train.device"),
    ("train device cuda:", "train.device", "'cuda:'", "train.device"),
    ("train device cuda:-1", "train.device", "cuda:-1", "train.device"),
    ("serve device cuda:abc", "serve.device", "cuda:abc", "serve.device"),
    *[(f"paths.{k} empty", f"paths.{k}", "''", f"paths.{k}")
      for k in ("raw", "prepared", "models", "metrics", "plots", "wandb", "exports", "reports")],
    ("paths.raw blank", "paths.raw", "'   '", "paths.raw"),
    ("paths.raw NUL", "paths.raw", '"data\\0raw"', "paths.raw"),
    ("paths.models newline", "paths.models", '"models\\nx"', "paths.models"),
    ("ingest state_dir empty", "ingest.state_dir", "''", "ingest.state_dir"),
    ("serve model empty", "serve.model", "''", "serve.model"),
    ("pretrained_path empty", "train.pretrained_path", "''", "train.pretrained_path"),
    ("ingest source newline", "ingest.source", '"data\\nphotos"', "ingest.source"),
]


@pytest.mark.parametrize("via", VIA)
@pytest.mark.parametrize("key,yaml_text,needle", [b[1:] for b in BAD_VALUES], ids=[b[0] for b in BAD_VALUES])
def test_bad_value_exit_2_naming_the_key(tmp_path, via, key, yaml_text, needle):
    _refused(_bad_value(tmp_path, via, key, yaml_text), needle)


@pytest.mark.parametrize("key,yaml_text", [
    ("train.seed", str(2**32 - 1)), ("split.seed", "0"), ("audit.seed", str(2**32 - 1)), ("train.device", "cuda:1"), ("serve.device", "mps"),
    ("train.batch_size", str(2**20)), ("ingest.workers", "1024"), ("paths.raw", "."),
    ("augment.train", "[{Affine: {p: 0.5}}]"),
])
def test_edge_values_are_still_accepted(tmp_path, key, yaml_text):
    proc = _bad_value(tmp_path, "set", key, yaml_text)
    assert proc.returncode == 1 and "evaluat" in proc.stderr, proc.stderr


# ----------------------------------------------------------------------------- cvpipe init


def _tiny_dataset(folder: Path) -> Path:
    from PIL import Image

    for cls in ("ants", "bees"):
        (folder / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (16, 16), (40 * i, 200 if cls == "ants" else 0, 90)).save(folder / cls / f"{i}.png")
    return folder


@pytest.mark.parametrize("name", ["new\nline", "tab\there", "cr\rhere"], ids=["newline", "tab", "carriage-return"])
def test_init_control_character_in_source_exit_2(tmp_path, name):
    data = _tiny_dataset(tmp_path / name)
    out = tmp_path / "out"
    out.mkdir()
    proc = cvpipe("init", str(data), "--quiet", cwd=out, check=False, timeout=300)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "SOURCE" in proc.stderr and "control character" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (out / "params.yaml").exists()


def test_init_control_character_in_params_path_exit_2(tmp_path):
    proc = cvpipe("init", "sample://digits", "--params", "my\nparams.yaml", cwd=tmp_path, check=False, timeout=300)
    assert proc.returncode == 2 and "--params" in proc.stderr and "control character" in proc.stderr, proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_init_comments_cannot_break_out_of_the_yaml():
    """What init writes is dumped by a YAML dumper (keys too); text that ends up in comments (the command line,
    the source, reasons) has its line breaks escaped, so it cannot add or change a key."""
    from cvpipe.init import stage
    from cvpipe.init.recipe import Choice, DataProfile, MachineProfile, SizeStats

    side = SizeStats(32, 32, 32)
    hostile = "x\ntrain:\n  lr: 5\r\u2028\x85y"
    odd_key = "odd: name # [x]"
    profile = DataProfile(sources=(hostile,), class_counts={"a": 5, "b": 5}, shorter_side=side, longer_side=side,
                          scanned=10)
    machine = MachineProfile(cpu_cores=2, ram_gib=4, gpu_name=hostile)
    shared = [0.9, 1.1]  # one object twice: a dumper would write an anchor and an alias
    choices = {
        "ingest.source": Choice("data/photos", f"reason {hostile}"),
        "bakeoff.archs": Choice({odd_key: {}, "resnet18": {}}, hostile,
                                (Choice(odd_key, hostile), Choice("resnet18", "fine"))),
        "augment.train": Choice([{"Affine": {"scale": shared, "translate_percent": shared}}], hostile,
                                (Choice({"Affine": {"scale": shared, "translate_percent": shared}}, hostile),)),
    }
    text = stage.render_params(profile, machine, choices, command=f"cvpipe init {hostile}")
    data = yaml.safe_load(text)
    assert data["train"]["lr"] != 5 and list(data["bakeoff"]["archs"]) == [odd_key, "resnet18"]
    assert "&" not in text.split("augment:")[1].split("train:")[0]
    for line in text.splitlines():
        assert not line.startswith("  lr: 5"), line
