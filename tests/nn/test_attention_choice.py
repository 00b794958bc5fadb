import json
import time

import pytest
import torch

from tformer.nn import attention as attention_module
from tformer.nn import attention_choice as choice
from tformer.nn.attention import QUERY_BLOCK, MultiHeadAttention


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TFORMER_CACHE", str(tmp_path))
    monkeypatch.setattr(choice, "_chosen", {})
    return tmp_path


def counting(seconds: float, calls: list):
    def path(q, k, v):
        calls.append(1)
        time.sleep(seconds)
        return q * k + v

    return path


def test_the_faster_path_is_measured_once_and_kept_in_the_cache(private_cache, monkeypatch):
    q = torch.zeros(1, 2, 3, 4, dtype=torch.bfloat16)
    slow, fast = [], []
    assert choice.long_attention_path(q, counting(0.02, slow), counting(0.0, fast)) == "fused"
    assert len(slow) == len(fast) == 1 + choice.TURNS  # a warm-up, then the turns
    assert json.loads(choice.choice_file().read_text()) == {"1x2x3x4 bfloat16": "fused"}
    assert choice.long_attention_path(q, counting(0.0, slow), counting(0.02, fast)) == "fused"
    monkeypatch.setattr(choice, "_chosen", {})  # a new process reads the file: no timing
    assert choice.long_attention_path(q, counting(0.0, slow), counting(0.02, fast)) == "fused"
    assert len(slow) == len(fast) == 1 + choice.TURNS
    other = torch.zeros(2, 2, 3, 4)  # another shape and dtype: measured for itself
    assert choice.long_attention_path(other, counting(0.0, slow), counting(0.02, fast)) == (
        "blocked"
    )
    assert json.loads(choice.choice_file().read_text()) == {
        "1x2x3x4 bfloat16": "fused",
        "2x2x3x4 float32": "blocked",
    }


def test_an_unreadable_choice_file_is_measured_again(private_cache):
    choice.choice_file().parent.mkdir(parents=True)
    choice.choice_file().write_text('{"1x2x3x4 float32": "teleport"')
    q = torch.zeros(1, 2, 3, 4)
    assert choice.long_attention_path(q, counting(0.0, []), counting(0.02, [])) == "blocked"
    assert choice.read_choices(choice.choice_file()) == {"1x2x3x4 float32": "blocked"}
    choice.choice_file().write_text('{"1x2x3x4 float32": "teleport", "x": 3}')
    assert choice.read_choices(choice.choice_file()) == {}


def test_off_the_cpu_the_fused_kernel_runs_without_timing():
    calls = []
    q = torch.zeros(1, 2, 3, 4, device="meta")
    assert choice.long_attention_path(q, counting(0, calls), counting(0, calls)) == "fused"
    assert calls == []


@pytest.mark.parametrize("path", choice.PATHS)
def test_either_choice_trains_as_the_explicit_path(private_cache, monkeypatch, path):
    t = QUERY_BLOCK + 21
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, t, 32, generator=g)
    grad = torch.randn(2, t, 32, generator=g)
    taken = []
    for name in ("fused_causal", "blocked_causal_attention"):
        original = getattr(attention_module, name)

        def recorded(*args, original=original, name=name):
            taken.append(name)
            return original(*args)

        monkeypatch.setattr(attention_module, name, recorded)
    torch.manual_seed(0)
    explicit = MultiHeadAttention(32, 4, causal=True, implementation="explicit")
    blocked = MultiHeadAttention(32, 4, causal=True, implementation="blocked")
    blocked.load_state_dict(explicit.state_dict())
    monkeypatch.setitem(choice._chosen, f"2x4x{t}x8 bfloat16", path)
    results = []
    for module in (explicit, blocked):
        inputs = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = module(inputs)
        out.float().backward(grad)
        results.append([out.float(), inputs.grad, *(p.grad for p in module.parameters())])
    for ours, reference in zip(results[1], results[0], strict=True):
        scale = reference.abs().max()  # bf16's rounding, relative to each tensor's size
        torch.testing.assert_close(ours / scale, reference / scale, rtol=0, atol=2e-2)
    assert taken == ["fused_causal" if path == "fused" else "blocked_causal_attention"]
    assert not choice.choice_file().exists()  # the forced choice was not measured
