"""Building the C kernels: compiler, flags, the cache of built libraries, and loading one.

The sources are compiled, each on its own and as many at once as this process has cores,
with the machine's C compiler for this CPU, and linked into one shared library in
$TFORMER_CACHE/kernels/ (or $TFORMER_KERNELS_DIR). Its name is a hash of everything the
machine code depends on (the sources and the header they include, the compiler's version,
the flags, the CPU's model and features), so a library is built once per machine and
reused by every later run; a change to any of them builds a new one. Everything that can
go wrong here (no compiler, a failed compilation, sources missing from an installation)
raises KernelUnavailable with a message that says what, so that the caller can use torch
instead.
"""

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tformer.files import cache_dir

SOURCES = tuple(
    Path(__file__).with_name(name)
    for name in (
        "linear.c",
        "integer_linear.c",
        "cross_entropy.c",
        "dropout.c",
        "gelu.c",
        "global_norm.c",
        "adamw.c",
        "layer_norm.c",
        "casts.c",
        "transpose.c",
        "attention.c",
        "attention_pairs.c",
        "products.c",
        "softmax.c",
        "flash_attention.c",
        "flash_attention_f32.c",
        "slot_attention.c",
        "decode_block.c",
        "top_logits.c",
        "threads.c",
    )
)
HEADERS = (Path(__file__).with_name("common.h"),)  # part of the key, not compiled alone
# -fno-trapping-math: the kernels never read the floating-point exception flags, and with
# them kept exact GCC leaves a loop with a float select (x < c ? a : b) scalar on AVX2
# (AVX-512's masks do not need it): GELU ran 2.6x slower than torch's there (docs/LOG.md).
# Values are unchanged; reassociation is a different flag, not given.
FLAGS = ["-O3", "-march=native", "-fno-trapping-math", "-fopenmp", "-shared", "-fPIC"]
WIDE_VECTORS = "-mprefer-vector-width=512"
# Flags of one source only. adamw.c rounds each operation once, as torch's AdamW does, so
# that the two agree to the bit: no contraction of a multiply and an add into one fma (GCC
# contracts by default); sqrtf need not set errno (so that its loop vectorises).
SOURCE_FLAGS = {"adamw.c": ["-ffp-contract=off", "-fno-math-errno"]}


class KernelUnavailable(RuntimeError):
    """Why the kernels cannot be built or loaded here."""


def open_library() -> tuple[ctypes.CDLL, Path]:
    """The kernels' shared library, compiled first if this machine has not built it yet,
    and its path. Raises KernelUnavailable."""
    if os.environ.get("TFORMER_KERNELS", "1") == "0":
        raise KernelUnavailable("switched off by TFORMER_KERNELS=0")
    if platform.machine() not in ("x86_64", "AMD64", "aarch64", "arm64"):
        raise KernelUnavailable(f"not built for {platform.machine()}")
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        raise KernelUnavailable("no C compiler found (set CC, or install gcc)")
    path = library_path(compiler)
    if not path.exists():
        compile_library(compiler, path)
    try:
        return ctypes.CDLL(str(path)), path
    except OSError as e:
        raise KernelUnavailable(f"could not load {path}: {e}") from e


def library_path(compiler: str) -> Path:
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
    flag_text = " ".join(flags()) + repr(sorted(SOURCE_FLAGS.items()))
    for part in (*sources, version.encode(), flag_text.encode(), cpu_id()):
        key.update(part)
        key.update(b"\0")
    return library_dir() / f"tformer-{key.hexdigest()[:24]}.so"


def library_dir() -> Path:
    """Where built libraries are kept: $TFORMER_KERNELS_DIR, else the cache's kernels/. A
    library's name is its key, so one folder can serve several caches: the test suite
    builds once for tests that each keep a private cache (tests/conftest.py)."""
    folder = os.environ.get("TFORMER_KERNELS_DIR")
    # absolute: ctypes looks up a bare file name in the system's library paths
    return Path(folder).expanduser().resolve() if folder else cache_dir() / "kernels"


def flags() -> list[str]:
    """The compiler flags for this CPU. GCC tunes AVX-512 CPUs for 256-bit vectors unless
    told; where AVX-512 is recent enough to run bfloat16 (Zen 4, Sapphire Rapids: no clock
    penalty for whole registers), the kernels' 16-float loops are built whole-register, which
    measured faster there (docs/LOG.md)."""
    if b"avx512_bf16" in cpu_id():
        return [*FLAGS, WIDE_VECTORS]
    return list(FLAGS)


def cpu_id() -> bytes:
    """The CPU's model name and feature flags, as far as the system tells them."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor().encode()
    wanted = ("model name", "flags", "Features", "CPU part")
    return "\n".join(sorted({ln for ln in lines if ln.startswith(wanted)})).encode()


def compile_library(compiler: str, path: Path) -> None:
    """Compile the sources into `path`, written whole or not at all: each source to an
    object file, several at once (a first run waits for the slowest, not for their sum),
    then one link."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".objects-", dir=path.parent) as folder:
            objects = [str(Path(folder) / f"{source.stem}.o") for source in SOURCES]
            compiles = [
                [
                    compiler,
                    *flags(),
                    *SOURCE_FLAGS.get(source.name, []),
                    "-c",
                    str(source),
                    "-o",
                    obj,
                ]
                for source, obj in zip(SOURCES, objects, strict=True)
            ]
            with ThreadPoolExecutor(max_workers=usable_cores()) as pool:
                list(pool.map(run_compiler, compiles))
            run_compiler([compiler, *flags(), *objects, "-lm", "-o", str(tmp)])
        os.replace(tmp, path)  # concurrent builders each write their own file; last one wins
    except OSError as e:  # an unwritable cache, a full disk: torch's kernels instead
        raise KernelUnavailable(f"compiling the kernels failed: {e}") from e
    finally:
        tmp.unlink(missing_ok=True)


def usable_cores() -> int:
    """The cores this process may run on (its affinity where the OS tells it)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def run_compiler(command: list[str]) -> None:
    """Run one compiler command; KernelUnavailable with its last line of errors if it fails."""
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.SubprocessError) as e:
        raise KernelUnavailable(f"compiling the kernels failed: {e}") from e
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise KernelUnavailable(f"compiling the kernels failed: {last}")
