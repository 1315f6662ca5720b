"""worldflow.io.atomic_path: the one atomic write (temporary in the same folder, fsync, rename)."""

import os

import pytest

from worldflow.io import atomic_path, atomic_write_text


def test_success_replaces_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "a.json"
    atomic_write_text(target, "old")
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.endswith(".tmp") and tmp != target
        tmp.write_text("new")
        assert target.read_text() == "old"  # the final name changes only on a clean exit
    assert target.read_text() == "new"
    assert [p.name for p in target.parent.iterdir()] == ["a.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # plain open() permissions, not mkstemp's 0600


def test_error_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    target = tmp_path / "v.mp4"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target, keep_suffix=True) as tmp:
        assert tmp.suffix == ".mp4"
        tmp.write_text("half")
        raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["v.mp4"]
