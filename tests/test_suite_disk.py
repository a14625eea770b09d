"""The suite's own disk discipline (see tests/conftest.py): it writes ~30 GB in all, so scratch
folders must go when their test or module ends. A session-scoped fixture that makes folders with
``tmp_path_factory`` would have them swept after its first module, so none may exist."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def _fixture_scope(decorator: ast.expr) -> str | None:
    call = decorator if isinstance(decorator, ast.Call) else None
    target = call.func if call else decorator
    name = target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", "")
    if name != "fixture":
        return None
    for kw in call.keywords if call else []:
        if kw.arg == "scope" and isinstance(kw.value, ast.Constant):
            return kw.value.value
    return "function"


def session_fixtures_making_folders(source: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef):
            scopes = {_fixture_scope(d) for d in node.decorator_list} - {None}
            args = {a.arg for a in node.args.args}
            if "session" in scopes and "tmp_path_factory" in args:
                found.append(node.name)
    return found


def test_no_session_fixture_makes_scratch_folders():
    offenders = {p.name: names for p in sorted(TESTS.glob("*.py"))
                 if (names := session_fixtures_making_folders(p.read_text()))}
    assert offenders == {}, f"session-scoped fixtures with tmp_path_factory (make them module-scoped): {offenders}"


def test_the_check_sees_a_session_fixture_with_tmp_path_factory():
    src = "import pytest\n@pytest.fixture(scope='session')\ndef data(tmp_path_factory):\n    pass\n"
    assert session_fixtures_making_folders(src) == ["data"]
    assert session_fixtures_making_folders(src.replace("'session'", "'module'")) == []


def test_retention_keeps_only_failed_tests_folders():
    import tomllib

    opts = tomllib.loads((TESTS.parent / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert opts["tmp_path_retention_policy"] == "failed"


_MODULE_A = """
def test_makes_a_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("scratch")
    (path / "f").write_bytes(b"x" * 1000)
    (tmp_path_factory.getbasetemp().parent / "made.txt").write_text(str(path))
    assert {ok}
"""
_MODULE_B = """
from pathlib import Path

def test_the_folder_of_the_module_before(tmp_path_factory):
    made = Path((tmp_path_factory.getbasetemp().parent / "made.txt").read_text())
    assert made.exists() is {kept}
"""


def _inner_suite(tmp_path: Path, a_passes: bool) -> subprocess.CompletedProcess:
    suite = tmp_path / "suite"
    suite.mkdir(parents=True)
    (tmp_path / "base").mkdir()
    shutil.copy(TESTS / "conftest.py", suite / "conftest.py")
    (suite / "test_a.py").write_text(_MODULE_A.format(ok=a_passes))
    (suite / "test_b.py").write_text(_MODULE_B.format(kept=not a_passes))
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(suite),
                           "--basetemp", str(tmp_path / "base" / "bt"), str(suite)],
                          capture_output=True, text=True, timeout=120, cwd=suite)


def test_a_module_s_folders_are_swept_when_it_ends_and_kept_when_it_failed(tmp_path):
    passed = _inner_suite(tmp_path / "pass", a_passes=True)
    assert passed.returncode == 0, passed.stdout[-3000:]
    failed = _inner_suite(tmp_path / "fail", a_passes=False)
    assert "1 failed, 1 passed" in failed.stdout, failed.stdout[-3000:]
