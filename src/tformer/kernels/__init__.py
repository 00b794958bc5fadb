"""The C kernels behind fast decoding and training on the CPU, compiled on first use.

`linear.c` holds small-batch linear layers over float32, bfloat16 or int8 weights (see its
header for why they beat a general matmul when decoding); `cross_entropy.c` the
label-smoothed cross-entropy over bfloat16 logits, forward and backward, in one pass each;
`dropout.c` dropout masks from a counter-based generator; `gelu.c` GPT-2's tanh GELU and the
exact GELU, with their derivatives; `attention.c` causal self-attention over short
sequences, forward and backward, head by head in float32; `flash_attention.c` causal
self-attention over long ones on AMX's tiles (FlashAttention, where the CPU has AMX);
`slot_attention.c` a decoding
step's attention over a server's slot cache, each row over its own positions; `threads.c`
denormals flushed on every thread; `common.h` what they share.

The first call to `load()` compiles them with the machine's C compiler for this CPU
(`-O3 -march=native -fopenmp`) into one library in $TFORMER_CACHE/kernels/ (or
$TFORMER_KERNELS_DIR), keyed by the sources, the compiler and the CPU, so later runs load
it at once (build.py). What comes back is a `Kernels`, a Python function for each C
function (bindings.py). Without a compiler, or with TFORMER_KERNELS=0, `load()` returns
None and `unavailable_reason()` says why; callers then use torch's own kernels.
"""

import torch

from tformer.kernels.bindings import AdamWPlan, Kernels
from tformer.kernels.build import HEADERS, SOURCES, KernelUnavailable, open_library

__all__ = [
    "AdamWPlan",
    "HEADERS",
    "SOURCES",
    "KernelUnavailable",
    "Kernels",
    "load",
    "load_for",
    "unavailable_reason",
]

_loaded: Kernels | None = None
_reason: str | None = None


def load() -> Kernels | None:
    """The compiled kernels, building them once per machine; None if that is not possible."""
    global _loaded, _reason
    if _loaded is not None or _reason is not None:
        return _loaded
    try:
        _loaded = Kernels.bind(*open_library())
    except KernelUnavailable as e:
        _reason = str(e)
    return _loaded


def load_for(tensor: torch.Tensor, dtypes: tuple[torch.dtype, ...]) -> Kernels | None:
    """The compiled kernels if they take `tensor`: on the CPU, of one of `dtypes`, and not
    while torch.compile traces (it cannot see into C); else None."""
    if tensor.device.type != "cpu" or tensor.dtype not in dtypes:
        return None
    return None if torch.compiler.is_compiling() else load()


def unavailable_reason() -> str | None:
    """Why `load()` returned None (None if it has not been called or succeeded)."""
    return _reason
