import json
import time

import pytest

from tformer.nn import measured


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TFORMER_CACHE", str(tmp_path))
    monkeypatch.setattr(measured, "_chosen", {})
    return tmp_path


def counting(seconds: float, calls: list):
    def run():
        calls.append(1)
        time.sleep(seconds)

    return run


def test_the_fastest_is_timed_once_and_kept_in_the_cache(private_cache, monkeypatch):
    slow, fast = [], []
    assert measured.fastest("k", "a", {"x": counting(0.02, slow), "y": counting(0, fast)}) == "y"
    assert len(slow) == len(fast) == 1 + measured.TURNS  # a warm-up, then the turns
    assert json.loads(measured.choices_file("k").read_text()) == {"a": "y"}
    # asked again in this process: the answer, without timing
    assert measured.fastest("k", "a", {"x": counting(0, slow), "y": counting(0.02, fast)}) == "y"
    monkeypatch.setattr(measured, "_chosen", {})  # a new process reads the file: no timing
    assert measured.fastest("k", "a", {"x": counting(0, slow), "y": counting(0.02, fast)}) == "y"
    assert len(slow) == len(fast) == 1 + measured.TURNS
    # another key is timed for itself, and kept beside the first
    assert measured.fastest("k", "b", {"x": counting(0, slow), "y": counting(0.02, fast)}) == "x"
    assert json.loads(measured.choices_file("k").read_text()) == {"a": "y", "b": "x"}
    assert not measured.choices_file("other").exists()  # each kind its own file


def test_an_unreadable_or_foreign_choices_file_is_timed_again(private_cache):
    store = measured.choices_file("k")
    store.parent.mkdir(parents=True)
    store.write_text('{"a": "teleport"')  # cut short
    assert measured.fastest("k", "a", {"x": counting(0, []), "y": counting(0.02, [])}) == "x"
    assert measured.read_choices(store, ("x", "y")) == {"a": "x"}
    store.write_text('{"a": "teleport", "b": 3, "c": "y"}')
    assert measured.read_choices(store, ("x", "y")) == {"c": "y"}
    store.write_text("[1, 2]")
    assert measured.read_choices(store, ("x", "y")) == {}


def test_the_file_names_the_cpu_torch_and_threads(private_cache):
    name = measured.choices_file("attention").name
    assert name.startswith("attention.") and name.endswith("-threads.json")
    assert "/" not in name and " " not in name
