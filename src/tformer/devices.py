"""Choosing where a model runs and in which floating-point format."""

import ctypes
import ctypes.util
import os
import platform

import torch

from tformer import kernels

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(name: str = "auto") -> torch.device:
    """'auto' takes a CUDA GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {name!r} asked for, but PyTorch sees no CUDA GPU; use --device cpu"
        )
    if device.type == "cuda" and device.index is not None:
        gpus = torch.cuda.device_count()
        if device.index >= gpus:
            raise ValueError(
                f"device {name!r} asked for, but PyTorch sees {gpus} GPU(s) "
                f"(cuda:0{f' to cuda:{gpus - 1}' if gpus > 1 else ''})"
            )
    return device


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def bf16_supported(device: torch.device) -> bool:
    """Whether this hardware computes in bfloat16 natively (AMX or AVX-512-BF16; CUDA >= sm80,
    not the emulation torch also counts by default, which is slow)."""
    if device.type == "cuda":  # this device, not the current one torch would ask about
        if torch.version.hip is not None:
            return torch.cuda.is_bf16_supported(including_emulation=False)
        return torch.cuda.get_device_capability(device)[0] >= 8
    if device.type == "cpu":
        return torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    return False


def training_dtype(name: str, device: torch.device) -> str:
    """'auto' picks bfloat16 autocast where the hardware has it, float16 (with loss scaling)
    on a CUDA GPU without it (before sm80: V100, T4), else float32."""
    if name == "auto":
        if bf16_supported(device):
            return "bfloat16"
        return "float16" if device.type == "cuda" else "float32"
    if name == "float16" and device.type != "cuda":
        raise ValueError("float16 training needs a CUDA GPU; on the CPU use bfloat16 or float32")
    if name == "bfloat16" and not bf16_supported(device):
        instead = "float16 or float32" if device.type == "cuda" else "float32"
        raise ValueError(f"this {device.type} has no native bfloat16; use --dtype {instead}")
    parse_dtype(name)
    return name


M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)
KEEP_FREED_BYTES = 1 << 30


def keep_freed_memory() -> bool:
    """Make this process's C allocator keep freed memory for reuse (glibc only).

    A training step allocates and frees the same large activation buffers every time. By
    default glibc serves each of them with a fresh mmap and returns it on free, so every
    step pays page faults to zero them again, a cost measured in docs/LOG.md. Here large
    blocks come from the heap instead, and up to 1 GiB of freed memory is kept rather than
    given back. The setting lasts for the process. Returns whether it took effect (False on
    other C libraries).
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(M_MMAP_MAX, 0) == 1
        return libc.mallopt(M_TRIM_THRESHOLD, KEEP_FREED_BYTES) == 1 and ok
    except (OSError, AttributeError):
        return False


PR_SET_THP_DISABLE = 41  # Linux's prctl option (linux/prctl.h)
HUGE_PAGES_WITHHELD = "TFORMER_HUGE_PAGES_WITHHELD"  # as tformer/cli/launch.py sets it
HUGE_PAGES_FROM = 4_000_000  # parameters: a model this large gains from huge pages


def allow_huge_pages(model: torch.nn.Module) -> bool:
    """Let Linux back this process's new memory with 2 MiB pages from now on, if `model`
    has at least HUGE_PAGES_FROM parameters and `tformer train` withheld them at its start;
    return whether that changed anything.

    `tformer train` starts under jemalloc asking for huge pages (thp:always) but with them
    withheld from the process (prctl PR_SET_THP_DISABLE, and HUGE_PAGES_WITHHELD=1 in its
    environment; tformer/cli/launch.py). A large model's step streams tensors of many MB,
    and there a TLB miss every 4 KiB cost GPT-2's and the character model's bf16 steps 3-7%
    on the Intel machine; a small model's step does not stream, while each huge page costs
    its fault up front (~20 ms in the virtual machine measured: 1.2 s of nanoGPT's 40 s
    recipe). Memory already in use keeps its pages; what the training steps allocate from
    here gets huge ones (docs/LOG.md). A process started without huge pages otherwise is
    left so."""
    if os.environ.get(HUGE_PAGES_WITHHELD) != "1" or platform.system() != "Linux":
        return False
    if sum(p.numel() for p in model.parameters()) < HUGE_PAGES_FROM:
        return False
    try:
        allowed = ctypes.CDLL(None, use_errno=True).prctl(PR_SET_THP_DISABLE, 0, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False
    if allowed:
        del os.environ[HUGE_PAGES_WITHHELD]  # what this process starts from now on has them
    return allowed


def flush_denormals(on: bool, pool: bool = True) -> bool:
    """Flush numbers below ~1e-38 (denormals, slow on the CPU) to zero, or stop flushing;
    return whether the calling thread flushed them before (to restore it later).

    torch.set_flush_denormal sets the calling thread only; with pool, the compiled kernels
    (built on first use) set the threads of the pool that runs parallel CPU operations too
    (kernels/threads.c). Without the kernels only the calling thread is set, and the state
    before is taken to be torch's default, not flushing.
    """
    library = kernels.load() if pool else None
    before = library.denormals_flushed() if library is not None else False
    torch.set_flush_denormal(on)
    if library is not None:
        library.flush_denormals(on)
    return before


def cpu_model() -> str:
    """The CPU's name, with family and model numbers (some hypervisors hide the full name)."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        return platform.processor() or "unknown CPU"
    name = fields.get("model name", "unknown CPU")
    return f"{name} (family {fields.get('cpu family', '?')}, model {fields.get('model', '?')})"


def machine_line() -> str:
    """What a measurement ran on: CPU, torch version, threads, and the GPU if there is one."""
    return f"CPU: {cpu_model()} | torch {torch.__version__} | {torch.get_num_threads()} threads" + (
        f" | GPU: {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    )
