"""The C kernels behind fast decoding and training on the CPU, compiled on first use.

`linear.c` holds small-batch linear layers over float32, bfloat16 or int8 weights (see its
header for why they beat a general matmul when decoding); `cross_entropy.c` the
label-smoothed cross-entropy over bfloat16 logits, forward and backward, in one pass each;
`dropout.c` dropout masks from a counter-based generator; `gelu.c` GPT-2's tanh GELU and the
exact GELU, with their derivatives; `attention.c` causal self-attention over short
sequences, forward and backward, head by head in float32; `threads.c` denormals flushed on
every thread; `common.h` what they share. The first call compiles them with the machine's C
compiler for this CPU (`-O3 -march=native -fopenmp`) into one library in
$TFORMER_CACHE/kernels/, keyed by the sources, the compiler and the CPU, so later runs load
it at once. Without a compiler, or with TFORMER_KERNELS=0, `load()` returns None and
`unavailable_reason()` says why; callers then use torch's own kernels.

    kernels = load()
    kernels.linear(x, weight, scale, bias, out)   x (M, K) float32 -> out (M, N)
    kernels.smoothed_ce_forward(logits, targets, eps)   (N, V) bf16 -> loss, lse (N,)
    kernels.dropout_mask(n, seed, threshold)   -> (n,) bool, True with P = threshold / 65536
    kernels.gelu_tanh(z), kernels.gelu_tanh_backward(grad, z)   float32 or bfloat16
    kernels.gelu(z), kernels.gelu_and_derivative(z) -> y, dy/dz   float32 or bfloat16
    kernels.causal_attention(qkv, n_heads)   qkv (B, T, 3C) bf16 -> out (B, T, C), weights
    kernels.causal_attention_backward(qkv, weights, grad_out, n_heads)   -> grad_qkv
    kernels.flush_denormals(on)   on every thread of the pool -> threads set
    kernels.denormals_flushed()   on the calling thread?
"""

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

from tformer.files import cache_dir

SOURCES = tuple(
    Path(__file__).with_name(name)
    for name in ("linear.c", "cross_entropy.c", "dropout.c", "gelu.c", "attention.c", "threads.c")
)
HEADERS = (Path(__file__).with_name("common.h"),)  # part of the key, not compiled alone
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
WIDE_VECTORS = "-mprefer-vector-width=512"


class KernelUnavailable(RuntimeError):
    """Why the kernels cannot be built or loaded here."""


_loaded: "Kernels | None" = None
_reason: str | None = None


@dataclass(frozen=True)
class Kernels:
    library: ctypes.CDLL
    path: Path
    avx512: bool

    def linear(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        scale: torch.Tensor | None,
        bias: torch.Tensor | None,
        out: torch.Tensor,
    ) -> torch.Tensor:
        """out (M, N) = x (M, K) weight (N, K)^T [* scale (N)] + bias (N), in float32.

        weight is float32, bfloat16, or int8 with a float32 scale per row; every tensor is
        contiguous and on the CPU (the caller checks; this is the inner loop).
        """
        m, k = x.shape
        n = weight.shape[0]
        b = bias.data_ptr() if bias is not None else None
        if weight.dtype == torch.int8:
            self.library.tformer_linear_i8(
                x.data_ptr(), weight.data_ptr(), scale.data_ptr(), b, out.data_ptr(), m, n, k
            )
        elif weight.dtype == torch.bfloat16:
            self.library.tformer_linear_bf16(
                x.data_ptr(), weight.data_ptr(), b, out.data_ptr(), m, n, k
            )
        else:
            self.library.tformer_linear_f32(
                x.data_ptr(), weight.data_ptr(), b, out.data_ptr(), m, n, k
            )
        return out

    def smoothed_ce_forward(
        self, logits: torch.Tensor, targets: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """logits (N, V) bfloat16, targets (N,) int64 in [0, V) -> each row's label-smoothed
        loss and log-sum-exp, (N,) float32 each. Contiguous CPU tensors (the caller checks)."""
        n, v = logits.shape
        loss = torch.empty(n, dtype=torch.float32)
        lse = torch.empty(n, dtype=torch.float32)
        self.library.tformer_smoothed_ce_forward_bf16(
            logits.data_ptr(), targets.data_ptr(), loss.data_ptr(), lse.data_ptr(), n, v, eps
        )
        return loss, lse

    def smoothed_ce_backward(
        self,
        logits: torch.Tensor,
        targets: torch.Tensor,
        lse: torch.Tensor,
        row_scale: torch.Tensor,
        eps: float,
    ) -> torch.Tensor:
        """The gradient (N, V) bfloat16 of sum_i row_scale[i] loss_i with respect to logits."""
        n, v = logits.shape
        grad = torch.empty_like(logits)
        self.library.tformer_smoothed_ce_backward_bf16(
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

    def dropout_mask(self, n: int, seed: int, threshold: int) -> torch.Tensor:
        """(n,) bool: True where the 16-bit lane of word seed's stream is below threshold."""
        mask = torch.empty(n, dtype=torch.bool)
        self.library.tformer_dropout_mask(mask.data_ptr(), n, seed, threshold)
        return mask

    def gelu_tanh(self, z: torch.Tensor) -> torch.Tensor:
        """GPT-2's GELU, 0.5 z (1 + tanh(sqrt(2 / pi) (z + 0.044715 z^3))), elementwise on a
        contiguous float32 or bfloat16 CPU tensor."""
        y = torch.empty_like(z)
        function = (
            self.library.tformer_gelu_tanh_bf16
            if z.dtype == torch.bfloat16
            else (self.library.tformer_gelu_tanh_f32)
        )
        function(z.data_ptr(), y.data_ptr(), z.numel())
        return y

    def gelu_tanh_backward(self, grad: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """grad * d gelu_tanh(z) / dz; both contiguous, of z's dtype and shape."""
        out = torch.empty_like(z)
        if z.dtype == torch.bfloat16:
            function = self.library.tformer_gelu_tanh_backward_bf16
        else:
            function = self.library.tformer_gelu_tanh_backward_f32
        function(grad.data_ptr(), z.data_ptr(), out.data_ptr(), z.numel())
        return out

    def gelu(self, z: torch.Tensor) -> torch.Tensor:
        """The exact GELU, z Phi(z), elementwise on a contiguous float32 or bfloat16 CPU
        tensor."""
        y = torch.empty_like(z)
        self._gelu(z)(z.data_ptr(), y.data_ptr(), None, z.numel())
        return y

    def gelu_and_derivative(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The exact GELU and its derivative dy/dz, both in z's dtype: the backward pass is
        then grad * dy/dz."""
        y, d = torch.empty_like(z), torch.empty_like(z)
        self._gelu(z)(z.data_ptr(), y.data_ptr(), d.data_ptr(), z.numel())
        return y, d

    def _gelu(self, z: torch.Tensor):
        """The exact GELU's C function for z's dtype."""
        if z.dtype == torch.bfloat16:
            return self.library.tformer_gelu_bf16
        return self.library.tformer_gelu_f32

    def flush_denormals(self, on: bool) -> int:
        """Flush denormal numbers to zero (on) or not on every thread of the OpenMP pool
        that torch and these kernels share; the number of threads set (0: not on this CPU)."""
        return self.library.tformer_flush_denormals(int(on))

    def denormals_flushed(self) -> bool:
        """Whether the calling thread flushes denormal numbers to zero."""
        return bool(self.library.tformer_denormals_flushed())

    def causal_attention(
        self, qkv: torch.Tensor, n_heads: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Causal self-attention of every head: qkv (B, T, 3C) contiguous bfloat16, the
        fused Q, K, V projection -> out (B, T, C) bfloat16 (heads side by side, as the
        output projection reads them) and the weights P (B, H, T, T) float32, zero above
        the diagonal, which the backward pass needs."""
        b, t, d = attention_shape(qkv, n_heads)
        out = torch.empty(b, t, n_heads * d, dtype=torch.bfloat16)
        weights = torch.empty(b, n_heads, t, t, dtype=torch.float32)
        failed = self.library.tformer_causal_attention_bf16(
            qkv.data_ptr(), out.data_ptr(), weights.data_ptr(), b, t, n_heads, d
        )
        if failed:
            raise MemoryError(f"causal_attention: no memory for a head's buffers at T = {t}")
        return out, weights

    def causal_attention_backward(
        self, qkv: torch.Tensor, weights: torch.Tensor, grad_out: torch.Tensor, n_heads: int
    ) -> torch.Tensor:
        """The gradient (B, T, 3C) bfloat16 of the projection qkv, from the forward pass's
        qkv and weights and the output's gradient grad_out (B, T, C) bfloat16, contiguous."""
        b, t, d = attention_shape(qkv, n_heads)
        expected = {
            "weights": (weights, (b, n_heads, t, t), torch.float32),
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
        failed = self.library.tformer_causal_attention_backward_bf16(
            qkv.data_ptr(),
            weights.data_ptr(),
            grad_out.data_ptr(),
            grad_qkv.data_ptr(),
            b,
            t,
            n_heads,
            d,
        )
        if failed:
            raise MemoryError(f"causal_attention: no memory for a head's buffers at T = {t}")
        return grad_qkv


def attention_shape(qkv: torch.Tensor, n_heads: int) -> tuple[int, int, int]:
    """(B, T, D) of a fused projection qkv (B, T, 3 H D), checked: the kernels read raw
    memory, so a wrong shape or layout must not reach them."""
    if qkv.dim() != 3 or qkv.shape[2] % (3 * n_heads) != 0 or qkv.shape[2] == 0:
        raise ValueError(f"qkv must be (B, T, 3 H D) with H = {n_heads}, got {tuple(qkv.shape)}")
    if qkv.dtype != torch.bfloat16 or not qkv.is_contiguous() or qkv.device.type != "cpu":
        raise ValueError("the attention kernels take a contiguous bfloat16 CPU tensor")
    return qkv.shape[0], qkv.shape[1], qkv.shape[2] // (3 * n_heads)


def load() -> Kernels | None:
    """The compiled kernels, building them once per machine; None if that is not possible."""
    global _loaded, _reason
    if _loaded is not None or _reason is not None:
        return _loaded
    try:
        _loaded = _build_and_load()
    except KernelUnavailable as e:
        _reason = str(e)
    return _loaded


def unavailable_reason() -> str | None:
    """Why `load()` returned None (None if it has not been called or succeeded)."""
    return _reason


def _build_and_load() -> Kernels:
    if os.environ.get("TFORMER_KERNELS", "1") == "0":
        raise KernelUnavailable("switched off by TFORMER_KERNELS=0")
    if platform.machine() not in ("x86_64", "AMD64", "aarch64", "arm64"):
        raise KernelUnavailable(f"not built for {platform.machine()}")
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        raise KernelUnavailable("no C compiler found (set CC, or install gcc)")
    path = _library_path(compiler)
    if not path.exists():
        _compile(compiler, path)
    try:
        library = ctypes.CDLL(str(path))
    except OSError as e:
        raise KernelUnavailable(f"could not load {path}: {e}") from e
    pointer, size, real = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
    library.tformer_linear_f32.argtypes = [pointer] * 4 + [size] * 3
    library.tformer_linear_bf16.argtypes = [pointer] * 4 + [size] * 3
    library.tformer_linear_i8.argtypes = [pointer] * 5 + [size] * 3
    library.tformer_smoothed_ce_forward_bf16.argtypes = [pointer] * 4 + [size] * 2 + [real]
    library.tformer_smoothed_ce_backward_bf16.argtypes = [pointer] * 5 + [size] * 2 + [real]
    library.tformer_dropout_mask.argtypes = [pointer, size, ctypes.c_uint64, ctypes.c_uint32]
    for name in ("tformer_gelu_tanh_f32", "tformer_gelu_tanh_bf16"):
        getattr(library, name).argtypes = [pointer, pointer, size]
    for name in ("tformer_gelu_tanh_backward_f32", "tformer_gelu_tanh_backward_bf16"):
        getattr(library, name).argtypes = [pointer, pointer, pointer, size]
    for name in ("tformer_gelu_f32", "tformer_gelu_bf16"):
        getattr(library, name).argtypes = [pointer] * 3 + [size]
    library.tformer_causal_attention_bf16.argtypes = [pointer] * 3 + [size] * 4
    library.tformer_causal_attention_backward_bf16.argtypes = [pointer] * 4 + [size] * 4
    library.tformer_flush_denormals.argtypes = [ctypes.c_int]
    library.tformer_flush_denormals.restype = ctypes.c_int
    library.tformer_denormals_flushed.argtypes = []
    library.tformer_denormals_flushed.restype = ctypes.c_int
    library.tformer_causal_attention_bf16.restype = ctypes.c_int
    library.tformer_causal_attention_backward_bf16.restype = ctypes.c_int
    for name in (
        "tformer_gelu_tanh_f32",
        "tformer_gelu_tanh_bf16",
        "tformer_gelu_tanh_backward_f32",
        "tformer_gelu_tanh_backward_bf16",
        "tformer_gelu_f32",
        "tformer_gelu_bf16",
        "tformer_dropout_mask",
        "tformer_linear_f32",
        "tformer_linear_bf16",
        "tformer_linear_i8",
        "tformer_smoothed_ce_forward_bf16",
        "tformer_smoothed_ce_backward_bf16",
    ):
        getattr(library, name).restype = None
    return Kernels(library, path, bool(library.tformer_has_avx512()))


def _library_path(compiler: str) -> Path:
    """One file per (source, compiler, flags, CPU): -march=native code is for this CPU only."""
    try:
        version = subprocess.run(
            [compiler, "--version"], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise KernelUnavailable(f"{compiler} --version failed: {e}") from e
    key = hashlib.sha256()
    try:
        sources = [source.read_bytes() for source in (*SOURCES, *HEADERS)]
    except OSError as e:  # an installation without the sources: torch's kernels instead
        raise KernelUnavailable(f"the kernel sources are not installed: {e}") from e
    for part in (*sources, version.encode(), " ".join(flags()).encode(), _cpu_id()):
        key.update(part)
        key.update(b"\0")
    return cache_dir() / "kernels" / f"tformer-{key.hexdigest()[:24]}.so"


def flags() -> list[str]:
    """The compiler flags for this CPU. GCC tunes AVX-512 CPUs for 256-bit vectors unless
    told; where AVX-512 is recent enough to run bfloat16 (Zen 4, Sapphire Rapids: no clock
    penalty for whole registers), the kernels' 16-float loops are built whole-register:
    attention forward 6% faster, exact GELU 20% on Zen 4 (docs/LOG.md)."""
    if b"avx512_bf16" in _cpu_id():
        return [*FLAGS, WIDE_VECTORS]
    return list(FLAGS)


def _cpu_id() -> bytes:
    """The CPU's model name and feature flags, as far as the system tells them."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor().encode()
    wanted = ("model name", "flags", "Features", "CPU part")
    return "\n".join(sorted({ln for ln in lines if ln.startswith(wanted)})).encode()


def _compile(compiler: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    command = [compiler, *flags(), *map(str, SOURCES), "-lm", "-o", str(tmp)]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["(no message)"])[-1]
            raise KernelUnavailable(f"compiling the kernels failed: {last}")
        os.replace(tmp, path)  # concurrent builders each write their own file; last one wins
    except (OSError, subprocess.SubprocessError) as e:
        raise KernelUnavailable(f"compiling the kernels failed: {e}") from e
    finally:
        tmp.unlink(missing_ok=True)
