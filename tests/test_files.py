"""Writing files: atomically, with the umask's permissions, errors naming the user's path."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest

from minunet.files import atomic_write, check_writable, write_json


def leftovers(folder):
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_a_failing_writer_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "result.json"
    write_json(path, {"a": 1})

    def half_then_crash(stream):
        stream.write(b'{"a": ')
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, half_then_crash)
    assert json.loads(path.read_text()) == {"a": 1}
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_new_files_get_the_mode_the_umask_asks_for(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        atomic_write(tmp_path / "a.npy", lambda stream: np.save(stream, np.arange(3)))
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "a.npy").stat().st_mode) == mode
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), np.arange(3))


def test_missing_folders_are_created(tmp_path):
    write_json(tmp_path / "a" / "b" / "c.json", [1])
    assert json.loads((tmp_path / "a" / "b" / "c.json").read_text()) == [1]


def test_errors_name_the_target_not_the_temporary(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OSError, match=f"output {blocker / 'x.json'}: cannot create") as error:
        write_json(blocker / "x.json", {})
    assert ".tmp" not in str(error.value)
    with pytest.raises(OSError, match="--out .*x.npz: cannot create its folder"):
        check_writable(blocker / "x.npz", "--out")
    with pytest.raises(IsADirectoryError, match="is a folder"):
        write_json(tmp_path, {})


def test_check_writable_leaves_nothing_behind(tmp_path):
    check_writable(tmp_path / "new" / "model.npz", "--out")
    assert (tmp_path / "new").is_dir() and list((tmp_path / "new").iterdir()) == []
