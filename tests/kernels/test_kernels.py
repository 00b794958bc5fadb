import math
import os
import shutil

import pytest
import torch
from torch import nn

from tformer import kernels
from tformer.kernels import build
from tformer.nn.attention import causal_mask, explicit_attention
from tformer.nn.packed_linear import dequantize_int4, quantize_int4, quantize_int8


@pytest.fixture(scope="module")
def compiled():
    """The kernels must build where the suite runs, unless switched off on purpose."""
    if os.environ.get("TFORMER_KERNELS") == "0":
        pytest.skip("TFORMER_KERNELS=0: testing the torch fallback only")
    loaded = kernels.load()
    assert loaded is not None, f"the C kernels did not build: {kernels.unavailable_reason()}"
    return loaded


# tiles of up to 6 rows, split evenly; 1 and 2 rows run 4 and 2 panels side by side
@pytest.mark.parametrize("rows", [1, 2, 3, 6, 7, 17])
# k: odd ones end bfloat16's pairs with a zero
@pytest.mark.parametrize("k", [5, 37, 64, 200])
@pytest.mark.parametrize("with_bias", [True, False])
# panels of 16 columns (32 on AVX-512): n = 5 is one padded panel, 46 and 47 end in one;
# 150, 300: groups of 4 or 2 panels side by side (as many as give each thread two groups),
# then single panels and a padded one
@pytest.mark.parametrize("n", [5, 46, 47, 64, 150, 300])
def test_kernels_compute_x_times_w_transposed_plus_bias(compiled, rows, k, with_bias, n):
    g = torch.Generator().manual_seed(rows * 1000 + k + n)
    x = torch.randn(rows, k, generator=g)
    w = torch.randn(n, k, generator=g)
    bias = torch.randn(n, generator=g) if with_bias else None
    q, scale = quantize_int8(w)
    cases = [
        (w, None, w.double()),
        (w.bfloat16(), None, w.bfloat16().double()),
        (q, scale, q.double() * scale.double()[:, None]),
    ]
    for weight, s, exact in cases:
        panels = compiled.pack_linear(weight)
        assert torch.equal(compiled.unpack_linear(panels, n, k), weight)
        out = compiled.linear(x, panels, s, bias, torch.empty(rows, n))
        reference = x.double() @ exact.T + (bias.double() if with_bias else 0)
        # float32 accumulation over k terms of size ~1: error ~ sqrt(k) * 1e-7 * |terms|
        torch.testing.assert_close(out.double(), reference, rtol=1e-5, atol=1e-4)
    # int4: groups of 32 k (k = 5, 37: one short group, a whole one and a short one)
    q4, d4 = quantize_int4(w)
    panels = compiled.pack_int4(q4, d4)
    q_back, d_back = compiled.unpack_int4(panels, n, k)
    assert torch.equal(q_back, q4) and torch.equal(d_back, d4)
    exact = (q4.double() - 8) * d4.double().repeat_interleave(32, dim=1)[:, :k]
    out = compiled.linear(x, panels, None, bias, torch.empty(rows, n))
    reference = x.double() @ exact.T + (bias.double() if with_bias else 0)
    # sum x q - 8 sum x: the cancellation costs a few more ulps of sum |x| q than direct sums
    torch.testing.assert_close(out.double(), reference, rtol=1e-5, atol=4e-4)


def test_a_rows_result_does_not_depend_on_the_other_rows(compiled):
    """Each output is one lane's sum over k in order, whichever tile its row is in: a
    request's logits on a server do not change with what else is in the batch."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(17, 301, generator=g)  # odd k: bfloat16's last pair
    w = torch.randn(300, 301, generator=g)  # groups of panels side by side, then single ones
    for bias in (None, torch.randn(300, generator=g)):
        for weight in (w, w.bfloat16(), quantize_int8(w)[0]):
            panels = compiled.pack_linear(weight)
            s = quantize_int8(w)[1] if weight.dtype == torch.int8 else None
            together = compiled.linear(x, panels, s, bias, torch.empty(17, 300))
            for rows in (slice(0, 1), slice(16, 17), slice(3, 5), slice(4, 11)):
                part = x[rows].contiguous()
                alone = compiled.linear(part, panels, s, bias, torch.empty(part.shape[0], 300))
                assert torch.equal(alone, together[rows]), (weight.dtype, bias is None, rows)
        panels = compiled.pack_int4(*quantize_int4(w))  # int4: 1 and 2 rows take another path
        together = compiled.linear(x, panels, None, bias, torch.empty(17, 300))
        for rows in (slice(0, 1), slice(16, 17), slice(3, 5), slice(4, 11), slice(0, 3)):
            part = x[rows].contiguous()
            alone = compiled.linear(part, panels, None, bias, torch.empty(part.shape[0], 300))
            assert torch.equal(alone, together[rows]), ("int4", bias is None, rows)


def test_unpack_linear_is_the_panels_read_back(compiled):
    """The C unpacking against the same read-back written with torch's views, for every
    stored dtype, an odd K (bfloat16 pads it to even), N short of a whole panel, and empty
    shapes; and its refusals of panels it cannot read."""
    p = compiled.panel
    g = torch.Generator().manual_seed(5)
    for dtype in (torch.float32, torch.bfloat16, torch.int8):
        for n, k in ((p + 3, 37), (1, 2), (2 * p, 64), (3, 0), (0, 5)):
            w = (torch.randn(n, k, generator=g) * 20).to(dtype)
            panels = compiled.pack_linear(w)
            # bfloat16 (G, K/2, P, 2) -> (G, P, K/2, 2); the others (G, K, P) -> (G, P, K)
            pairs = dtype == torch.bfloat16
            rows = panels.permute(0, 2, 1, 3) if pairs else panels.transpose(1, 2)
            k_pad = k + k % 2 if pairs else k
            expected = rows.reshape(panels.shape[0] * p, k_pad)[:n, :k]
            assert torch.equal(compiled.unpack_linear(panels, n, k), expected), (dtype, n, k)
            assert torch.equal(expected, w)
    panels = compiled.pack_linear(torch.randn(p, 8))
    with pytest.raises(ValueError, match="panels"):
        compiled.unpack_linear(panels, p + 1, 8)  # more columns than they hold
    with pytest.raises(ValueError, match="contiguous"):
        compiled.unpack_linear(panels.transpose(1, 2), p, 8)
    with pytest.raises(ValueError, match="float32, bfloat16 or int8"):
        compiled.unpack_linear(panels.double(), p, 8)


def test_dequantize_int4_is_torchs_dequantisation_then_cast(compiled):
    """int4 panels dequantised in C against torch's (q - 8) d from the same q and scales,
    then cast: equal bit for bit in float32 and bfloat16 (including bfloat16's rounding of
    values between two of its own), for a short last group, N short of a panel, empty
    shapes; and its refusals."""
    p = compiled.panel
    g = torch.Generator().manual_seed(6)
    for n, k in ((p + 3, 37), (1, 2), (2 * p, 64), (5, 95), (3, 0), (0, 5)):
        # scales of 11 bits: (q - 8) d has up to 15, so bfloat16's 8 must round most of them
        q4, d4 = quantize_int4(torch.randn(n, k, generator=g) * 3)
        panels = compiled.pack_int4(q4, d4)
        for dtype in (torch.float32, torch.bfloat16):
            expected = dequantize_int4(q4, d4).to(dtype)
            out = compiled.dequantize_int4(panels, n, k, dtype)
            assert out.dtype == dtype and torch.equal(out, expected), (n, k, dtype)
    panels = compiled.pack_int4(*quantize_int4(torch.randn(p, 40)))
    with pytest.raises(ValueError, match="panels"):
        compiled.dequantize_int4(panels, p + 1, 40, torch.float32)  # more columns than they hold
    with pytest.raises(ValueError, match="panels"):
        compiled.dequantize_int4(panels, p, 70, torch.float32)  # more groups
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        compiled.dequantize_int4(panels, p, 40, torch.float16)


def w8a8_reference(x, q, scale, bias):
    """integer_linear.c's formula, written out: x rounded to int8 per row, the integer sums
    exact in float64, then ((float)acc * s_x) * s_w + b (the last two one fma, here in
    float64 and rounded once more to float32)."""
    largest = x.abs().amax(dim=1)
    s_x = torch.where(largest > 0, largest / 127.0, torch.ones_like(largest))
    x_q = torch.round(x / s_x[:, None]).clamp(-127, 127)
    acc = (x_q.double() @ q.double().T).float()  # exact sums, rounded to float32 as C's cast
    r = acc * s_x[:, None]
    if bias is None:
        return r * scale
    return (r.double() * scale.double() + bias.double()).float()


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 7, 17])
@pytest.mark.parametrize("k", [1, 5, 64, 203])  # k not a multiple of 4: padded with zeros
@pytest.mark.parametrize("n", [5, 16, 47, 300])  # panels of 16 columns; padded ones
@pytest.mark.parametrize("with_bias", [True, False])
def test_w8a8_kernels_compute_the_integer_formula(compiled, rows, k, n, with_bias):
    g = torch.Generator().manual_seed(rows * 1000 + k + n)
    x = torch.randn(rows, k, generator=g) * torch.rand(rows, 1, generator=g) * 10
    x[rows // 2] = 0.0  # a row of zeros: scale 1, all products 0
    w = torch.randn(n, k, generator=g)
    bias = torch.randn(n, generator=g) if with_bias else None
    q, scale = quantize_int8(w)
    panels = compiled.pack_w8a8(q)
    assert panels.shape == (-(-n // 16), -(-k // 4), 16, 4)
    assert torch.equal(compiled.unpack_w8a8(panels, n, k), q)
    with pytest.raises(ValueError, match="linear_w8a8 reads them"):
        compiled.linear(x, panels, scale, bias, torch.empty(rows, n))  # another layout
    out = compiled.linear_w8a8(x, panels, scale, bias, torch.empty(rows, n))
    expected = w8a8_reference(x, q, scale, bias)
    if with_bias:  # float64's fma against C's: at most a float32 rounding apart
        torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    else:
        assert torch.equal(out, expected)
    if with_bias:
        assert torch.equal(out[rows // 2], bias)
    # and it is x W^T within its two roundings: each x and each w within half a step,
    # |x W^T - x' W'^T| <= sum_k |x - x'| |w| + |x'| |w - w'|
    exact = x.double() @ w.double().T + (bias.double() if with_bias else 0)
    s_x = (x.abs().amax(dim=1) / 127).double()[:, None]
    x_size = x.abs().double().sum(1, keepdim=True) + k * s_x / 2  # sum_k |x'|
    bound = s_x / 2 * w.abs().double().sum(1) + x_size * scale.double() / 2 + 1e-4
    assert ((out.double() - exact).abs() <= bound).all()


def test_w8a8_rounds_ties_to_even_and_a_rows_result_does_not_depend_on_the_others(compiled):
    with pytest.raises(ValueError, match=r"\[-127, 127\]"):  # vpsignb cannot negate -128
        compiled.pack_w8a8(torch.full((2, 4), -128, dtype=torch.int8))
    x = torch.tensor([[127.0, 0.5, 1.5, -2.5, -0.5, 3.0, 2.5, 0.0]])  # s_x = 1: ties
    q = torch.eye(8, dtype=torch.int8)
    out = compiled.linear_w8a8(x, compiled.pack_w8a8(q), torch.ones(8), None, torch.empty(1, 8))
    assert out.tolist() == [[127.0, 0.0, 2.0, -2.0, -0.0, 3.0, 2.0, 0.0]]
    g = torch.Generator().manual_seed(6)
    x = torch.randn(17, 301, generator=g)
    q, scale = quantize_int8(torch.randn(300, 301, generator=g))
    panels = compiled.pack_w8a8(q)
    together = compiled.linear_w8a8(x, panels, scale, None, torch.empty(17, 300))
    for rows in (slice(0, 1), slice(16, 17), slice(3, 5), slice(4, 11)):
        part = x[rows].contiguous()
        alone = compiled.linear_w8a8(part, panels, scale, None, torch.empty(part.shape[0], 300))
        assert torch.equal(alone, together[rows]), rows


def w4a8_reference(x, q, d, bias):
    """integer_linear.c's w4a8 formula, written out: each group of 32 k of a row of x rounded
    to int8 with its own scale, the group's integer sums against q - 8 exact in float64,
    then the terms c (d s_x) added in order of groups (float64 here: the kernels' float32
    fused multiply-adds round each term, hence the tolerance of the test)."""
    m, k = x.shape
    t = d.shape[1]
    groups = torch.zeros(m, t * 32, dtype=torch.float64)
    groups[:, :k] = x.double()
    groups = groups.view(m, t, 32)
    largest = groups.abs().amax(dim=2).float()  # as float32, as C computes it
    s_x = torch.where(largest > 0, largest / 127.0, torch.ones_like(largest))  # (M, T)
    p = torch.round(groups.float() / s_x[:, :, None]).clamp(-127, 127).double()
    w = torch.full((q.shape[0], t * 32), 8.0, dtype=torch.float64)
    w[:, :k] = q.double()
    sums = torch.einsum("mtk,ntk->mnt", p, (w - 8.0).view(-1, t, 32))  # exact integers
    scales = (d.float()[None, :, :] * s_x[:, None, :]).double()  # d s_x in float32, as C
    out = (sums * scales).sum(dim=2)
    return out + bias.double() if bias is not None else out


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 9])  # tiles of 1 to 4 rows; 9: 3 + 3 + 3
@pytest.mark.parametrize("k", [7, 32, 100])  # a short last group: padded with p = 0
# panels of 16 columns; padded ones; 65 panels, several a thread
@pytest.mark.parametrize("n", [5, 47, 1040])
@pytest.mark.parametrize("with_bias", [True, False])
def test_w4a8_kernels_compute_the_integer_formula(compiled, rows, k, n, with_bias):
    g = torch.Generator().manual_seed(rows * 1000 + k + n)
    x = torch.randn(rows, k, generator=g) * torch.rand(rows, 1, generator=g) * 10
    x[rows // 2, : min(k, 32)] = 0.0  # a group of zeros: scale 1, its products 0
    w = torch.randn(n, k, generator=g)
    bias = torch.randn(n, generator=g) if with_bias else None
    q, d = quantize_int4(w)
    panels = compiled.pack_w4a8(q, d)
    assert panels.shape == (-(-n // 16), -(-k // 32), 9, 32)  # d, then 4 steps x 2 vectors
    unpacked_q, unpacked_d = compiled.unpack_w4a8(panels, n, k)
    assert torch.equal(unpacked_q, q) and torch.equal(unpacked_d, d)
    with pytest.raises(ValueError, match="linear_w4a8 reads them"):
        compiled.linear(x, panels, None, bias, torch.empty(rows, n))  # int4's are another
    out = compiled.linear_w4a8(x, panels, None, bias, torch.empty(rows, n))
    expected = w4a8_reference(x, q, d, bias)
    size = (w4a8_reference(x.abs(), torch.full_like(q, 15), d.abs(), None)).abs()
    assert ((out.double() - expected).abs() <= 1e-6 * size + 1e-6).all()
    # and it is x W'^T (W' the int4 weights) within the rounding of x: half a step per k,
    # |x W'^T - x' W'^T| <= sum_k |x - x'| |w'| <= sum_t s_x,t / 2 sum_{k in t} |w'|
    dequantised = dequantize_int4(q, d).double()
    exact = x.double() @ dequantised.T + (bias.double() if with_bias else 0)
    t = d.shape[1]
    padded_x = torch.zeros(rows, t * 32)
    padded_x[:, :k] = x
    s_x = padded_x.view(rows, t, 32).abs().amax(dim=2).double() / 127  # (M, T)
    padded_w = torch.zeros(n, t * 32, dtype=torch.float64)
    padded_w[:, :k] = dequantised.abs()
    bound = s_x / 2 @ padded_w.view(n, t, 32).sum(dim=2).T + 1e-4
    assert ((out.double() - exact).abs() <= bound).all()


def test_w4a8_rounds_ties_to_even_and_a_rows_result_does_not_depend_on_the_others(compiled):
    q, d = quantize_int4(torch.randn(4, 40))
    with pytest.raises(ValueError, match=r"\[0, 15\]"):  # 16 would spill into the next
        compiled.pack_w4a8(q | 16, d)
    with pytest.raises(ValueError, match=r"float16 \(4, 2\)"):
        compiled.pack_w4a8(q, d[:, :1])
    empty = compiled.pack_w4a8(*quantize_int4(torch.zeros(3, 0)))  # K = 0: the bias
    out = compiled.linear_w4a8(torch.zeros(2, 0), empty, None, torch.ones(3), torch.empty(2, 3))
    assert torch.equal(out, torch.ones(2, 3))
    x = torch.zeros(1, 32)
    x[0, :8] = torch.tensor([127.0, 0.5, 1.5, -2.5, -0.5, 3.0, 2.5, -127.0])  # s_x = 1: ties
    q = torch.full((8, 32), 8, dtype=torch.uint8)
    q[torch.arange(8), torch.arange(8)] = 9  # w = (q - 8) d = d on the diagonal
    d = torch.ones(8, 1, dtype=torch.float16)
    out = compiled.linear_w4a8(x, compiled.pack_w4a8(q, d), None, None, torch.empty(1, 8))
    assert out.tolist() == [[127.0, 0.0, 2.0, -2.0, -0.0, 3.0, 2.0, -127.0]]
    g = torch.Generator().manual_seed(6)
    for n in (300, 1040):
        x = torch.randn(17, 301, generator=g)
        panels = compiled.pack_w4a8(*quantize_int4(torch.randn(n, 301, generator=g)))
        bias = torch.randn(n, generator=g)
        together = compiled.linear_w4a8(x, panels, None, bias, torch.empty(17, n))
        for rows in (slice(0, 1), slice(16, 17), slice(3, 5), slice(4, 11), slice(0, 3)):
            part = x[rows].contiguous()
            alone = compiled.linear_w4a8(part, panels, None, bias, torch.empty(part.shape[0], n))
            assert torch.equal(alone, together[rows]), (n, rows)


def test_int4_quantisation_is_ggml_q4_0():
    """quantize_int4 against the gguf package's q4_0 (llama.cpp's own numpy reference):
    the same weights to the bit, a short last group as a group of its own."""
    np = pytest.importorskip("numpy")
    from tformer.checkpoints.gguf import decode, encode

    g = torch.Generator().manual_seed(3)
    w = torch.randn(9, 96, generator=g) * torch.rand(9, 1, generator=g) * 3
    w[2, :32] = 0.0  # an all-zero group stays zero
    w[4, 40] = -7.0  # a negative largest value: d > 0
    ours = dequantize_int4(*quantize_int4(w))
    theirs = torch.from_numpy(decode(encode(w.numpy(), "q4_0"), "q4_0"))
    assert torch.equal(ours, theirs)
    short = w[:, :70]  # 32, 32, 6: the last group's scale from its own 6 values
    q, d = quantize_int4(short)
    assert q.shape == (9, 70) and d.shape == (9, 3)
    assert torch.equal(dequantize_int4(q, d)[:, :64], ours[:, :64])
    tail = torch.zeros(9, 32)
    tail[:, :6] = short[:, 64:]
    expected = torch.from_numpy(decode(encode(tail.numpy(), "q4_0"), "q4_0"))[:, :6]
    assert np.array_equal(dequantize_int4(q, d)[:, 64:].numpy(), expected.numpy())


@pytest.mark.parametrize("d", [16, 20])  # 20: not a whole number of vectors
def test_slot_attention_stores_each_row_and_attends_over_its_own_positions(compiled, d):
    g = torch.Generator().manual_seed(d)
    slots, heads, max_len = 5, 3, 33
    k_cache = torch.randn(slots, heads, max_len, d, generator=g)
    v_cache = torch.randn(slots, heads, max_len, d, generator=g)
    positions = torch.tensor([0, 32, 7, 19])  # 4 rows in slots 0..3: the first and last place
    qkv = torch.randn(4, 3 * heads * d, generator=g) * 3  # scores of a few units: peaked
    k_before, v_before = k_cache.clone(), v_cache.clone()
    out = compiled.slot_attention(qkv, k_cache, v_cache, positions)
    q, k, v = qkv.double().view(4, 3, heads, d).unbind(1)  # (B, H, D) each
    for b, p in enumerate(positions.tolist()):
        k_before[b, :, p], v_before[b, :, p] = k[b].float(), v[b].float()
        keys, values = k_before[b, :, : p + 1].double(), v_before[b, :, : p + 1].double()
        weights = torch.softmax((keys @ q[b, :, :, None])[..., 0] / math.sqrt(d), -1)  # (H, P)
        expected = (weights[:, None, :] @ values)[:, 0]  # (H, D)
        torch.testing.assert_close(out[b].double(), expected.reshape(-1), rtol=1e-5, atol=1e-5)
    # The new keys and values are stored; nothing else in the cache changed (slot 4 unused).
    assert torch.equal(k_cache, k_before) and torch.equal(v_cache, v_before)
    with pytest.raises(ValueError, match="positions"):  # would write outside the cache
        compiled.slot_attention(qkv, k_cache, v_cache, torch.tensor([0, 33, 7, 19]))
    with pytest.raises(ValueError, match="qkv"):
        compiled.slot_attention(qkv[:, 1:].contiguous(), k_cache, v_cache, positions)


@pytest.mark.parametrize(("v", "n"), [(97, 8), (8000, 8), (40, 1), (33, 33)])
def test_top_logits_are_the_log_sum_exp_and_the_n_largest(compiled, v, n):
    g = torch.Generator().manual_seed(v)
    logits = torch.randn(6, v, generator=g) * 4
    logits[:, 3] = float("-inf")  # masked tokens (padding, beyond the tokenizer)
    logits[1, 10:12] = 9.0  # a tie: the lower id first
    logits[2] = float("-inf")  # no token at all
    logits[2, 5] = 0.5
    lse, values, ids = compiled.top_logits(logits, n)
    assert torch.allclose(lse.double(), logits.double().logsumexp(-1), rtol=0, atol=1e-5)
    expected = logits.double().sort(dim=-1, descending=True, stable=True)
    assert torch.equal(values, expected.values[:, :n].float())
    assert torch.equal(ids, expected.indices[:, :n])
    everything_masked = torch.full((1, v), float("-inf"))
    assert compiled.top_logits(everything_masked, n)[0].item() == float("-inf")
    with pytest.raises(ValueError, match="n must"):
        compiled.top_logits(logits, v + 1)


def test_switched_off_kernels_report_why(monkeypatch):
    monkeypatch.setattr(kernels, "_loaded", None)
    monkeypatch.setattr(kernels, "_reason", None)
    monkeypatch.setenv("TFORMER_KERNELS", "0")
    assert kernels.load() is None
    assert "TFORMER_KERNELS=0" in kernels.unavailable_reason()


def test_a_failing_compiler_gives_its_message_and_no_library(monkeypatch, tmp_path):
    monkeypatch.setattr(kernels, "_loaded", None)
    monkeypatch.setattr(kernels, "_reason", None)
    monkeypatch.setenv("TFORMER_CACHE", str(tmp_path))
    monkeypatch.delenv("TFORMER_KERNELS_DIR", raising=False)  # built in the cache's kernels/
    fake = tmp_path / "cc"
    fake.write_text("#!/bin/sh\necho 'cc: error: no such option' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    assert kernels.load() is None
    assert "compiling the kernels failed: cc: error: no such option" in kernels.unavailable_reason()
    assert not list((tmp_path / "kernels").glob("*.so"))  # nothing half-written is left


@pytest.mark.parametrize("one_visit", [False, True], ids=["two passes", "one visit"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("v", [5, 37, 8000])  # 37: rows end in a partial vector
def test_cross_entropy_kernel_equals_the_float64_formula(compiled, smoothing, v, dtype, one_visit):
    """Each row's loss and log-sum-exp, and the gradient in the logits' dtype, against
    float64 torch: from the forward and backward kernels, and from the one that does both
    in one visit of each row."""
    g = torch.Generator().manual_seed(v)
    logits = (torch.randn(67, v, generator=g) * 6).to(dtype)
    logits[3, :] = -30.0  # a flat row, and a row whose target is far below its maximum
    logits[4, 0] = 80.0
    targets = torch.randint(0, v, (67,), generator=g)
    targets[4] = 1
    row_scale = torch.rand(67, generator=g)
    if one_visit:
        loss, lse, grad = compiled.smoothed_ce_forward_backward(
            logits, targets, row_scale, smoothing
        )
    else:
        loss, lse = compiled.smoothed_ce_forward(logits, targets, smoothing)
        grad = compiled.smoothed_ce_backward(logits, targets, lse, row_scale, smoothing)
    exact = logits.double()
    log_p = torch.log_softmax(exact, -1)
    expected = -(1 - smoothing) * log_p.gather(-1, targets[:, None])[:, 0]
    expected -= smoothing * log_p.mean(-1)
    torch.testing.assert_close(lse.double(), torch.logsumexp(exact, -1), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=1e-5)
    q = torch.full_like(exact, smoothing / v)
    q[torch.arange(67), targets] += 1 - smoothing
    expected_grad = row_scale.double()[:, None] * (log_p.exp() - q)
    assert grad.dtype == dtype
    # Where p ~ eps / V, p - eps / V cancels: float32 leaves it a few units in the last
    # place of eps / V (2^-24 eps / V each), whatever the CPU's exp rounds to.
    cancellation = 4 * 2**-24 * smoothing / v
    if dtype == torch.bfloat16:  # 8 bits: within half a unit in the last place, and the above
        torch.testing.assert_close(
            grad.double(), expected_grad, rtol=2**-8, atol=cancellation + 1e-30
        )
    else:  # p = exp(x - lse) carries lse's rounding, half a unit of |lse| < 2^7: 2^-18 of p;
        # compared as p - q, each element within 2^-17 of p and the rounding of q
        p, scale = log_p.exp(), row_scale.double()[:, None]
        error = (grad.double() / scale - expected_grad / scale).abs()
        bound = 2**-17 * p + 2**-22 * q + cancellation + 1e-30
        assert (error <= bound).all(), (error / bound).max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1001, 1 << 22])  # one thread; split over the threads
def test_gelu_tanh_and_its_gradient_match_the_formula_in_float64(compiled, dtype, n):
    g = torch.Generator().manual_seed(0)
    # and the ends of the range: zero, large values, huge ones (n + 4 values in all)
    z = torch.cat([torch.randn(n, generator=g) * 4, torch.tensor([0.0, -30, 30, 1e30])])
    z = z.to(dtype)
    grad = torch.randn(z.shape, generator=g).to(dtype)
    # 0.5 z (1 + tanh(u)) = z sigmoid(2u): the same function, without the cancellation of
    # 1 + tanh(u) that makes even float64 give 0 below z ~ -6.5
    x = z.double()
    u = math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)
    s = torch.sigmoid(2 * u)
    exact = x * s
    slope = math.sqrt(2 / math.pi) * (1 + 3 * 0.044715 * x**2)
    exact_grad = grad.double() * (s + torch.nan_to_num(2 * x * s * (1 - s) * slope))
    y = compiled.gelu_tanh(z)
    y_too, derivative = compiled.gelu_tanh_and_derivative(z)  # the forward pass in training
    assert torch.equal(y_too, y) and derivative.dtype == torch.float32
    dz = grad * derivative if dtype == torch.float32 else compiled.scale_bf16(grad, derivative)
    assert y.dtype == dz.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(y.double(), exact, rtol=2e-6, atol=1e-7)
        torch.testing.assert_close(dz.double(), exact_grad, rtol=2e-5, atol=1e-6)
    else:  # float32 inside, then rounded: at most one bfloat16 step off, mostly exact
        torch.testing.assert_close(y.double(), exact, rtol=2**-7, atol=1e-6)
        torch.testing.assert_close(dz.double(), exact_grad, rtol=2**-7, atol=1e-6)
        assert (y == exact.to(dtype)).float().mean() > 0.98
        assert (dz == exact_grad.to(dtype)).float().mean() > 0.98
    # torch's own, the path the model falls back to: the same within its precision
    torch.testing.assert_close(y, nn.functional.gelu(z, approximate="tanh"))
    torch_grad = torch.ops.aten.gelu_backward(grad, z, approximate="tanh")
    torch.testing.assert_close(dz[:-1], torch_grad[:-1])  # torch's is NaN at 1e30


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_model_s_gelu_uses_the_kernels_and_autograd_agrees(compiled, dtype):
    from tformer.nn.activations import gelu_tanh

    z = torch.randn(64, 300, dtype=torch.float64).to(dtype).requires_grad_()
    ours = gelu_tanh(z)
    assert ours.grad_fn is not None and "Compiled" in type(ours.grad_fn).__name__
    reference = gelu_tanh(z, compiled=False)
    weights = torch.randn_like(z)
    (grad,) = torch.autograd.grad((ours * weights).sum(), z)
    (expected,) = torch.autograd.grad((reference * weights).sum(), z)
    if dtype == torch.float32:
        torch.testing.assert_close(ours, reference, rtol=2e-6, atol=1e-7)
        torch.testing.assert_close(grad, expected, rtol=2e-5, atol=1e-6)
    else:  # both float32 inside, rounded once to bfloat16
        torch.testing.assert_close(ours, reference, rtol=2**-7, atol=1e-6)
        torch.testing.assert_close(grad, expected, rtol=2**-7, atol=1e-6)


@pytest.mark.parametrize("n", [1001, 1 << 16])  # one thread; split over the threads
def test_round_bf16_rounds_as_torch_does_and_keeps_nan(compiled, n):
    g = torch.Generator().manual_seed(n)
    # normal values only: a CPU's own conversion instruction may flush subnormal ones
    x = torch.randn(n, generator=g) * torch.logspace(-30, 30, n)
    # halfway between two bf16 values (the lower 16 bits 0x8000): to the even one; an
    # exponent field of 1 to 254
    top = torch.randint(0x0080, 0x7F00, (64,), generator=g, dtype=torch.int32)
    ties = (top << 16) | 0x8000
    x[:64] = ties.view(torch.float32)
    x[64:70] = torch.tensor([float("inf"), -float("inf"), 0.0, -0.0, 3.4e38, -3.4e38])
    x[70] = float("nan")
    b = compiled.round_bf16(x)
    expected = x.to(torch.bfloat16)
    assert b.dtype == torch.bfloat16 and b.shape == x.shape
    finite = ~x.isnan()
    assert torch.equal(b[finite].view(torch.int16), expected[finite].view(torch.int16))
    assert b[70].isnan()


@pytest.mark.parametrize("n", [1001, 1 << 16])
def test_add_bf16_is_torch_s_mixed_dtype_add(compiled, n):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(12, n // 12, generator=g) * 100
    b = torch.randn(x.shape, generator=g).to(torch.bfloat16)
    x[0, :3] = torch.tensor([float("inf"), float("nan"), 1.0])
    b[0, :3] = torch.tensor([-float("inf"), 1.0, float("nan")])
    y = compiled.add_bf16(x, b)
    assert y.dtype == torch.float32
    assert torch.equal(y[1:], x[1:] + b[1:]) and torch.equal(y[0, 3:], x[0, 3:] + b[0, 3:])
    assert y[0, :3].isnan().all()


def test_the_casts_refuse_what_they_cannot_read(compiled):
    x, b = torch.randn(4, 6), torch.randn(4, 6).to(torch.bfloat16)
    for bad in (x.t(), x.double(), b):
        with pytest.raises(ValueError, match="round_bf16"):
            compiled.round_bf16(bad)
    for bad_x, bad_b in ((x, b.float()), (x.bfloat16(), b), (x.t(), b.t()), (x, b[:, :5])):
        with pytest.raises(ValueError, match="add_bf16"):
            compiled.add_bf16(bad_x, bad_b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1001, 1 << 16])  # one thread; split over the threads
def test_exact_gelu_and_its_derivative_match_the_formula_in_float64(compiled, dtype, n):
    g = torch.Generator().manual_seed(1)
    # and the ends: zero, the left tail (y tiny, not 0), large values, huge ones
    ends = torch.tensor([0.0, -5, -9, -12.5, -30, 30, 1e30, -1e30])
    z = torch.cat([torch.randn(n, generator=g) * 4, ends]).to(dtype)
    x = z.double()
    cdf = 0.5 * torch.special.erfc(-x / math.sqrt(2))  # Phi, without 1 + erf's cancellation
    exact = x * cdf
    derivative = cdf + torch.nan_to_num(x * torch.exp(-(x**2) / 2) / math.sqrt(2 * math.pi))
    y, d = compiled.gelu_and_derivative(z)
    assert y.dtype == d.dtype == dtype
    assert torch.equal(y, compiled.gelu(z))  # the forward-only kernel: the same values
    # Abramowitz and Stegun's erfc: absolute error below 1.5e-7
    if dtype == torch.float32:
        torch.testing.assert_close(y.double(), exact, rtol=2e-6, atol=3e-7)
        torch.testing.assert_close(d.double(), derivative, rtol=1e-6, atol=2e-7)
    else:  # float32 inside, rounded once: at most one bfloat16 step off, mostly exact
        torch.testing.assert_close(y.double(), exact, rtol=2**-8, atol=1e-6)
        torch.testing.assert_close(d.double(), derivative, rtol=2**-8, atol=1e-6)
        body = x.abs() < 3  # (the tail's few percent are more than a bfloat16 step)
        assert (y == exact.to(dtype))[body].float().mean() > 0.98
        assert (d == derivative.to(dtype))[body].float().mean() > 0.98
    # the left tail does not cancel to 0 (as 1 + erf does in torch's): within 5% to -12.5
    tail = (x < -3) & (x >= -12.5)
    assert ((y.double() - exact)[tail].abs() <= 0.05 * exact[tail].abs()).all()
    # torch's own, the path the model falls back to: the same within its precision (torch's
    # 1 + erf loses ~1e-6 to cancellation)
    close = {"rtol": 1.3e-6, "atol": 1.5e-6} if dtype == torch.float32 else {}
    torch.testing.assert_close(y, nn.functional.gelu(z), **close)
    grad = torch.randn(z.shape, generator=g).to(dtype)
    torch.testing.assert_close(grad * d, torch.ops.aten.gelu_backward(grad, z), **close)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("contiguous", [True, False])
def test_the_model_s_exact_gelu_uses_the_kernels_and_autograd_agrees(compiled, dtype, contiguous):
    from tformer.nn.activations import gelu

    z = torch.randn(64, 300, dtype=torch.float64).to(dtype)
    z = (z if contiguous else z.t()).requires_grad_()  # made contiguous for the kernel
    ours = gelu(z)
    assert ours.grad_fn is not None and "Compiled" in type(ours.grad_fn).__name__
    reference = gelu(z, compiled=False)
    weights = torch.randn_like(z)
    (grad,) = torch.autograd.grad((ours * weights).sum(), z)
    (expected,) = torch.autograd.grad((reference * weights).sum(), z)
    assert grad.dtype == dtype and grad.shape == z.shape
    close = {"rtol": 2e-6, "atol": 1.5e-6} if dtype == torch.float32 else {}
    torch.testing.assert_close(ours, reference, **close)
    torch.testing.assert_close(grad, expected, **close)
    with torch.no_grad():  # no derivative to keep: the forward-only kernel, no graph
        plain = gelu(z)
    assert plain.grad_fn is None and torch.equal(plain, ours.detach())


def test_every_kernel_source_is_installed_with_the_package():
    """pyproject.toml's package data must carry what the kernels compile from."""
    from fnmatch import fnmatch
    from pathlib import Path

    import tomllib

    root = Path(__file__).parents[2]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]["tformer"]
    package = Path(kernels.__file__).parents[1]
    for source in (*build.SOURCES, *build.HEADERS):
        name = source.relative_to(package).as_posix()
        assert any(fnmatch(name, pattern) for pattern in patterns), name


def test_missing_sources_mean_torch_s_kernels_not_a_crash(monkeypatch, tmp_path):
    monkeypatch.setenv("TFORMER_KERNELS", "1")
    monkeypatch.setattr(build, "HEADERS", (tmp_path / "gone.h",))
    monkeypatch.setattr(kernels, "_loaded", None)
    monkeypatch.setattr(kernels, "_reason", None)
    assert kernels.load() is None
    assert "not installed" in kernels.unavailable_reason()


def attention_in_float64(qkv: torch.Tensor, n_heads: int, grad_out: torch.Tensor):
    """The formula through autograd in float64: out (B, T, C), P (B, H, T, T), grad of qkv."""
    b, t, three_c = qkv.shape
    d = three_c // 3 // n_heads
    x = qkv.double().requires_grad_()
    q, k, v = x.view(b, t, 3, n_heads, d).permute(2, 0, 3, 1, 4)  # (B, H, T, D) each
    scores = q @ k.transpose(-2, -1) / math.sqrt(d)
    future = ~torch.ones(t, t, dtype=torch.bool).tril()
    weights = scores.masked_fill(future, float("-inf")).softmax(-1)
    out = (weights @ v).transpose(1, 2).reshape(b, t, three_c // 3)
    out.backward(grad_out.double())
    return out.detach(), weights.detach(), x.grad


@pytest.mark.parametrize(
    "b, t, h, d",
    [
        (3, 64, 4, 32),
        (2, 13, 3, 24),
        (1, 1, 2, 16),
        (2, 128, 2, 64),
        (1, 9, 1, 8),
        (2, 40, 2, 24),
        (2, 21, 3, 17),
    ],
)  # nanoGPT's shape; sizes that end in partial blocks of 8 rows and 16 lanes; one position;
# K^T and V^T in whole 16 x 16 blocks and the rest (40 x 24); an odd head width (the bf16
# pairs' last pair half padding)
def test_causal_attention_kernel_matches_the_formula_in_float64(compiled, pairs, b, t, h, d):
    g = torch.Generator().manual_seed(t * 100 + d)
    qkv = (torch.randn(b, t, 3 * h * d, generator=g) * 1.5).bfloat16()
    grad_out = torch.randn(b, t, h * d, generator=g).bfloat16()
    out, weights = compiled.causal_attention(qkv, h, pairs)
    grad_qkv = compiled.causal_attention_backward(qkv, weights, grad_out, h)
    exact_out, exact_weights, exact_grad = attention_in_float64(qkv, h, grad_out)
    assert out.dtype == grad_qkv.dtype == torch.bfloat16
    assert weights.dtype == (torch.bfloat16 if pairs else torch.float32)
    assert torch.equal(weights.triu(1), torch.zeros_like(weights))  # nothing from the future
    # P: float32's error, or one rounding to bf16 (half a step: at most 2^-8 of the value)
    rtol, atol = (2**-8, 1e-6) if pairs else (0, 1e-6)
    torch.testing.assert_close(weights.double(), exact_weights, rtol=rtol, atol=atol)
    # float32 inside, one rounding to bfloat16 at the end: within about one bf16 step; with
    # pairs, P and dS rounded to bf16 before their products as well: within two
    steps = 2 if pairs else 1
    for ours, exact in ((out, exact_out), (grad_qkv, exact_grad)):
        scale = exact.abs().max()
        torch.testing.assert_close(
            ours.double() / scale, exact / scale, rtol=steps * 2**-7, atol=steps * 2**-9
        )


def test_causal_attention_kernel_gradient_reads_nothing_from_the_future(compiled, pairs):
    """A value at a later position that overflows dO V^T (inf there) leaves the earlier
    rows' gradients finite: row i's sums run over j <= i only, as the formula's."""
    b, t, h, d = 1, 24, 1, 16
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(b, t, 3 * h * d, generator=g).bfloat16()
    qkv[0, 20, 2 * d :] = 3e38  # V at position 20
    grad_out = torch.randn(b, t, h * d, generator=g).bfloat16()
    grad_out[0, 17] = 1e10  # dO_17 . V_20 overflows float32
    _, weights = compiled.causal_attention(qkv, h, pairs)
    grad_qkv = compiled.causal_attention_backward(qkv, weights, grad_out, h)
    dq = grad_qkv[0, :, :d]  # row i of dQ reads dS row i: positions j <= i
    assert torch.isfinite(dq[:20]).all()
    exact = attention_in_float64(qkv, h, grad_out)[2][0, :17, :d]
    scale, steps = exact.abs().max(), 2 if pairs else 1  # as the test above
    torch.testing.assert_close(
        dq[:17].double() / scale, exact / scale, rtol=steps * 2**-7, atol=steps * 2**-9
    )


def test_causal_attention_kernel_is_closer_to_the_exact_values_than_the_explicit_path(
    compiled, pairs
):
    g = torch.Generator().manual_seed(0)
    b, t, h, d = 4, 64, 4, 32
    qkv = torch.randn(b, t, 3 * h * d, generator=g).bfloat16()
    grad_out = torch.randn(b, t, h * d, generator=g).bfloat16()
    out, weights = compiled.causal_attention(qkv, h, pairs)
    grad_qkv = compiled.causal_attention_backward(qkv, weights, grad_out, h)
    exact_out, _, exact_grad = attention_in_float64(qkv, h, grad_out)
    x = qkv.clone().requires_grad_()  # the explicit path's torch operations in bf16
    q, k, v = x.view(b, t, 3, h, d).permute(2, 0, 3, 1, 4)
    torch_out = explicit_attention(q, k, v, causal_mask(t, t))
    torch_out = torch_out.transpose(1, 2).reshape(b, t, h * d)
    torch_out.backward(grad_out)

    def error(ours, exact):
        return ((ours.double() - exact).norm() / exact.norm()).item()

    assert error(out, exact_out) < error(torch_out, exact_out)
    assert error(grad_qkv, exact_grad) < error(x.grad, exact_grad)


def test_causal_attention_kernel_refuses_what_it_cannot_read(compiled):
    qkv = torch.randn(2, 5, 3 * 2 * 8).bfloat16()
    out, weights = compiled.causal_attention(qkv, 2)
    grad = torch.randn(2, 5, 16).bfloat16()
    bad_inputs = [
        lambda: compiled.causal_attention(qkv.float(), 2),  # not bf16
        lambda: compiled.causal_attention(qkv[:, :, :45], 2),  # 45 is not 3 H D
        lambda: compiled.causal_attention(qkv.transpose(0, 1), 2),  # not contiguous
        lambda: compiled.causal_attention(qkv[0], 2),  # not (B, T, 3C)
        lambda: compiled.causal_attention_backward(qkv, weights[:, :1], grad, 2),
        lambda: compiled.causal_attention_backward(qkv, weights, grad.float(), 2),
        lambda: compiled.causal_attention_backward(qkv, weights, grad[:, :4], 2),
        lambda: compiled.causal_attention_backward(qkv, weights.half(), grad, 2),
    ]
    if compiled.attention_pairs_available():  # bf16 weights: the pairs' backward's
        bf16_weights = compiled.causal_attention(qkv, 2, pairs=True)[1]
        bad_inputs += [
            lambda: compiled.causal_attention(qkv.float(), 2, pairs=True),
            lambda: compiled.causal_attention_backward(qkv, bf16_weights[:, :1], grad, 2),
            lambda: compiled.causal_attention_backward(qkv, bf16_weights, grad.float(), 2),
        ]
    else:  # neither pairs nor their weights where the kernel is not built
        bad_inputs += [
            lambda: compiled.causal_attention(qkv, 2, pairs=True),
            lambda: compiled.causal_attention_backward(qkv, weights.bfloat16(), grad, 2),
        ]
    for call in bad_inputs:
        with pytest.raises(ValueError):
            call()


def test_denormals_are_flushed_on_every_thread_of_the_pool(compiled):
    from tformer.devices import flush_denormals

    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # one multiply split over two threads
    x = torch.full((1 << 20,), 1e-20)
    try:
        assert (x * 1e-20 > 0).all()  # 1e-40: a denormal, not flushed by default
        torch.set_flush_denormal(True)  # torch's own: the calling thread only
        assert not (x * 1e-20 == 0).all()
        assert flush_denormals(True) is True  # the calling thread's state before
        assert (x * 1e-20 == 0).all()
        assert flush_denormals(False) is True
        assert (x * 1e-20 > 0).all()
        assert flush_denormals(False) is False
    finally:
        flush_denormals(False)
        torch.set_num_threads(threads)


@pytest.mark.parametrize("t", [64, 48, 13])  # whole blocks of 16 (P formed in place), or not
def test_the_attention_kernel_reads_only_what_it_wrote_of_the_weights_tensor(compiled, pairs, t):
    """The weights tensor handed to the kernel is uninitialised memory, which the forward
    pass uses as its scratch where T is whole blocks: filled with NaN first, the results are
    those of a zeroed one, to the bit."""
    b, h, d = 2, 3, 32
    g = torch.Generator().manual_seed(t)
    qkv = torch.randn(b, t, 3 * h * d, generator=g).bfloat16()
    grad = torch.randn(b, t, h * d, generator=g).bfloat16()
    results = []
    kernel = compiled.library.tformer_causal_attention_bf16
    if pairs:
        kernel = compiled.library.tformer_causal_attention_pairs
    for fill in (float("nan"), 0.0):
        out = torch.empty(b, t, h * d, dtype=torch.bfloat16)
        weights = torch.full((b, h, t, t), fill, dtype=torch.bfloat16 if pairs else torch.float32)
        failed = kernel(qkv.data_ptr(), out.data_ptr(), weights.data_ptr(), b, t, h, d)
        assert failed == 0
        results.append((out, weights, compiled.causal_attention_backward(qkv, weights, grad, h)))
    assert all(torch.equal(x, y) for x, y in zip(*results, strict=True))
    assert not results[0][1].triu(1).any()


@pytest.mark.parametrize("t", [33, 64])  # T a whole number of blocks or not; D 24 is not
def test_the_attention_kernel_gives_the_same_bits_on_any_number_of_threads(compiled, pairs, t):
    # Each thread's buffer serves several heads in turn: a head that read what the one
    # before left behind would come out differently when the heads are shared out otherwise.
    b, h, d = 3, 4, 24
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(b, t, 3 * h * d, generator=g).bfloat16()
    grad = torch.randn(b, t, h * d, generator=g).bfloat16()
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            out, weights = compiled.causal_attention(qkv, h, pairs)
            grad_qkv = compiled.causal_attention_backward(qkv, weights, grad, h)
            results.append((out, weights, grad_qkv))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert all(torch.equal(x, y) for x, y in zip(results[0], other, strict=True))


# below the kernel's 65,536 elements one thread sums; above, each thread's range ends inside
# one tensor and the next starts there (for 1 and 3 threads at different places)
@pytest.mark.parametrize("sizes", [[0], [1], [5, 0, 17], [40_000, 3, 30_001, 1], [300_000, 77]])
@pytest.mark.parametrize("threads", [1, 3])
def test_sum_squares_is_the_exact_sum_over_all_the_tensors(compiled, sizes, threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)  # the kernels' OpenMP threads follow torch's
    try:
        check_sum_squares(compiled, sizes)
    finally:
        torch.set_num_threads(before)


def check_sum_squares(compiled, sizes):
    g = torch.Generator().manual_seed(sum(sizes))
    tensors = [
        torch.randn(n, generator=g) * 10.0 ** torch.randint(-3, 4, (), generator=g).item()
        for n in sizes
    ]
    exact = math.fsum((t.double() ** 2).sum().item() for t in tensors)
    # squares and sums in double: ~1e-14 relative at these counts, where float32 sums drift
    # to ~1e-5
    assert compiled.sum_squares(tensors) == pytest.approx(exact, rel=1e-12, abs=1e-300)
    if sum(sizes):
        assert exact > 0


def test_sum_squares_refuses_what_it_cannot_read(compiled):
    for bad in (torch.ones(4, dtype=torch.float64), torch.ones(4, 4).t(), torch.ones(4).bfloat16()):
        with pytest.raises(ValueError, match="contiguous float32 CPU"):
            compiled.sum_squares([torch.ones(3), bad])


def test_the_library_is_kept_in_tformer_kernels_dir_else_in_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("TFORMER_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("TFORMER_KERNELS_DIR", raising=False)
    assert build.library_dir() == tmp_path / "cache" / "kernels"
    monkeypatch.setenv("TFORMER_KERNELS_DIR", str(tmp_path / "built"))
    assert build.library_dir() == (tmp_path / "built").resolve()
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is not None:
        assert build.library_path(compiler).parent == (tmp_path / "built").resolve()


def test_a_relative_kernels_dir_is_made_absolute(monkeypatch, tmp_path):
    """ctypes looks a bare file name up in the system's library paths, not here."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TFORMER_KERNELS_DIR", ".")
    assert build.library_dir() == tmp_path.resolve()
