"""Writing files so that a crash never leaves a half-written one behind.

A file is written under a temporary name in the same directory, flushed to disk (fsync),
and only then renamed over the final name; a rename within one file system is atomic, so a
reader sees the old file or the new one, never a torn mix.
"""

import hashlib
import json
import os
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any


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
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


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
