import pytest
import torch

from tformer.nn import attention as attention_module
from tformer.nn import attention_choice as choice
from tformer.nn import attention_step, measured
from tformer.nn.attention import QUERY_BLOCK, MultiHeadAttention
from tformer.nn.flash_attention import flash_takes
from tformer.nn.kv_cache import KVCache


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TFORMER_CACHE", str(tmp_path))
    monkeypatch.setattr(measured, "_chosen", {})
    return tmp_path


def test_off_the_cpu_the_fused_kernel_runs_without_timing():
    calls = []
    q = torch.zeros(1, 2, 3, 4, device="meta")
    paths = {"blocked": calls.append, "fused": calls.append}
    assert choice.long_attention_path(q, paths) == "fused"
    assert calls == []


def test_the_faster_path_is_timed_forward_and_backward(private_cache):
    calls = []

    def path(name):
        def run(q, k, v):
            calls.append((name, q.shape, q.requires_grad, q.is_contiguous()))
            return q * k + v

        return run

    q = torch.zeros(2, 3, 5, 4, dtype=torch.bfloat16)
    paths = {name: path(name) for name in choice_names()}
    assert choice.long_attention_path(q, paths) in choice_names()
    assert {c[0] for c in calls} == {"blocked", "fused"}
    # the heads of a projection: (B, H, T, D) views of (B, T, H, D), with gradients
    assert all(c[1] == q.shape and c[2] and not c[3] for c in calls)
    key = choice.choice_key(q)
    assert key == "2x3x5x4 bfloat16"
    assert measured.read_choices(measured.choices_file(choice.KIND), choice_names()) == {
        key: measured._chosen[choice.KIND, key, torch.get_num_threads()]
    }


def choice_names() -> tuple[str, ...]:
    return ("blocked", "fused")


def test_short_attention_times_the_kernels_this_cpu_runs(private_cache, compiled, monkeypatch):
    """The short kernel is chosen among those built and taken here, each timed forward and
    backward on the first call for a shape, then read from the cache; with only the kernel
    of float32 products, it is taken untimed."""
    calls = []
    for name in ("causal_attention", "causal_attention_backward", "flash_attention"):
        original = getattr(type(compiled), name)

        def counted(self, *args, name=name, original=original, **kwargs):
            pairs = kwargs.get("pairs", args[2] if name == "causal_attention" else False)
            calls.append(name + (" pairs" if pairs is True else ""))
            return original(self, *args, **kwargs)

        monkeypatch.setattr(type(compiled), name, counted)
    qkv = torch.empty(2, 16, 3 * 2 * 16, dtype=torch.bfloat16)
    expected = {"kernel"}
    if compiled.attention_pairs_available():
        expected.add("pairs")
    if flash_takes(qkv.unflatten(-1, (6, -1))):
        expected.add("flash")
    chosen = choice.short_attention_kernel(qkv, 2, compiled)
    assert chosen in expected
    timed = {"kernel": "causal_attention", "pairs": "causal_attention pairs"}
    timed["flash"] = "flash_attention"
    assert {timed[name] for name in expected} <= set(calls)
    stored = measured.read_cached_json(measured.choices_file(choice.KIND))
    assert stored == ({"2x16x96 2 heads, short bfloat16": chosen} if len(expected) > 1 else {})
    calls.clear()
    assert choice.short_attention_kernel(qkv, 2, compiled) == chosen and calls == []
    monkeypatch.setattr(measured, "_chosen", {})
    monkeypatch.setattr(type(compiled), "attention_pairs_available", lambda self: False)
    monkeypatch.setattr(choice, "flash_takes", lambda heads: False)
    assert choice.short_attention_kernel(qkv[:1], 2, compiled) == "kernel" and calls == []


def record_calls(monkeypatch, names: tuple[str, ...]) -> list[str]:
    """The names of the attention module's functions `names`, in the order they are called
    (" pairs" added where the compiled kernel is asked for its bf16 pairs)."""
    taken = []
    for name in names:
        original = getattr(attention_module, name)

        def recorded(*args, original=original, name=name, **kwargs):
            taken.append(name + (" pairs" if kwargs.get("pairs") else ""))
            return original(*args, **kwargs)

        monkeypatch.setattr(attention_module, name, recorded)
    return taken


def trains_as(module, reference, x, grad, dtype=torch.bfloat16):
    """module's output and gradients, under bf16 autocast or in float32, equal reference's
    to that dtype's rounding, relative to each tensor's size."""
    results = []
    for m in (module, reference):
        inputs = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            out = m(inputs)
        out.float().backward(grad)
        results.append([out.float(), inputs.grad, *(p.grad for p in m.parameters())])
    tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-5
    for ours, expected in zip(*results, strict=True):
        scale = expected.abs().max()
        torch.testing.assert_close(ours / scale, expected / scale, rtol=0, atol=tolerance)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("path", ["blocked", "fused", "flash"])
def test_each_choice_trains_as_the_explicit_path(private_cache, monkeypatch, request, path, dtype):
    """A long sequence in training, each measured path forced: bf16 under autocast (its
    FlashAttention kernel; on a CPU without AMX the float32 one in its place, conftest.py's
    bf16_flash) and float32 (its kernel on any CPU the kernels build for)."""
    if path == "flash":  # (the float32 kernel needs the compiled kernels)
        request.getfixturevalue("bf16_flash" if dtype == torch.bfloat16 else "compiled")
    t = QUERY_BLOCK + 21
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, t, 128, generator=g)
    grad = torch.randn(2, t, 128, generator=g)
    names = ("fused_causal", "blocked_causal_attention", "flash_causal_projection")
    taken = record_calls(monkeypatch, names)
    torch.manual_seed(0)
    explicit = MultiHeadAttention(128, 4, causal=True, implementation="explicit")
    blocked = MultiHeadAttention(128, 4, causal=True, implementation="blocked")
    blocked.load_state_dict(explicit.state_dict())
    key = (choice.KIND, f"2x4x{t}x32 {measured.dtype_name(dtype)}", torch.get_num_threads())
    monkeypatch.setitem(measured._chosen, key, path)
    trains_as(blocked, explicit, x, grad, dtype)
    # flash takes the fused projection whole (its gradient comes back in that layout)
    called = {"blocked": "blocked_causal_attention", "fused": "fused_causal"}
    assert taken == [called.get(path, "flash_causal_projection")]
    assert not measured.choices_file(choice.KIND).exists()  # forced: not timed


def test_the_first_timing_inside_a_checkpointed_layer_trains(private_cache):
    """Activation checkpointing recomputes the layer's forward pass; the timing inside the
    first one (nothing cached yet) must not change what that pass saved."""
    attention = MultiHeadAttention(16, 2, causal=True, implementation="blocked")
    x = torch.randn(1, QUERY_BLOCK + 2, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = torch.utils.checkpoint.checkpoint(attention, x, use_reentrant=False)
    out.float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert measured.choices_file(choice.KIND).exists()  # it was timed in there


@pytest.mark.parametrize("path", ["kernel", "pairs", "flash", "flash step"])
def test_each_choice_of_short_attention_trains_as_the_explicit_path(monkeypatch, request, path):
    """At most QUERY_BLOCK positions: the compiled kernel (float32 products, or bf16 pairs
    where the CPU has AVX-512 BF16) or the FlashAttention kernel (on a CPU without AMX, its
    float32 kernel in the bf16 one's place: conftest.py's bf16_flash), as chosen for the
    shape (forced here); with the kernel chosen, a small layer's sublayer trains as one step
    (nn/attention_step.py), and, where a hook on a projection must see it, through the
    modules."""
    if path == "pairs" and not request.getfixturevalue("compiled").attention_pairs_available():
        pytest.skip("the bf16 pairs' attention kernel needs a CPU with AVX-512 BF16")
    if path.startswith("flash"):
        request.getfixturevalue("bf16_flash")
    t, width, heads = QUERY_BLOCK - 28, 128, 4
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, t, width, generator=g)
    grad = torch.randn(2, t, width, generator=g)
    torch.manual_seed(0)
    explicit = MultiHeadAttention(width, heads, causal=True, implementation="explicit")
    blocked = MultiHeadAttention(width, heads, causal=True, implementation="blocked")
    blocked.load_state_dict(explicit.state_dict())
    if path == "flash":  # a hook on the output projection keeps the modules' path
        blocked.w_o.register_forward_hook(lambda module, inputs, output: None)
    key = (choice.KIND, f"2x{t}x{3 * width} {heads} heads, short bfloat16", torch.get_num_threads())
    monkeypatch.setitem(measured._chosen, key, path.removesuffix(" step"))
    taken = record_calls(monkeypatch, ("compiled_causal_attention", "flash_causal_projection"))
    attend = attention_step.attend
    monkeypatch.setattr(attention_step, "attend", lambda *a: taken.append("step") or attend(*a))
    trains_as(blocked, explicit, x, grad)
    expected = {
        "kernel": "compiled_causal_attention",
        "pairs": "compiled_causal_attention pairs",
        "flash": "flash_causal_projection",
        "flash step": "step",
    }
    assert taken == [expected[path]]


@pytest.mark.parametrize("t", [QUERY_BLOCK - 28, QUERY_BLOCK + 21])
def test_float32_outside_the_measured_path_takes_torchs_fused_kernel_unless_hooked(t):
    """Short sequences, and long ones with padding, in float32: torch's fused kernel (the
    "sdpa" path's numbers, bit for bit); with a hook on the weights, the explicit path,
    whose hook sees them."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, t, 64, generator=g)
    padding = torch.ones(2, t, dtype=torch.bool)
    padding[1, -5:] = False
    torch.manual_seed(0)
    blocked = MultiHeadAttention(64, 4, causal=True, implementation="blocked")
    sdpa = MultiHeadAttention(64, 4, causal=True, implementation="sdpa")
    sdpa.load_state_dict(blocked.state_dict())
    for mask in (None, padding):
        with torch.no_grad():
            assert torch.equal(blocked(x, attention_mask=mask), sdpa(x, attention_mask=mask))
    seen = []
    blocked.hook_pattern.register_forward_hook(lambda module, args, out: seen.append(out))
    with torch.no_grad():
        out = blocked(x, attention_mask=padding)
    assert len(seen) == 1 and seen[0].shape == (2, 4, t, t)
    torch.testing.assert_close(out, sdpa(x, attention_mask=padding), rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_hook_on_the_weights_sees_them_in_long_training_too(private_cache, dtype):
    """A long causal sequence in training, where a measured path (fused, FlashAttention,
    query blocks) would never form the weights: with a hook on them, the explicit path."""
    t = QUERY_BLOCK + 21
    x = torch.randn(2, t, 64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    blocked = MultiHeadAttention(64, 4, causal=True, implementation="blocked")
    seen = []
    blocked.hook_pattern.register_forward_hook(lambda module, args, out: seen.append(out))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        out = blocked(x)
    out.float().sum().backward()
    assert len(seen) == 1 and seen[0].shape == (2, 4, t, t)
    assert x.grad is not None and not measured.choices_file(choice.KIND).exists()  # not timed


@pytest.mark.parametrize("path", ["fused", "flash"])
@pytest.mark.parametrize("implementation", ["sdpa", "blocked"])
def test_a_prompt_in_inference_takes_the_chosen_kernel(
    private_cache, monkeypatch, path, implementation
):
    """A prompt's causal self-attention in float32 without a gradient (into an empty KV
    cache or without one; under inference_mode or no_grad) runs in the kernel chosen for
    its shape (forced here: torch's fused kernel or FlashAttention) and equals the explicit
    path; a token after it (T = 1), a chunk of a prompt after cached positions, padding or
    a gradient keep torch's fused kernel."""
    if path == "flash" and not flash_takes(torch.zeros(1, 1, 1, 32)):
        pytest.skip("no compiled kernels here")
    t = choice.PROMPT_FROM + 9  # timed at the power of two below
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, t + 5, 128, generator=g)  # timed at 2 rows
    torch.manual_seed(0)
    explicit = MultiHeadAttention(128, 4, causal=True, implementation="explicit")
    fast = MultiHeadAttention(128, 4, causal=True, implementation=implementation)
    fast.load_state_dict(explicit.state_dict())
    key = f"2x4x{choice.PROMPT_FROM}x32 float32, inference"
    monkeypatch.setitem(measured._chosen, (choice.PROMPT_KIND, key, torch.get_num_threads()), path)
    taken = record_calls(monkeypatch, ("fused_attention", "flash_causal"))
    chosen = {"fused": "fused_attention", "flash": "flash_causal"}[path]
    with torch.inference_mode():
        expected = explicit(x[:, :t])
        reference = explicit(x, cache=KVCache(3, 4, t + 5, 32))
    for mode in (torch.inference_mode, torch.no_grad):
        taken.clear()
        with mode():
            torch.testing.assert_close(fast(x[:, :t]), expected, rtol=0, atol=1e-5)
            cache = KVCache(3, 4, t + 5, 32)
            prompt = fast(x[:, :t], cache=cache)
            token = fast(x[:, t : t + 1], cache=cache)  # one more position after the prompt
            chunk = fast(x[:, t + 1 :], cache=cache)  # four more: a mask for the cached ones
        assert taken == [chosen, chosen, "fused_attention", "fused_attention"], mode
        torch.testing.assert_close(prompt, expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(token, reference[:, t : t + 1], rtol=0, atol=1e-5)
        torch.testing.assert_close(chunk, reference[:, t + 1 :], rtol=0, atol=1e-5)
    taken.clear()
    with torch.no_grad():
        fast(x[:, :t], attention_mask=torch.ones(3, t, dtype=torch.bool))  # padding: a mask
    assert taken == ["fused_attention"]
    if implementation == "sdpa":  # ("blocked" trains on paths of its own)
        taken.clear()
        fast(x[:, :t].clone().requires_grad_())
        assert taken == ["fused_attention"]
    assert not measured.choices_file(choice.PROMPT_KIND).exists()  # forced: not timed


def test_a_prompt_with_a_float32_cache_under_autocast_keeps_torchs_kernel(
    private_cache, monkeypatch
):
    """Under bf16 autocast the queries are bf16 and a float32 cache hands back float32 keys
    and values: only torch's kernel takes that mix, whatever was chosen for the shape.
    (Where bf16 has a FlashAttention kernel, AMX, forcing "flash" would otherwise run it.)"""
    x = torch.randn(1, choice.PROMPT_FROM, 64)
    attention = MultiHeadAttention(64, 2, causal=True)
    for dtype in ("float32", "bfloat16"):
        key = (
            choice.PROMPT_KIND,
            f"1x2x{choice.PROMPT_FROM}x32 {dtype}, inference",
            torch.get_num_threads(),
        )
        monkeypatch.setitem(measured._chosen, key, "flash")
    taken = record_calls(monkeypatch, ("fused_attention", "flash_causal"))
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention(x, cache=KVCache(1, 2, choice.PROMPT_FROM, 32))
    assert taken == ["fused_attention"] and out.shape == x.shape


def test_a_prompts_kernel_is_timed_once_forward_only(private_cache, monkeypatch):
    """Unforced, the first prompt of a shape times both kernels forward only (inference)
    and keeps the choice; a prompt of the same range after it is not timed again; a prompt
    shorter than PROMPT_FROM is not timed."""
    torch.manual_seed(0)
    attention = MultiHeadAttention(64, 2, causal=True)
    explicit = MultiHeadAttention(64, 2, causal=True, implementation="explicit")
    explicit.load_state_dict(attention.state_dict())
    seen = []
    run = measured._time
    monkeypatch.setattr(
        measured,
        "_time",
        lambda c, turns: seen.append(torch.is_inference_mode_enabled()) or run(c, turns),
    )
    x = torch.randn(1, 2 * choice.PROMPT_FROM - 1, 64)
    with torch.no_grad():
        attention(x[:, : choice.PROMPT_FROM - 1])
        assert not measured.choices_file(choice.PROMPT_KIND).exists() and seen == []
        out = attention(x[:, : choice.PROMPT_FROM + 1])
        again = attention(x)  # the same power of two below
        torch.testing.assert_close(out, explicit(x[:, : choice.PROMPT_FROM + 1]), rtol=0, atol=1e-5)
        torch.testing.assert_close(again, explicit(x), rtol=0, atol=1e-5)
    kept = measured.read_choices(measured.choices_file(choice.PROMPT_KIND), ("fused", "flash"))
    if flash_takes(torch.zeros(1, 1, 1, 32)):
        key = f"1x2x{choice.PROMPT_FROM}x32 float32, inference"
        assert list(kept) == [key] and kept[key] in ("fused", "flash")
        assert seen == [True]  # timed once, in inference: no graph, no gradient
    else:  # nothing to choose from
        assert kept == {} and seen == []
