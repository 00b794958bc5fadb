import math
import os

import pytest
import torch

from tformer import kernels
from tformer.nn import (
    KVCache,
    MultiHeadAttention,
    attention,
    attention_choice,
    attention_weights,
    blocked_attention,
    blocked_causal_attention,
    causal_mask,
    explicit_attention,
    fused_attention,
    measured,
)
from tformer.nn.attention import PADDED_KERNEL_MAX_LEN
from tformer.nn.kv_cache import follow_paths


@pytest.fixture(autouse=True)
def small_query_blocks(monkeypatch):
    """Blocks of 2 queries, so that the short sequences here take the blocked path too."""
    monkeypatch.setattr(blocked_attention, "QUERY_BLOCK", 2)


def attention_formula(q, k, v, mask=None):
    """softmax(Q K^T / sqrt(d_k) + M) V, one (batch, head) at a time, in float64."""
    b, h, t, d = q.shape
    out = torch.zeros(b, h, t, v.shape[-1], dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            scores = q[bi, hi].double() @ k[bi, hi].double().T / math.sqrt(d)
            if mask is not None:
                m = mask.expand(b, h, t, k.shape[2])[bi, hi]
                scores = scores + torch.where(m, 0.0, float("-inf")).double()
            out[bi, hi] = torch.softmax(scores, dim=-1) @ v[bi, hi].double()
    return out


def qkv(b=2, h=3, t=5, s=5, d=4):
    return torch.randn(b, h, t, d), torch.randn(b, h, s, d), torch.randn(b, h, s, d)


def test_attention_weights_are_scaled_softmax_rows():
    q, k, _ = qkv()
    w = attention_weights(q, k)
    expected = torch.softmax(q @ k.transpose(-2, -1) / 2.0, dim=-1)  # sqrt(d_k) = sqrt(4)
    torch.testing.assert_close(w, expected)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 3, 5))


@pytest.mark.parametrize("masked", [False, True])
def test_explicit_and_fused_match_formula(masked):
    q, k, v = qkv(t=4, s=6)
    mask = torch.rand(2, 1, 4, 6) > 0.4 if masked else None
    if mask is not None:
        mask[..., 0] = True  # every query sees at least one key
    expected = attention_formula(q, k, v, mask).float()
    torch.testing.assert_close(explicit_attention(q, k, v, mask), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused_attention(q, k, v, mask), expected, rtol=1e-5, atol=1e-5)


def test_fused_causal_flag_equals_explicit_causal_mask():
    q, k, v = qkv()
    expected = explicit_attention(q, k, v, causal_mask(5, 5))
    torch.testing.assert_close(fused_attention(q, k, v, is_causal=True), expected)


def test_query_that_sees_no_key_gets_zero_output_on_both_paths():
    q, k, v = qkv(t=2, s=3)
    mask = torch.tensor([[False, False, False], [True, True, False]])
    for out in (explicit_attention(q, k, v, mask), fused_attention(q, k, v, mask)):
        assert not out.isnan().any()
        torch.testing.assert_close(out[:, :, 0], torch.zeros(2, 3, 4))


@pytest.mark.parametrize("implementation", ["sdpa", "explicit", "blocked"])
def test_query_that_sees_no_key_gets_finite_gradients(implementation, monkeypatch):
    """Left padding in causal attention leaves the first queries no key to see: their
    output is zero, and no NaN reaches the gradients through their softmax row."""
    monkeypatch.setattr(blocked_attention, "QUERY_BLOCK", 4)  # so "blocked" takes its path
    torch.manual_seed(0)
    mha = MultiHeadAttention(8, 2, causal=True, implementation=implementation)
    x = torch.randn(2, 9, 8, requires_grad=True)
    padding = torch.ones(2, 9, dtype=torch.bool)
    padding[1, :3] = False
    out = mha(x, attention_mask=padding)
    out.square().sum().backward()
    for grad in (x.grad, *(p.grad for p in mha.parameters())):
        assert torch.isfinite(grad).all()


@pytest.mark.parametrize("block", [1, 3, 4, 10])  # uneven last block, one block for all
def test_blocked_causal_attention_matches_formula(block):
    q, k, v = qkv(t=10, s=10)
    mask = causal_mask(10, 10)
    expected = attention_formula(q, k, v, mask).float()
    out = blocked_causal_attention(q, k, v, mask, block=block)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block", [1, 3, 4, 10])
def test_blocked_causal_attention_without_a_mask_is_the_causal_mask_s_to_the_bit(
    block, dtype, monkeypatch
):
    # no mask: causality alone, masked in each block's diagonal square only, on torch's
    # path (the softmax kernel's is held to float64's in tests/nn/test_causal_softmax.py)
    monkeypatch.setattr(blocked_attention, "softmax_kernels", lambda q, block: None)
    q, k, v = (t.to(dtype).requires_grad_() for t in qkv(t=10, s=10))
    grad = torch.randn(2, 3, 10, 4).to(dtype)
    implied = blocked_causal_attention(q, k, v, block=block)
    given = blocked_causal_attention(q, k, v, causal_mask(10, 10), block=block)
    assert torch.equal(implied, given)
    for a, b in zip(
        torch.autograd.grad(implied, (q, k, v), grad),
        torch.autograd.grad(given, (q, k, v), grad),
        strict=True,
    ):
        assert torch.equal(a, b)


def test_blocked_causal_attention_with_padding_and_an_empty_query():
    q, k, v = qkv(b=2, t=9, s=9)
    padding = torch.ones(2, 9, dtype=torch.bool)
    padding[1, :3] = False  # left padding: query 0 of the second row sees no key at all
    mask = padding[:, None, None, :] & causal_mask(9, 9)  # (B, 1, T, S)
    out = blocked_causal_attention(q, k, v, mask, block=4)
    torch.testing.assert_close(out, explicit_attention(q, k, v, mask), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1, :, 0], torch.zeros(3, 4))


def test_blocked_causal_attention_gradients_equal_explicit():
    q, k, v = (t.requires_grad_() for t in qkv(t=11, s=11))
    mask = causal_mask(11, 11)
    grad = torch.randn(2, 3, 11, 4)
    blocked = torch.autograd.grad(blocked_causal_attention(q, k, v, mask, block=4), (q, k, v), grad)
    explicit = torch.autograd.grad(explicit_attention(q, k, v, mask), (q, k, v), grad)
    for ours, reference in zip(blocked, explicit, strict=True):
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_blocked_causal_attention_backward_passes_gradcheck(dropout_p):
    """The hand-written backward against finite differences, in float64, with padding; the
    dropout masks are fixed by reseeding before every call."""
    q, k, v = (t.double().requires_grad_() for t in qkv(b=2, h=2, t=7, s=7, d=3))
    padding = torch.ones(2, 7, dtype=torch.bool)
    padding[1, :2] = False
    mask = padding[:, None, None, :] & causal_mask(7, 7)

    def attend(q, k, v):
        torch.manual_seed(0)
        return blocked_causal_attention(q, k, v, mask, dropout_p, block=3)

    assert torch.autograd.gradcheck(attend, (q, k, v))
    if dropout_p > 0:
        no_dropout = blocked_causal_attention(q, k, v, mask, 0.0, block=3)
        assert not torch.allclose(attend(q, k, v), no_dropout)


def test_blocked_path_of_the_module_equals_explicit_in_bf16(monkeypatch):
    """Past QUERY_BLOCK positions the module takes the blocked path; its bf16 softmax and
    gradients agree with the explicit path's (float32 softmax) to bf16 rounding."""
    monkeypatch.setattr(blocked_attention, "QUERY_BLOCK", 128)  # as in training
    monkeypatch.setattr(attention, "long_attention_path", lambda q, paths: "blocked")
    torch.manual_seed(0)
    explicit = MultiHeadAttention(32, 2, causal=True, implementation="explicit")
    blocked = MultiHeadAttention(32, 2, causal=True, implementation="blocked")
    blocked.load_state_dict(explicit.state_dict())
    x = torch.randn(2, 600, 32)  # 600 > QUERY_BLOCK (128): five blocks, the last one short
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, out = explicit(x).float(), blocked(x).float()
    torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(blocked(x), explicit(x), rtol=1e-5, atol=1e-5)  # float32
    grads = []
    for module in (explicit, blocked):
        x_grad = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            module(x_grad).float().square().mean().backward()
        grads.append([x_grad.grad, *(p.grad for p in module.parameters())])
    for ours, reference in zip(grads[1], grads[0], strict=True):
        scale = reference.abs().max()
        torch.testing.assert_close(ours / scale, reference / scale, rtol=0, atol=2e-2)


def autograd_nodes(out: torch.Tensor) -> set[str]:
    """The names of the autograd nodes that produced `out`."""
    names, seen, todo = set(), set(), [out.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        todo += [child for child, _ in node.next_functions]
    return names


def test_blocked_implementation_runs_query_blocks_only_past_one_block(monkeypatch):
    """QUERY_BLOCK (2 here) decides the path: more positions and no cache, query blocks
    (where they, not torch's fused kernel, are the faster: so chosen here); otherwise
    (float32, so not the kernel) the explicit path."""
    monkeypatch.setattr(attention, "long_attention_path", lambda q, paths: "blocked")
    mha = MultiHeadAttention(8, 2, causal=True, implementation="blocked")
    blocked = "BlockedCausalAttentionBackward"
    assert blocked in autograd_nodes(mha(torch.randn(1, 5, 8)))
    assert blocked not in autograd_nodes(mha(torch.randn(1, 2, 8)))
    cache = KVCache(1, 2, max_len=8, d_head=4)
    mha(torch.randn(1, 2, 8), cache=cache)
    assert blocked not in autograd_nodes(mha(torch.randn(1, 3, 8), cache=cache))  # T != S
    explicit = MultiHeadAttention(8, 2, causal=True, implementation="explicit")
    assert blocked not in autograd_nodes(explicit(torch.randn(1, 5, 8)))


@pytest.mark.parametrize("padded", [False, True])
def test_explicit_path_in_bf16_matches_float32_to_bf16_rounding(padded):
    """Under bf16 autocast the explicit path's matmuls run in bf16 (its softmax in float32):
    outputs and every gradient stay within bf16 rounding of float32, with and without
    queries that see no key."""
    torch.manual_seed(0)
    mha = MultiHeadAttention(64, 4, causal=True, implementation="explicit")
    x = torch.randn(3, 50, 64)
    padding = torch.ones(3, 50, dtype=torch.bool)
    padding[1, :7] = False  # left padding: queries that see no key at all
    mask = padding if padded else None
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        mha.zero_grad(set_to_none=True)
        x_grad = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            out = mha(x_grad, attention_mask=mask).float()
        (out * torch.linspace(-1, 1, 64)).square().mean().backward()
        results.append([out, x_grad.grad, *(p.grad.clone() for p in mha.parameters())])
    for low, reference in zip(results[1], results[0], strict=True):
        assert torch.isfinite(low).all()
        scale = reference.abs().max()
        torch.testing.assert_close(low / scale, reference / scale, rtol=0, atol=2e-2)


def test_causal_mask_with_cached_offset():
    # 2 new queries after 3 cached positions: query 0 is position 3, query 1 is position 4.
    expected = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(causal_mask(2, 5), expected)


def copy_to_torch_mha(mha: MultiHeadAttention) -> torch.nn.MultiheadAttention:
    ref = torch.nn.MultiheadAttention(mha.d_model, mha.n_heads, batch_first=True)
    with torch.no_grad():
        if mha.cross:
            ref.in_proj_weight.copy_(torch.cat([mha.w_q.weight, mha.w_kv.weight]))
            ref.in_proj_bias.copy_(torch.cat([mha.w_q.bias, mha.w_kv.bias]))
        else:
            ref.in_proj_weight.copy_(mha.w_qkv.weight)
            ref.in_proj_bias.copy_(mha.w_qkv.bias)
        ref.out_proj.weight.copy_(mha.w_o.weight)
        ref.out_proj.bias.copy_(mha.w_o.bias)
    return ref.eval()


@pytest.mark.parametrize("implementation", ["sdpa", "explicit", "blocked"])
def test_self_attention_matches_torch_multihead_attention(implementation):
    mha = MultiHeadAttention(12, 3, implementation=implementation).eval()
    ref = copy_to_torch_mha(mha)
    x = torch.randn(2, 7, 12)
    padding = torch.ones(2, 7, dtype=torch.bool)
    padding[1, 5:] = False  # the second sequence has two padding tokens at its end
    expected, _ = ref(x, x, x, key_padding_mask=~padding, need_weights=False)
    torch.testing.assert_close(mha(x, attention_mask=padding), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(kernels.load() is None, reason="no C kernels here")
@pytest.mark.parametrize(("d_model", "heads", "t"), [(12, 3, 7), (40, 5, 1), (100, 5, 32)])
def test_an_encoder_s_attention_in_inference_runs_in_one_kernel(d_model, heads, t, monkeypatch):
    """Non-causal self-attention with no gradients on the CPU: kernels.padded_attention
    (d_head 4, 8 and 20, a tail of 4 past the 8-lane loops), against torch's module; a
    sentence of padding alone gets zeros, as on every path."""
    calls = []
    original = kernels.Kernels.padded_attention
    monkeypatch.setattr(kernels.Kernels, "padded_attention",
                        lambda *a: calls.append(1) or original(*a))  # fmt: skip
    g = torch.Generator().manual_seed(t)
    x = torch.randn(3, t, d_model, generator=g)
    padding = torch.ones(3, t, dtype=torch.bool)
    padding[1, t // 2 + 1 :] = False
    padding[2] = False  # nothing to attend to
    for implementation in ("sdpa", "blocked"):
        mha = MultiHeadAttention(d_model, heads, implementation=implementation).eval()
        expected, _ = copy_to_torch_mha(mha)(x[:2], x[:2], x[:2], key_padding_mask=~padding[:2],
                                             need_weights=False)  # fmt: skip
        with torch.inference_mode():
            out = mha(x, attention_mask=padding)
            unpadded = mha(x)  # no mask: every position a token
        torch.testing.assert_close(out[:2], expected, rtol=1e-5, atol=1e-5)
        assert torch.equal(out[2], mha.w_o.bias.detach().expand(t, d_model))  # zeros, then W_o
        mha.implementation = "explicit"  # the reference path: no kernel
        with torch.inference_mode():
            torch.testing.assert_close(unpadded, mha(x), rtol=1e-5, atol=1e-5)
    assert len(calls) == 4
    mha.implementation = "sdpa"
    with torch.inference_mode():  # longer: torch's fused kernel is faster there
        mha(torch.randn(1, PADDED_KERNEL_MAX_LEN + 1, d_model))
    assert len(calls) == 4


@pytest.mark.parametrize("implementation", ["sdpa", "explicit", "blocked"])
def test_causal_self_attention_matches_torch_with_causal_mask(implementation):
    mha = MultiHeadAttention(12, 4, causal=True, implementation=implementation)
    mha.eval()
    ref = copy_to_torch_mha(mha)
    x = torch.randn(3, 6, 12)
    future = ~causal_mask(6, 6)  # torch: True = not allowed
    expected, _ = ref(x, x, x, attn_mask=future, need_weights=False)
    torch.testing.assert_close(mha(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("implementation", ["sdpa", "explicit", "blocked"])
def test_cross_attention_matches_torch(implementation):
    mha = MultiHeadAttention(8, 2, cross=True, implementation=implementation).eval()
    ref = copy_to_torch_mha(mha)
    x, memory = torch.randn(2, 3, 8), torch.randn(2, 9, 8)
    memory_mask = torch.ones(2, 9, dtype=torch.bool)
    memory_mask[0, 6:] = False
    expected, _ = ref(x, memory, memory, key_padding_mask=~memory_mask, need_weights=False)
    out = mha(x, memory=memory, attention_mask=memory_mask)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("implementation", ["sdpa", "explicit"])
def test_a_sentence_s_beams_read_its_one_row_of_memory_keys(implementation):
    # 2 sentences of 3 beams each: memory_kv with one row per sentence gives what copies
    # of it for every beam give, queries of 1 or 2 positions
    mha = MultiHeadAttention(8, 2, cross=True, implementation=implementation).eval()
    memory = torch.randn(2, 9, 8)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, 6:] = False
    k, v = mha.project_memory(memory)
    assert k.is_contiguous() and v.is_contiguous()
    for t in (1, 2):
        x = torch.randn(6, t, 8)
        copies = [(kv.repeat_interleave(3, 0)) for kv in (k, v)]
        expected = mha(x, attention_mask=mask.repeat_interleave(3, 0), memory_kv=tuple(copies))
        shared = mha(x, attention_mask=mask, memory_kv=(k, v))
        torch.testing.assert_close(shared, expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="memory_kv has 4 rows for 6 query rows"):
        mha(x, memory_kv=(torch.zeros(4, 2, 9, 4), torch.zeros(4, 2, 9, 4)))


def test_rows_that_follow_paths_read_their_past_where_it_was_written():
    cache = KVCache(4, 2, max_len=6, d_head=3)
    first = torch.randn(4, 2, 3, 3)  # 3 positions of 4 rows, each in its own slot
    cache.update(first, -first)
    # 3 rows go on: two from row 2, one from row 0; row i writes its next positions in slot i
    follow_paths([cache], torch.tensor([2, 2, 0]))
    assert cache.paths.tolist() == [[2, 2, 2, 0, 0, 0], [2, 2, 2, 1, 1, 1], [0, 0, 0, 2, 2, 2]]
    second = torch.randn(3, 2, 1, 3)
    k, v = cache.update(second, -second)  # the plain path lays the paths out, then appends
    expected = torch.cat([first[[2, 2, 0]], second], dim=2)  # (3, H, 4, D)
    assert torch.equal(k, expected) and torch.equal(v, -expected)
    assert cache.paths is None and torch.equal(cache.k[:3, :, :4], expected)
    # again: the rows swap, and one leaves
    follow_paths([cache], torch.tensor([1, 0]), torch.tensor([3, 0]))
    assert cache.paths[:, 4].tolist() == [3, 0]
    third = torch.randn(2, 2, 1, 3)
    k, _ = cache.update(third, -third)
    assert torch.equal(k, torch.cat([expected[[1, 0]], third], dim=2))
    with pytest.raises(ValueError, match="distinct slot"):
        follow_paths([cache], torch.tensor([0, 1]), torch.tensor([3, 3]))
    with pytest.raises(ValueError, match="slots must lie in 0..3"):
        follow_paths([cache], torch.tensor([0]), torch.tensor([4]))


def test_self_and_cross_attention_refuse_each_others_inputs():
    x, memory = torch.randn(1, 2, 8), torch.randn(1, 3, 8)
    with pytest.raises(ValueError, match="self-attention takes no memory"):
        MultiHeadAttention(8, 2)(x, memory=memory)
    with pytest.raises(ValueError, match="cross-attention needs the memory"):
        MultiHeadAttention(8, 2, cross=True)(x)
    with pytest.raises(ValueError, match="cannot be causal"):
        MultiHeadAttention(8, 2, causal=True, cross=True)


def test_weight_blocks_are_views_of_the_paper_s_four_matrices():
    for cross in (False, True):
        mha = MultiHeadAttention(8, 2, cross=cross)
        biases = [mha.w_q.bias, *mha.w_kv.bias.split(8)] if cross else mha.w_qkv.bias.split(8)
        x = torch.randn(1, 3, 8)
        w_q, w_k, w_v, w_o = mha.weight_blocks()
        assert w_o is mha.w_o.weight
        projected = mha.project(x, x if cross else None)
        for out, w, b in zip(projected, (w_q, w_k, w_v), biases, strict=True):
            torch.testing.assert_close(out, x @ w.T + b)
        with torch.no_grad():
            w_v.zero_()  # a view: the stored W^V changes with it
        v = mha.project(x, x if cross else None)[2]
        torch.testing.assert_close(v, biases[2].expand(1, 3, 8))


@pytest.mark.parametrize("implementation", ["sdpa", "explicit", "blocked"])
def test_future_tokens_never_change_past_outputs(implementation):
    mha = MultiHeadAttention(8, 2, causal=True, implementation=implementation)
    x = torch.randn(1, 6, 8)
    changed = x.clone()
    changed[:, 4:] = torch.randn(1, 2, 8)
    torch.testing.assert_close(mha(x)[:, :4], mha(changed)[:, :4], rtol=0, atol=0)
    assert not torch.allclose(mha(x)[:, 4:], mha(changed)[:, 4:])


@pytest.mark.parametrize("implementation", ["sdpa", "explicit", "blocked"])
def test_kv_cache_decoding_equals_full_forward(implementation):
    mha = MultiHeadAttention(8, 2, causal=True, implementation=implementation)
    x = torch.randn(2, 7, 8)
    padding = torch.ones(2, 7, dtype=torch.bool)
    padding[0, :2] = False  # left padding on the first row
    full = mha(x, attention_mask=padding)
    cache = KVCache(2, 2, max_len=10, d_head=4)
    prefill = mha(x[:, :3], attention_mask=padding[:, :3], cache=cache)
    chunk = mha(x[:, 3:5], attention_mask=padding[:, :5], cache=cache)  # 2 queries after 3
    steps = [
        mha(x[:, i : i + 1], attention_mask=padding[:, : i + 1], cache=cache) for i in range(5, 7)
    ]
    incremental = torch.cat([prefill, chunk, *steps], dim=1)
    real = padding.unsqueeze(-1).expand_as(full)  # padding queries are not compared
    torch.testing.assert_close(incremental[real], full[real], rtol=1e-5, atol=1e-6)
    assert cache.length == 7


@pytest.mark.parametrize("implementation", ["sdpa", "explicit", "blocked"])
def test_kv_cache_chunk_without_padding_equals_full_forward(implementation):
    mha = MultiHeadAttention(8, 2, causal=True, implementation=implementation)
    x = torch.randn(1, 8, 8)
    cache = KVCache(1, 2, max_len=8, d_head=4)
    parts = [mha(x[:, :2], cache=cache), mha(x[:, 2:6], cache=cache), mha(x[:, 6:], cache=cache)]
    torch.testing.assert_close(torch.cat(parts, dim=1), mha(x), rtol=1e-5, atol=1e-6)


def test_kv_cache_overflow_is_reported():
    cache = KVCache(1, 1, max_len=2, d_head=2)
    with pytest.raises(ValueError, match="KV cache is full"):
        cache.update(torch.zeros(1, 1, 3, 2), torch.zeros(1, 1, 3, 2))


def test_pattern_hook_exposes_attention_weights():
    mha = MultiHeadAttention(8, 2, causal=True, implementation="explicit")
    seen = []
    mha.hook_pattern.register_forward_hook(lambda module, args, out: seen.append(out))
    mha(torch.randn(1, 4, 8))
    (pattern,) = seen
    assert pattern.shape == (1, 2, 4, 4)
    torch.testing.assert_close(pattern.sum(-1), torch.ones(1, 2, 4))
    assert (pattern.triu(diagonal=1) == 0).all()  # nothing attends to the future


def test_heads_must_divide_width():
    with pytest.raises(ValueError, match="divisible"):
        MultiHeadAttention(10, 3)


def test_blocked_path_hands_short_bf16_causal_attention_to_the_compiled_kernel(monkeypatch):
    """At most QUERY_BLOCK positions in bf16 on the CPU, with no padding, cache or dropout,
    the blocked path runs tformer/kernels/attention.c: its outputs and gradients agree with
    the explicit path's to bf16 rounding. Anything else takes torch's operations."""
    if os.environ.get("TFORMER_KERNELS") == "0":
        pytest.skip("TFORMER_KERNELS=0: testing the torch fallback only")
    assert kernels.load() is not None, kernels.unavailable_reason()
    monkeypatch.setattr(blocked_attention, "QUERY_BLOCK", 128)  # as in training
    calls = []
    original = kernels.Kernels.causal_attention

    def counted(self, qkv, n_heads, pairs=False):
        calls.append(tuple(qkv.shape))
        return original(self, qkv, n_heads, pairs)

    # the kernel of float32 products chosen for the shape (not timed: no other calls)
    key = (attention_choice.KIND, "3x50x192 4 heads, short bfloat16", torch.get_num_threads())
    monkeypatch.setitem(measured._chosen, key, "kernel")

    monkeypatch.setattr(kernels.Kernels, "causal_attention", counted)
    torch.manual_seed(0)
    explicit = MultiHeadAttention(64, 4, causal=True, implementation="explicit")
    blocked = MultiHeadAttention(64, 4, causal=True, implementation="blocked")
    blocked.load_state_dict(explicit.state_dict())
    x = torch.randn(3, 50, 64)
    results = []
    for module in (explicit, blocked):
        x_grad = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = module(x_grad).float()
        (out * torch.linspace(-1, 1, 64)).square().mean().backward()
        results.append([out, x_grad.grad, *(p.grad for p in module.parameters())])
    assert calls == [(3, 50, 192)]  # the blocked module's call, (B, T, 3C)
    for ours, reference in zip(results[1], results[0], strict=True):
        scale = reference.abs().max()
        torch.testing.assert_close(ours / scale, reference / scale, rtol=0, atol=2e-2)

    calls.clear()
    with torch.no_grad():
        blocked(x)  # float32
        with torch.autocast("cpu", dtype=torch.bfloat16):
            blocked(x, attention_mask=torch.ones(3, 50, dtype=torch.bool))  # a padding mask
            blocked.dropout = 0.1  # attention dropout while training
            blocked(x)
            blocked.dropout = 0.0
            seen = []
            handle = blocked.hook_pattern.register_forward_hook(lambda m, i, o: seen.append(o))
            blocked(x)  # a hook on the weights: the explicit path forms them
            handle.remove()
            assert len(seen) == 1 and seen[0].shape == (3, 4, 50, 50)
            blocked.double()(x.double())  # autocast leaves float64 alone: not bf16
            blocked.float().eval()
            blocked(x)  # the same module in evaluation: the kernel again
    assert calls == [(3, 50, 192)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t", [32, 200])  # the short kernel's lengths, a long one
def test_blocked_attention_off_the_cpu_is_torchs_fused_kernel(monkeypatch, dtype, t):
    """The "blocked" path is for CPUs: a model trained with it, moved to a GPU, attends in
    torch's fused kernel there, never in the explicit path nor in query blocks (checked on
    the meta device, which no compiled kernel takes either)."""
    monkeypatch.setattr(blocked_attention, "QUERY_BLOCK", 128)  # as in training
    for path in ("explicit_attention", "blocked_causal_attention"):  # the CPU's paths
        monkeypatch.setattr(attention, path, lambda *a, path=path: pytest.fail(path))
    layer = MultiHeadAttention(32, 2, causal=True, implementation="blocked").to("meta", dtype)
    x = torch.empty(2, t, 32, device="meta", dtype=dtype, requires_grad=True)
    assert layer.train()(x).shape == (2, t, 32)
    with torch.no_grad():
        assert layer.eval()(x).shape == (2, t, 32)
