import os
import stat

import pytest

from tformer.files import atomic_write, atomic_write_json, read_json


def test_atomic_write_replaces_whole_file_and_leaves_no_temporaries(tmp_path):
    path = tmp_path / "sub" / "x.json"
    atomic_write_json(path, {"a": 1})
    atomic_write_json(path, {"a": 2})
    assert read_json(path, "test") == {"a": 2}
    assert [p.name for p in path.parent.iterdir()] == ["x.json"]


def test_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "x.json"
    atomic_write_json(path, {"a": 1})

    def crash(tmp):
        with open(tmp, "w") as f:
            f.write('{"a": ')  # half written
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        atomic_write(path, crash)
    assert read_json(path, "test") == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_written_files_get_the_usual_permissions(tmp_path):
    atomic_write_json(tmp_path / "x.json", {})
    mode = stat.S_IMODE(os.stat(tmp_path / "x.json").st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask


def test_read_json_names_the_file_and_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        read_json(tmp_path / "nope.json", "a config")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json: not valid JSON"):
        read_json(tmp_path / "bad.json", "a config")
    (tmp_path / "list.json").write_text("[1]")
    with pytest.raises(ValueError, match="expected a JSON object"):
        read_json(tmp_path / "list.json", "a config")


def test_json_writes_numpy_and_torch_scalars_as_plain_numbers(tmp_path):
    import numpy as np
    import torch

    scalars = {"a": np.int64(3), "b": np.float32(0.5), "c": torch.tensor(2)}
    atomic_write_json(tmp_path / "c.json", scalars)
    assert read_json(tmp_path / "c.json", "a config") == {"a": 3, "b": 0.5, "c": 2}
    with pytest.raises(TypeError, match="object"):
        atomic_write_json(tmp_path / "d.json", {"a": object()})
