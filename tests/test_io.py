import json
import os

import numpy as np
import pytest

from ensembler import _io


def test_atomic_write_replaces_whole_file(tmp_path):
    p = tmp_path / "a.json"
    _io.write_json_atomic(p, {"x": 1})
    _io.write_json_atomic(p, {"x": np.int64(2), "arr": np.arange(2)})
    assert json.loads(p.read_text()) == {"x": 2, "arr": [0, 1]}
    assert os.listdir(tmp_path) == ["a.json"]


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path):
    p = tmp_path / "a.txt"
    _io.write_text_atomic(p, "old")
    with pytest.raises(RuntimeError):
        with _io.atomic_write(p, "w") as fh:
            fh.write("half of the new")
            raise RuntimeError("crash mid-write")
    assert p.read_text() == "old"
    assert os.listdir(tmp_path) == ["a.txt"]


def test_atomic_path_and_bytes(tmp_path):
    p = tmp_path / "l.bin"
    _io.write_bytes_atomic(p, b"payload")
    q = tmp_path / "w.bin"
    with pytest.raises(ValueError):
        with _io.atomic_path(q) as tmp:
            tmp.write_bytes(b"x")
            raise ValueError
    assert not q.exists() and os.listdir(tmp_path) == ["l.bin"]
    assert _io.sha256_file(p) == _io.sha256_bytes(p.read_bytes())


def test_written_files_get_normal_permissions(tmp_path):
    p = tmp_path / "shared.json"
    _io.write_json_atomic(p, {})
    mask = os.umask(0)
    os.umask(mask)
    assert (p.stat().st_mode & 0o777) == (0o666 & ~mask)
