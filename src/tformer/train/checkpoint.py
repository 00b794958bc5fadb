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
"""

import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch

from tformer.tokenizers import Tokenizer

STATE_FILE = "trainer_state.pt"


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
    """Write checkpoint `step` and point `last` (and `best` if `best`) at it."""
    checkpoints = run_dir / "checkpoints"
    final = checkpoints / f"step-{step:06d}"
    if final.exists():  # nothing links to it (see forget_after): a leftover of a crash
        shutil.rmtree(final)
    tmp = checkpoints / f".step-{step:06d}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir(parents=True)
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save(tmp)
        torch.save(state, tmp / STATE_FILE)
        for f in tmp.iterdir():
            with open(f, "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_dir(tmp)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(checkpoints)
    # `best` first: if the process dies between the two, `last` still holds the older state,
    # whose best loss is the older one, and the resumed run re-points `best` when it gets there.
    if best:
        point(run_dir / "best", final)
    point(run_dir / "last", final)
    prune(run_dir)
    return final


def step_of(checkpoint: Path) -> int:
    return int(checkpoint.resolve().name.removeprefix("step-"))


def forget_after(run_dir: Path, step: int) -> None:
    """Before resuming at `step`: drop what the interrupted run wrote past it (a `best` link
    to a later step, checkpoints nothing links to, temporaries), so it cannot be mistaken
    for the resumed run's own."""
    best = run_dir / "best"
    if best.is_symlink() and (not best.exists() or step_of(best) > step):
        best.unlink()
    prune(run_dir)
    for leftover in run_dir.glob(".*.tmp"):
        leftover.unlink(missing_ok=True)


def prune(run_dir: Path) -> None:
    """Remove checkpoints that neither `last` nor `best` points at, and stale temporaries."""
    keep = {(run_dir / name).resolve() for name in ("last", "best") if (run_dir / name).exists()}
    if not (run_dir / "checkpoints").is_dir():
        return
    for path in (run_dir / "checkpoints").iterdir():
        if path.resolve() not in keep:
            shutil.rmtree(path, ignore_errors=True)


def load_state(checkpoint: Path) -> dict:
    path = checkpoint / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: missing; {checkpoint} is not a training checkpoint that can be resumed"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated or foreign: say which file, without a traceback
        raise ValueError(f"{path}: cannot read the training state ({type(e).__name__})") from None
