import json
import time

import pytest
import torch

from tformer.nn import measured
from tformer.nn.measured import choices_file  # the real one (conftest redirects the module's)


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TFORMER_CACHE", str(tmp_path))
    monkeypatch.setattr(measured, "choices_file", choices_file)
    monkeypatch.setattr(measured, "_chosen", {})
    return tmp_path


def pick(key: str, runs: dict) -> str:
    """measured.fastest of kind "k" over these runs."""
    return measured.fastest("k", key, tuple(runs), lambda: runs)


def counting(seconds: float, calls: list):
    def run():
        calls.append(1)
        time.sleep(seconds)

    return run


def test_the_fastest_is_timed_once_and_kept_in_the_cache(private_cache, monkeypatch):
    slow, fast = [], []
    assert pick("a", {"x": counting(0.02, slow), "y": counting(0, fast)}) == "y"
    assert len(slow) == len(fast) == 1 + measured.TURNS  # a warm-up, then the turns
    assert json.loads(measured.choices_file("k").read_text()) == {"a": "y"}
    # asked again in this process: the answer, without even making the candidates
    assert measured.fastest("k", "a", ("x", "y"), lambda: pytest.fail("made")) == "y"
    assert pick("a", {"x": counting(0, slow), "y": counting(0.02, fast)}) == "y"
    monkeypatch.setattr(measured, "_chosen", {})  # a new process reads the file: no timing
    assert pick("a", {"x": counting(0, slow), "y": counting(0.02, fast)}) == "y"
    assert len(slow) == len(fast) == 1 + measured.TURNS
    # another key is timed for itself, and kept beside the first
    assert pick("b", {"x": counting(0, slow), "y": counting(0.02, fast)}) == "x"
    assert json.loads(measured.choices_file("k").read_text()) == {"a": "y", "b": "x"}
    assert not measured.choices_file("other").exists()  # each kind its own file


def test_a_kind_may_ask_for_more_turns(private_cache):
    slow, fast = [], []
    runs = {"x": counting(0.002, slow), "y": counting(0, fast)}
    assert measured.fastest("k", "c", ("x", "y"), lambda: runs, turns=12) == "y"
    assert len(slow) == len(fast) == 1 + 12


def test_an_unreadable_or_foreign_choices_file_is_timed_again(private_cache):
    store = measured.choices_file("k")
    store.parent.mkdir(parents=True)
    store.write_text('{"a": "teleport"')  # cut short
    assert pick("a", {"x": counting(0, []), "y": counting(0.02, [])}) == "x"
    assert measured.read_choices(store, ("x", "y")) == {"a": "x"}
    store.write_text('{"a": "teleport", "b": 3, "c": "y"}')
    assert measured.read_choices(store, ("x", "y")) == {"c": "y"}
    store.write_text("[1, 2]")
    assert measured.read_choices(store, ("x", "y")) == {}


def test_the_file_names_the_cpu_torch_and_threads(tmp_path, monkeypatch):
    monkeypatch.setenv("TFORMER_CACHE", str(tmp_path))
    path = choices_file("attention-v1")
    assert path.parent == tmp_path / "kernels"
    assert path.name.startswith("attention-v1.") and path.name.endswith("-threads.json")
    assert torch.__version__ in path.name and " " not in path.name


def test_under_checkpointing_the_timing_leaves_the_recomputation_alone(private_cache):
    """The timing's own backward passes run inside a checkpointed forward pass; the
    checkpoint must see the same tensors saved when it recomputes (a fresh cache: timed)."""
    layer = torch.nn.Linear(4, 4)

    def forward(x):
        def run():
            y = layer(torch.randn(3, 4)).sum()
            y.backward()

        pick("a", {"x": run, "y": run})
        return layer(x).relu()

    x = torch.randn(2, 4, requires_grad=True)
    out = torch.utils.checkpoint.checkpoint(forward, x, use_reentrant=False)
    out.sum().backward()
    assert x.grad is not None


def test_under_torch_compile_nothing_is_timed(private_cache, monkeypatch):
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    calls = []
    assert pick("a", {"x": counting(0, calls), "y": counting(0, calls)}) == "x"
    assert calls == [] and measured._chosen == {}


def test_a_kind_s_file_keeps_every_key_whatever_names_it_was_chosen_from():
    """Keys of one kind may choose among different names (the short and long attention
    paths): timing one must not drop the others' choices; one name is not timed at all."""
    assert measured.fastest(
        "mix-v1", "one", ("a", "b"), lambda: {"a": lambda: None, "b": lambda: None}
    ) in ("a", "b")
    first = measured.read_choices(measured.choices_file("mix-v1"), ("a", "b"))
    measured._chosen.clear()
    measured.fastest("mix-v1", "two", ("c", "d"), lambda: {"c": lambda: None, "d": lambda: None})
    kept = measured.read_choices(measured.choices_file("mix-v1"), ("a", "b", "c", "d"))
    assert kept["one"] == first["one"] and kept["two"] in ("c", "d")
    assert measured.fastest("mix-v1", "three", ("e",), lambda: pytest.fail("timed")) == "e"
    assert "three" not in measured.read_choices(measured.choices_file("mix-v1"), ("e",))
