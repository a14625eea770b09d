"""cvpipe.core.storage: atomic copies and removal (local; gs:// paths are covered by the GCS emulator tests)."""

from __future__ import annotations

import os

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
