"""Training checkpoints that a crash can never break.

A run directory keeps every checkpoint in its own directory and points at the ones that
matter with symbolic links:

    run/checkpoints/step-000500/   model (Hugging Face layout), tokenizer, trainer_state.pt
    run/last -> checkpoints/step-000500
    run/best -> checkpoints/step-000250      (lowest validation loss so far)

A checkpoint is written under a temporary name, flushed, and renamed into place; only then is
the link swapped, itself atomically (a new link renamed over the old). A crash at any moment
leaves `last` pointing at a complete checkpoint: the previous one or the new one.
`trainer_state.pt` holds everything else an exact resume needs (optimizer moments, step, the
random generators' states) and is read with `weights_only=True`.

A save that fails (a full disk: torch and safetensors raise their own errors for it) removes
its temporary and raises a WriteError naming the checkpoint, the cause and the step that is
still intact. Pruning removes only what this module writes (`step-NNNNNN` directories and
their temporaries): anything else under checkpoints/ is someone else's and stays.

A checkpoint that a resume finds damaged (a torn or missing file) is moved aside, not
deleted: `checkpoints/.step-NNNNNN.unreadable` (`set_aside`), which pruning never removes,
so whatever can still be saved from it stays on disk for the user to look at or delete.
"""

import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from tformer.files import is_write_error, write_failure
from tformer.tokenizers import Tokenizer

STATE_FILE = "trainer_state.pt"
CHECKPOINT = re.compile(r"step-\d{6,}")  # a checkpoint's directory name
TEMPORARY = re.compile(r"\.step-\d{6,}\.[0-9a-f]{8}\.tmp")  # one being written
# The run directory's own temporaries: `.NAME.HEX.tmp`, by `point` and tformer.files.
RUN_TEMPORARY = re.compile(r"\..+\.(?:[0-9a-f]{8}|[0-9a-f]{12})\.tmp")
# A damaged checkpoint a resume moved aside (set_aside): kept, never pruned.
UNREADABLE = re.compile(r"\.step-\d{6,}\.unreadable(?:-\d+)?")
# What reading a damaged checkpoint raises: a missing file, a torn one (safetensors' own
# error; load_state's ValueError; a JSON file cut off, a JSONDecodeError), one that is not
# what it should be (a CheckpointError): all ValueErrors but safetensors'. Anything else (too
# many open files, an I/O error, no memory, a bug) says nothing about the checkpoint, and
# must not make a resume give it up.
DAMAGE = (FileNotFoundError, NotADirectoryError, SafetensorError, ValueError)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def point(link: Path, target: Path) -> None:
    """Make `link` a symlink to `target` (relative), replacing any old link atomically."""
    tmp = link.with_name(f".{link.name}.{uuid.uuid4().hex[:8]}.tmp")
    os.symlink(os.path.relpath(target, link.parent), tmp)
    os.replace(tmp, link)
    _fsync_dir(link.parent)


def save_checkpoint(
    run_dir: Path, step: int, model: Any, tokenizer: Tokenizer | None, state: dict, best: bool
) -> Path:
    """Write checkpoint `step` and point `last` (and `best` if `best`) at it; a failed
    write is a WriteError that says which step is still intact."""
    checkpoints = run_dir / "checkpoints"
    final = checkpoints / f"step-{step:06d}"
    intact = intact_note(run_dir)
    if final.exists():  # nothing links to it (see forget_after): a leftover of a crash
        shutil.rmtree(final)
    tmp = checkpoints / f".step-{step:06d}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        tmp.mkdir(parents=True)
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save(tmp)
        torch.save(state, tmp / STATE_FILE)
        for f in tmp.iterdir():
            with open(f, "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_dir(tmp)
        os.replace(tmp, final)
    except BaseException as e:
        # described before the temporary goes: removing it frees the space it filled
        failure = write_failure(final, e, intact) if is_write_error(e) else None
        shutil.rmtree(tmp, ignore_errors=True)
        if failure is not None:
            raise failure from None
        raise
    try:
        _fsync_dir(checkpoints)
        # `best` first: if the process dies between the two, `last` still holds the older
        # state, whose best loss is the older one, and the resumed run re-points `best`
        # when it gets there.
        if best:
            point(run_dir / "best", final)
        point(run_dir / "last", final)
    except OSError as e:
        raise write_failure(run_dir / "last", e, f"{final} is complete; {intact}") from None
    prune(run_dir)
    return final


def intact_note(run_dir: Path) -> str:
    """What a failed write leaves intact: "step 200 (RUN/last) is intact"."""
    last = run_dir / "last"
    if not last.exists():
        return "no checkpoint was saved before it"
    return f"step {step_of(last)} ({last}) is intact"


def step_of(checkpoint: Path) -> int:
    return int(checkpoint.resolve().name.removeprefix("step-"))


def checkpoints_newest_first(run_dir: Path) -> list[Path]:
    """The run's checkpoint directories (`checkpoints/step-NNNNNN`), the latest step first;
    a link of that name is not one (it is someone else's, wherever it points)."""
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return []
    found = [
        p
        for p in folder.iterdir()
        if CHECKPOINT.fullmatch(p.name) and p.is_dir() and not p.is_symlink()
    ]
    # by the number: step-1000000 comes after step-999999, though not by name
    return sorted(found, key=lambda p: int(p.name.removeprefix("step-")), reverse=True)


def forget_after(run_dir: Path, step: int) -> None:
    """Before resuming at `step`: drop what the interrupted run wrote past it (a `best` link
    to a later step, checkpoints nothing links to, temporaries), so it cannot be mistaken
    for the resumed run's own."""
    best = run_dir / "best"
    if best.is_symlink() and (not best.exists() or step_of(best) > step):
        best.unlink()
    prune(run_dir)
    remove_temporaries(run_dir)


def remove_temporaries(run_dir: Path) -> None:
    """Remove the run directory's own stale temporaries (`.NAME.HEX.tmp` files at its top:
    an atomic write or a link swap cut short)."""
    for leftover in run_dir.iterdir():
        if RUN_TEMPORARY.fullmatch(leftover.name) and not leftover.is_dir():
            leftover.unlink(missing_ok=True)


def set_aside(checkpoint: Path) -> Path:
    """Move a damaged checkpoint `checkpoints/step-NNNNNN` to `.step-NNNNNN.unreadable`
    (`-2`, `-3`, ... if that is taken), where pruning never removes it; -> its new path."""
    target = checkpoint.with_name(f".{checkpoint.name}.unreadable")
    number = 1
    while target.exists() or target.is_symlink():
        number += 1
        target = checkpoint.with_name(f".{checkpoint.name}.unreadable-{number}")
    os.replace(checkpoint, target)
    _fsync_dir(checkpoint.parent)
    return target


def prune(run_dir: Path) -> None:
    """Remove the checkpoints that neither `last` nor `best` points at, and stale
    temporaries: only `step-NNNNNN` and `.step-NNNNNN.HEX.tmp`, never another name (not a
    checkpoint set aside as unreadable either)."""
    keep = {(run_dir / name).resolve() for name in ("last", "best") if (run_dir / name).exists()}
    if not (run_dir / "checkpoints").is_dir():
        return
    for path in (run_dir / "checkpoints").iterdir():
        ours = CHECKPOINT.fullmatch(path.name) or TEMPORARY.fullmatch(path.name)
        if ours and not path.is_symlink() and path.resolve() not in keep:
            shutil.rmtree(path, ignore_errors=True)


def load_state(checkpoint: Path) -> dict:
    path = checkpoint / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: missing; {checkpoint} is not a training checkpoint that can be resumed"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, MemoryError):  # the machine's trouble, not the file's
        raise
    except Exception as e:  # truncated or foreign: say which file, without a traceback
        raise ValueError(f"{path}: cannot read the training state ({type(e).__name__})") from None
