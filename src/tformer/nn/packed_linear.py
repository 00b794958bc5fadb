"""A linear layer with its weights stored narrower, for fast decoding.

    y = x W^T + b,   W stored as float32, bfloat16, int8 with one scale per output row, or
    int4 with one scale per group of 32 k of a row (ggml's q4_0):
    int8 (symmetric):   s_n = max_k |W_nk| / 127,   q_nk = round(W_nk / s_n),   W ≈ q s
    int4, group t:      d = m / -8 (m the W_nk of the group with the largest |W_nk|, d kept
                        as float16), q = min(15, ⌊W_nk / d + 8.5⌋) in [0, 15],   W ≈ (q - 8) d

Decoding reads every weight once per token, so narrower weights mean proportionally less
memory traffic: bfloat16 halves it, int8 quarters it, int4 (4.5 bits a weight with its
scales) takes it to 14%. For these only the stored weights change (weight-only):
activations, bias and accumulation stay float32 (`x` in, float32 out).

w8a8 stores the weights as int8 does and also quantises each row of x, at each call, to
int8 with a scale of its own (the same formula over the row's K values):

    y_in = ((x_q,i . q_n) s_x,i) s_n + b_n     the dot product x_q,i . q_n summed exactly

Where a step has many rows (batches, beams, prompts) a linear layer is bound by the
multiply-adds, and the integer units issue more of them a cycle (kernels/integer_linear.c);
the price is the rounding of x, which the weight-only formats do not pay.

w4a8 stores the weights as int4 does and rounds x to int8 per group of 32 k of a row, with
a scale per group (as llama.cpp multiplies q4_0 weights by q8_0 activations):

    s_x,it = max_{k in t} |x_ik| / 127,   p_ik = round(x_ik / s_x,it)
    y_in = sum_t (p_i,t . (q_n,t - 8)) d_nt s_x,it + b_n     each dot product exact

For int4 weights this is the cheap product: a byte of two weights meets the integer
multiply-adds after an `and` and a shift, where the weight-only kernel widens each weight to
a float first.

On the CPU, where the C kernels load, the weights are stored in the panels they read
(tformer.kernels, kernels/linear.c: each weight read once for all the rows, in register
tiles), and the kernels run up to `kernel_max_rows` rows. Beyond it (a long prompt), or on
a GPU, torch's matmul runs: float32 weights as they are, the others in bfloat16 where the
hardware computes in it natively, else in float32 (on the CPU from the panels unpacked, a
copy per call); w8a8's quantised rows and weights in float32, whose sums are exact up to
K = 1040 (127^2 K < 2^24) and rounded beyond (the kernels' int32 sums are exact up to
K = 133,144); w4a8's the same, a group at a time (always exact). Inference only: no
gradients flow through; and a packed layer stays on the device and in the dtypes it was
packed with (pack again rather than move it).

`pack_linear_layers(model, "int8")` swaps every nn.Linear of a model for a PackedLinear of
the same weights (a tied output head included: it packs the shared weight); the swap is
one-way, and `packed_layers` finds the packed layers again.
"""

import contextlib
import math
import time
from pathlib import Path

import torch
from torch import nn

from tformer import kernels
from tformer.devices import bf16_supported
from tformer.files import atomic_write_json, cache_dir, read_cached_json
from tformer.kernels.bindings import LinearLayout

WEIGHT_DTYPES = ("float32", "bfloat16", "int8", "int4", "w8a8", "w4a8")
GROUP = 32  # int4: k per scale

# Up to this many rows the C kernels run. With one row they read the weights at memory
# bandwidth; with more they compute in float32 at nearly the CPU's peak (docs/LOG.md, session
# 14), where torch must first unpack the panels: float32 keeps to the kernels at any count.
# On a CPU with native bfloat16 matrix units (AMX) torch's bfloat16 matmul computes several
# times faster once there are enough rows to use them, so the bfloat16 and int8 limits stay
# low. `tformer generate` and `tformer serve` measure the crossover on their CPU once and
# keep it (calibrate_kernel_rows); these defaults hold elsewhere. Measured on the AMD
# machine (benchmarks/decode_linear.py), where the kernels were faster at every row count
# up to 128; not yet on the Intel one. int4's torch path dequantises every weight at each
# call, which costs more than the kernels' work for a 512-token prompt: its kernels run at
# any count unless a calibration says otherwise; nor do w8a8's and w4a8's, whose torch paths
# multiply in float32.
ANY = math.inf  # a limit of no limit: compares with any row count (not JSON, not a range)
KERNEL_MAX_ROWS = {
    "float32": ANY,
    "bfloat16": 16,
    "int8": 32,
    "int4": ANY,
    "w8a8": ANY,
    "w4a8": ANY,
}
# The rows of a prompt's prefill, the last count calibrate_kernel_rows measures.
PROMPT_ROWS = 512


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float -> int8 q (N, K) and float32 scale (N,), with q * scale[:, None] ≈ weight.
    w8a8 rounds each step's activation rows (M, K) the same way (as its kernels do)."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1) / 127.0  # (N,)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row stays zero
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def quantize_int4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float -> q (N, K) uint8 in [0, 15] and scale d (N, T) float16, one per group
    of GROUP k (T = ceil(K / GROUP), a short last group), as ggml's q4_0 computes them:
    (q - 8) d ≈ weight. d is m / -8 for m the group's value of largest magnitude, so m itself
    is exactly -8 d before d's rounding; q is computed with the unrounded d."""
    w = weight.detach().float()
    n, k = w.shape
    t = -(-k // GROUP)
    groups = torch.zeros(n, t * GROUP, device=w.device)
    groups[:, :k] = w
    groups = groups.view(n, t, GROUP)
    largest = groups.gather(2, groups.abs().argmax(dim=2, keepdim=True))  # (N, T, 1)
    d = largest / -8.0
    inverse = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    q = torch.trunc(groups * inverse + 8.5).clamp(0, 15).to(torch.uint8)  # ggml: min(15, ...)
    return q.view(n, t * GROUP)[:, :k].contiguous(), d.squeeze(2).to(torch.float16)


def quantize_groups(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows x (M, K) float -> p (M, T, GROUP) float32 holding integers in [-127, 127]
    (K padded with zeros to T whole groups) and the scales s_x (M, T), as w4a8's kernels
    round each group of GROUP k of a row: s_x = max |x| / 127 (1 for zeros), p = round(x / s_x)."""
    m, k = x.shape
    t = -(-k // GROUP)
    groups = torch.zeros(m, t * GROUP, device=x.device)
    groups[:, :k] = x
    groups = groups.view(m, t, GROUP)
    scale = groups.abs().amax(dim=2) / 127.0  # (M, T)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.round(groups / scale[:, :, None]).clamp(-127, 127), scale


def dequantize_int4(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The float32 (N, K) weights of quantize_int4's q and scale."""
    n, k = q.shape
    d = scale.float().repeat_interleave(GROUP, dim=1)[:, :k]  # (N, K)
    return (q.float() - 8.0) * d


class PackedLinear(nn.Module):
    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None, weight_dtype: str = "bfloat16"
    ) -> None:
        super().__init__()
        if weight_dtype not in WEIGHT_DTYPES:
            raise ValueError(
                f"unknown weight dtype {weight_dtype!r}; choose one of {', '.join(WEIGHT_DTYPES)}"
            )
        self.weight_dtype = weight_dtype
        self.out_features, self.in_features = weight.shape
        scale = group_scale = None
        if weight_dtype in ("int8", "w8a8"):
            stored, scale = quantize_int8(weight)
        elif weight_dtype in ("int4", "w4a8"):
            stored, group_scale = quantize_int4(weight)
        else:
            stored = weight.detach().to(getattr(torch, weight_dtype)).contiguous()
        device = weight.device
        self.kernels = kernels.load() if device.type == "cpu" else None
        # The weights once: as the kernels' panels where they run (int4's scales inside
        # them), else (N, K) with int4's scales (N, K / GROUP) beside.
        if self.kernels is not None and weight_dtype == "int4":
            self.register_buffer("panels", self.kernels.pack_int4(stored, group_scale))
            self.weight = self.group_scale = None
        elif self.kernels is not None and weight_dtype == "w8a8":
            self.register_buffer("panels", self.kernels.pack_w8a8(stored))
            self.weight = self.group_scale = None
        elif self.kernels is not None and weight_dtype == "w4a8":
            self.register_buffer("panels", self.kernels.pack_w4a8(stored, group_scale))
            self.weight = self.group_scale = None
        elif self.kernels is not None:
            self.register_buffer("panels", self.kernels.pack_linear(stored))
            self.weight = self.group_scale = None
        else:
            self.register_buffer("weight", stored)  # (N, K)
            self.register_buffer("group_scale", group_scale)  # (N, K / GROUP): int4, w4a8
            self.panels = None
        self.register_buffer("scale", scale)  # (N,) for int8 and w8a8, else None
        b = bias.detach().float().contiguous() if bias is not None else None
        self.register_buffer("bias", b)  # (N,)
        self.compute_dtype = torch.float32
        if weight_dtype not in ("float32", "w8a8", "w4a8") and bf16_supported(device):
            self.compute_dtype = torch.bfloat16
        # Up to this many rows the C kernels run, beyond it torch's matmul; measured on the
        # CPU in use by calibrate_kernel_rows, else the figures of KERNEL_MAX_ROWS.
        self.kernel_max_rows = KERNEL_MAX_ROWS[weight_dtype]

    @classmethod
    def from_linear(cls, linear: nn.Linear, weight_dtype: str) -> "PackedLinear":
        return cls(linear.weight, linear.bias, weight_dtype)

    def extra_repr(self) -> str:
        path = "C kernels" if self.kernels is not None else "torch"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"weight_dtype={self.weight_dtype}, small batches: {path}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., K) -> (..., N), float32."""
        if x.requires_grad:
            raise RuntimeError("PackedLinear is for inference: it does not compute gradients")
        shape = x.shape[:-1]
        x = x.reshape(-1, self.in_features).float()  # (M, K)
        if self.kernels is not None and x.shape[0] <= self.kernel_max_rows:
            out = self.by_kernels(x)
        else:
            out = self.by_torch(x)
        return out.view(*shape, self.out_features)

    def stored_weight(self) -> torch.Tensor:
        """The stored weights as (N, K), in their dtype (int8 without its scale; int4 and
        w4a8, which have no dtype, as the float32 values of q and its scales): a copy where
        the kernels' panels hold them."""
        n, k = self.out_features, self.in_features
        if self.weight_dtype in ("int4", "w4a8"):
            return dequantize_int4(*self.int4_weight())
        if self.panels is None:
            return self.weight
        if self.weight_dtype == "w8a8":
            return self.kernels.unpack_w8a8(self.panels, n, k)
        return self.kernels.unpack_linear(self.panels, n, k)

    def int4_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """int4's and w4a8's q (N, K) and scale (N, T), unpacked where the panels hold them."""
        n, k = self.out_features, self.in_features
        if self.panels is None:
            return self.weight, self.group_scale
        if self.weight_dtype == "w4a8":
            return self.kernels.unpack_w4a8(self.panels, n, k)
        return self.kernels.unpack_int4(self.panels, n, k)

    def by_kernels(self, x: torch.Tensor) -> torch.Tensor:
        """(M, K) float32 -> (M, N) through the C kernels."""
        out = torch.empty(x.shape[0], self.out_features, device=x.device)
        if self.weight_dtype == "w4a8":
            linear = self.kernels.linear_w4a8
        elif self.weight_dtype == "w8a8":
            linear = self.kernels.linear_w8a8
        else:
            linear = self.kernels.linear
        linear(x.contiguous(), self.panels, self.scale, self.bias, out)
        return out

    def layout(self) -> "LinearLayout":
        """This layer as the fused decoding steps read it (kernels/decode_block.c), a
        LinearLayout (kernels/bindings.py) pointing at this layer's tensors."""
        n, k = self.out_features, self.in_features
        return self.kernels.linear_layout(
            self.panels, self.scale, self.bias, n, k, self.weight_dtype
        )

    def torch_weight(self) -> torch.Tensor:
        """The (N, K) weight by_torch multiplies by, in the compute dtype (int8 values are
        exact in bfloat16; int4's, q times a float16 scale, are rounded to it): for int4
        panels dequantised in C, in one pass."""
        if self.weight_dtype == "int4" and self.panels is not None:
            n, k = self.out_features, self.in_features
            return self.kernels.dequantize_int4(self.panels, n, k, self.compute_dtype)
        return self.stored_weight().to(self.compute_dtype)

    def by_torch(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """(M, K) float32 -> (M, N) through torch's matmul, by `weight` if given (the
        torch_weight() made beforehand), else made now (w4a8: its q and scales, by_groups)."""
        if self.weight_dtype == "w4a8":
            return self.by_groups(x) + (self.bias if self.bias is not None else 0.0)
        weight = self.torch_weight() if weight is None else weight
        if self.weight_dtype == "w8a8":  # the integer sums, in float32 (see the top)
            rows, row_scale = quantize_int8(x)
            out = nn.functional.linear(rows.float(), weight) * row_scale[:, None]
        else:
            out = nn.functional.linear(x.to(self.compute_dtype), weight).float()
        if self.scale is not None:  # x (q s)^T = (x q^T) s: cheaper than dequantising
            out = out * self.scale
        if self.bias is not None:
            out = out + self.bias
        return out

    def by_groups(self, x: torch.Tensor) -> torch.Tensor:
        """w4a8's y (M, N) = sum_t (p_t . (q_t - 8)) d_t s_x,t in torch, a group t at a time:
        each group's integer sum is exact in float32 (at most 32 * 127 * 8 < 2^24); the
        terms are added in order of t, as the kernels add them (not fused, so the last bit
        may differ)."""
        q, d = self.int4_weight()
        n, k = q.shape
        t = d.shape[1]
        weights = torch.full((n, t * GROUP), 8.0, device=x.device)
        weights[:, :k] = q.float()
        weights = (weights - 8.0).view(n, t, GROUP)
        rows, row_scale = quantize_groups(x)  # (M, T, GROUP), (M, T)
        out = torch.zeros(x.shape[0], n, device=x.device)
        for g in range(t):
            sums = rows[:, g] @ weights[:, g].T  # (M, N)
            out = out + sums * (d[:, g].float()[None, :] * row_scale[:, g, None])
        return out


TAKEOVER = 1.1  # torch's matmul takes over where the kernels take 10% longer


def calibrate_kernel_rows(
    model: nn.Module,
    most_rows: int,
    repeats: int = 5,
    cached: bool = False,
    heads: tuple[str, ...] = (),
) -> dict:
    """Measure, on the CPU in use, up to how many rows (1, 2, 4, ..., most_rows, then
    PROMPT_ROWS for a prefill) the C kernels are about as fast as torch's matmul or faster,
    for each shape of packed layer in the model, and set every layer's kernel_max_rows to
    it -> {"NxK dtype": rows, or ANY where they held at every count}. Torch takes over where
    it is clearly faster (by TAKEOVER), so timing noise at a near tie does not switch paths.

    Where the crossover lies depends on the CPU: on one without native bfloat16 torch
    widens bfloat16 weights at every call and the kernels win at any batch; with AMX
    torch wins early. With `cached`, what was measured once for this kernel library (this
    CPU, compiler and sources), torch version and thread count is kept in the cache
    (calibration_file) and read back instead of measured again: `tformer generate` and
    `tformer serve` do so. The layers named in `heads` (a language model's output head:
    prefill unembeds the last position only) never see a prompt's rows, so a shape that
    only they have is measured up to most_rows."""
    shapes: dict[tuple[int, int, str], list[PackedLinear]] = {}
    prompt_shapes = set()
    for name, layer in packed_layers(model).items():
        if layer.kernels is not None:
            key = (layer.out_features, layer.in_features, layer.weight_dtype)
            shapes.setdefault(key, []).append(layer)
            if name not in heads:
                prompt_shapes.add(key)
    if not shapes:
        return {}
    store = calibration_file(next(iter(shapes.values()))[0].kernels) if cached else None
    known = read_calibration(store) if store else {}
    batch = [2**i for i in range(most_rows.bit_length()) if 2**i < most_rows] + [most_rows]
    limits, measured = {}, False
    with torch.inference_mode():
        for (n, k, dtype), layers in shapes.items():
            prompt = (n, k, dtype) in prompt_shapes and most_rows < PROMPT_ROWS
            counts = batch + [PROMPT_ROWS] if prompt else batch
            entry = f"{n}x{k} {dtype} at {','.join(map(str, counts))} rows"
            if entry in known:
                limit = ANY if known[entry] is None else known[entry]
            else:
                limit, measured = _kernel_limit(layers[0], counts, repeats), True
                known[entry] = None if limit == ANY else limit
            for each in layers:
                each.kernel_max_rows = limit
            limits[f"{n}x{k} {dtype}"] = limit
    if store and measured:
        with contextlib.suppress(OSError):  # a read-only cache: measured again next time
            atomic_write_json(store, known)
    return limits


def _kernel_limit(layer: "PackedLinear", counts: list[int], repeats: int) -> int | float:
    """The last of `counts` up to which the layer's kernels hold against torch (ANY: all)."""
    for i, m in enumerate(counts):
        x = torch.randn(m, layer.in_features)
        kernel_time = _fastest(layer.by_kernels, x, repeats)
        if kernel_time > TAKEOVER * _fastest(layer.by_torch, x, repeats):
            return counts[i - 1] if i else 0
    return ANY


def calibration_file(library: kernels.Kernels) -> Path:
    """Where calibrate_kernel_rows keeps its limits for a kernel library, in the cache's
    kernels/: named by the library (a hash of the sources, compiler, flags and CPU), torch
    and the threads."""
    name = f"{library.path.stem}.rows.torch-{torch.__version__}.{torch.get_num_threads()}-threads"
    return cache_dir() / "kernels" / f"{name}.json"


def read_calibration(path: Path) -> dict:
    """The limits kept in `path`, {} where there are none or the file is not what this
    writes (it is then measured and written again)."""
    return {
        entry: limit
        for entry, limit in read_cached_json(path).items()
        if limit is None or (isinstance(limit, int) and not isinstance(limit, bool) and limit >= 0)
    }


MEASURE_SECONDS = 0.25  # _fastest stops repeating a call after this long (2 runs at least)


def _fastest(run, x: torch.Tensor, repeats: int) -> float:
    run(x)  # warm: caches, and torch's first-call work
    best, spent = float("inf"), 0.0
    for i in range(repeats):
        start = time.perf_counter()
        run(x)
        seconds = time.perf_counter() - start
        best, spent = min(best, seconds), spent + seconds
        if i >= 1 and spent > MEASURE_SECONDS:  # a slow call varies little from run to run
            break
    return best


def pack_linear_layers(
    model: nn.Module, weight_dtype: str, overrides: dict[str, str] | None = None
) -> list[str]:
    """Replace every nn.Linear inside `model` with a PackedLinear holding its weights as
    `weight_dtype` (or as `overrides[name]` for the layers it names); returns the replaced
    layers' names. A subclass of nn.Linear (a LoRA layer) computes more than its weight and
    is refused: merge it first."""
    overrides = overrides or {}
    if weight_dtype not in WEIGHT_DTYPES:
        raise ValueError(
            f"unknown weights {weight_dtype!r}; choose one of {', '.join(WEIGHT_DTYPES)}"
        )
    linear = [  # the layers inside the model, not the model itself
        (name, module)
        for name, module in model.named_modules()
        if name and isinstance(module, nn.Linear)
    ]
    special = [name for name, module in linear if type(module) is not nn.Linear]
    if special:
        raise ValueError(
            f"cannot pack {', '.join(special)}: not plain linear layers (LoRA layers: merge "
            "them first, tformer.nn.lora.merge_lora)"
        )
    with torch.no_grad():
        for name, module in linear:
            parent, _, child = name.rpartition(".")
            owner = model.get_submodule(parent) if parent else model
            dtype = overrides.get(name, weight_dtype)
            setattr(owner, child, PackedLinear.from_linear(module, dtype))
    return [name for name, _ in linear]


def packed_layers(model: nn.Module) -> dict[str, PackedLinear]:
    """Every PackedLinear of `model`, by module name, and those it holds outside its
    modules, by the names its `packed_outside_modules()` gives them (the encoder-decoder's
    packed copy of its output projection)."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, PackedLinear)}
    outside = getattr(model, "packed_outside_modules", None)
    return {**layers, **(outside() if callable(outside) else {})}
