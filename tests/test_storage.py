"""cvpipe.core.storage: atomic copies, removal, CSV and PNG writers (local and fsspec memory://; gs:// paths are
covered by the GCS emulator tests)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import uuid

import pytest

from cvpipe.core import storage


def test_copy_file_links_locally_and_stays_independent_of_later_writes(tmp_path):
    src, dst = tmp_path / "best.pt", tmp_path / "sub" / "last.pt"
    storage.write_bytes(src, b"epoch 3")
    storage.copy_file(src, dst)
    assert dst.read_bytes() == b"epoch 3" and os.stat(src).st_ino == os.stat(dst).st_ino  # no second write
    storage.write_bytes(dst, b"epoch 4")  # writers replace by rename: the other name keeps its bytes
    assert src.read_bytes() == b"epoch 3" and dst.read_bytes() == b"epoch 4"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["best.pt", "last.pt", "sub"]  # no temp files left


def test_remove_is_quiet_about_missing_files(tmp_path):
    f = tmp_path / "x"
    f.write_text("1")
    storage.remove(f)
    storage.remove(f)
    assert not f.exists()


def test_copy_file_falls_back_to_a_byte_copy_without_hard_links(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_links)
    src, dst = tmp_path / "best.pt", tmp_path / "last.pt"
    storage.write_bytes(src, b"x" * 3_000_000)
    storage.copy_file(src, dst)
    assert dst.read_bytes() == src.read_bytes() and os.stat(src).st_ino != os.stat(dst).st_ino
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt"]


# -- write_csv / save_png: the one CSV writer and the one figure writer of every stage ----------------------


def _no_temp_files(folder) -> bool:
    return not [p for p in os.listdir(folder) if storage.TMP_MARKER in p]


def test_write_csv_bytes_dict_and_sequence_rows(tmp_path):
    path = tmp_path / "sub" / "t.csv"
    rows = [
        {"a": 1, "b": 0.1 + 0.2, "c": None, "ignored": "x"},  # a float as str() writes it, None as empty
        {"a": "com,ma", "c": 'quo"te'},  # a missing key is an empty field; minimal quoting
        ["multi\nline", True, 2.5],  # a sequence is written as it is
    ]
    storage.write_csv(path, ["a", "b", "c"], iter(rows))
    assert path.read_bytes() == b'a,b,c\n1,0.30000000000000004,\n"com,ma",,"quo""te"\n"multi\nline",True,2.5\n'
    storage.write_csv(path, ("only",), [])
    assert path.read_bytes() == b"only\n"
    assert _no_temp_files(path.parent)


def test_write_csv_only_if_changed_leaves_the_same_bytes_untouched(tmp_path):
    path = tmp_path / "m.csv"
    storage.write_csv(path, ["id"], [["x"]], only_if_changed=True)
    before = os.stat(path)
    storage.write_csv(path, ["id"], [{"id": "x"}], only_if_changed=True)
    after = os.stat(path)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    storage.write_csv(path, ["id"], [["y"]], only_if_changed=True)
    assert path.read_text() == "id\ny\n" and os.stat(path).st_ino != before.st_ino  # replaced by rename


def test_write_csv_only_if_changed_compares_contents_not_just_sizes(tmp_path):
    path = tmp_path / "m.csv"
    storage.write_csv(path, ["id"], [["x"]], only_if_changed=True)
    storage.write_csv(path, ["id"], [["y"]], only_if_changed=True)  # the same size, other bytes
    assert path.read_text() == "id\ny\n" and _no_temp_files(tmp_path)


def test_write_csv_streams_rows_to_disk_instead_of_building_the_file_in_memory(tmp_path):
    """A million-row manifest must not sit in memory as text: by the last row, the earlier ones are on disk."""
    path = tmp_path / "manifest.csv"
    on_disk = []

    def rows():
        for i in range(20_000):
            yield [f"{i:08d}", "x" * 40]
        temp = [p for p in tmp_path.iterdir() if storage.TMP_MARKER in p.name]
        on_disk.append(sum(p.stat().st_size for p in temp))

    storage.write_csv(path, ["id", "pad"], rows())
    assert on_disk[0] > 500_000  # of ~1 MB: all but the write buffer
    assert path.stat().st_size == len("id,pad\n") + 20_000 * 50 and _no_temp_files(tmp_path)


def test_write_csv_a_failing_row_leaves_the_old_file_intact(tmp_path):
    path = tmp_path / "history.csv"
    storage.write_csv(path, ["epoch"], [[1]])

    def rows():
        yield [1]
        yield [2]
        raise RuntimeError("the third row failed")

    with pytest.raises(RuntimeError, match="third row"):
        storage.write_csv(path, ["epoch"], rows())
    assert path.read_bytes() == b"epoch\n1\n" and _no_temp_files(tmp_path)


def test_write_csv_and_save_png_write_through_fsspec_urls():
    plt = _pyplot()
    base = f"memory://cvpipe-test-{uuid.uuid4().hex}"
    storage.write_csv(f"{base}/r/t.csv", ["a", "b"], [[1, None]])
    assert storage.read_bytes(f"{base}/r/t.csv") == b"a,b\n1,\n"
    fig, ax = plt.subplots(figsize=(2, 2), dpi=50)
    storage.save_png(fig, f"{base}/r/p.png")
    assert storage.read_bytes(f"{base}/r/p.png").startswith(b"\x89PNG\r\n\x1a\n")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def test_save_png_writes_the_figure_bytes_and_closes_it(tmp_path):
    plt = _pyplot()

    def figure():
        fig, ax = plt.subplots(figsize=(3, 2), dpi=80)
        ax.plot([0, 1, 2], [2, 0, 1])
        return fig

    expected = io.BytesIO()
    reference = figure()
    reference.savefig(expected, format="png", dpi=40, bbox_inches="tight")
    plt.close(reference)
    fig = figure()
    storage.save_png(fig, tmp_path / "plots" / "p.png", dpi=40, bbox_inches="tight")
    assert (tmp_path / "plots" / "p.png").read_bytes() == expected.getvalue()
    assert not plt.fignum_exists(fig.number)
    assert storage.png_bytes(figure(), dpi=40, bbox_inches="tight") == expected.getvalue()
    assert plt.get_fignums() == [] and _no_temp_files(tmp_path / "plots")


def test_save_png_a_failing_render_leaves_the_old_file_intact_and_closes_the_figure(tmp_path):
    plt = _pyplot()
    path = tmp_path / "p.png"
    path.write_bytes(b"old picture")
    fig, ax = plt.subplots()
    with pytest.raises(TypeError):
        storage.save_png(fig, path, no_such_savefig_keyword=1)
    assert path.read_bytes() == b"old picture" and _no_temp_files(tmp_path)
    assert not plt.fignum_exists(fig.number)


def test_storage_imports_no_plotting_library():
    code = "import sys, cvpipe.core.storage; sys.exit('matplotlib' in sys.modules or 'torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0
