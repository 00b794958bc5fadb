import json

import pytest
import torch
from torch import nn

from tformer.nn.packed_linear import PROMPT_ROWS, PackedLinear, quantize_int8


def test_int8_quantisation_error_is_at_most_half_a_step_per_weight():
    w = torch.randn(64, 48, generator=torch.Generator().manual_seed(0))
    w[3] = 0.0  # an all-zero row must stay zero, not divide by zero
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    assert torch.equal(q[3], torch.zeros(48, dtype=torch.int8))
    error = (q.float() * scale[:, None] - w).abs()
    assert (error <= scale[:, None] / 2 + 1e-7).all()
    # The largest weight of each row is represented exactly (up to float rounding).
    assert torch.allclose(q.abs().amax(1)[torch.arange(64) != 3].float(), torch.tensor(127.0))


@pytest.mark.parametrize("weight_dtype", ["float32", "bfloat16", "int8", "int4"])
def test_packed_linear_equals_linear_on_its_rounded_weights_for_few_and_many_rows(weight_dtype):
    g = torch.Generator().manual_seed(1)
    linear = nn.Linear(40, 24)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(24, 40, generator=g))
        linear.bias.copy_(torch.randn(24, generator=g))
    packed = PackedLinear.from_linear(linear, weight_dtype)
    if weight_dtype == "int8":
        rounded = packed.stored_weight().double() * packed.scale.double()[:, None]
    else:
        rounded = packed.stored_weight().double()
    most = packed.kernel_max_rows = 8  # the C kernels up to M = 8 rows of x, then torch
    for rows in (1, most // 2, most, 3 * most):
        x = torch.randn(2, rows, 40, generator=g)  # (B, T, K): M = 2 * rows
        with torch.inference_mode():
            out = packed(x)
        assert out.shape == (2, rows, 24) and out.dtype == torch.float32
        reference = x.double() @ rounded.T + linear.bias.double()
        # Many rows may compute in bfloat16 (on CPUs that have it): x rounded to 8 bits.
        tight = weight_dtype == "float32" or 2 * rows <= most
        tolerance = 1e-4 if tight or packed.compute_dtype == torch.float32 else 0.3
        torch.testing.assert_close(out.double(), reference, rtol=0, atol=tolerance)


def test_w8a8_rounds_each_row_of_x_and_both_paths_compute_the_same_sums():
    """w8a8: x_q = round(x / s_x), s_x = max |x| / 127 per row; then the integer sums times
    both scales. The kernels (few rows) and torch's float32 matmul (many rows) agree to a
    rounding of float32 (their sums are exact for K <= 1040, then scaled)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 40, generator=g)
    x[2] = 0.0
    x_q, s_x = quantize_int8(x)  # the activations' rounding: the weights' formula
    assert x_q.dtype == torch.int8 and x_q.abs().max() == 127
    assert s_x[2] == 1.0 and torch.equal(x_q[2], torch.zeros(40, dtype=torch.int8))
    torch.testing.assert_close(s_x[[0, 1, 3]], x[[0, 1, 3]].abs().amax(1) / 127)
    assert ((x_q.float() * s_x[:, None] - x).abs() <= s_x[:, None] / 2 + 1e-7).all()
    linear = nn.Linear(40, 24)
    packed = PackedLinear.from_linear(linear, "w8a8")
    assert packed.compute_dtype == torch.float32  # never bfloat16: the sums must stay exact
    q, scale = quantize_int8(linear.weight)
    assert torch.equal(packed.stored_weight(), q) and torch.equal(packed.scale, scale)
    with torch.inference_mode():
        by_torch = packed.by_torch(x)
        expected = (x_q.double() @ q.double().T) * s_x.double()[:, None] * scale.double()
        torch.testing.assert_close(by_torch.double(), expected + linear.bias.double())
        if packed.kernels is not None:
            torch.testing.assert_close(packed.by_kernels(x), by_torch, rtol=1e-6, atol=1e-6)


def test_w4a8_rounds_each_group_of_x_and_both_paths_compute_the_same_sums():
    """w4a8: int4's weights (quantize_int4), x rounded per group of 32 k of a row
    (quantize_groups); the kernels and the torch path (a group at a time) against the
    formula written out in float64, and the head-free layer against nn.Linear within the
    two roundings' bound."""
    from tformer.nn.packed_linear import dequantize_int4, quantize_groups, quantize_int4

    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, 70, generator=g) * 3
    x[2, 32:64] = 0.0  # a group of zeros: scale 1, p 0
    p, s_x = quantize_groups(x)
    assert p.shape == (6, 3, 32) and s_x.shape == (6, 3) and s_x[2, 1] == 1.0
    assert torch.equal(p[:, 2, 6:], torch.zeros(6, 26))  # the short last group: zeros
    torch.testing.assert_close(s_x[:, 0], x[:, :32].abs().amax(1) / 127)
    assert ((p.view(6, -1)[:, :70] * s_x.repeat_interleave(32, 1)[:, :70] - x).abs()
            <= s_x.repeat_interleave(32, 1)[:, :70] / 2 + 1e-6).all()  # fmt: skip
    linear = nn.Linear(70, 24)
    packed = PackedLinear.from_linear(linear, "w4a8")
    assert packed.compute_dtype == torch.float32 and packed.scale is None
    q, d = quantize_int4(linear.weight)
    torch.testing.assert_close(packed.stored_weight(), dequantize_int4(q, d), rtol=0, atol=0)
    w = torch.full((24, 96), 8.0, dtype=torch.float64)
    w[:, :70] = q.double()
    sums = torch.einsum("mtk,ntk->mnt", p.double(), (w - 8).view(24, 3, 32))
    expected = (sums * d.double()[None] * s_x.double()[:, None]).sum(2) + linear.bias.double()
    with torch.inference_mode():
        paths = [packed.by_torch(x)] + ([packed.by_kernels(x)] if packed.kernels else [])
    for out in paths:
        torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-5)
    exact = x.double() @ dequantize_int4(q, d).double().T + linear.bias.double()
    assert (paths[0].double() - exact).abs().max() < 0.05 * exact.abs().max()


def test_packed_linear_refuses_to_train():
    packed = PackedLinear.from_linear(nn.Linear(8, 4), "int8")
    with pytest.raises(RuntimeError, match="inference"):
        packed(torch.randn(1, 8, requires_grad=True))


def test_unknown_weight_dtype_is_rejected():
    with pytest.raises(ValueError, match="unknown weight dtype 'int2'"):
        PackedLinear.from_linear(nn.Linear(8, 4), "int2")


def test_pack_linear_layers_swaps_every_linear_layer_and_keeps_a_tied_weight():
    from tformer.nn.packed_linear import pack_linear_layers, packed_layers

    embedding = nn.Embedding(11, 8)
    model = nn.ModuleDict(
        {"inner": nn.Sequential(nn.Linear(8, 8), nn.ReLU()), "head": nn.Linear(8, 11, bias=False)}
    )
    model["head"].weight = embedding.weight  # tied, as GPT-2's head
    x = torch.randn(3, 8)
    with torch.no_grad():
        expected = model["head"](model["inner"](x))
    assert pack_linear_layers(model, "float32") == ["inner.0", "head"]
    assert set(packed_layers(model)) == {"inner.0", "head"}
    assert not any(type(m) is nn.Linear for m in model.modules())
    with torch.inference_mode():
        torch.testing.assert_close(model["head"](model["inner"](x)), expected)
    with pytest.raises(ValueError, match="unknown weights"):
        pack_linear_layers(nn.Linear(2, 2), "float16")


@pytest.mark.parametrize(
    ("torch_wins_from", "expected"), [(8, 4), (1, 0), (None, "any"), (PROMPT_ROWS, 16)]
)
def test_calibration_keeps_the_kernels_up_to_the_last_row_count_they_held_at(
    monkeypatch, torch_wins_from, expected
):
    """Row counts 1, 2, 4, 8, 16, then a prompt's; torch takes over only where clearly
    faster, and where it never is the kernels keep every count."""
    from tformer.nn import packed_linear

    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    packed_linear.pack_linear_layers(model, "float32")
    if packed_linear.packed_layers(model)["0"].kernels is None:
        pytest.skip("no C kernels here: nothing to calibrate")

    def fastest(run, x, repeats):  # kernels 1 s; torch 0.5 s from torch_wins_from rows on
        if run.__name__ == "by_kernels":
            return 1.0
        return 0.5 if torch_wins_from is not None and x.shape[0] >= torch_wins_from else 1.0

    monkeypatch.setattr(packed_linear, "_fastest", fastest)
    limits = packed_linear.calibrate_kernel_rows(model, most_rows=16)
    want = packed_linear.ANY if expected == "any" else expected
    assert limits == {"8x8 float32": want, "4x8 float32": want}
    layers = packed_linear.packed_layers(model).values()
    assert all(layer.kernel_max_rows == want for layer in layers)


def test_calibration_is_kept_for_the_kernel_library_and_read_back(monkeypatch, tmp_path):
    """With cached=True what was measured once is read back, not measured again; another
    row count, or a file that is not what calibration writes, is measured (and kept)."""
    from tformer.nn import packed_linear

    monkeypatch.setenv("TFORMER_CACHE", str(tmp_path / "cache"))
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    packed_linear.pack_linear_layers(model, "float32")
    layer = packed_linear.packed_layers(model)["0"]
    if layer.kernels is None:
        pytest.skip("no C kernels here: nothing to calibrate")
    seen = []

    def fastest(run, x, repeats):  # torch twice as fast from 4 rows on
        seen.append(x.shape[0])
        return 1.0 if run.__name__ == "by_kernels" or x.shape[0] < 4 else 0.5

    monkeypatch.setattr(packed_linear, "_fastest", fastest)
    limits = packed_linear.calibrate_kernel_rows(model, most_rows=8, cached=True)
    assert limits == {"8x8 float32": 2, "4x8 float32": 2} and seen
    store = packed_linear.calibration_file(layer.kernels)
    assert store.is_relative_to(tmp_path / "cache") and store.exists()

    seen.clear()
    for each in packed_linear.packed_layers(model).values():
        each.kernel_max_rows = 99
    assert packed_linear.calibrate_kernel_rows(model, most_rows=8, cached=True) == limits
    assert not seen, "measured again what the cache holds"
    assert all(each.kernel_max_rows == 2 for each in packed_linear.packed_layers(model).values())

    assert packed_linear.calibrate_kernel_rows(model, most_rows=2, cached=True) == {
        "8x8 float32": 2,
        "4x8 float32": 2,
    }
    assert seen, "another row count is another measurement"
    store.write_text("[not, json", encoding="utf-8")
    seen.clear()
    assert packed_linear.calibrate_kernel_rows(model, most_rows=8, cached=True) == limits
    assert seen and json.loads(store.read_text(encoding="utf-8"))  # measured and written again


def test_calibration_measures_an_output_head_at_batch_rows_only(monkeypatch):
    """Prefill unembeds the last position only: a layer named in `heads` is never timed at a
    prompt's rows (PROMPT_ROWS), the other layers are."""
    from tformer.nn import packed_linear

    model = nn.ModuleDict({"inner": nn.Linear(8, 8), "lm_head": nn.Linear(8, 11)})
    packed_linear.pack_linear_layers(model, "float32")
    if packed_linear.packed_layers(model)["inner"].kernels is None:
        pytest.skip("no C kernels here: nothing to calibrate")
    seen = {}

    def fastest(run, x, repeats):
        seen.setdefault(run.__self__.out_features, set()).add(x.shape[0])
        return 1.0

    monkeypatch.setattr(packed_linear, "_fastest", fastest)
    packed_linear.calibrate_kernel_rows(model, most_rows=4, heads=("lm_head",))
    assert seen == {8: {1, 2, 4, PROMPT_ROWS}, 11: {1, 2, 4}}
