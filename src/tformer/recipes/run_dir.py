"""A run directory: tformer's alone, one writer at a time, and read back for --resume.

RUN_DIR/run.json            what the run trains on (task, data, tokenizer, init, LoRA,
                            and a sha256 of its data), so --resume needs nothing but
                            the directory; its "format" marks the directory as a run
RUN_DIR/train_config.json   how it trains (TrainConfig), written by the trainer
RUN_DIR/.lock               held (flock) by the process writing the run (tformer.files)
RUN_DIR/last, best, checkpoints/, metrics.jsonl, the final model: the trainer's

What `train --out DIR` accepts (docs/run_directories.md):

    DIR missing or empty         a new run
    DIR holds a run              --resume continues it; --overwrite replaces the run's own
                                 files (RUN_NAMES) and starts over, leaving any other file
    DIR holds anything else      refused, naming what is there: tformer never writes over
                                 files it did not write (a Hugging Face checkpoint, ...)

Everything is checked before anything is written; a run.json written before the format
field existed is recognised by what it always held ("threads", a "*_sha256" of the data).
"""

import shutil
from dataclasses import replace
from pathlib import Path

import torch

from tformer.errors import ConfigError, RunDirectoryError
from tformer.files import (
    LOCK_FILE,
    DirectoryLock,
    atomic_write_json,
    check_unlocked,
    lock_directory,
    read_json,
    write_failure,
)
from tformer.tokenizers import TOKENIZER_FILES
from tformer.train import TrainConfig, distributed
from tformer.train.checkpoint import (
    CHECKPOINT,
    RUN_TEMPORARY,
    TEMPORARY,
    UNREADABLE,
    checkpoints_newest_first,
    intact_note,
    remove_temporaries,
)
from tformer.train.metrics import METRICS_FILE, parse_metrics
from tformer.train.plots import PLOT_FILE

RUN_FILE = "run.json"
FORMAT = "tformer-run/1"  # run.json's "format": this directory is a tformer run
CONFIG_FILE = "train_config.json"
# Every name a run writes at its top level: what --overwrite removes, and nothing else. The
# model's files (Hugging Face layout, or a PEFT adapter), its tokenizer's, the question-
# answering task's scores, and the adapters a merged LoRA run moves aside.
RUN_NAMES = (
    RUN_FILE,
    CONFIG_FILE,
    METRICS_FILE,
    PLOT_FILE,
    "last",
    "best",
    "checkpoints",
    "config.json",
    "model.safetensors",
    "adapter_config.json",
    "adapter_model.safetensors",
    "adapter",
    "qa_scores.json",
    *TOKENIZER_FILES,
)
SHOWN = 6  # names listed in a refusal


def output_directory(text: str | None, flag: str = "--out") -> Path:
    """The directory a command was told to write; an empty name (which would mean the
    current directory) is refused."""
    if text is None or not str(text).strip():
        raise ConfigError(f"{flag} must name a directory, got {text!r}")
    return Path(text).expanduser()


def is_run(directory: Path) -> bool:
    """Whether `directory` holds a tformer run: a run.json with our format (or one of an
    earlier version, which had none)."""
    try:
        saved = read_json(directory / RUN_FILE, "the description of a training run")
    except (OSError, ValueError):
        return False
    if "format" in saved:
        return str(saved["format"]).startswith("tformer-run/")
    return "threads" in saved and any(key.endswith("_sha256") for key in saved)


def contents(directory: Path) -> list[str]:
    """The names in `directory` (sorted), leaving out our own lock and the temporaries an
    interrupted atomic write of ours may have left (`.NAME.HEX.tmp`)."""
    return sorted(
        p.name
        for p in directory.iterdir()
        if p.name != LOCK_FILE and not RUN_TEMPORARY.fullmatch(p.name)
    )


def listing(names: list[str]) -> str:
    shown = ", ".join(names[:SHOWN])
    return shown + (f", and {len(names) - SHOWN} more" if len(names) > SHOWN else "")


def check_new_run(out: Path, overwrite: bool) -> None:
    """Refuse an --out that a new run may not write into (see the module's table); writes
    nothing. Another process writing there is refused too (RunLockedError)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise RunDirectoryError(f"--out {out} is a file, not a directory: pick another --out")
    check_unlocked(out)
    check_contents(out, overwrite)


def check_contents(out: Path, overwrite: bool) -> None:
    """check_new_run's verdict on what an existing directory `out` holds."""
    names = contents(out)
    if not names:
        return
    if is_run(out):
        if overwrite:
            return
        raise RunDirectoryError(
            f"{out} already holds a training run: add --resume to continue it, --overwrite "
            "to start it over (its files are replaced), or pick another --out"
        )
    raise RunDirectoryError(
        f"{out} holds files tformer did not write ({listing(names)}): pick an empty or new "
        "--out; tformer never writes over them, even with --overwrite"
    )


def check_resumable(out: Path) -> None:
    """Refuse an --out that holds no run to resume; writes nothing."""
    if out.exists() and not out.is_dir():
        raise RunDirectoryError(f"{out}: nothing to resume; it is a file, not a run directory")
    if not out.is_dir():
        raise FileNotFoundError(f"{out}: nothing to resume (no such directory)")
    if not is_run(out):
        names = contents(out)
        held = f"it holds {listing(names)}" if names else "it is empty"
        raise RunDirectoryError(f"{out}: nothing to resume; it is not a tformer run ({held})")


def clear_run(out: Path) -> None:
    """--overwrite: remove what a run wrote (RUN_NAMES; under checkpoints/ only its
    `step-NNNNNN` folders, their temporaries and the ones set aside as unreadable, never a
    link), never another file. run.json goes last: if this stops partway (an I/O error, a
    signal), DIR is still a run, which --overwrite (or --resume) takes up again."""
    for name in (n for n in RUN_NAMES if n != RUN_FILE):
        path = out / name
        if name == "checkpoints" and path.is_dir() and not path.is_symlink():
            for checkpoint in path.iterdir():
                ours = CHECKPOINT, TEMPORARY, UNREADABLE
                if checkpoint.is_symlink() or not any(p.fullmatch(checkpoint.name) for p in ours):
                    continue  # a link is someone else's, wherever it points
                shutil.rmtree(checkpoint)
            if not any(path.iterdir()):
                path.rmdir()
        elif path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.is_symlink() or path.exists():
            path.unlink()
    remove_temporaries(out)
    (out / RUN_FILE).unlink(missing_ok=True)


def absolute(path: str | None) -> str | None:
    """A path as run.json keeps it: absolute, so a run resumes from any directory."""
    return str(Path(path).expanduser().resolve()) if path is not None else None


def data_record(spec, builtin: tuple[str, ...]) -> dict:
    """Where a run's data comes from, as run.json keeps it: a built-in data set by its name,
    files by their absolute paths."""
    data = spec.data if spec.data in builtin else absolute(spec.data)
    return {"data": data, "train": absolute(spec.train_file), "val": absolute(spec.val_file)}


def task_of(out: Path) -> str | None:
    """The task of the run in `out` (None: no run there); a run.json written before tasks
    were recorded is a language model's."""
    if not (out / RUN_FILE).is_file():
        return None
    return read_json(out / RUN_FILE, "the description of a training run").get("task", "lm")


def start_run_directory(
    out: Path, record: dict, dist: distributed.Distributed, overwrite: bool
) -> DirectoryLock | None:
    """A new run's directory with its run.json, locked for this run (the main process's
    lock; None elsewhere). Checked again under the lock, since another process may have
    started there meanwhile; with `overwrite`, the run there before is removed first."""
    if not dist.is_main:
        return None
    check_new_run(out, overwrite)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_failure(out, e, "nothing was written") from None
    lock = lock_directory(out)
    try:
        check_contents(out, overwrite)
        lock.announce()
        if overwrite and is_run(out):
            clear_run(out)
        try:
            atomic_write_json(out / RUN_FILE, {"format": FORMAT, **record})
        except OSError as e:
            raise write_failure(out / RUN_FILE, e, "nothing was written") from None
    except BaseException:
        lock.release()
        raise
    return lock


def read_run(
    out: Path, threads: int | None, overrides: dict[str, object | None]
) -> tuple[dict, TrainConfig]:
    """What a run trains on and how, for --resume, on the run's own number of threads
    unless `threads` says otherwise (the same sums, the same digits). `overrides` (None:
    not given) may change how the work is spread (parallel, activation_checkpointing,
    compile): the arithmetic is the same, up to the order of sums across processes."""
    if not ((out / "last").is_symlink() or checkpoints_newest_first(out)):
        raise FileNotFoundError(
            f"{out}: nothing to resume (no checkpoint: the run saved none yet); start it over "
            "with --overwrite"
        )
    saved = read_json(out / RUN_FILE, "the description of a training run")
    if (out / METRICS_FILE).is_file():  # a bad line stops the resume before it writes
        parse_metrics(out / METRICS_FILE)
    torch.set_num_threads(threads or saved["threads"])
    path = out / CONFIG_FILE
    stored = read_json(path, "a training config")
    try:
        config = TrainConfig(**stored)
    except TypeError as e:
        raise ValueError(f"{path}: not a training config ({e})") from None
    except ConfigError as e:  # a field out of its range: the file is where to fix it
        raise ConfigError(f"{path}: {e}") from None
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return saved, replace(config, **given)
    except ConfigError as e:  # the flags given with --resume, over the file's settings
        raise ConfigError(f"{path} with the flags given: {e}") from None


def extended(config: TrainConfig, steps: int | None, reached: int, out: Path) -> TrainConfig:
    """The run's config for --resume --steps N (None: not given, the run's own steps).

    N is the run's new total: more than the steps it has done (`reached`), and not fewer
    than it planned (a shorter run would have had another schedule). A cosine schedule
    keeps its decay where the run had it (decay_steps, else the old total): a finished run
    goes on at min_lr, as if it had been started with --steps N --decay-steps OLD, and its
    losses are exactly that run's. An inverse square root schedule just goes on."""
    if steps is None or (steps == config.steps and steps > reached):
        return config
    check = f"--steps {steps}"
    if steps <= reached:
        raise ConfigError(
            f"{check}: {out} has already trained {reached} steps; to train longer, give a "
            f"larger --steps"
        )
    if steps < config.steps:
        raise ConfigError(
            f"{check} is fewer than the {config.steps} steps {out} was started with; a run "
            "can be extended, not shortened"
        )
    return replace(config, steps=steps, decay_steps=config.last_decay_step)


def record_config(out: Path, config: TrainConfig) -> None:
    """Keep an extended run's new total (and where its decay ends) in train_config.json,
    so that a later --resume continues the extended run."""
    path = out / CONFIG_FILE
    stored = read_json(path, "a training config")
    if (stored.get("steps"), stored.get("decay_steps")) == (config.steps, config.decay_steps):
        return
    try:
        atomic_write_json(
            path, {**stored, "steps": config.steps, "decay_steps": config.decay_steps}
        )
    except OSError as e:
        raise write_failure(path, e, intact_note(out)) from None


def check_same_data(saved: dict, key: str, digest: str, out: Path, what: str) -> None:
    """A resumed run must see the data it started with (run.json keeps its sha256)."""
    if saved.get(key) != digest:
        raise ValueError(
            f"the {what} of {out} have changed since the run started; resume needs the same "
            f"{what} (or start a new run)"
        )
