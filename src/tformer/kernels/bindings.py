"""The C kernels as Python functions: each C function's signature beside its wrapper.

The wrappers take and return torch tensors; the C functions read and write raw memory, so
every tensor handed to them must be contiguous, on the CPU, of the dtype and shape the
function expects. The inner loops of decoding (linear) leave that to their caller; the
attention kernels, called once per layer, check it here.

    kernels.pack_linear(weight) -> panels   (N, K) float32, bfloat16 or int8, as linear reads it
    kernels.unpack_linear(panels, n, k) -> weight (N, K)
    kernels.pack_int4(q, scale) -> panels   int4: q (N, K) in [0, 15], a float16 scale per 32 k
    kernels.dequantize_int4(panels, n, k, dtype) -> (N, K) (q - 8) d, float32 or bfloat16
    kernels.linear(x, panels, scale, bias, out)   x (M, K) float32 -> out (M, N)
    kernels.pack_w8a8(q) -> panels   int8 q (N, K) for linear_w8a8, four k a column in 32 bits
    kernels.unpack_w8a8(panels, n, k) -> q (N, K)
    kernels.linear_w8a8(x, panels, scale, bias, out)   the same with x quantised to int8 per
        row and integer products (kernels/integer_linear.c)
    kernels.pack_w4a8(q, scale) -> panels   int4's q and scales for linear_w4a8
    kernels.unpack_w4a8(panels, n, k) -> q (N, K), scale (N, T)
    kernels.linear_w4a8(x, panels, scale, bias, out)   int4 weights (scale unused: the
        panels hold theirs) times x quantised to int8 per group of 32 k, integer products
        (kernels/integer_linear.c)
    kernels.smoothed_ce_forward(logits, targets, eps)   (N, V) float32 or bf16 -> loss, lse (N,)
    kernels.smoothed_ce_forward_backward(logits, targets, row_scale, eps) -> loss, lse, grad
    kernels.dropout_mask(n, seed, threshold)   -> (n,) bool, True with P = threshold / 65536
    kernels.masked_scale(x, mask, scale)   -> x * mask * scale, float32 or bfloat16, one pass
    kernels.gelu_tanh(z), kernels.gelu_tanh_and_derivative(z) -> y, dy/dz (float32)
        float32 or bfloat16; kernels.scale_bf16(grad, d) -> grad * d in bfloat16;
        kernels.scale_bf16_column_sums(grad, d) -> the same (rows, cols), its column sums
    kernels.gelu(z), kernels.gelu_and_derivative(z) -> y, dy/dz   float32 or bfloat16
    kernels.sum_squares(tensors)   float32 tensors -> the sum of all their elements' squares
    kernels.layer_norm_bf16_out(x, gamma, beta, eps)   x (N, C) float32 -> y (N, C) bfloat16,
        mean, rstd (N,); kernels.layer_norm_backward_bf16(dy, x, mean, rstd, gamma) -> dx
        (N, C) float32, dgamma, dbeta (C,); kernels.add_layer_norm_bf16_out(x, add, gamma,
        beta, eps) -> h = x + add, y = its norm in bf16, mean, rstd, and its backward
        add_layer_norm_backward_bf16(dy, dh, h, mean, rstd, gamma) -> dx, dx in bf16, dgamma,
        dbeta
    kernels.round_bf16(x) -> bfloat16 of float32 x; kernels.add_bf16(x, b) -> x + b, x
        float32, b bfloat16 (kernels/casts.c)
    kernels.product_bf16(a, w, bias=None, transposed=True)   a (M, K) bf16 times w^T (w (N,
        K)) or w (K, N), plus bias -> (M, N) bf16, the rows split over the threads as the
        other kernels split them; kernels.weight_gradient_bf16(dy, x) -> dy^T x (N, K)
        float32 (kernels/products.c, on AVX-512 BF16: products_available())
    kernels.transpose16(a)   a (C, R) bfloat16 or float16, the transposed view of a row-major
        (R, C) -> a copy of it, row-major
    kernels.causal_attention(qkv, n_heads, pairs=False)   qkv (B, T, 3C) bf16 -> out (B, T,
        C), weights P: float32 products, or bf16 pairs on AVX-512 BF16
        (attention_pairs_available())
    kernels.causal_attention_backward(qkv, weights, grad_out, n_heads)   -> grad_qkv
    kernels.causal_softmax(scores, first)   a block's causal scores (..., n, e) bf16, in place
        -> the weights P; kernels.causal_softmax_backward(weights, grad, first) -> dS in grad
    kernels.flash_attention(q, k, v)   (B, H, T, D) bf16 or float32 -> out (B, T, H, D), lse
        (B, H, T): long causal self-attention, bf16 on AMX (flash_attention_available()),
        float32 on the vector units
    kernels.flash_attention_backward(q, k, v, grad_out, out, lse)   -> grad (B, T, 3, H, D)
    kernels.slot_attention(qkv, k_cache, v_cache, positions)   -> out (B, C)
    kernels.padded_attention(qkv, mask, n_heads)   qkv (B, T, 3C) float32, mask (B, T) ->
        out (B, T, C): an encoder's self-attention over padded sequences
    kernels.decode_step(blocks, ids, embeddings, final_norm, x, work, ...)   one decoding step
        of pre-LN GPT-2 before its head: embeddings, blocks, final norm -> x (M, C)
    kernels.decode_cross_blocks(blocks, x, work, ..., memory_k, memory_v, strides, mask, ...)
        the same for the encoder-decoder's post-LN decoder layers, with cross-attention
    kernels.top_logits(logits, n, log_sum_exp=True)   (M, V) float32 -> log-sum-exp (M,)
        (or None), the n largest (M, n) best first and their ids (M, n) int64
    kernels.flush_denormals(on)   on every thread of the pool -> threads set
    kernels.denormals_flushed()   on the calling thread?
"""

import ctypes
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch

from tformer.kernels.build import KernelUnavailable

POINTER, SIZE, REAL = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
Wrapper = TypeVar("Wrapper", bound=Callable)

# Every C function a wrapper calls: name -> (argument types, return type; None for void).
SIGNATURES: dict[str, tuple[list[type], type | None]] = {}


def c_function(
    name: str, argtypes: list[type], restype: type | None = None
) -> Callable[[Wrapper], Wrapper]:
    """Declare a C function that the decorated wrapper calls (restype None: it returns
    nothing). The wrapper itself is returned unchanged; Kernels.bind gives the declared
    types to the library, so that ctypes converts the arguments instead of guessing."""

    def declare(wrapper: Wrapper) -> Wrapper:
        SIGNATURES[name] = (argtypes, restype)
        return wrapper

    return declare


def by_dtype(z: torch.Tensor) -> str:
    """The suffix of the C function for z's dtype: the kernels come in bf16 and f32."""
    return "bf16" if z.dtype == torch.bfloat16 else "f32"


GROUP = 32  # int4: k per scale, as kernels/linear.c
# decode_block.c's enum linear_kind, by PackedLinear's weight dtype
LINEAR_KINDS = {"float32": 0, "bfloat16": 1, "int8": 2, "int4": 3, "w8a8": 4, "w4a8": 5}
W8A8_STEP = 4  # w8a8: k per 32-bit lane of a panel, as kernels/integer_linear.c
W4A8_PANEL = 16  # w4a8: output columns per panel, as kernels/integer_linear.c


HUGE_PAGE = 2 << 20
MADV_HUGEPAGE = 14  # Linux's madvise advice


def on_huge_pages(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor`, contiguous, in memory Linux is asked to back with 2 MiB pages
    (madvise MADV_HUGEPAGE) before it is written. Decoding streams every weight once per
    token: with 4 KiB pages each page is a TLB miss and a stop for the hardware
    prefetchers (docs/LOG.md). For a tensor under a huge page, or off Linux, just
    `tensor.contiguous()`; where the system gives no huge pages, the advice changes nothing."""
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes < HUGE_PAGE or sys.platform != "linux":
        return tensor.contiguous()
    out = torch.empty(nbytes + HUGE_PAGE, dtype=torch.uint8)
    start = -out.data_ptr() % HUGE_PAGE  # the first 2 MiB boundary inside
    whole = (nbytes // HUGE_PAGE) * HUGE_PAGE
    if whole:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise(
            ctypes.c_void_p(out.data_ptr() + start), ctypes.c_size_t(whole), MADV_HUGEPAGE
        )  # fmt: skip  (advice: failing changes nothing)
    aligned = out[start : start + nbytes].view(tensor.dtype).view(tensor.shape)
    aligned.copy_(tensor)
    return aligned


def check_int4(q: torch.Tensor, scale: torch.Tensor) -> None:
    """ValueError unless q (N, K) is uint8 in [0, 15] and scale (N, ceil(K / GROUP)) float16,
    as quantize_int4 makes them: a wider q would spill into its neighbour's 4 bits."""
    n, k = q.shape
    if q.dtype != torch.uint8 or (q.numel() and int(q.max()) > 15):
        raise ValueError("int4 weights are uint8 in [0, 15] (quantize_int4's)")
    if scale.dtype != torch.float16 or tuple(scale.shape) != (n, -(-k // GROUP)):
        raise ValueError(f"int4 scales are float16 ({n}, {-(-k // GROUP)}), one per {GROUP} k")


class AdamWTensor(ctypes.Structure):
    """adamw.c's struct adamw_tensor: one parameter's place in an AdamW step."""

    _fields_ = [
        ("param", POINTER),
        ("exp_avg", POINTER),
        ("exp_avg_sq", POINTER),
        ("step", POINTER),
        ("size", SIZE),
        ("group", SIZE),
        ("compiled", SIZE),
    ]


class AdamWGroup(ctypes.Structure):
    """adamw.c's struct adamw_group: a parameter group's settings."""

    _fields_ = [
        ("lr", ctypes.c_double),
        ("beta1", ctypes.c_double),
        ("beta2", ctypes.c_double),
        ("weight_decay", ctypes.c_double),
        ("eps", ctypes.c_double),
    ]


class AdamWPlan:
    """The tensors of an AdamW step laid out for kernels/adamw.c once, to be reused while
    none of them has moved (the plan holds them: their addresses stay theirs while it
    lives): a step then writes only the gradients' and the copies' addresses.

    entries: per parameter (param, exp_avg, exp_avg_sq, step, group index, compiled), param
    and the moments contiguous float32 CPU tensors of one size, step its float32 scalar;
    compiled False for a tensor whose update the caller leaves to torch (its gradient still
    counts towards the norm). Checked here: ValueError."""

    def __init__(self, entries: list[tuple]) -> None:
        count = len(entries)
        self.tensors = (AdamWTensor * count)()
        for entry, (param, exp_avg, exp_avg_sq, step, group, compiled) in zip(
            self.tensors, entries, strict=True
        ):
            for x in (param, exp_avg, exp_avg_sq):
                if x.dtype != torch.float32 or x.device.type != "cpu" or not x.is_contiguous():
                    raise ValueError("adamw: the states must be contiguous float32 CPU tensors")
                if x.numel() != param.numel():
                    raise ValueError("adamw: a moment of another size than its parameter")
            if step.dtype != torch.float32 or step.device.type != "cpu" or step.numel() != 1:
                raise ValueError("adamw: a step must be a float32 CPU scalar")
            entry.param, entry.exp_avg = param.data_ptr(), exp_avg.data_ptr()
            entry.exp_avg_sq, entry.step = exp_avg_sq.data_ptr(), step.data_ptr()
            entry.size, entry.group, entry.compiled = param.numel(), group, int(compiled)
        self.entries = entries
        self.sizes = [entry.size for entry in self.tensors]
        self.groups = 1 + max((entry.group for entry in self.tensors), default=-1)
        self.grads = (POINTER * count)()
        self.copies = (POINTER * count)()


class LinearLayout(ctypes.Structure):
    """decode_block.c's struct tformer_linear: one packed layer."""

    _fields_ = [
        ("panels", POINTER),
        ("scale", POINTER),
        ("bias", POINTER),
        ("n", SIZE),
        ("k", SIZE),
        ("kind", SIZE),
    ]


class BlockLayout(ctypes.Structure):
    """decode_block.c's struct tformer_block: one pre-LN block's norms and layers."""

    _fields_ = [
        ("norm1_weight", POINTER),
        ("norm1_bias", POINTER),
        ("norm2_weight", POINTER),
        ("norm2_bias", POINTER),
        ("qkv", LinearLayout),
        ("out", LinearLayout),
        ("up", LinearLayout),
        ("down", LinearLayout),
    ]


class CrossBlockLayout(ctypes.Structure):
    """decode_block.c's struct tformer_cross_block: one post-LN decoder layer of the
    encoder-decoder, its three norms and six layers."""

    _fields_ = [
        ("norm1_weight", POINTER),
        ("norm1_bias", POINTER),
        ("norm2_weight", POINTER),
        ("norm2_bias", POINTER),
        ("norm3_weight", POINTER),
        ("norm3_bias", POINTER),
        ("qkv", LinearLayout),
        ("out", LinearLayout),
        ("cross_q", LinearLayout),
        ("cross_out", LinearLayout),
        ("up", LinearLayout),
        ("down", LinearLayout),
    ]


@dataclass(frozen=True)
class Kernels:
    library: ctypes.CDLL
    path: Path
    avx512: bool
    panel: int  # output columns per panel of linear's weights: two vectors of the build
    w8a8_panel: int  # output columns per panel of linear_w8a8's weights

    @classmethod
    @c_function("tformer_has_avx512", [], ctypes.c_int)
    @c_function("tformer_linear_panel", [], ctypes.c_int)
    @c_function("tformer_w8a8_panel", [], ctypes.c_int)
    @c_function("tformer_w4a8_panel", [], ctypes.c_int)
    def bind(cls, library: ctypes.CDLL, path: Path) -> "Kernels":
        """The wrappers over a loaded library, each of its C functions given its signature."""
        for name, (argtypes, restype) in SIGNATURES.items():
            function = getattr(library, name)
            function.argtypes, function.restype = argtypes, restype
        if library.tformer_w4a8_panel() != W4A8_PANEL:
            raise KernelUnavailable(f"{path}: w4a8 panels of another width than W4A8_PANEL")
        return cls(
            library,
            path,
            bool(library.tformer_has_avx512()),
            library.tformer_linear_panel(),
            library.tformer_w8a8_panel(),
        )

    def pack_linear(self, weight: torch.Tensor) -> torch.Tensor:
        """weight (N, K) -> the panels linear reads (kernels/linear.c), a copy: N padded with
        zero rows to G panels of P = self.panel columns each,

            float32, int8   (G, K, P)          panels[g, k, j] = W[g P + j, k]
            bfloat16        (G, K/2, P, 2)     panels[g, p, j] = (W[g P + j, 2p], W[.., 2p+1])

        with K padded by a zero column to even for bfloat16: each pair is one 32-bit lane."""
        n, k = weight.shape
        groups, p = -(-n // self.panel), self.panel
        pad_k = k % 2 if weight.dtype == torch.bfloat16 else 0
        padded = torch.zeros(groups * p, k + pad_k, dtype=weight.dtype)
        padded[:n, :k] = weight
        if weight.dtype == torch.bfloat16:  # (G, P, K/2, 2) -> (G, K/2, P, 2)
            return on_huge_pages(padded.view(groups, p, (k + pad_k) // 2, 2).permute(0, 2, 1, 3))
        return on_huge_pages(padded.view(groups, p, k).transpose(1, 2))

    @c_function("tformer_unpack_linear", [POINTER, POINTER] + [SIZE] * 3)
    def unpack_linear(self, panels: torch.Tensor, n: int, k: int) -> torch.Tensor:
        """The (N, K) weight that pack_linear packed into `panels`, a new tensor, in C
        (torch's permute and copy, the reference in the tests, was 2.3x slower for bfloat16:
        a long prompt's torch path unpacks at every call). ValueError for panels that are
        not an (N, K) weight's of this build."""
        if panels.dtype not in (torch.float32, torch.bfloat16, torch.int8):
            raise ValueError(f"panels of float32, bfloat16 or int8, not {panels.dtype}")
        if panels.device.type != "cpu" or not panels.is_contiguous():
            raise ValueError("unpack_linear reads contiguous panels on the CPU")
        pairs = 2 if panels.dtype == torch.bfloat16 else 1
        size = -(-n // self.panel) * self.panel * (-(-k // pairs) * pairs)
        if panels.numel() != size:
            raise ValueError(f"these panels do not hold an ({n}, {k}) weight of this build")
        out = torch.empty(n, k, dtype=panels.dtype)
        self.library.tformer_unpack_linear(
            panels.data_ptr(), out.data_ptr(), n, k, panels.element_size()
        )
        return out

    def pack_int4(self, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """q (N, K) uint8 in [0, 15] and scale (N, T) float16, one per group of GROUP k
        (T = ceil(K / GROUP)), w = (q - 8) scale -> the uint8 panels linear reads, a copy:

            (G, T, 2 P + GROUP P / 2)   per panel g and group t: the P scales' bytes, then
                                        for each k of the group P / 2 bytes, byte j holding
                                        column j's q (low 4 bits) and column j + P/2's (high)

        N padded to G panels with q = 8, scale 0 (zero weights); K to whole groups the same
        way (the kernel never reads the padding's k)."""
        check_int4(q, scale)
        n, k = q.shape
        groups, p, t = -(-n // self.panel), self.panel, -(-k // GROUP)
        padded = torch.full((groups * p, t * GROUP), 8, dtype=torch.uint8)
        padded[:n, :k] = q
        scales = torch.zeros(groups * p, t, dtype=torch.float16)
        scales[:n] = scale
        padded = padded.view(groups, p, t, GROUP)
        nibbles = padded[:, : p // 2] | (padded[:, p // 2 :] << 4)  # (G, P/2, T, GROUP)
        nibbles = nibbles.permute(0, 2, 3, 1).reshape(groups, t, GROUP * p // 2)
        scale_bytes = scales.view(groups, p, t).permute(0, 2, 1).contiguous().view(torch.uint8)
        return on_huge_pages(torch.cat([scale_bytes, nibbles], dim=2))  # (G, T, 2P + GROUP P/2)

    def unpack_int4(
        self, panels: torch.Tensor, n: int, k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The q (N, K) and scale (N, T) that pack_int4 packed into `panels`, new tensors."""
        groups, t, _ = panels.shape
        p = self.panel
        scales = panels[:, :, : 2 * p].contiguous().view(torch.float16)  # (G, T, P)
        nibbles = panels[:, :, 2 * p :].reshape(groups, t, GROUP, p // 2)
        q = torch.cat([nibbles & 15, nibbles >> 4], dim=3)  # (G, T, GROUP, P)
        q = q.permute(0, 3, 1, 2).reshape(groups * p, t * GROUP)[:n, :k].contiguous()
        return q, scales.permute(0, 2, 1).reshape(groups * p, t)[:n].contiguous()

    @c_function("tformer_dequantize_int4", [POINTER, POINTER] + [SIZE] * 3)
    def dequantize_int4(
        self, panels: torch.Tensor, n: int, k: int, dtype: torch.dtype
    ) -> torch.Tensor:
        """The (N, K) weights w = (q - 8) d that pack_int4 packed into `panels`, float32 or
        bfloat16 (rounded), a new tensor in one pass in C: what torch's matmul multiplies by
        where the int4 kernels stop. ValueError for panels that are not an (N, K) weight's
        of this build."""
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"int4 weights dequantise to float32 or bfloat16, not {dtype}")
        if panels.dtype != torch.uint8 or panels.device.type != "cpu":
            raise ValueError("dequantize_int4 reads uint8 panels on the CPU")
        shape = (-(-n // self.panel), -(-k // GROUP), self.panel * 2 + GROUP * self.panel // 2)
        if tuple(panels.shape) != shape or not panels.is_contiguous():
            raise ValueError(f"these panels do not hold an ({n}, {k}) int4 weight of this build")
        out = torch.empty(n, k, dtype=dtype)
        self.library.tformer_dequantize_int4(
            panels.data_ptr(), out.data_ptr(), n, k, out.element_size()
        )
        return out

    def pack_w8a8(self, q: torch.Tensor) -> torch.Tensor:
        """int8 q (N, K) -> the panels linear_w8a8 reads (kernels/integer_linear.c), a copy:
        N padded with zero rows to G panels of P = self.w8a8_panel columns, K with zeros to
        a multiple of 4,

            (G, K/4, P, 4)     panels[g, t, j, l] = q[g P + j, 4 t + l]"""
        if q.dtype != torch.int8 or (q.numel() and int(q.min()) < -127):
            raise ValueError("w8a8 weights are int8 in [-127, 127] (quantize_int8's)")
        n, k = q.shape
        groups, p = -(-n // self.w8a8_panel), self.w8a8_panel
        steps = -(-k // W8A8_STEP)
        padded = torch.zeros(groups * p, steps * W8A8_STEP, dtype=torch.int8)
        padded[:n, :k] = q
        return on_huge_pages(padded.view(groups, p, steps, W8A8_STEP).transpose(1, 2))

    def unpack_w8a8(self, panels: torch.Tensor, n: int, k: int) -> torch.Tensor:
        """The int8 q (N, K) that pack_w8a8 packed into `panels`, a new tensor."""
        rows = panels.transpose(1, 2)  # (G, P, K/4, 4)
        return rows.reshape(panels.shape[0] * self.w8a8_panel, -1)[:n, :k].contiguous()

    def pack_w4a8(self, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """q (N, K) uint8 in [0, 15] and scale (N, T) float16, as pack_int4 takes them ->
        the uint8 panels linear_w4a8 reads (kernels/integer_linear.c), a copy:

            (G, T, 9, 2 P)   per panel g of P = W4A8_PANEL columns and group t, 9 rows of
                             32 bytes: the P scales, then for each of 4 steps s of 8 k
                             the 2 vectors v of 8 columns c, 4 bytes l a column:
                             q[g P + 8 v + c, GROUP t + 8 s + l] (low 4 bits) |
                             q[.., GROUP t + 8 s + 4 + l] << 4

        (four dimensions, where int4's panels have three: `linear` refuses these). N padded
        with zero weights (q = 8, scale 0) to whole panels, K with q = 8 to whole groups
        (the kernel multiplies those by zeros)."""
        check_int4(q, scale)
        n, k = q.shape
        groups, p, t = -(-n // W4A8_PANEL), W4A8_PANEL, -(-k // GROUP)
        padded = torch.full((groups * p, t * GROUP), 8, dtype=torch.uint8)
        padded[:n, :k] = q
        scales = torch.zeros(groups * p, t, dtype=torch.float16)
        scales[:n] = scale
        # k = GROUP t + 8 s + 4 h + l: (G, v, c, T, s, h, l)
        split = padded.view(groups, 2, p // 2, t, GROUP // 8, 2, 4)
        nibbles = split[..., 0, :] | (split[..., 1, :] << 4)  # (G, v, c, T, s, l)
        nibbles = nibbles.permute(0, 3, 4, 1, 2, 5).reshape(groups, t, GROUP * p // 2)
        scale_bytes = scales.view(groups, p, t).permute(0, 2, 1).contiguous().view(torch.uint8)
        rows = torch.cat([scale_bytes, nibbles], dim=2).view(groups, t, 9, 2 * p)
        return on_huge_pages(rows)

    def unpack_w4a8(
        self, panels: torch.Tensor, n: int, k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The q (N, K) and scale (N, T) that pack_w4a8 packed into `panels`, new tensors."""
        groups, t = panels.shape[:2]
        p = W4A8_PANEL
        scales = panels[:, :, 0].contiguous().view(torch.float16)  # (G, T, P)
        nibbles = panels[:, :, 1:].reshape(groups, t, GROUP // 8, 2, p // 2, 4)
        split = torch.stack([nibbles & 15, nibbles >> 4], dim=5)  # (G, T, s, v, c, h, l)
        q = split.permute(0, 3, 4, 1, 2, 5, 6).reshape(groups * p, t * GROUP)[:n, :k]
        return q.contiguous(), scales.permute(0, 2, 1).reshape(groups * p, t)[:n].contiguous()

    @c_function("tformer_linear_w4a8", [POINTER] * 4 + [SIZE] * 3, ctypes.c_int)
    def linear_w4a8(
        self,
        x: torch.Tensor,
        panels: torch.Tensor,
        scale: torch.Tensor | None,
        bias: torch.Tensor | None,
        out: torch.Tensor,
    ) -> torch.Tensor:
        """out (M, N) = x (M, K) W (N, K)^T + bias (N), W = (q - 8) d packed by pack_w4a8
        (`scale` unused: the d are inside), each group of 32 k of a row of x quantised to
        int8 (kernels/integer_linear.c). Every tensor contiguous and on the CPU, as
        linear's."""
        m, k = x.shape
        b = bias.data_ptr() if bias is not None else None
        status = self.library.tformer_linear_w4a8(
            x.data_ptr(), panels.data_ptr(), b, out.data_ptr(), m, out.shape[1], k
        )
        if status != 0:
            raise MemoryError(f"w4a8 linear: no memory for {m} quantised rows")
        return out

    @c_function("tformer_linear_w8a8", [POINTER] * 5 + [SIZE] * 3, ctypes.c_int)
    def linear_w8a8(
        self,
        x: torch.Tensor,
        panels: torch.Tensor,
        scale: torch.Tensor,
        bias: torch.Tensor | None,
        out: torch.Tensor,
    ) -> torch.Tensor:
        """out (M, N) = x (M, K) W (N, K)^T + bias (N), W = q * scale[:, None] with q packed
        by pack_w8a8, each row of x quantised to int8 (kernels/integer_linear.c). Every
        tensor contiguous and on the CPU, as linear's."""
        m, k = x.shape
        b = bias.data_ptr() if bias is not None else None
        status = self.library.tformer_linear_w8a8(
            x.data_ptr(), panels.data_ptr(), scale.data_ptr(), b, out.data_ptr(), m, out.shape[1], k
        )
        if status != 0:
            raise MemoryError(f"w8a8 linear: no memory for {m} quantised rows")
        return out

    @c_function("tformer_linear_f32", [POINTER] * 4 + [SIZE] * 3)
    @c_function("tformer_linear_bf16", [POINTER] * 4 + [SIZE] * 3)
    @c_function("tformer_linear_i8", [POINTER] * 5 + [SIZE] * 3)
    @c_function("tformer_linear_i4", [POINTER] * 4 + [SIZE] * 3, ctypes.c_int)
    def linear(
        self,
        x: torch.Tensor,
        panels: torch.Tensor,
        scale: torch.Tensor | None,
        bias: torch.Tensor | None,
        out: torch.Tensor,
    ) -> torch.Tensor:
        """out (M, N) = x (M, K) W (N, K)^T [* scale (N)] + bias (N), in float32, with W
        packed by pack_linear: float32, bfloat16, or int8 with a float32 scale per row; or
        int4 packed by pack_int4 (uint8 panels, their scales inside: `scale` unused). Every
        tensor is contiguous and on the CPU, the panels of an (N, K) weight (the caller
        checks; this is the inner loop)."""
        m, k = x.shape
        n = out.shape[1]
        b = bias.data_ptr() if bias is not None else None
        if panels.dtype == torch.uint8:
            if panels.dim() != 3:  # w4a8's (G, T, 9, 2P), read by linear_w4a8 alone
                raise ValueError("these uint8 panels are w4a8's: linear_w4a8 reads them")
            status = self.library.tformer_linear_i4(
                x.data_ptr(), panels.data_ptr(), b, out.data_ptr(), m, n, k
            )
            if status != 0:
                raise MemoryError(f"int4 linear: no memory for the sums of {m} rows")
        elif panels.dtype == torch.int8:
            if panels.dim() != 3:  # w8a8's (G, K/4, P, 4), read by linear_w8a8 alone
                raise ValueError("these int8 panels are w8a8's: linear_w8a8 reads them")
            self.library.tformer_linear_i8(
                x.data_ptr(), panels.data_ptr(), scale.data_ptr(), b, out.data_ptr(), m, n, k
            )
        elif panels.dtype == torch.bfloat16:
            self.library.tformer_linear_bf16(
                x.data_ptr(), panels.data_ptr(), b, out.data_ptr(), m, n, k
            )
        else:
            self.library.tformer_linear_f32(
                x.data_ptr(), panels.data_ptr(), b, out.data_ptr(), m, n, k
            )
        return out

    @staticmethod
    def linear_layout(
        panels: torch.Tensor,
        scale: torch.Tensor | None,
        bias: torch.Tensor | None,
        n: int,
        k: int,
        weights: str,
    ) -> LinearLayout:
        """A packed layer of `weights` (PackedLinear's weight dtype) as decode_step reads
        it (the tensors must outlive its use)."""
        return LinearLayout(
            panels.data_ptr(),
            scale.data_ptr() if scale is not None else None,
            bias.data_ptr() if bias is not None else None,
            n,
            k,
            LINEAR_KINDS[weights],
        )

    @c_function(
        "tformer_decode_step",
        [POINTER, SIZE] + [POINTER] * 10 + [SIZE] * 5 + [REAL, SIZE],
        ctypes.c_int,
    )
    def decode_step(
        self,
        blocks: ctypes.Array,
        ids: torch.Tensor,
        embeddings: tuple[torch.Tensor, torch.Tensor],
        final_norm: tuple[torch.Tensor, torch.Tensor],
        x: torch.Tensor,
        work: torch.Tensor,
        k_caches: ctypes.Array,
        v_caches: ctypes.Array,
        position: int,
        d_ff: int,
        heads: int,
        max_len: int,
        eps: float,
        exact_gelu: bool,
    ) -> None:
        """One decoding step of GPT-2 before its output head (kernels/decode_block.c): ids
        (M,) int64 -> x (M, C) float32, the embeddings (token (V, C), position (L, C))
        summed, every block (BlockLayout array), and the final norm's (weight, bias): work
        (M, 6C + F) float32, the caches arrays of pointers to each block's (M, H, max_len,
        D) float32 keys and values, every row's new key and value at `position`.
        Contiguous CPU tensors, ids within the vocabulary and position below L (the caller
        checks: this is the inner loop)."""
        m, c = x.shape
        positions = (ctypes.c_int64 * m)(*([position] * m))
        status = self.library.tformer_decode_step(
            ctypes.addressof(blocks), len(blocks), ids.data_ptr(), embeddings[0].data_ptr(),
            embeddings[1].data_ptr(), final_norm[0].data_ptr(), final_norm[1].data_ptr(),
            x.data_ptr(), work.data_ptr(), ctypes.addressof(k_caches),
            ctypes.addressof(v_caches), ctypes.addressof(positions), m, c, d_ff, heads,
            max_len, eps, int(exact_gelu),
        )  # fmt: skip
        if status != 0:
            raise MemoryError("decode_step: a kernel could not allocate its buffers")

    @c_function(
        "tformer_decode_cross_blocks",
        [POINTER, SIZE] + [POINTER] * 10 + [SIZE] * 7 + [REAL, SIZE],
        ctypes.c_int,
    )
    def decode_cross_blocks(
        self,
        blocks: ctypes.Array,
        x: torch.Tensor,
        work: torch.Tensor,
        k_caches: ctypes.Array,
        v_caches: ctypes.Array,
        positions: torch.Tensor,
        paths: torch.Tensor | None,
        memory_k: ctypes.Array,
        memory_v: ctypes.Array,
        strides: torch.Tensor,
        mask: torch.Tensor,
        d_ff: int,
        heads: int,
        max_len: int,
        eps: float,
        activation: int,
    ) -> None:
        """One decoding step of every post-LN decoder layer of the encoder-decoder
        (kernels/decode_block.c), x (M, C) float32 in place: blocks an array of
        CrossBlockLayout, work (M, 5C + F) float32, the caches as for decode_step, or
        with paths (M, L) int64, the slot of each row's every position (nn/kv_cache.py),
        memory_k and memory_v arrays of pointers to each layer's cross-attention keys and
        values with `strides` (3,) int64 (sentence, head, position; d contiguous), mask
        (N, S) bool for N sentences of M / N consecutive rows each (beam search's beams),
        activation 0 ReLU, 1 GELU's tanh form, 2 GELU. Contiguous CPU tensors (the caller
        checks: this is the inner loop)."""
        m, c = x.shape
        status = self.library.tformer_decode_cross_blocks(
            ctypes.addressof(blocks), len(blocks), x.data_ptr(), work.data_ptr(),
            ctypes.addressof(k_caches), ctypes.addressof(v_caches), positions.data_ptr(),
            None if paths is None else paths.data_ptr(), ctypes.addressof(memory_k),
            ctypes.addressof(memory_v), strides.data_ptr(),
            mask.data_ptr(), mask.shape[1], m // mask.shape[0], m, c, d_ff, heads, max_len, eps,
            activation,
        )  # fmt: skip
        if status != 0:
            raise MemoryError("decode_cross_blocks: a kernel could not allocate its buffers")

    @c_function("tformer_padded_attention_f32", [POINTER] * 3 + [SIZE] * 4)
    def padded_attention(self, qkv: torch.Tensor, mask: torch.Tensor, n_heads: int) -> torch.Tensor:
        """Self-attention over whole padded sequences, every head at once (an encoder
        layer's; kernels/decode_block.c): qkv (B, T, 3C) float32, the fused projection, and
        mask (B, T) bool, True for real tokens -> out (B, T, C) float32, the heads side by
        side. A position with no real token to attend to gets zeros."""
        if qkv.dim() != 3 or qkv.dtype != torch.float32 or qkv.device.type != "cpu":
            raise ValueError("qkv must be (B, T, 3C) float32 on the CPU")
        b, t, three_c = qkv.shape
        if three_c % (3 * n_heads) != 0:
            raise ValueError(f"qkv's last dimension {three_c} is not 3 x heads ({n_heads}) x D")
        if mask.shape != (b, t) or mask.dtype != torch.bool or mask.device.type != "cpu":
            raise ValueError(f"mask must be ({b}, {t}) bool on the CPU")
        qkv, mask = qkv.contiguous(), mask.contiguous()
        out = torch.empty(b, t, three_c // 3)
        self.library.tformer_padded_attention_f32(
            qkv.data_ptr(), mask.data_ptr(), out.data_ptr(), b, t, n_heads, three_c // 3 // n_heads
        )
        return out

    @c_function("tformer_smoothed_ce_forward_f32", [POINTER] * 4 + [SIZE] * 2 + [REAL])
    @c_function("tformer_smoothed_ce_forward_bf16", [POINTER] * 4 + [SIZE] * 2 + [REAL])
    def smoothed_ce_forward(
        self, logits: torch.Tensor, targets: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """logits (N, V) float32 or bfloat16, targets (N,) int64 in [0, V) -> each row's
        label-smoothed loss and log-sum-exp, (N,) float32 each. Contiguous CPU tensors (the
        caller checks)."""
        check_loss_inputs("smoothed_ce_forward", logits, targets)
        n, v = logits.shape
        loss = torch.empty(n, dtype=torch.float32)
        lse = torch.empty(n, dtype=torch.float32)
        function = getattr(self.library, f"tformer_smoothed_ce_forward_{by_dtype(logits)}")
        function(logits.data_ptr(), targets.data_ptr(), loss.data_ptr(), lse.data_ptr(), n, v, eps)
        return loss, lse

    @c_function("tformer_smoothed_ce_backward_f32", [POINTER] * 5 + [SIZE] * 2 + [REAL])
    @c_function("tformer_smoothed_ce_backward_bf16", [POINTER] * 5 + [SIZE] * 2 + [REAL])
    def smoothed_ce_backward(
        self,
        logits: torch.Tensor,
        targets: torch.Tensor,
        lse: torch.Tensor,
        row_scale: torch.Tensor,
        eps: float,
    ) -> torch.Tensor:
        """The gradient (N, V), in the logits' dtype, of sum_i row_scale[i] loss_i with
        respect to logits."""
        check_loss_inputs("smoothed_ce_backward", logits, targets)
        n, v = logits.shape
        grad = torch.empty_like(logits)
        function = getattr(self.library, f"tformer_smoothed_ce_backward_{by_dtype(logits)}")
        function(
            logits.data_ptr(),
            targets.data_ptr(),
            lse.data_ptr(),
            row_scale.data_ptr(),
            grad.data_ptr(),
            n,
            v,
            eps,
        )
        return grad

    @c_function("tformer_smoothed_ce_forward_backward_f32", [POINTER] * 7 + [SIZE] * 4 + [REAL])
    @c_function("tformer_smoothed_ce_forward_backward_bf16", [POINTER] * 7 + [SIZE] * 4 + [REAL])
    def smoothed_ce_forward_backward(
        self, logits: torch.Tensor, targets: torch.Tensor, row_scale: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """smoothed_ce_forward's loss and lse and smoothed_ce_backward's gradient (for
        row_scale, (N,) float32) in one visit of each row, each exp computed once."""
        check_loss_inputs("smoothed_ce_forward_backward", logits, targets)
        n, v = logits.shape
        if row_scale.shape != (n,) or row_scale.dtype != torch.float32:
            raise ValueError(f"smoothed_ce_forward_backward: row_scale must be ({n},) float32")
        row_scale = row_scale.contiguous()
        loss = torch.empty(n, dtype=torch.float32)
        lse = torch.empty(n, dtype=torch.float32)
        grad = torch.empty_like(logits)
        threads = torch.get_num_threads()
        stride = -(-v // 16) * 16  # whole 64-byte lines: no line shared by two threads
        scratch = torch.empty(threads, stride, dtype=torch.float32)  # a row's exps per thread
        function = getattr(self.library, f"tformer_smoothed_ce_forward_backward_{by_dtype(logits)}")
        function(
            logits.data_ptr(),
            targets.data_ptr(),
            row_scale.data_ptr(),
            loss.data_ptr(),
            lse.data_ptr(),
            grad.data_ptr(),
            scratch.data_ptr(),
            stride,
            threads,
            n,
            v,
            eps,
        )
        return loss, lse, grad

    @c_function("tformer_dropout_mask", [POINTER, SIZE, ctypes.c_uint64, ctypes.c_uint32])
    def dropout_mask(self, n: int, seed: int, threshold: int) -> torch.Tensor:
        """(n,) bool: True where the 16-bit lane of word seed's stream is below threshold."""
        mask = torch.empty(n, dtype=torch.bool)
        self.library.tformer_dropout_mask(mask.data_ptr(), n, seed, threshold)
        return mask

    @c_function("tformer_masked_scale_f32", [POINTER, POINTER, ctypes.c_float, POINTER, SIZE])
    @c_function("tformer_masked_scale_bf16", [POINTER, POINTER, ctypes.c_float, POINTER, SIZE])
    def masked_scale(self, x: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
        """x * mask * scale in one pass, equal to x.mul(mask).mul_(scale) (NaN bits aside):
        x a contiguous float32 or bfloat16 CPU tensor, mask a bool one of its shape. Not
        differentiable. Checked here."""
        if (
            x.dtype not in (torch.float32, torch.bfloat16)
            or mask.dtype != torch.bool
            or x.shape != mask.shape
            or x.device.type != "cpu"
            or mask.device.type != "cpu"
            or not (x.is_contiguous() and mask.is_contiguous())
        ):
            raise ValueError(
                "masked_scale: x float32 or bfloat16 and mask bool, contiguous CPU tensors of "
                "one shape"
            )
        out = torch.empty_like(x)
        function = getattr(self.library, f"tformer_masked_scale_{by_dtype(x)}")
        function(x.data_ptr(), mask.data_ptr(), scale, out.data_ptr(), x.numel())
        return out

    @c_function("tformer_sum_squares_f32", [POINTER, POINTER, SIZE], ctypes.c_double)
    def sum_squares(self, tensors: list[torch.Tensor]) -> float:
        """The sum of the squares of every element of `tensors`, contiguous float32 CPU
        tensors taken as one vector, summed in double (kernels/global_norm.c). Checked here."""
        pointers, sizes = [], []
        for t in tensors:  # one pass: this runs once a training step
            if t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous():
                raise ValueError("sum_squares: every tensor must be a contiguous float32 CPU one")
            pointers.append(t.data_ptr())
            sizes.append(t.numel())
        count = len(tensors)
        return self.library.tformer_sum_squares_f32(
            (ctypes.c_void_p * count)(*pointers), (ctypes.c_int64 * count)(*sizes), count
        )

    @c_function(
        "tformer_adamw_step_f32",
        [POINTER, POINTER, POINTER, SIZE, POINTER, ctypes.c_double, POINTER],
        ctypes.c_int,
    )
    def adamw_step(
        self,
        plan: AdamWPlan,
        grads: list[torch.Tensor],
        copies: list[torch.Tensor | None],
        groups: list[dict],
        max_norm: float | None,
    ) -> tuple[float, float] | None:
        """One AdamW step in place (kernels/adamw.c) of the plan's tensors, in one call:
        grads and copies (a bf16 tensor of the parameter's size to write its new value
        into, or None) in the plan's order, groups the settings (lr, betas, eps,
        weight_decay) its group indices point to. With max_norm the gradients are clipped to
        that global norm first (and left clipped): returns (the norm before clipping, the
        scale s the gradients were divided by, or 1), both float32 values; else None.
        Checked here before anything changes: ValueError."""
        count = len(plan.sizes)
        if len(grads) != count or len(copies) != count:
            raise ValueError("adamw_step: one gradient and one copy (or None) per tensor")
        if len(groups) < plan.groups:
            raise ValueError(f"adamw_step: the plan's tensors name {plan.groups} groups")
        for g, size in zip(grads, plan.sizes, strict=True):  # this runs once a step
            strided = g.layout == torch.strided  # a sparse one has no is_contiguous
            if not (strided and g.dtype == torch.float32 and g.is_cpu and g.is_contiguous()):
                raise ValueError("adamw_step: the gradients must be contiguous float32 CPU ones")
            if g.numel() != size:
                raise ValueError("adamw_step: a gradient of another size than its parameter")
        for c, size in zip(copies, plan.sizes, strict=True):
            if c is not None and (
                c.dtype != torch.bfloat16 or not c.is_contiguous() or c.numel() != size
            ):
                raise ValueError(
                    "adamw_step: a copy must be a contiguous bf16 tensor of the parameter's size"
                )
        plan.grads[:] = [g.data_ptr() for g in grads]
        plan.copies[:] = [None if c is None else c.data_ptr() for c in copies]
        settings = (AdamWGroup * len(groups))(
            *(AdamWGroup(g["lr"], *g["betas"], g["weight_decay"], g["eps"]) for g in groups)
        )
        out = (ctypes.c_float * 2)()
        failed = self.library.tformer_adamw_step_f32(
            plan.tensors, plan.grads, plan.copies, count, settings, max_norm or 0.0, out
        )
        if failed:
            raise MemoryError("adamw_step: no memory for the step's bookkeeping")
        return (out[0], out[1]) if max_norm else None

    @c_function("tformer_gelu_tanh_f32", [POINTER, POINTER, SIZE])
    @c_function("tformer_gelu_tanh_bf16", [POINTER, POINTER, SIZE])
    def gelu_tanh(self, z: torch.Tensor) -> torch.Tensor:
        """GPT-2's GELU, 0.5 z (1 + tanh(sqrt(2 / pi) (z + 0.044715 z^3))), elementwise on a
        contiguous float32 or bfloat16 CPU tensor."""
        y = torch.empty_like(z)
        function = getattr(self.library, f"tformer_gelu_tanh_{by_dtype(z)}")
        function(z.data_ptr(), y.data_ptr(), z.numel())
        return y

    @c_function("tformer_gelu_tanh_derivative_f32", [POINTER] * 3 + [SIZE])
    @c_function("tformer_gelu_tanh_derivative_bf16", [POINTER] * 3 + [SIZE])
    def gelu_tanh_and_derivative(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """gelu_tanh(z) in z's dtype and its derivative dy/dz in float32, from a contiguous
        float32 or bfloat16 CPU tensor: the backward pass is then grad * dy/dz."""
        y, d = torch.empty_like(z), torch.empty_like(z, dtype=torch.float32)
        function = getattr(self.library, f"tformer_gelu_tanh_derivative_{by_dtype(z)}")
        function(z.data_ptr(), y.data_ptr(), d.data_ptr(), z.numel())
        return y, d

    @c_function("tformer_scale_bf16", [POINTER] * 3 + [SIZE])
    def scale_bf16(self, grad: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """grad * d, rounded to bfloat16 once: grad bfloat16, d float32, both contiguous and
        of one shape."""
        if grad.shape != d.shape or grad.dtype != torch.bfloat16 or d.dtype != torch.float32:
            raise ValueError("scale_bf16: grad bfloat16 and d float32 of one shape")
        out = torch.empty_like(grad)
        self.library.tformer_scale_bf16(grad.data_ptr(), d.data_ptr(), out.data_ptr(), grad.numel())
        return out

    @c_function(
        "tformer_scale_bf16_column_sums",
        [POINTER, POINTER, SIZE] + [POINTER] * 2 + [SIZE] * 2,
        ctypes.c_int,
    )
    def scale_bf16_column_sums(
        self, grad: torch.Tensor, d: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """scale_bf16's grad * d for 2-D operands (rows, cols), d float32 or bfloat16 (each
        product rounded to bf16 once, as torch's bf16 multiply), and the sum of each column
        of the product over the rows, (cols,) float32. Checked here."""
        if (
            grad.dim() != 2
            or grad.shape != d.shape
            or grad.dtype != torch.bfloat16
            or d.dtype not in (torch.float32, torch.bfloat16)
            or not (grad.is_contiguous() and d.is_contiguous())
        ):
            raise ValueError(
                "scale_bf16_column_sums: grad bfloat16 and d float32 or bfloat16, contiguous, "
                "one 2-D shape"
            )
        rows, cols = grad.shape
        out, sums = torch.empty_like(grad), torch.empty(cols, dtype=torch.float32)
        failed = self.library.tformer_scale_bf16_column_sums(
            grad.data_ptr(), d.data_ptr(), int(d.dtype == torch.bfloat16), out.data_ptr(),
            sums.data_ptr(), rows, cols,
        )  # fmt: skip
        if failed:
            raise MemoryError("scale_bf16_column_sums: out of memory for the threads' sums")
        return out, sums

    @c_function("tformer_gelu_f32", [POINTER] * 3 + [SIZE])
    @c_function("tformer_gelu_bf16", [POINTER] * 3 + [SIZE])
    def gelu(self, z: torch.Tensor) -> torch.Tensor:
        """The exact GELU, z Phi(z), elementwise on a contiguous float32 or bfloat16 CPU
        tensor."""
        y = torch.empty_like(z)
        function = getattr(self.library, f"tformer_gelu_{by_dtype(z)}")
        function(z.data_ptr(), y.data_ptr(), None, z.numel())  # no derivative to write
        return y

    def gelu_and_derivative(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The exact GELU and its derivative dy/dz, both in z's dtype (gelu's C function,
        given somewhere to write dy/dz): the backward pass is then grad * dy/dz."""
        y, d = torch.empty_like(z), torch.empty_like(z)
        function = getattr(self.library, f"tformer_gelu_{by_dtype(z)}")
        function(z.data_ptr(), y.data_ptr(), d.data_ptr(), z.numel())
        return y, d

    @c_function("tformer_round_bf16", [POINTER, POINTER, SIZE])
    def round_bf16(self, x: torch.Tensor) -> torch.Tensor:
        """x rounded to bfloat16 (to nearest even, as torch's cast), x a contiguous float32
        CPU tensor. Checked here."""
        check_cpu_tensors("round_bf16", [("x", x, tuple(x.shape), torch.float32)])
        b = torch.empty(x.shape, dtype=torch.bfloat16)
        self.library.tformer_round_bf16(x.data_ptr(), b.data_ptr(), x.numel())
        return b

    @c_function("tformer_add_bf16", [POINTER] * 3 + [SIZE])
    def add_bf16(self, x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """x + b in float32, x float32 and b bfloat16, contiguous CPU tensors of one shape
        (torch's x + b, without its cast of b to a temporary first). Checked here."""
        shape = tuple(x.shape)
        check_cpu_tensors(
            "add_bf16", [("x", x, shape, torch.float32), ("b", b, shape, torch.bfloat16)]
        )
        y = torch.empty_like(x)
        self.library.tformer_add_bf16(x.data_ptr(), b.data_ptr(), y.data_ptr(), x.numel())
        return y

    @c_function("tformer_transpose16", [POINTER, SIZE, SIZE, SIZE, POINTER])
    def transpose16(self, a: torch.Tensor) -> torch.Tensor:
        """a row-major copy of `a`, a 2-D bfloat16 or float16 CPU tensor laid out as the
        transposed view of a row-major one (strides (1, ld)): the same values, contiguous."""
        if a.dim() != 2 or a.dtype not in (torch.bfloat16, torch.float16) or a.device.type != "cpu":
            raise ValueError("transpose16: a must be a 2-D bfloat16 or float16 CPU tensor")
        c, r = a.shape
        if a.stride(0) != 1 or a.stride(1) < max(c, 1):
            raise ValueError("transpose16: a must be the transposed view of a row-major matrix")
        out = torch.empty(c, r, dtype=a.dtype)
        self.library.tformer_transpose16(a.data_ptr(), r, c, a.stride(1), out.data_ptr())
        return out

    @c_function("tformer_transpose_bf16_to_f32", [POINTER, SIZE, SIZE, SIZE, POINTER])
    def transpose_to_f32(self, a: torch.Tensor) -> torch.Tensor:
        """a.t() in float32, contiguous: a (R, C) a 2-D bfloat16 CPU tensor with rows
        contiguous -> (C, R) float32, each value widened exactly."""
        if a.dim() != 2 or a.dtype != torch.bfloat16 or a.device.type != "cpu":
            raise ValueError("transpose_to_f32: a must be a 2-D bfloat16 CPU tensor")
        r, c = a.shape
        if a.stride(1) != 1 or a.stride(0) < max(c, 1):
            raise ValueError("transpose_to_f32: a's rows must be contiguous")
        out = torch.empty(c, r, dtype=torch.float32)
        self.library.tformer_transpose_bf16_to_f32(a.data_ptr(), r, c, a.stride(0), out.data_ptr())
        return out

    @c_function("tformer_layer_norm_bf16_out", [POINTER] * 3 + [REAL] + [POINTER] * 3 + [SIZE] * 2)
    def layer_norm_bf16_out(
        self,
        x: torch.Tensor,
        gamma: torch.Tensor,
        beta: torch.Tensor,
        eps: float,
        out: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """LayerNorm over the last dimension of x (N, C) float32 with gamma and beta (C,)
        float32, written in bfloat16 -> y (N, C) (into `out` if given), and each row's mean
        and 1 / sqrt(var + eps) (N,) float32 for the backward pass. Checked here."""
        n, c = layer_norm_shape(x, gamma, beta)
        y = torch.empty(n, c, dtype=torch.bfloat16) if out is None else out
        if y.shape != (n, c) or y.dtype != torch.bfloat16 or not y.is_contiguous():
            raise ValueError(f"layer_norm_bf16_out: out must be contiguous bfloat16 {(n, c)}")
        mean, rstd = torch.empty(n, dtype=torch.float32), torch.empty(n, dtype=torch.float32)
        self.library.tformer_layer_norm_bf16_out(
            x.data_ptr(), gamma.data_ptr(), beta.data_ptr(), eps, y.data_ptr(),
            mean.data_ptr(), rstd.data_ptr(), n, c,
        )  # fmt: skip
        return y, mean, rstd

    @c_function("tformer_layer_norm_backward_bf16", [POINTER] * 8 + [SIZE] * 2, ctypes.c_int)
    def layer_norm_backward_bf16(
        self,
        dy: torch.Tensor,
        x: torch.Tensor,
        mean: torch.Tensor,
        rstd: torch.Tensor,
        gamma: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The gradients of layer_norm_bf16_out's x, gamma and beta from dy (N, C) bfloat16
        and its x, mean, rstd and gamma: dx (N, C), dgamma and dbeta (C,), all float32."""
        n, c = layer_norm_shape(x, gamma)
        check_cpu_tensors(
            "layer_norm_backward_bf16",
            [
                ("dy", dy, (n, c), torch.bfloat16),
                ("mean", mean, (n,), torch.float32),
                ("rstd", rstd, (n,), torch.float32),
            ],
        )
        dx = torch.empty(n, c, dtype=torch.float32)
        dgamma, dbeta = torch.empty(c, dtype=torch.float32), torch.empty(c, dtype=torch.float32)
        failed = self.library.tformer_layer_norm_backward_bf16(
            dy.data_ptr(), x.data_ptr(), mean.data_ptr(), rstd.data_ptr(), gamma.data_ptr(),
            dx.data_ptr(), dgamma.data_ptr(), dbeta.data_ptr(), n, c,
        )  # fmt: skip
        if failed:
            raise MemoryError("layer_norm_backward_bf16: out of memory for the threads' sums")
        return dx, dgamma, dbeta

    @c_function(
        "tformer_add_layer_norm_bf16_out", [POINTER] * 4 + [REAL] + [POINTER] * 4 + [SIZE] * 2
    )
    def add_layer_norm_bf16_out(
        self,
        x: torch.Tensor,
        add: torch.Tensor,
        gamma: torch.Tensor,
        beta: torch.Tensor,
        eps: float,
        out: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """h = x + add, x (N, C) float32 and add (N, C) bfloat16, and layer_norm_bf16_out of
        h in one pass -> h (N, C) float32, y (N, C) bfloat16 (into `out`'s two if given),
        mean, rstd (N,). Checked here."""
        n, c = layer_norm_shape(x, gamma, beta)
        if out is None:
            out = torch.empty(n, c, dtype=torch.float32), torch.empty(n, c, dtype=torch.bfloat16)
        h, y = out
        check_cpu_tensors(
            "add_layer_norm_bf16_out",
            [
                ("add", add, (n, c), torch.bfloat16),
                ("h", h, (n, c), torch.float32),
                ("y", y, (n, c), torch.bfloat16),
            ],
        )
        mean, rstd = torch.empty(n, dtype=torch.float32), torch.empty(n, dtype=torch.float32)
        self.library.tformer_add_layer_norm_bf16_out(
            x.data_ptr(), add.data_ptr(), gamma.data_ptr(), beta.data_ptr(), eps, h.data_ptr(),
            y.data_ptr(), mean.data_ptr(), rstd.data_ptr(), n, c,
        )  # fmt: skip
        return h, y, mean, rstd

    @c_function("tformer_add_layer_norm_backward_bf16", [POINTER] * 10 + [SIZE] * 2, ctypes.c_int)
    def add_layer_norm_backward_bf16(
        self,
        dy: torch.Tensor,
        dh: torch.Tensor,
        h: torch.Tensor,
        mean: torch.Tensor,
        rstd: torch.Tensor,
        gamma: torch.Tensor,
        bf16_too: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """The gradients of add_layer_norm_bf16_out from dy (N, C) bfloat16 (the norm's
        output's) and dh (N, C) float32 (h's own): dx = dh + the norm's (N, C) float32, the
        same in bfloat16 (add's; None unless bf16_too), dgamma and dbeta (C,)."""
        n, c = layer_norm_shape(h, gamma)
        check_cpu_tensors(
            "add_layer_norm_backward_bf16",
            [
                ("dy", dy, (n, c), torch.bfloat16),
                ("dh", dh, (n, c), torch.float32),
                ("mean", mean, (n,), torch.float32),
                ("rstd", rstd, (n,), torch.float32),
            ],
        )
        dx = torch.empty(n, c, dtype=torch.float32)
        dx_bf16 = torch.empty_like(dy) if bf16_too else None
        dgamma, dbeta = torch.empty(c, dtype=torch.float32), torch.empty(c, dtype=torch.float32)
        failed = self.library.tformer_add_layer_norm_backward_bf16(
            dy.data_ptr(), dh.data_ptr(), h.data_ptr(), mean.data_ptr(), rstd.data_ptr(),
            gamma.data_ptr(), dx.data_ptr(), None if dx_bf16 is None else dx_bf16.data_ptr(),
            dgamma.data_ptr(), dbeta.data_ptr(), n, c,
        )  # fmt: skip
        if failed:
            raise MemoryError("add_layer_norm_backward_bf16: out of memory for the threads' sums")
        return dx, dx_bf16, dgamma, dbeta

    @c_function("tformer_slot_attention_f32", [POINTER] * 5 + [SIZE] * 4, ctypes.c_int)
    def slot_attention(
        self,
        qkv: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        positions: torch.Tensor,
    ) -> torch.Tensor:
        """One decoding step over a slot cache: qkv (B, 3C) float32, the fused projection of
        each row's new token; the caches (slots, H, L, D) float32; positions (B,) int64,
        row b's position in slot b. Stores each row's key and value there and attends over
        positions 0..positions[b] of its slot -> out (B, C) float32, heads side by side.
        Checked here: a wrong shape or position would write outside the cache."""
        for name, tensor in (("qkv", qkv), ("k_cache", k_cache), ("v_cache", v_cache)):
            if not (tensor.device.type == "cpu" and tensor.dtype == torch.float32):
                raise ValueError(f"{name} must be float32 on the CPU, got {tensor.dtype}")
            if not tensor.is_contiguous():
                raise ValueError(f"{name} must be contiguous")
        if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
            raise ValueError("k_cache and v_cache must be (slots, H, L, D), the same shape")
        slots, h, max_len, d = k_cache.shape
        b = qkv.shape[0]
        if qkv.shape != (b, 3 * h * d) or b > slots:
            raise ValueError(f"qkv must be (B <= {slots}, {3 * h * d}), got {tuple(qkv.shape)}")
        if positions.shape != (b,) or positions.dtype != torch.int64:
            raise ValueError(f"positions must be ({b},) int64")
        if b and not (int(positions.min()) >= 0 and int(positions.max()) < max_len):
            raise ValueError(f"positions must lie in 0..{max_len - 1}")
        positions = positions.cpu().contiguous()
        out = torch.empty(b, h * d, dtype=torch.float32)
        failed = self.library.tformer_slot_attention_f32(
            qkv.data_ptr(),
            k_cache.data_ptr(),
            v_cache.data_ptr(),
            positions.data_ptr(),
            out.data_ptr(),
            b,
            h,
            d,
            max_len,
        )
        if failed:
            raise MemoryError(f"no memory for the attention kernel's {max_len} scores")
        return out

    @c_function("tformer_top_logits", [POINTER, SIZE, SIZE, SIZE] + [POINTER] * 3)
    def top_logits(
        self, logits: torch.Tensor, n: int, log_sum_exp: bool = True
    ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """logits (M, V) float32 on the CPU -> log sum_v exp(logits) (M,) (None without
        log_sum_exp), and the n largest logits of each row (M, n), best first (ties: the
        lower id first), with their ids (M, n) int64 (kernels/top_logits.c)."""
        if logits.dim() != 2 or logits.dtype != torch.float32 or logits.device.type != "cpu":
            raise ValueError("logits must be (M, V) float32 on the CPU")
        m, v = logits.shape
        if not 1 <= n <= v:
            raise ValueError(f"n must lie in 1..{v}, got {n}")
        logits = logits.contiguous()
        lse = torch.empty(m, dtype=torch.float32) if log_sum_exp else None
        values = torch.empty(m, n, dtype=torch.float32)
        ids = torch.empty(m, n, dtype=torch.int64)
        self.library.tformer_top_logits(
            logits.data_ptr(),
            m,
            v,
            n,
            lse.data_ptr() if lse is not None else None,
            values.data_ptr(),
            ids.data_ptr(),
        )
        return lse, values, ids

    @c_function("tformer_causal_attention_bf16", [POINTER] * 3 + [SIZE] * 4, ctypes.c_int)
    @c_function("tformer_causal_attention_pairs", [POINTER] * 3 + [SIZE] * 4, ctypes.c_int)
    def causal_attention(
        self, qkv: torch.Tensor, n_heads: int, pairs: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Causal self-attention of every head: qkv (B, T, 3C) contiguous bfloat16, the
        fused Q, K, V projection -> out (B, T, C) bfloat16 (heads side by side, as the
        output projection reads them) and the weights P (B, H, T, T), zero above the
        diagonal, which the backward pass needs: float32, each product in float32
        (kernels/attention.c), or with `pairs` bf16, the products of bf16 pairs
        (kernels/attention_pairs.c, where attention_pairs_available())."""
        b, t, d = attention_shape(qkv, n_heads)
        if pairs and not self.attention_pairs_available():
            raise ValueError("causal_attention: pairs need a build for AVX-512 BF16")
        out = torch.empty(b, t, n_heads * d, dtype=torch.bfloat16)
        weights = torch.empty(b, n_heads, t, t, dtype=torch.bfloat16 if pairs else torch.float32)
        function = (
            self.library.tformer_causal_attention_pairs
            if pairs
            else self.library.tformer_causal_attention_bf16
        )
        failed = function(qkv.data_ptr(), out.data_ptr(), weights.data_ptr(), b, t, n_heads, d)
        check_allocated(failed, t)
        return out, weights

    @c_function("tformer_attention_pairs_available", [], ctypes.c_int)
    def attention_pairs_available(self) -> bool:
        """Whether causal_attention takes `pairs` here: built for a CPU with AVX-512 BF16."""
        return bool(self.library.tformer_attention_pairs_available())

    @c_function(
        "tformer_product_bf16",
        [POINTER, POINTER, ctypes.c_int, POINTER, POINTER] + [SIZE] * 3,
        ctypes.c_int,
    )
    def product_bf16(
        self,
        a: torch.Tensor,
        w: torch.Tensor,
        bias: torch.Tensor | None = None,
        transposed: bool = True,
    ) -> torch.Tensor:
        """a B + bias in bf16 with float32 sums (kernels/products.c): a (M, K), B = w^T for w
        (N, K) as a linear layer stores its weight (transposed) or B = w for w (K, N),
        bias (N,) or None, all contiguous bfloat16 on the CPU -> (M, N) bfloat16, each
        thread computing the rows the other kernels give it. Checked here."""
        if a.dim() != 2 or w.dim() != 2:
            raise ValueError("product_bf16: a and w must be matrices")
        (m, k), (rows, cols) = a.shape, w.shape
        n, inner = (rows, cols) if transposed else (cols, rows)
        if inner != k:
            how = "w^T" if transposed else "w"
            raise ValueError(f"product_bf16: a {(m, k)} does not multiply {how}, w {(rows, cols)}")
        given = [("a", a, (m, k), torch.bfloat16), ("w", w, (rows, cols), torch.bfloat16)]
        given += [] if bias is None else [("bias", bias, (n,), torch.bfloat16)]
        check_cpu_tensors("product_bf16", given)
        c = torch.empty(m, n, dtype=torch.bfloat16)
        failed = self.library.tformer_product_bf16(
            a.data_ptr(), w.data_ptr(), int(transposed), None if bias is None else bias.data_ptr(),
            c.data_ptr(), m, n, k,
        )  # fmt: skip
        check_products(failed, "product_bf16")
        return c

    @c_function("tformer_weight_gradient_bf16", [POINTER] * 3 + [SIZE] * 3, ctypes.c_int)
    def weight_gradient_bf16(self, dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """dy^T x summed in float32 (kernels/products.c): dy (M, N) and x (M, K) contiguous
        bfloat16 on the CPU -> (N, K) float32, not rounded: a linear layer's weight
        gradient. Each thread sums its share of the rows; the threads' sums are added in
        thread order. Checked here."""
        if dy.dim() != 2 or x.dim() != 2 or dy.shape[0] != x.shape[0]:
            raise ValueError("weight_gradient_bf16: dy (M, N) and x (M, K) must share M rows")
        (m, n), k = dy.shape, x.shape[1]
        given = [("dy", dy, (m, n), torch.bfloat16), ("x", x, (m, k), torch.bfloat16)]
        check_cpu_tensors("weight_gradient_bf16", given)
        out = torch.empty(n, k, dtype=torch.float32)
        failed = self.library.tformer_weight_gradient_bf16(
            dy.data_ptr(), x.data_ptr(), out.data_ptr(), m, n, k
        )
        check_products(failed, "weight_gradient_bf16")
        return out

    @c_function("tformer_products_available", [], ctypes.c_int)
    def products_available(self) -> bool:
        """Whether product_bf16 and weight_gradient_bf16 run here: built for a CPU with
        AVX-512 BF16."""
        return bool(self.library.tformer_products_available())

    @c_function("tformer_causal_softmax_bf16", [POINTER] + [SIZE] * 4, ctypes.c_int)
    def causal_softmax(self, scores: torch.Tensor, first: int) -> torch.Tensor:
        """A block's causal softmax in place: scores (..., n, e) contiguous bfloat16, of
        queries first, ..., first + n - 1 over keys 0, ..., e - 1 -> the weights P, each
        row's softmax over the keys it may see and zeros after (kernels/softmax.c)."""
        n, cols = causal_block_shape("causal_softmax", scores, first)
        rows = scores.numel() // cols
        failed = self.library.tformer_causal_softmax_bf16(scores.data_ptr(), rows, n, cols, first)
        if failed:
            raise MemoryError(f"causal_softmax: no memory for a row of {cols} floats")
        return scores

    @c_function("tformer_causal_softmax_backward_bf16", [POINTER] * 2 + [SIZE] * 4)
    def causal_softmax_backward(
        self, weights: torch.Tensor, grad: torch.Tensor, first: int
    ) -> torch.Tensor:
        """The scores' gradient in place of the weights' grad (..., n, e), from causal_softmax's
        weights P of the same shape, both contiguous bfloat16: dS = P (dP - rowsum(P dP))."""
        n, cols = causal_block_shape("causal_softmax_backward", weights, first)
        check_cpu_tensors(
            "causal_softmax_backward", [("grad", grad, tuple(weights.shape), torch.bfloat16)]
        )
        rows = weights.numel() // cols
        self.library.tformer_causal_softmax_backward_bf16(
            weights.data_ptr(), grad.data_ptr(), rows, n, cols, first
        )
        return grad

    @c_function("tformer_causal_attention_backward_bf16", [POINTER] * 4 + [SIZE] * 4, ctypes.c_int)
    @c_function("tformer_causal_attention_pairs_backward", [POINTER] * 4 + [SIZE] * 4, ctypes.c_int)
    def causal_attention_backward(
        self, qkv: torch.Tensor, weights: torch.Tensor, grad_out: torch.Tensor, n_heads: int
    ) -> torch.Tensor:
        """The gradient (B, T, 3C) bfloat16 of the projection qkv, from the forward pass's
        qkv and weights and the output's gradient grad_out (B, T, C) bfloat16, contiguous:
        by the kernel whose weights these are (bf16: the pairs' kernel)."""
        b, t, d = attention_shape(qkv, n_heads)
        pairs = weights.dtype == torch.bfloat16
        if pairs and not self.attention_pairs_available():
            raise ValueError("causal_attention_backward: bf16 weights need AVX-512 BF16")
        expected = {
            "weights": (weights, (b, n_heads, t, t), weights.dtype if pairs else torch.float32),
            "grad_out": (grad_out, (b, t, n_heads * d), torch.bfloat16),
        }
        for name, (tensor, shape, dtype) in expected.items():
            if tuple(tensor.shape) != shape or tensor.dtype != dtype:
                raise ValueError(f"causal_attention_backward: {name} must be {dtype} {shape}")
            if not tensor.is_contiguous() or tensor.device.type != "cpu":
                raise ValueError(
                    f"causal_attention_backward: {name} must be contiguous, on the CPU"
                )
        grad_qkv = torch.empty_like(qkv)
        function = (
            self.library.tformer_causal_attention_pairs_backward
            if pairs
            else self.library.tformer_causal_attention_backward_bf16
        )
        failed = function(
            qkv.data_ptr(),
            weights.data_ptr(),
            grad_out.data_ptr(),
            grad_qkv.data_ptr(),
            b,
            t,
            n_heads,
            d,
        )
        check_allocated(failed, t)
        return grad_qkv

    @c_function("tformer_flash_attention_available", [], ctypes.c_int)
    def flash_attention_available(self) -> bool:
        """Whether flash_attention runs here: built for a CPU with AMX, and Linux lets this
        process use its tiles."""
        return bool(self.library.tformer_flash_attention_available())

    @c_function("tformer_flash_attention_f32", [POINTER] * 6 + [SIZE] * 4, ctypes.c_int)
    @c_function("tformer_flash_attention_bf16", [POINTER] * 6 + [SIZE] * 4, ctypes.c_int)
    def flash_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Causal self-attention of every head: q, k, v (B, H, T, D) bfloat16 (on AMX,
        kernels/flash_attention.c) or float32 (kernels/flash_attention_f32.c), one dtype,
        any strides with D contiguous -> out (B, T, H, D) in that dtype (into `out` if
        given, contiguous) and the scores' log-sum-exp per query, lse (B, H, T) float32, for
        the backward pass."""
        b, h, t, d = flash_shape({"q": q, "k": k, "v": v})
        if out is None:
            out = torch.empty(b, t, h, d, dtype=q.dtype)
        elif out.shape != (b, t, h, d) or out.dtype != q.dtype or not out.is_contiguous():
            raise ValueError(f"flash_attention: out must be contiguous {q.dtype} {(b, t, h, d)}")
        lse = torch.empty(b, h, t, dtype=torch.float32)
        strides = head_strides(q, k, v)
        function = getattr(self.library, f"tformer_flash_attention_{by_dtype(q)}")
        failed = function(
            q.data_ptr(), k.data_ptr(), v.data_ptr(), strides.data_ptr(), out.data_ptr(),
            lse.data_ptr(), b, t, h, d,
        )  # fmt: skip
        check_flash(failed, t)
        return out, lse

    @c_function("tformer_flash_attention_backward_f32", [POINTER] * 8 + [SIZE] * 4, ctypes.c_int)
    @c_function("tformer_flash_attention_backward_bf16", [POINTER] * 8 + [SIZE] * 4, ctypes.c_int)
    def flash_attention_backward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        grad_out: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
    ) -> torch.Tensor:
        """The gradient of q, k and v side by side, (B, T, 3, H, D) in their dtype (the
        fused projection's layout), from the output's gradient grad_out (B, H, T, D) (any
        strides, D contiguous) and flash_attention's q, k, v, out and lse."""
        b, h, t, d = flash_shape({"q": q, "k": k, "v": v, "grad_out": grad_out})
        if tuple(out.shape) != (b, t, h, d) or out.dtype != q.dtype:
            raise ValueError(f"flash_attention_backward: out must be {q.dtype} {(b, t, h, d)}")
        if tuple(lse.shape) != (b, h, t) or lse.dtype != torch.float32:
            raise ValueError(f"flash_attention_backward: lse must be float32 {(b, h, t)}")
        if not (out.is_contiguous() and lse.is_contiguous()):
            raise ValueError("flash_attention_backward: out and lse must be contiguous")
        grad = torch.empty(b, t, 3, h, d, dtype=q.dtype)
        strides = head_strides(q, k, v, grad_out)
        function = getattr(self.library, f"tformer_flash_attention_backward_{by_dtype(q)}")
        failed = function(
            q.data_ptr(), k.data_ptr(), v.data_ptr(), grad_out.data_ptr(), strides.data_ptr(),
            out.data_ptr(), lse.data_ptr(), grad.data_ptr(), b, t, h, d,
        )  # fmt: skip
        check_flash(failed, t)
        return grad

    @c_function("tformer_flush_denormals", [ctypes.c_int], ctypes.c_int)
    def flush_denormals(self, on: bool) -> int:
        """Flush denormal numbers to zero (on) or not on every thread of the OpenMP pool
        that torch and these kernels share; the number of threads set (0: not on this CPU)."""
        return self.library.tformer_flush_denormals(int(on))

    @c_function("tformer_denormals_flushed", [], ctypes.c_int)
    def denormals_flushed(self) -> bool:
        """Whether the calling thread flushes denormal numbers to zero."""
        return bool(self.library.tformer_denormals_flushed())


def attention_shape(qkv: torch.Tensor, n_heads: int) -> tuple[int, int, int]:
    """(B, T, D) of a fused projection qkv (B, T, 3 H D), checked: the kernels read raw
    memory, so a wrong shape or layout must not reach them."""
    if qkv.dim() != 3 or qkv.shape[2] % (3 * n_heads) != 0 or qkv.shape[2] == 0:
        raise ValueError(f"qkv must be (B, T, 3 H D) with H = {n_heads}, got {tuple(qkv.shape)}")
    if qkv.dtype != torch.bfloat16 or not qkv.is_contiguous() or qkv.device.type != "cpu":
        raise ValueError("the attention kernels take a contiguous bfloat16 CPU tensor")
    return qkv.shape[0], qkv.shape[1], qkv.shape[2] // (3 * n_heads)


FLASH_D = 32  # flash_attention: the head width is a multiple of this (one AMX tile's k;
# kernels/flash_attention_f32.c's WIDE)


def flash_shape(heads: dict[str, torch.Tensor]) -> tuple[int, int, int, int]:
    """(B, H, T, D) of flash_attention's inputs, checked: the kernel reads raw memory."""
    shape, dtype = tuple(heads["q"].shape), heads["q"].dtype
    if dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"flash_attention: q must be bfloat16 or float32, got {dtype}")
    for name, x in heads.items():
        if x.dim() != 4 or tuple(x.shape) != shape:
            raise ValueError(
                f"flash_attention: {name} must be (B, H, T, D) as q, got {tuple(x.shape)}"
            )
        if x.dtype != dtype or x.device.type != "cpu" or x.stride(3) != 1:
            raise ValueError(f"flash_attention: {name} must be {dtype} on the CPU, D contiguous")
    if shape[3] % FLASH_D or shape[2] == 0:
        raise ValueError(
            f"flash_attention: D must be a multiple of {FLASH_D} and T > 0, got {shape}"
        )
    for name, x in heads.items():  # the kernel gathers 16 rows at 32-bit offsets
        if 16 * x.stride(2) >= 1 << 31:
            raise ValueError(f"flash_attention: {name}'s rows are too far apart ({x.stride(2)})")
    return shape


def check_loss_inputs(function: str, logits: torch.Tensor, targets: torch.Tensor) -> None:
    """ValueError unless logits are (N, V) float32 or bfloat16 and targets (N,) int64: the
    C loops read them as such (the values' range is the caller's to check)."""
    if logits.dim() != 2 or logits.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"{function}: logits must be (N, V) float32 or bfloat16")
    if targets.dtype != torch.int64 or tuple(targets.shape) != logits.shape[:1]:
        raise ValueError(f"{function}: targets must be int64 (N,), one per row of logits")


def head_strides(*heads: torch.Tensor) -> torch.Tensor:
    """The (B, H, T) strides of each tensor, in elements, as the C functions read them."""
    return torch.tensor([s for x in heads for s in x.stride()[:3]], dtype=torch.int64)


def check_flash(failed: int, t: int) -> None:
    """flash_attention returns 1 when a thread could not allocate its buffers, 2 without AMX."""
    if failed == 2:
        raise KernelUnavailable("flash_attention: this CPU or build has no AMX tiles")
    check_allocated(failed, t)


def check_allocated(failed: int, t: int) -> None:
    """The attention kernels return 1 when a thread could not allocate its buffers."""
    if failed:
        raise MemoryError(f"causal_attention: no memory for a head's buffers at T = {t}")


def check_products(failed: int, function: str) -> None:
    """kernels/products.c's return codes: 1, a buffer could not be allocated; 2, the
    kernels are not built for this CPU."""
    if failed == 2:
        raise ValueError(f"{function}: needs a build for AVX-512 BF16 (products_available())")
    if failed:
        raise MemoryError(f"{function}: no memory for the product's buffers")


def causal_block_shape(function: str, scores: torch.Tensor, first: int) -> tuple[int, int]:
    """(n, e) of a block of causal scores (..., n, e): contiguous bfloat16 on the CPU, n
    and e positive, e = first + n (the block's last query sees every key); else
    ValueError."""
    check_cpu_tensors(function, [("scores", scores, tuple(scores.shape), torch.bfloat16)])
    if scores.dim() < 2 or scores.numel() == 0:
        raise ValueError(f"{function}: scores must be a nonempty (..., n, e) block")
    n, cols = scores.shape[-2:]
    if first < 0 or first + n != cols:
        raise ValueError(
            f"{function}: queries {first}..{first + n - 1} need {first + n} keys, got {cols}"
        )
    return n, cols


def check_cpu_tensors(
    function: str, expected: list[tuple[str, torch.Tensor, tuple[int, ...], torch.dtype]]
) -> None:
    """ValueError naming `function` and the tensor unless each (name, tensor, shape, dtype)
    is a contiguous CPU tensor of that shape and dtype."""
    for name, tensor, shape, dtype in expected:
        on_cpu = tensor.shape == shape and tensor.dtype == dtype and tensor.device.type == "cpu"
        if not (on_cpu and tensor.is_contiguous()):  # (the message made only when needed)
            wanted = f"{name} must be contiguous {str(dtype).removeprefix('torch.')} {shape}"
            raise ValueError(f"{function}: {wanted}{'' if on_cpu else ' on the CPU'}")


def layer_norm_shape(
    x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor | None = None
) -> tuple[int, int]:
    """(N, C) of a LayerNorm kernel's input: x (N, C), gamma and beta (C,) (beta if given),
    all contiguous float32 on the CPU; else ValueError."""
    if x.dim() != 2:
        raise ValueError(f"layer_norm: x must be (N, C), got {tuple(x.shape)}")
    n, c = x.shape
    given = [("x", x, (n, c)), ("gamma", gamma, (c,))]
    given += [] if beta is None else [("beta", beta, (c,))]
    for name, tensor, shape in given:
        if tensor.shape != shape or tensor.dtype != torch.float32 or tensor.device.type != "cpu":
            raise ValueError(f"layer_norm: {name} must be float32 {shape} on the CPU")
        if not tensor.is_contiguous():
            raise ValueError(f"layer_norm: {name} must be contiguous")
    return n, c
