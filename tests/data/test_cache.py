import json

import pytest

from tformer.data.cache import read_cache
from tformer.errors import DataError


def read_records(path):
    return [json.loads(line)["split"] for line in path.read_text().splitlines()]


def test_a_cache_reads_as_written(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"split": "train"}\n')
    assert read_cache(path, "some-set", read_records) == ["train"]


@pytest.mark.parametrize("content", ['{"split": "train"}\n{', '{"other": 1}\n', "[1]\n"])
def test_a_damaged_cache_says_to_delete_it(tmp_path, content):
    path = tmp_path / "c.jsonl"
    path.write_text(content)
    with pytest.raises(DataError) as caught:
        read_cache(path, "some-set", read_records)
    assert caught.value.where == str(path)
    assert caught.value.problem.startswith("a damaged cache of some-set (")
    assert "delete it and the next run builds it again" in caught.value.problem
