"""The `tformer` program's start: which C allocator a training run gets, then main().

A training step allocates and frees a few hundred tensors, and glibc's allocator, which
sorts and merges freed blocks on every call, took 8% of a small model's step (nanoGPT's
configuration; docs/LOG.md). jemalloc serves the same requests from size classes: where its
library is installed (Debian: `apt-get install libjemalloc2`), `tformer train` runs under
it, keeping the memory it frees for reuse as tformer does with glibc's
(tformer.devices.keep_freed_memory):

    LD_PRELOAD=libjemalloc.so.2   MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1

An allocator is chosen when the process starts, so the command starts itself again under
it (os.execv: the same process, arguments and environment, nothing else run yet; torch is
not imported before this). TFORMER_ALLOCATOR=system keeps the C library's own; a
LD_PRELOAD that already names an allocator is left alone. Only training was measured, so
only `train` takes it.
"""

import ctypes.util
import os
import sys

COMMANDS = ("train",)  # the subcommands measured to gain (docs/LOG.md)
ALLOCATORS = ("jemalloc", "system")
# jemalloc keeps freed pages (no decay back to the system): a step's buffers are reused,
# not faulted in again; without this the character model's step took 65% longer
KEEP_FREED = "dirty_decay_ms:-1,muzzy_decay_ms:-1"
ALREADY = ("jemalloc", "tcmalloc", "mimalloc")  # a preloaded allocator the user chose


def allocator_environment(
    argv: list[str], environ: dict[str, str], library: str | None
) -> dict[str, str] | None:
    """The environment to start `tformer argv` again under jemalloc (its library's name or
    path `library`, None where it is not installed), or None to go on as it is."""
    if subcommand(argv) not in COMMANDS or library is None or "--help" in argv or "-h" in argv:
        return None
    choice = environ.get("TFORMER_ALLOCATOR", "jemalloc")
    if choice not in ALLOCATORS:
        sys.exit(f"tformer: TFORMER_ALLOCATOR={choice!r}: choose one of {', '.join(ALLOCATORS)}")
    preloaded = environ.get("LD_PRELOAD", "")
    if choice == "system" or any(name in preloaded for name in ALREADY):
        return None
    changed = dict(environ)
    changed["LD_PRELOAD"] = f"{library} {preloaded}".strip()
    changed.setdefault("MALLOC_CONF", KEEP_FREED)
    return changed


def subcommand(argv: list[str]) -> str | None:
    """The subcommand of `tformer argv`: its first argument that is not an option."""
    return next((arg for arg in argv if not arg.startswith("-")), None)


def start_under_allocator(argv: list[str]) -> None:
    """Start this process again under jemalloc if allocator_environment says so (Linux
    only); otherwise return."""
    if not sys.platform.startswith("linux") or subcommand(argv) not in COMMANDS:
        return
    environ = allocator_environment(argv, dict(os.environ), ctypes.util.find_library("jemalloc"))
    if environ is None or not sys.executable:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environ)
    except OSError:  # cannot start again: go on under the C library's allocator
        return


def entry() -> None:
    """The `tformer` program."""
    start_under_allocator(sys.argv[1:])
    from tformer.cli.main import entry as main_entry  # torch is imported from here on

    main_entry()
