"""A run directory's own record: run.json, and reading a run back for --resume.

RUN_DIR/run.json            what the run trains on (task, data, tokenizer, init, LoRA,
                            and a sha256 of its data), so --resume needs nothing but
                            the directory
RUN_DIR/train_config.json   how it trains (TrainConfig), written by the trainer
RUN_DIR/last, best, checkpoints/, metrics.jsonl, the final model: the trainer's
"""

from dataclasses import replace
from pathlib import Path

import torch

from tformer.files import atomic_write_json, read_json
from tformer.train import TrainConfig, distributed

RUN_FILE = "run.json"


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


def start_run_directory(out: Path, record: dict, dist: distributed.Distributed) -> None:
    """A new run's directory with its run.json, refusing one that holds a run already; the
    main process writes it."""
    if not dist.is_main:
        return
    if (out / "last").exists():
        raise FileExistsError(f"{out} already holds a run: add --resume, or pick --out")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / RUN_FILE, record)


def read_run(
    out: Path, threads: int | None, overrides: dict[str, object | None]
) -> tuple[dict, TrainConfig]:
    """What a run trains on and how, for --resume, on the run's own number of threads
    unless `threads` says otherwise (the same sums, the same digits). `overrides` (None:
    not given) may change how the work is spread (parallel, activation_checkpointing,
    compile): the arithmetic is the same, up to the order of sums across processes."""
    if not (out / "last").exists():
        raise FileNotFoundError(
            f"{out}: nothing to resume (no 'last' checkpoint: the run saved none yet, or this "
            "is not a run directory)"
        )
    saved = read_json(out / RUN_FILE, "the description of a training run")
    torch.set_num_threads(threads or saved["threads"])
    stored = read_json(out / "train_config.json", "a training config")
    try:
        config = TrainConfig(**stored)
    except TypeError as e:
        raise ValueError(f"{out / 'train_config.json'}: not a training config ({e})") from None
    return saved, replace(config, **{k: v for k, v in overrides.items() if v is not None})


def check_same_data(saved: dict, key: str, digest: str, out: Path, what: str) -> None:
    """A resumed run must see the data it started with (run.json keeps its sha256)."""
    if saved.get(key) != digest:
        raise ValueError(
            f"the {what} of {out} have changed since the run started; resume needs the same "
            f"{what} (or start a new run)"
        )
