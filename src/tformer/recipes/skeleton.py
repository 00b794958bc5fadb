"""The one skeleton every training task runs; a task fills in its own steps.

    claim       check --out before anything is read or written (recipes.run_dir): a new
                run needs an empty or new directory (or --overwrite over a run); a
                resumed one is locked against a second writer at once
    start       device, processes, the TrainConfig (new, or the run's own on --resume)
    record      what run.json keeps of a new run                      task.new_record
    data        load it, and its sha256 (a resumed run must see the same)
                                                             task.load_data, task.fingerprint
    model       new (or --init), or the run's `last` checkpoint      task.new_model, task.load_model
                (if `last` is damaged, the newest checkpoint that can be read, said so;
                the damaged ones are moved aside once the resume is known to go ahead)
    batches     the training and validation batches                  task.batches
    train       fit(), with checkpoints, metrics and the final model in the run directory; a
                new run's directory is written (and locked) only now that its data and
                model are known to work; a signal stops it with a checkpoint to resume
    result      the final evaluation, as a dict (what --json prints) task.finish

Only the main process returns a result; the others return None.
"""

import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from tformer.devices import pick_device, training_dtype
from tformer.errors import RunDirectoryError, TrainingInterrupted
from tformer.files import DirectoryLock, lock_directory
from tformer.nn.lora import lora_layers
from tformer.recipes.run_dir import (
    check_new_run,
    check_resumable,
    check_same_data,
    extended,
    output_directory,
    read_run,
    record_config,
    start_run_directory,
)
from tformer.recipes.spec import TrainSpec, train_options
from tformer.recipes.start import attention_for, merge_run, trainable_parameters
from tformer.tokenizers import Tokenizer, load_tokenizer
from tformer.train import TrainConfig, distributed, fit
from tformer.train.checkpoint import (
    DAMAGE,
    checkpoints_newest_first,
    load_state,
    point,
    set_aside,
    step_of,
)
from tformer.train.metrics import read_metrics


@dataclass
class Run:
    """One process's view of a run, as the task's steps see it."""

    spec: TrainSpec
    saved: dict  # run.json: what the run trains on
    config: TrainConfig
    device: torch.device
    dist: distributed.Distributed
    out: Path
    attention: str  # the attention path the spec asks for on this device
    say: Callable[[str], None]  # the run's messages: the main process's, unless silenced

    @property
    def resume(self) -> bool:
        return self.spec.resume


class Task(Protocol):
    """A training task: a module with these names (tformer.recipes.lm, ...)."""

    NAME: str  # run.json's task
    FINGERPRINT: str  # run.json's key for the sha256 of the data
    DATA: str  # what the data is called in messages, e.g. "sentence pairs"

    def new_record(self, run: Run) -> dict: ...
    def load_data(self, saved: dict) -> Any: ...
    def fingerprint(self, data: Any) -> str: ...
    def new_model(self, run: Run, data: Any) -> tuple[torch.nn.Module, Tokenizer]: ...
    def load_model(self, run: Run, directory: Path) -> torch.nn.Module: ...
    def batches(self, run: Run, model, tokenizer, data) -> tuple[Any, Any, str]: ...
    def describe_model(self, run: Run, model: torch.nn.Module) -> str: ...
    def finish(self, run: Run, model, tokenizer, data) -> dict: ...


def run_task(task: Task, spec: TrainSpec) -> dict | None:
    """Train (or resume) one run of `task` as `spec` asks; -> the result (main process)."""
    started = time.perf_counter()
    out = output_directory(spec.out)
    overwrite = spec.overwrite
    device = pick_device(spec.device)
    dist = distributed.init_from_env(device)
    if device.type == "cuda" and dist.world_size > 1:
        device = torch.device("cuda", dist.local_rank)
    locks: list[DirectoryLock] = []  # the main process's claim on the run directory
    if dist.is_main:  # the others write nothing there
        if spec.resume:
            check_resumable(out)
            locks.append(lock_directory(out))
        else:
            check_new_run(out, overwrite)  # and again under the lock, once it is taken
    try:
        return train_run(task, spec, out, overwrite, device, dist, locks, started)
    except TrainingInterrupted as e:
        raise TrainingInterrupted(
            f"{e.message}; continue with: tformer train --out {shlex.quote(str(out))} --resume",
            e.step,
            e.checkpoint,
            e.exit_code,
        ) from None
    finally:
        for lock in locks:
            lock.release()


def train_run(
    task: Task,
    spec: TrainSpec,
    out: Path,
    overwrite: bool,
    device: torch.device,
    dist: distributed.Distributed,
    locks: list[DirectoryLock],
    started: float,
) -> dict | None:
    """run_task's steps, once --out is known to be usable (a new run's lock joins `locks`
    when its directory is written)."""
    if spec.resume:
        overrides = {
            "parallel": spec.parallel,
            "activation_checkpointing": spec.activation_checkpointing,
            "compile": spec.compile,
        }
        saved, config = read_run(out, spec.threads, overrides)
    else:
        saved, config = {"task": task.NAME}, new_train_config(spec, device)
    say = print if dist.is_main and spec.messages else _silent
    attention = attention_for(spec.attention, device)
    run = Run(spec, saved, config, device, dist, out, attention, say)
    if not spec.resume:
        saved.update(task.new_record(run))
    data = task.load_data(saved)
    digest = task.fingerprint(data)
    if spec.resume:
        check_same_data(saved, task.FINGERPRINT, digest, out, task.DATA)
        checkpoint, damaged, model, tokenizer = resume_point(task, run)
        planned = config.steps
        # checked before anything is changed (below): a refused --steps leaves the run as it was
        run.config = config = extended(config, spec.steps, step_of(checkpoint), out)
        say(f"resuming {out} from {checkpoint.name}; the run's own settings apply")
        if config.steps != planned:
            say(
                f"extending the run from {planned} to {config.steps} steps; the learning "
                f"rate keeps its schedule (decay ends at step {config.last_decay_step})"
            )
    else:
        model, tokenizer = task.new_model(run, data)
    train_data, val_data, description = task.batches(run, model, tokenizer, data)
    if not spec.resume:  # only now that the data is known to be usable
        lock = start_run_directory(out, {**saved, task.FINGERPRINT: digest}, dist, overwrite)
        if lock is not None:  # the main process's
            locks.append(lock)
    else:  # the first changes a resume makes, now that it is known to go ahead
        for lock in locks:
            lock.announce()
        if damaged is not None:
            fall_back(run, checkpoint, damaged)
        if dist.is_main:
            record_config(out, config)
    say(f"data: {description}")
    say(
        f"model: {model.num_parameters():,} parameters{task.describe_model(run, model)}; "
        f"{device}, {config.dtype}, attention {model.config.attention}, "
        f"{torch.get_num_threads()} threads, {dist.world_size} process(es){scale_note(run)}; "
        f"run directory {out}"
    )
    history, model, trainable = train_model(task, run, model, train_data, val_data, tokenizer)
    if model is None:  # not the main process
        return None
    evaluation = [r for r in read_metrics(out) if r["type"] == "eval"][-1]
    trained = [r for r in history if r["type"] == "train"]
    result = {
        "task": task.NAME,
        "run_dir": str(out),
        "steps": config.steps,
        "val_loss": round(evaluation["val_loss"], 4),
        "val_accuracy": round(evaluation["val_accuracy"], 4),
        "val_perplexity": round(evaluation["val_perplexity"], 3),
        "val_scope": "full" if evaluation["full"] else "sample",
        "train_loss": round(trained[-1]["loss"], 4) if trained else None,
        "tokens_per_second": trained[-1]["tokens_per_second"] if trained else None,
    }
    result.update(task.finish(run, model, tokenizer, data))
    result.update(
        {
            "seconds": round(time.perf_counter() - started, 1),
            "device": str(device),
            "dtype": config.dtype,
            "parameters": model.num_parameters(),
            "trainable_parameters": trainable,
        }
    )
    return result


@dataclass
class Damaged:
    """What a resume found wrong with the checkpoints newer than the one it continues from."""

    problems: list[str]  # each names its file
    checkpoints: list[Path]  # the damaged checkpoints themselves (not a `last` to nothing)


def resume_point(task: Task, run: Run) -> tuple[Path, Damaged | None, torch.nn.Module, Tokenizer]:
    """The checkpoint a resumed run continues from, what was damaged before it (None:
    nothing, it is `last`), its model and its tokenizer. That is `last`, or, when `last` is
    damaged (weights or trainer_state.pt missing or torn: DAMAGE), the newest checkpoint
    that can be read. Changes nothing: `fall_back` does, once the resume goes ahead. Any
    other error (too many open files, an I/O error) stops the resume as it is."""
    last = run.out / "last"
    candidates = [last.resolve()] if last.exists() else []
    candidates += [
        c.resolve() for c in checkpoints_newest_first(run.out) if c.resolve() not in candidates
    ]
    damaged = Damaged([] if last.exists() else [f"{last} points at nothing"], [])
    for checkpoint in candidates:
        try:
            load_state(checkpoint)  # read in full again by fit(); a torn file fails here
            model = task.load_model(run, checkpoint)
            tokenizer = load_tokenizer(checkpoint)
        except DAMAGE as e:  # this checkpoint cannot be read: try the next one
            damaged.problems.append(" ".join(str(e).split()))
            damaged.checkpoints.append(checkpoint)
            continue
        return checkpoint, (damaged if damaged.problems else None), model, tokenizer
    raise RunDirectoryError(
        f"{run.out}: no checkpoint can be read ({'; '.join(damaged.problems) or 'none saved'}); "
        "nothing to resume: start over with --overwrite"
    )


def fall_back(run: Run, checkpoint: Path, damaged: Damaged) -> None:
    """Resume from `checkpoint` instead of `last`: move the damaged checkpoints aside
    (`checkpoints/.step-NNNNNN.unreadable`, never pruned, so nothing is deleted), point
    `last` at `checkpoint`, and say so on standard error (the main process)."""
    if run.dist.is_main:
        ours = (run.out / "checkpoints").resolve()
        moved = [set_aside(c) for c in damaged.checkpoints if c.parent == ours and c.is_dir()]
        point(run.out / "last", checkpoint)
        kept = f"; kept as {', '.join(p.name for p in moved)}" if moved else ""
        print(
            f"{run.out}: cannot resume from the latest checkpoint "
            f"({'; '.join(damaged.problems)}); resuming from {checkpoint.name}, the newest "
            f"that can be read{kept}",
            file=sys.stderr,
        )
    distributed.barrier()


def window_length(run: Run, model: torch.nn.Module) -> int:
    """Tokens per training window: the spec's context (a fine-tuning run's may be shorter
    than its model's), else the model's whole window."""
    length = run.saved.get("context") or model.config.max_len
    if length > model.config.max_len:
        raise ValueError(
            f"--context {length} is longer than the window of the model "
            f"({model.config.max_len} positions)"
        )
    return length


def _silent(*args, **kwargs) -> None:
    pass


def new_train_config(spec: TrainSpec, device: torch.device) -> TrainConfig:
    """The TrainConfig of a new run from its spec (each field one flag); sets the threads."""
    if spec.threads:
        torch.set_num_threads(spec.threads)
    options = train_options(spec)  # without steps when not given: TrainConfig's
    defaults = TrainConfig()
    for name in ("parallel", "activation_checkpointing", "compile"):  # None: not given
        if options[name] is None:
            options[name] = getattr(defaults, name)
    return TrainConfig(**options, dtype=training_dtype(spec.dtype, device))


def train_model(task: Task, run: Run, model, train_data, val_data, tokenizer):
    """fit() as every task runs it; -> (history, the trained model for what the main process
    reports next or None in the other processes, its trainable parameters). A sharded model
    runs only with every process, so the main one reloads the saved whole model. A run with
    merge=True folds its LoRA updates into the weights at the end (merge_run)."""
    sharded = run.config.parallel == "fsdp" and run.dist.world_size > 1
    if sharded and lora_layers(model):
        raise ValueError("LoRA runs are not sharded (their adapters are small): use --parallel ddp")
    history = fit(
        model,
        train_data,
        val_data,
        run.config,
        run.out,
        tokenizer,
        resume=run.resume,
        progress=run.spec.progress and run.spec.messages,
    )
    if not distributed.current().is_main:
        return history, None, 0
    if distributed.is_sharded(model):
        model = task.load_model(run, run.out)  # the whole model the main process saved
    trainable = trainable_parameters(model)
    if run.saved.get("merge", False):
        merge_run(model, run.out, tokenizer)
    return history, model, trainable


def scale_note(run: Run) -> str:
    """The run's speed, memory and scale options, for its opening lines."""
    parts = ["compiled"] if run.config.compile else []
    if run.dist.world_size > 1:
        parts.append("FSDP, sharded" if run.config.parallel == "fsdp" else "DDP, replicated")
    if run.config.activation_checkpointing:
        parts.append("activation checkpointing")
    return "".join(f", {part}" for part in parts)
