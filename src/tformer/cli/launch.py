"""The `tformer` program's start: which C allocator a training run gets, then main().

A training step allocates and frees a few hundred tensors, and glibc's allocator, which
sorts and merges freed blocks on every call, took 8% of a small model's step (nanoGPT's
configuration; docs/LOG.md). jemalloc serves the same requests from size classes: where its
library is installed (Debian: `apt-get install libjemalloc2`), `tformer train` runs under
it, keeping the memory it frees for reuse as tformer does with glibc's
(tformer.devices.keep_freed_memory), and asking Linux to back it with 2 MiB pages:

    LD_PRELOAD=libjemalloc.so.2   MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1,thp:always

Huge pages are withheld from the process at its start (prctl PR_SET_THP_DISABLE, which
lasts across the new start, marked by TFORMER_HUGE_PAGES_WITHHELD=1 in its environment):
the trainer gives them back once it knows the model is large enough to gain from them
(tformer.devices.allow_huge_pages).

An allocator is chosen when a process starts, so the command starts itself again under it
(os.execve: the same process, with its command line, and that environment; torch is not
imported before this). In the process started again, LD_PRELOAD and MALLOC_CONF are put
back as they were, so that the processes it starts (the C compiler, workers) run as the
user set them. TFORMER_ALLOCATOR=system keeps the C library's allocator, and a LD_PRELOAD
that already names an allocator is left alone. Only training was measured, so only `train`
takes it.
"""

import ctypes.util
import gc
import json
import os
import sys
from collections.abc import Callable

COMMANDS = ("train",)  # the subcommands measured to gain (docs/LOG.md)
ALLOCATORS = ("jemalloc", "system")
# jemalloc keeps freed pages (no decay back to the system): a step's buffers are reused,
# not faulted in again; without this the character model's step took 65% longer
KEEP_FREED = "dirty_decay_ms:-1,muzzy_decay_ms:-1"
# and asks for transparent huge pages (madvise; nothing changes where the system has them
# off), for the trainer to allow or not (tformer.devices.allow_huge_pages)
MALLOC_SETTINGS = f"{KEEP_FREED},thp:always"
PR_SET_THP_DISABLE, PR_GET_THP_DISABLE = 41, 42  # Linux's prctl options (linux/prctl.h)
# set in the environment of the process started again where its huge pages were withheld
# here; the trainer gives back only those (tformer.devices.allow_huge_pages)
HUGE_PAGES_WITHHELD = "TFORMER_HUGE_PAGES_WITHHELD"
ALREADY = ("jemalloc", "tcmalloc", "mimalloc")  # a preloaded allocator the user chose
STARTED = "TFORMER_ALLOCATOR_STARTED"  # set in the process started again: what to put back
SAVED = ("LD_PRELOAD", "MALLOC_CONF")


def allocator_environment(
    argv: list[str], environ: dict[str, str], find_library: Callable[[], str | None]
) -> dict[str, str] | None:
    """The environment to start `tformer argv` again under jemalloc (find_library gives its
    library's name, or None where it is not installed), or None to go on as it is."""
    if subcommand(argv) not in COMMANDS or "--help" in argv or "-h" in argv:
        return None
    choice = environ.get("TFORMER_ALLOCATOR", "jemalloc")
    if choice not in ALLOCATORS:
        sys.exit(f"tformer: TFORMER_ALLOCATOR={choice!r}: choose one of {', '.join(ALLOCATORS)}")
    preloaded = environ.get("LD_PRELOAD", "")
    if choice == "system" or STARTED in environ or any(name in preloaded for name in ALREADY):
        return None
    library = find_library()
    if library is None:
        return None
    changed = dict(environ)
    changed[STARTED] = json.dumps({name: environ.get(name) for name in SAVED})
    changed["LD_PRELOAD"] = f"{library} {preloaded}".strip()
    changed.setdefault("MALLOC_CONF", MALLOC_SETTINGS)
    return changed


def subcommand(argv: list[str]) -> str | None:
    """The subcommand of `tformer argv`: its first argument that is not an option."""
    return next((arg for arg in argv if not arg.startswith("-")), None)


def put_back(environ: dict[str, str]) -> None:
    """In the process started again: LD_PRELOAD and MALLOC_CONF as they were before."""
    saved = environ.pop(STARTED, None)
    if saved is None:
        return
    for name, value in json.loads(saved).items():
        if value is None:
            environ.pop(name, None)
        else:
            environ[name] = value


def start_under_allocator(argv: list[str], own_command: bool = False) -> None:
    """Start this process again under jemalloc if allocator_environment says so (Linux
    only); otherwise return. argv are the `tformer` arguments, which must end the process's
    command line (a caller that only runs tformer in-process, as a test does, is left
    alone), or own_command: the process is this command's, whatever its command line."""
    if not sys.platform.startswith("linux") or subcommand(argv) not in COMMANDS:
        return
    if STARTED in os.environ:  # started again already
        put_back(os.environ)
        return
    own = own_command or (bool(argv) and sys.orig_argv[-len(argv) :] == argv)
    if not own or not sys.executable:
        return
    environ = allocator_environment(
        argv, dict(os.environ), lambda: ctypes.util.find_library("jemalloc")
    )
    if environ is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    if withhold_huge_pages(True):
        environ[HUGE_PAGES_WITHHELD] = "1"  # for tformer.devices.allow_huge_pages
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environ)
    except OSError:  # cannot start again: go on under the C library's allocator, as it was
        if HUGE_PAGES_WITHHELD in environ:
            withhold_huge_pages(False)
        return


def withhold_huge_pages(withhold: bool) -> bool:
    """Withhold transparent huge pages from this process and what it starts (prctl
    PR_SET_THP_DISABLE, kept across execve), or give them back; return whether the setting
    changed. Only a process that has them is made to withhold them: one started without
    them on purpose stays so."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if withhold and libc.prctl(PR_GET_THP_DISABLE, 0, 0, 0, 0) != 0:
            return False
        return libc.prctl(PR_SET_THP_DISABLE, int(withhold), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def allocator_in_use() -> str:
    """ "jemalloc" where it is loaded in this process, else "system"."""
    try:
        with open("/proc/self/maps") as maps:
            return "jemalloc" if "libjemalloc" in maps.read() else "system"
    except OSError:
        return "system"


def entry() -> None:
    """The `tformer` program.

    The garbage collector is off while the modules load: they make ~270,000 objects
    (torch's, mostly) that live as long as the process, and the three full collections
    they set off walked them again and again (0.1-0.2 s of a command's ~1.3 s start;
    docs/LOG.md). They go into its oldest generation without a walk instead (frozen, then
    unfrozen), to be looked at in the first full collection the command's own work sets
    off."""
    gc.disable()
    start_under_allocator(sys.argv[1:])
    from tformer.cli.main import entry as main_entry  # torch is imported from here on

    gc.freeze()
    gc.unfreeze()
    gc.enable()
    main_entry()
