"""bgsynth.fileio: one atomic write for every writer (durable by default, without fsync for exports)."""

from __future__ import annotations

import os
import stat

import pytest

from bgsynth.fileio import atomic_write_bytes, atomic_write_json


@pytest.mark.parametrize("durable", [True, False])
def test_atomic_write_makes_folders_replaces_and_leaves_no_temporary(tmp_path, durable):
    target = tmp_path / "a" / "b" / "x.bin"  # folders made with the first file
    atomic_write_bytes(target, b"one", durable=durable)
    atomic_write_bytes(str(target), b"two", durable=durable)
    assert target.read_bytes() == b"two"
    assert sorted(p.name for p in target.parent.iterdir()) == ["x.bin"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask  # what open() would give


def test_a_failed_write_keeps_the_old_file_and_removes_its_temporary(tmp_path):
    target = tmp_path / "r.json"
    atomic_write_json(target, {"a": 1})

    class Bad:
        def __len__(self):
            return 3

        def __buffer__(self, flags):
            raise RuntimeError("disk gone")

    with pytest.raises((RuntimeError, TypeError)):
        atomic_write_bytes(target, Bad())
    assert target.read_text() == '{"a": 1}' and [p.name for p in tmp_path.iterdir()] == ["r.json"]
