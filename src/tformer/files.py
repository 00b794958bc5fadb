"""Writing files so that a crash never leaves a half-written one behind, and one writer
per directory.

A file is written under a temporary name in the same directory, flushed to disk (fsync),
and only then renamed over the final name; a rename within one file system is atomic, so a
reader sees the old file or the new one, never a torn mix. A write that fails (a full disk)
becomes a WriteError that names the file and the cause (`write_failure`).

A directory that one process writes for a long time (a training run) holds DIR/.lock,
locked with flock(2) while it writes: a second writer is refused at once, told the first
one's process id, and the kernel drops the lock when its holder dies, even by SIGKILL, so a
crash never leaves a directory locked.

Whether a directory is locked is asked (check_unlocked) by trying for a *shared* lock and
letting it go at once: it fails only while a writer holds the exclusive one, and two such
probes never refuse each other. For that moment a writer cannot take its exclusive lock,
so lock_directory tries again for LOCK_PATIENCE seconds before it refuses: far longer than
any probe holds its lock, far shorter than any writer holds its own. (A probe without
taking any lock would need F_GETLK, which Linux answers only for fcntl locks, not for
flock's.) The holder's process id is written into DIR/.lock only when it has checked what
it was asked to do (DirectoryLock.announce): a command that is refused changes nothing.
"""

import errno
import fcntl
import hashlib
import json
import numbers
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

from tformer.errors import RunLockedError, WriteError

LOCK_FILE = ".lock"
LOCK_PATIENCE = 0.2  # seconds lock_directory waits out a probe's momentary shared lock
# Errors that mean the disk is full, in words; any other OSError says its own strerror.
FULL_DISK = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}
# What a failed write may raise: OSError, and torch's and safetensors' own errors for a full
# disk. Catch these, then ask `is_write_error`: only some RuntimeErrors are failed writes.
WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)
# How torch's RuntimeError says that a file could not be written ("unexpected pos 64 vs 0",
# "PytorchStreamWriter failed writing file data/0: file write failed"); any other
# RuntimeError during a save is a bug to report, not a full disk.
TORCH_WRITE_FAILURES = ("unexpected pos", "PytorchStreamWriter failed", "file write failed")


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call `write(tmp_path)` to fill a temporary file, then move it to `path` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A fresh name that `write` creates itself, so the file gets the usual permissions.
    tmp = str(path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp"))
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    text = json.dumps(obj, indent=2, ensure_ascii=False, default=plain_number)
    atomic_write_text(path, text + "\n")


def plain_number(value: Any) -> int | float:
    """A numpy (or torch) scalar as the Python number JSON writes: a config may hold one."""
    if hasattr(value, "item"):  # numpy's and torch's scalars
        return value.item()
    if isinstance(value, numbers.Real):  # e.g. a Fraction
        return float(value)
    raise TypeError(f"cannot write a {type(value).__name__} as JSON")


def read_json(path: str | os.PathLike, what: str) -> dict:
    """Read a JSON object, with an error that names the file and `what` it should hold."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing ({what} expected here)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}); expected {what}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object holding {what}")
    return obj


def read_cached_json(path: str | os.PathLike) -> dict:
    """A JSON object the cache keeps (measurements that can be made again): {} where the
    file is missing, unreadable or not a JSON object, rather than an error."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}


def cache_dir() -> Path:
    """$TFORMER_CACHE, else ~/.cache/tformer: token caches, corpora, compiled kernels."""
    return Path(os.environ.get("TFORMER_CACHE", Path.home() / ".cache" / "tformer"))


def sha256_of(pieces: Iterable[str]) -> str:
    """The sha256 (hex) of the pieces' UTF-8 bytes, one after another: how a run recognises
    its data on --resume. Callers put separators in the pieces where they need them."""
    digest = hashlib.sha256()
    for piece in pieces:
        digest.update(piece.encode("utf-8"))
    return digest.hexdigest()


def is_write_error(error: BaseException) -> bool:
    """Whether `error` (raised while saving) means the file could not be written."""
    if isinstance(error, OSError | SafetensorError):
        return True
    return isinstance(error, RuntimeError) and any(
        words in str(error) for words in TORCH_WRITE_FAILURES
    )


def write_failure(
    path: str | os.PathLike, error: BaseException, intact: str, what: str | None = None
) -> WriteError:
    """`error`, raised while writing `path` (`what`, if given, names it in the message), as
    one line: the cause, the path and what is `intact` ("step 200 (RUN/last) is intact").
    torch and safetensors report a full disk in their own words (a RuntimeError "unexpected
    pos", a SafetensorError): when the file system has no room left, that is what the line
    says."""
    if isinstance(error, OSError) and error.errno in FULL_DISK:
        cause = FULL_DISK[error.errno]
    elif isinstance(error, OSError) and error.strerror:
        cause = error.strerror
    elif disk_is_full(Path(path)):
        cause = FULL_DISK[errno.ENOSPC]
    else:
        cause = " ".join(str(error).split()) or type(error).__name__
    failure = WriteError(f"{cause} while writing {what or path}; {intact}")
    failure.errno = error.errno if isinstance(error, OSError) else errno.EIO
    return failure


def disk_is_full(path: Path) -> bool:
    """Whether the file system that holds `path` (or its nearest existing parent) has less
    than a MiB of room left for this user: a write that failed there ran out of space."""
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        stats = os.statvfs(path)
    except OSError:
        return False
    return stats.f_bavail * stats.f_frsize < 2**20


class DirectoryLock:
    """The lock on one directory, held until `release()` (or until the process ends)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def announce(self) -> None:
        """Write this process's id (and host) into the lock file, for whoever comes second:
        once the holder has checked what it was asked to do and starts writing."""
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = None


def lock_directory(directory: str | os.PathLike) -> DirectoryLock:
    """Lock DIR/.lock for this process (the directory must exist; the file is created
    empty if missing, and not written: see DirectoryLock.announce); RunLockedError if
    another process holds it (after LOCK_PATIENCE seconds, which outlast a probe)."""
    directory = Path(directory)
    # Not truncated on open: the file holds the current holder's id until we hold it.
    fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + LOCK_PATIENCE
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise _locked(directory, _read_holder(fd)) from None
                time.sleep(0.01)
    except BaseException:
        os.close(fd)
        raise
    return DirectoryLock(fd)


def check_unlocked(directory: str | os.PathLike) -> None:
    """RunLockedError if another process holds DIR/.lock; writes nothing, and takes only a
    shared lock for a moment (see the module's docstring)."""
    path = Path(directory) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # no lock file (or none we may read): nobody holds one
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _locked(Path(directory), _read_holder(fd)) from None
    finally:
        os.close(fd)  # drops the probe's own lock, if it got one


def _read_holder(fd: int) -> str:
    """Who holds the lock, as its file says; a process of this host that no longer runs
    (the file names the previous holder until the new one announces itself) is not named."""
    words = os.pread(fd, 200, 0).decode("utf-8", "replace").split()
    if not words or not words[0].isdigit():
        return "another process"
    if len(words) > 1 and words[1] != socket.gethostname():
        return f"process {words[0]} on {words[1]}"
    try:
        os.kill(int(words[0]), 0)
    except ProcessLookupError:
        return "another process"
    except OSError:  # alive, another user's (EPERM), or not a pid we can ask about
        pass
    return f"process {words[0]}"


def _locked(directory: Path, holder: str) -> RunLockedError:
    return RunLockedError(
        f"{directory} is being written by {holder} (it holds {directory / LOCK_FILE}): wait "
        "for it to finish or stop it; one process at a time writes there"
    )
