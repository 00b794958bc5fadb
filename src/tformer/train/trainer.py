"""One training loop for any model that maps inputs to logits: `fit` and `evaluate`.

The loop, per optimizer step s:

    lr_s = schedule(s)
    for each of grad_accum micro-batches:       this process's rows of the global batch
        loss = CE(model(x), y) / grad_accum    under bf16/fp16 autocast when asked; with
                                               several processes, the mean over all their
                                               scored targets
        loss.backward()                        DDP averages gradients across processes
    AdamW step, clipping the gradient norm in its pass; log; evaluate and checkpoint when due

The trainer knows nothing of GPT-2: a model is anything with `model(*batch.inputs)` ->
logits (B, T, V), plus `save_pretrained(dir)` and `load_weights(dir)` (in place) for checkpoints.
Training is deterministic for a given seed and number of processes: the data windows come
from a torch.Generator, dropout from torch's global generator, and both states are saved in
every checkpoint, so a resumed run continues with exactly the losses it would have had.
"""

import contextlib
import gc
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from tformer.checks import MAX_SEED, check_choice, check_number
from tformer.data.tokens import IGNORE_INDEX, LMBatches, stacked
from tformer.devices import allow_huge_pages, flush_denormals, keep_freed_memory
from tformer.errors import ConfigError, RunDirectoryError, TrainingInterrupted
from tformer.files import WRITE_ERRORS, atomic_write_json, is_write_error, write_failure
from tformer.nn import weight_copies
from tformer.nn.modes import evaluating
from tformer.tokenizers import Tokenizer
from tformer.train import distributed
from tformer.train.checkpoint import (
    checkpoints_newest_first,
    forget_after,
    intact_note,
    load_state,
    save_checkpoint,
)
from tformer.train.interrupts import StopRequests
from tformer.train.losses import label_smoothed_cross_entropy
from tformer.train.metrics import METRICS_FILE, MetricsLog
from tformer.train.optim import (
    AdamW,
    build_optimizer,
    inverse_sqrt_learning_rate,
    learning_rate,
)
from tformer.train.plots import plot_losses

EVAL_SEED = 1234  # the periodic evaluation always scores the same windows
EVAL_STACK = 4  # its batches scored four at a time, as the final whole-split one's rows


@dataclass
class TrainConfig:
    steps: int = 2000
    batch_size: int = 12  # sequences per optimizer step (all processes, all micro-batches)
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    decay_steps: int | None = None  # cosine decay ends here; None: at `steps`
    schedule: str = "cosine"  # or "inverse_sqrt": the original Transformer's, peaking at lr
    label_smoothing: float = 0.0  # the original Transformer used 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0  # 0: no clipping
    eval_every: int = 250  # 0: only at the end
    eval_batches: int = 20  # batches per periodic evaluation
    final_eval: str = "full"  # the last evaluation: "full" validation set or the "sample"
    checkpoint_every: int = 500  # 0: only at the end
    seed: int = 1337
    dtype: str = "float32"  # autocast dtype: float32 (off), bfloat16, float16 (CUDA only)
    activation_checkpointing: bool = False  # recompute each layer's activations backwards
    compile: bool = False  # torch.compile the training forward (pays on long runs, LOG)
    parallel: str = "ddp"  # across processes: "ddp" (replicas) or "fsdp" (sharded)

    def __post_init__(self) -> None:
        """Refuse any field out of its range or of the wrong type, naming it: a NaN or a
        beta of 1 would otherwise surface steps later as a loss blamed on --lr."""
        for name in ("steps", "batch_size", "grad_accum", "eval_batches"):
            check_number(name, getattr(self, name), integer=True, low=1)
        for name in ("warmup_steps", "eval_every", "checkpoint_every"):
            check_number(name, getattr(self, name), integer=True, low=0)
        check_number("decay_steps", self.decay_steps, integer=True, low=1, optional=True)
        check_number("seed", self.seed, integer=True, low=0, high=MAX_SEED)
        for name in ("lr", "min_lr"):
            check_number(name, getattr(self, name), low=0, low_open=True)
        for name in ("weight_decay", "grad_clip"):
            check_number(name, getattr(self, name), low=0)
        for name in ("beta1", "beta2", "label_smoothing"):
            check_number(name, getattr(self, name), low=0, high=1, high_open=True)
        check_choice("schedule", self.schedule, ("cosine", "inverse_sqrt"))
        check_choice("final_eval", self.final_eval, ("full", "sample"))
        check_choice("dtype", self.dtype, ("float32", "bfloat16", "float16"))
        check_choice("parallel", self.parallel, ("ddp", "fsdp"))
        for name in ("activation_checkpointing", "compile"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.batch_size % self.grad_accum != 0:
            raise ConfigError(
                f"batch_size ({self.batch_size}) must be divisible by "
                f"grad_accum ({self.grad_accum})"
            )
        if self.min_lr > self.lr:
            raise ConfigError(
                f"min_lr must be <= lr (the schedule decays to it), got min_lr={self.min_lr}, "
                f"lr={self.lr}"
            )
        if self.schedule == "inverse_sqrt" and self.warmup_steps == 0:
            raise ConfigError("the inverse_sqrt schedule needs warmup_steps >= 1")

    @property
    def last_decay_step(self) -> int:
        return self.decay_steps if self.decay_steps is not None else self.steps

    def learning_rate(self, step: int) -> float:
        if self.schedule == "inverse_sqrt":
            return inverse_sqrt_learning_rate(step, self.lr, self.warmup_steps)
        return learning_rate(step, self.lr, self.min_lr, self.warmup_steps, self.last_decay_step)


def autocast(device: torch.device, dtype: str):
    """Mixed precision: matmuls in bf16/fp16, reductions and weights in float32."""
    enabled = dtype != "float32"
    return torch.autocast(device.type, dtype=getattr(torch, dtype), enabled=enabled)


def cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Mean next-token loss over the targets that are not IGNORE_INDEX: (B, T, V), (B, T).

    Computed in float32 from logits of any dtype, without a float32 copy of them.
    """
    return label_smoothed_cross_entropy(logits, targets, label_smoothing, IGNORE_INDEX)


class ScoredLogits(nn.Module):
    """Logits and targets, one row per position: (inputs, targets (B, T)) -> logits (N, V),
    targets (N,).

    A model with `features` (the final residual stream) and `unembed` computes logits only
    at the positions the loss scores (targets != IGNORE_INDEX) when padding leaves some
    out: the output layer is the widest matmul of a small model, and a translation batch
    holds padding (docs/LOG.md). Otherwise every position comes back (N = B T), the padded ones for
    the loss to ignore. (On a GPU, checking for padding waits for the device once a step.)
    """

    def __init__(self, model: nn.Module, one_path: bool = False) -> None:
        super().__init__()
        self.model = model
        # A sharded model's forward is a collective: every process must take the same path,
        # whatever padding its own rows have, so it always takes features + unembed.
        self.one_path = one_path

    def forward(
        self, inputs: tuple[torch.Tensor, ...], targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        model = self.model
        scored = targets != IGNORE_INDEX  # (B, T)
        has_features = hasattr(model, "features") and hasattr(model, "unembed")
        if not has_features or (not self.one_path and bool(scored.all())):
            return model(*inputs).flatten(0, -2), targets.flatten()  # (B T, V), (B T,)
        # a head tied to the token table takes the pass's TiedTable, as the model's own
        # forward does (GPT2.tied_table); not a sharded model's, whose weights the
        # collective gathers into place
        tied = None if self.one_path or not hasattr(model, "tied_table") else model.tied_table()
        table = {} if tied is None else {"tied": tied}  # (a model without one takes none)
        features = model.features(*inputs, **table)[scored]  # (B, T, C) -> (N, C)
        return model.unembed(features, **table), targets[scored]


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    data: LMBatches,
    batch_size: int,
    max_batches: int | None = None,
    dtype: str = "float32",
) -> dict[str, float]:
    """Loss, next-token accuracy and perplexity = exp(loss) on `data`.

    With max_batches, the same fixed random windows each call (comparable across a run);
    without, every window of the data in order. Across processes, each scores its share and
    the sums are combined.
    """
    if batch_size <= 0 or (max_batches is not None and max_batches <= 0):
        raise ValueError("evaluate needs a positive batch size and number of batches")
    dist = distributed.current()
    device = next(model.parameters()).device
    if max_batches is None:
        batches = list(data.sequential(batch_size))
    else:
        generator = torch.Generator().manual_seed(EVAL_SEED)
        batches = [data.sample(batch_size, generator) for _ in range(max_batches)]
    # a sharded model's passes must match across processes: its batches are not stacked
    stack = 1 if max_batches is None or distributed.is_sharded(model) else EVAL_STACK
    with evaluating(model):
        totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count
        # each process's share, the sample's batches in fewer, larger forward passes (the
        # same windows): a small model's evaluation is otherwise mostly each call's cost
        mine = stacked(batches[dist.rank :: dist.world_size], stack)
        if distributed.is_sharded(model):
            # A sharded model's forward is a collective: every process runs as many as the
            # busiest one, and the spare passes (on a batch already scored) count nothing.
            rounds = math.ceil(len(batches) / dist.world_size)
            mine += [None] * (rounds - len(mine))
        for batch in mine:
            if batch is None:
                with autocast(device, dtype):
                    model(*batches[0].to(device).inputs)
                continue
            batch = batch.to(device)
            with autocast(device, dtype):
                logits = model(*batch.inputs)
            scored = batch.targets != IGNORE_INDEX
            loss_sum = nn.functional.cross_entropy(
                logits.float().flatten(0, 1),
                batch.targets.flatten(),
                reduction="sum",
                ignore_index=IGNORE_INDEX,
            )
            correct = ((logits.argmax(-1) == batch.targets) & scored).sum()
            totals += torch.stack([loss_sum.double(), correct.double(), scored.sum().double()])
    loss_sum, correct, count = distributed.all_reduce_sum(totals).tolist()
    loss = loss_sum / count
    perplexity = math.exp(loss) if loss < 700 else math.inf  # a diverged model
    return {"loss": loss, "accuracy": correct / count, "perplexity": perplexity}


@contextlib.contextmanager
def long_lived_objects_frozen() -> Iterator[None]:
    """Leave the objects alive now (torch's modules, the model, the data: ~200,000 Python
    objects) out of the garbage collector's passes until the block ends. A training step
    makes and drops enough objects to set off full collections, and each walked all of
    them: 3% of a step on the character model (docs/LOG.md). Garbage already there is
    collected first, and everything is collected as usual once the block ends
    (gc.unfreeze). Where the caller has frozen objects itself, nothing changes: unfreezing
    would undo theirs too."""
    if gc.get_freeze_count():
        yield
        return
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def fit(
    model: nn.Module,
    train: LMBatches,
    val: LMBatches | None,
    config: TrainConfig,
    run_dir: str | Path | None = None,
    tokenizer: Tokenizer | None = None,
    resume: bool = False,
    progress: bool = True,
    on_record: Callable[[dict[str, Any]], None] | None = None,
    print_evaluations: bool = True,
) -> list[dict[str, Any]]:
    """Train `model` in place; return the history (one record per step and per evaluation).

    progress shows a progress bar; print_evaluations prints each evaluation's figures (to
    standard error). on_record, if given, sees every record as it is made: an experiment
    keeps the history of a run that stops with an error (a loss that became NaN) this way.

    With run_dir: metrics.jsonl, checkpoints (`last`, `best`) every checkpoint_every steps,
    at each better validation loss and at the end, and the final model (with `tokenizer`) and
    the loss curve (loss.png) in run_dir itself. With resume, continue from run_dir/last
    exactly where it stopped; a config with more steps than the run had extends it (the
    caller keeps decay_steps where it was: see tformer.recipes.run_dir.extended).

    SIGINT or SIGTERM (tformer.train.interrupts) ends the current step, saves a checkpoint
    and raises TrainingInterrupted; a second signal stops at once. A write that fails (a
    full disk) raises WriteError, saying which checkpoint is intact.
    """
    # Numbers below ~1e-38 (denormals) take the CPU's slow path: late in training, when
    # some gradients and Adam moments get that small, they made float32 steps markedly
    # slower (docs/LOG.md). Flushing them to zero changes no printed digit of the loss.
    on_cpu = next(model.parameters()).device.type == "cpu"
    flushed_before = flush_denormals(True, pool=on_cpu)
    # Reuse freed activation buffers instead of fresh pages from the OS every step, and
    # take those pages 2 MiB at a time where the model is large enough to gain.
    keep_freed_memory()
    allow_huge_pages(model)
    try:
        # bf16 products read each weight's copy as the optimizer last wrote it
        with weight_copies.kept_between_steps():
            return _fit(
                model,
                train,
                val,
                config,
                run_dir,
                tokenizer,
                resume,
                progress,
                on_record,
                print_evaluations,
            )
    finally:
        flush_denormals(flushed_before, pool=on_cpu)


def _fit(
    model: nn.Module,
    train: LMBatches,
    val: LMBatches | None,
    config: TrainConfig,
    run_dir: Path | str | None,
    tokenizer: Tokenizer | None,
    resume: bool,
    progress: bool,
    on_record: Callable[[dict[str, Any]], None] | None,
    print_evaluations: bool,
) -> list[dict[str, Any]]:
    dist = distributed.current()
    device = next(model.parameters()).device
    if config.batch_size % (config.grad_accum * dist.world_size) != 0:
        raise ValueError(
            f"batch_size ({config.batch_size}) must be divisible by grad_accum x processes "
            f"({config.grad_accum} x {dist.world_size})"
        )
    micro = config.batch_size // config.grad_accum  # rows per micro-batch, all processes
    rows = micro // dist.world_size  # this process's rows of each micro-batch
    run_dir = Path(run_dir) if run_dir is not None else None
    log = MetricsLog(run_dir / METRICS_FILE if run_dir is not None and dist.is_main else None)

    torch.manual_seed(config.seed)  # dropout
    generator = torch.Generator().manual_seed(config.seed)  # data windows
    if resume:
        if run_dir is None or not (run_dir / "last").exists():
            raise FileNotFoundError(
                f"{run_dir}: no checkpoint to resume from (no 'last' link: the run saved none "
                "yet, or this is not a run directory)"
            )
        model.load_weights(run_dir / "last")  # whole, before any sharding spreads them
    if config.activation_checkpointing:
        if not hasattr(model, "set_activation_checkpointing"):
            raise ValueError(f"{type(model).__name__} has no activation checkpointing")
        model.set_activation_checkpointing(True)
    sharded = dist.world_size > 1 and config.parallel == "fsdp"
    if sharded:
        distributed.shard(model)  # before the optimizer: it updates the shards
    betas = (config.beta1, config.beta2)
    optimizer = build_optimizer(model, config.lr, config.weight_decay, betas, sharded=sharded)
    scaler = torch.amp.GradScaler(device.type, enabled=config.dtype == "float16")
    if resume:
        start, best_val = resume_run(model, optimizer, scaler, generator, config, run_dir, log)
    else:
        start, best_val = 0, math.inf
        if run_dir is not None and dist.is_main:
            start_run(config, run_dir, log)

    scored = ScoredLogits(model, one_path=sharded)
    ddp = DistributedDataParallel(scored) if dist.world_size > 1 and not sharded else scored
    step_model = torch.compile(ddp) if config.compile else ddp  # same parameters as `model`
    model.train()
    history: list[dict[str, Any]] = []
    tokens_seen = 0  # tokens (Batch.token_count) since this process started (or resumed)
    intact = intact_note(run_dir) if run_dir is not None else ""  # for a failed write's note

    def save(done: int, is_best: bool) -> None:
        """Checkpoint `done`: under FSDP every process takes part in gathering it."""
        state = training_state(done, best_val, model, optimizer, scaler, generator, config)
        whole = distributed.whole_model(model)
        if dist.is_main:
            save_checkpoint(run_dir, done, whole, tokenizer, state, is_best)
        distributed.barrier()

    bar = tqdm(
        total=config.steps,
        initial=start,
        disable=not (progress and dist.is_main),
        unit="step",
        dynamic_ncols=True,
    )
    started = time.perf_counter()
    with StopRequests() as stops, long_lived_objects_frozen(), contextlib.closing(log):
        for step in range(start, config.steps):
            lr = config.learning_rate(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            total = torch.zeros((), device=device)
            for m in range(config.grad_accum):
                # Every process draws the same global micro-batch and takes its own rows, so
                # the data (and the result) do not depend on the number of processes.
                batch = train.sample(micro, generator)
                tokens_seen += batch.token_count()  # all processes' rows
                share = 1.0
                if dist.world_size > 1:
                    # With padding the processes' rows score different numbers of targets:
                    # each process's mean is weighted by its share of the micro-batch's
                    # scored targets (times the processes the gradients are averaged over),
                    # so that the loss is the mean over all of them, as in one process.
                    everyone = int((batch.targets != IGNORE_INDEX).sum())
                    batch = batch.rows(dist.rank * rows, (dist.rank + 1) * rows)
                    share = int((batch.targets != IGNORE_INDEX).sum()) / everyone * dist.world_size
                batch = batch.to(device)
                with gradient_sync(ddp, model, on=m == config.grad_accum - 1):
                    with autocast(device, config.dtype):
                        logits, targets = step_model(batch.inputs, batch.targets)
                    if share == 0.0:  # nothing to score here; the graph still joins the sync
                        loss = logits.sum() * 0.0
                    else:
                        loss = cross_entropy(logits, targets, config.label_smoothing)
                        if share != 1.0:
                            loss = loss * share
                    loss = loss / config.grad_accum
                    scaler.scale(loss).backward()
                total += loss.detach()
            clip = config.grad_clip if config.grad_clip > 0 else None
            if clip is not None:
                scaler.unscale_(optimizer)  # clip the true gradients (a no-op unless float16)
            if isinstance(optimizer, AdamW):
                scaler.step(optimizer, max_grad_norm=clip)  # clipped inside the update's pass
            else:  # FSDP's torch.optim.AdamW
                if clip is not None:
                    nn.utils.clip_grad_norm_(model.parameters(), clip, foreach=True)
                scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)

            # One all-reduce carries the loss and whether any process was asked to stop, so
            # that all of them stop after the same step.
            if dist.world_size > 1:
                both = torch.cat([total.reshape(1), torch.tensor(stops.votes(), device=device)])
                loss_sum, *votes = distributed.all_reduce_sum(both).tolist()
                loss_value = loss_sum / dist.world_size
            else:
                loss_value = total.item()
            if not math.isfinite(loss_value):
                raise FloatingPointError(
                    f"the training loss became {loss_value} at step {step + 1}; lower --lr, "
                    "keep --grad-clip on, or resume from an earlier checkpoint"
                )
            elapsed = time.perf_counter() - started
            done = step + 1
            record = {
                "type": "train",
                "step": done,
                "loss": loss_value,
                "lr": lr,
                "tokens_per_second": round(tokens_seen / elapsed, 1),
            }
            history.append(record)
            log.write(record, intact)
            if on_record is not None:
                on_record(record)
            bar.update(1)
            bar.set_postfix(
                loss=f"{loss_value:.4f}",
                lr=f"{lr:.2e}",
                tok_s=f"{record['tokens_per_second']:.0f}",
                refresh=False,
            )

            last = done == config.steps
            due_eval = config.eval_every and done % config.eval_every == 0
            is_best = False
            if val is not None and (due_eval or last):
                record = evaluation(model, val, config, done, micro, final=last)
                history.append(record)
                log.write(record, intact)
                if on_record is not None:
                    on_record(record)
                if dist.is_main and print_evaluations:
                    bar.write(
                        f"step {done}: val loss {record['val_loss']:.4f}, accuracy "
                        f"{record['val_accuracy']:.3f}, perplexity "
                        f"{record['val_perplexity']:.2f}",
                        file=sys.stderr,
                    )
                # `best` follows the periodic evaluations, which score the same windows each
                # time; a final full one may become `best` but sets no bar for them (a run
                # extended past its end compares its later evaluations with like ones).
                is_best = record["val_loss"] < best_val
                if not record["full"]:
                    best_val = min(best_val, record["val_loss"])
            # A checkpoint when due, at the end, and whenever the validation loss improves
            # (so `best` always points at the best model evaluated), and when asked to stop.
            due = config.checkpoint_every and done % config.checkpoint_every == 0
            if dist.world_size == 1:  # a signal that came after the vote counts too
                votes = stops.votes()
            stop = sum(votes) > 0
            if run_dir is not None and (last or due or is_best or stop):
                save(done, is_best)
                intact = intact_note(run_dir) if dist.is_main else ""
            if stop and not last:  # a signal in the last step: the run finishes as usual
                bar.close()
                raise interrupted(done, config.steps, run_dir, stops.exit_code(votes))
    bar.close()
    if run_dir is not None:
        whole = distributed.whole_model(model)
        if dist.is_main:
            finish_run_directory(run_dir, whole, tokenizer, intact)
    return history


def resume_run(
    model: nn.Module,
    optimizer: AdamW | torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    generator: torch.Generator,
    config: TrainConfig,
    run_dir: Path,
    log: MetricsLog,
) -> tuple[int, float]:
    """Continue the run in `run_dir` from its `last` checkpoint (whose weights the model
    holds already): its optimizer and random states, and what the interrupted run wrote
    past it dropped (checkpoints, metrics); -> (step, best validation loss so far)."""
    last = run_dir / "last"
    start, best_val = restore(model, optimizer, scaler, generator, last)
    if start > config.steps:
        raise ConfigError(
            f"{last} is at step {start}, past the run's {config.steps} steps: give more steps"
        )
    if distributed.current().is_main:
        forget_after(run_dir, start)
        note = log.truncate_after(start)
        if note is not None:
            print(note, file=sys.stderr)
    distributed.barrier()
    return start, best_val


def start_run(config: TrainConfig, run_dir: Path, log: MetricsLog) -> None:
    """A new run in `run_dir` (the main process's part): refused over an earlier run's
    checkpoints; an empty metrics.jsonl and train_config.json."""
    if (run_dir / "last").exists() or any(checkpoints_newest_first(run_dir)):
        raise RunDirectoryError(
            f"{run_dir} already holds a run; pass --resume to continue it, or choose "
            "another output directory"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    log.truncate_after(-1)
    config_file = run_dir / "train_config.json"
    try:
        atomic_write_json(config_file, asdict(config))
    except OSError as e:
        raise write_failure(config_file, e, "no checkpoint was saved yet") from None


def evaluation(
    model: nn.Module, val: LMBatches, config: TrainConfig, done: int, micro: int, final: bool
) -> dict[str, Any]:
    """The eval record after step `done`. Periodic evaluations score the same sample of
    windows each time; the `final` one scores the whole validation set if
    config.final_eval says so (in bigger batches: no activations are kept)."""
    full = final and config.final_eval == "full"
    if full:
        metrics = evaluate(model, val, 4 * micro, None, config.dtype)
    else:
        metrics = evaluate(model, val, micro, config.eval_batches, config.dtype)
    return {
        "type": "eval",
        "step": done,
        "full": full,
        **{f"val_{k}": v for k, v in metrics.items()},
    }


def interrupted(step: int, steps: int, run_dir: Path | None, exit_code: int) -> TrainingInterrupted:
    """The stop at a signal after step `step`, whose checkpoint the run directory holds."""
    if run_dir is None:
        return TrainingInterrupted(
            f"interrupted at step {step} of {steps}; nothing saved (no run directory)",
            step,
            None,
            exit_code,
        )
    saved = run_dir / "checkpoints" / f"step-{step:06d}"
    message = f"interrupted at step {step} of {steps}; saved {saved}"
    return TrainingInterrupted(message, step, str(saved), exit_code)


def finish_run_directory(
    run_dir: Path, model: nn.Module, tokenizer: Tokenizer | None, intact: str
) -> None:
    """The finished model, loadable from the run directory itself, and its loss curve."""
    try:
        model.save_pretrained(run_dir)
        if tokenizer is not None:
            tokenizer.save(run_dir)
    except WRITE_ERRORS as e:
        if not is_write_error(e):
            raise
        raise write_failure(run_dir, e, intact, what=f"the final model in {run_dir}") from None
    plot_losses(run_dir, intact)


@contextlib.contextmanager
def gradient_sync(wrapper: nn.Module, model: nn.Module, on: bool):
    """Gradients are combined across processes on every backward pass; before the last
    micro-batch of a step that is wasted, so it is switched off there (DDP wraps the model
    in `wrapper`; FSDP shards `model` itself)."""
    if isinstance(wrapper, DistributedDataParallel) and not on:
        with wrapper.no_sync():
            yield
    elif distributed.is_sharded(model) and not on:
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def training_state(
    step: int,
    best_val: float,
    model: nn.Module,
    optimizer: AdamW | torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    generator: torch.Generator,
    config: TrainConfig,
) -> dict:
    state = {
        "step": step,
        "best_val_loss": best_val,
        "optimizer": distributed.optimizer_state(model, optimizer),
        "grad_scaler": scaler.state_dict(),
        "data_rng": generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        "config": asdict(config),
    }
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    return state


def restore(
    model: nn.Module,
    optimizer: AdamW | torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    generator: torch.Generator,
    checkpoint: Path,
) -> tuple[int, float]:
    """Load the optimizer and random states of a checkpoint whose weights the model holds
    already (model.load_weights); -> (step, best validation loss so far)."""
    state = load_state(checkpoint)
    optimizer_state = state["optimizer"]
    if hasattr(model, "current_name"):  # a model whose parameters an earlier version named
        optimizer_state = renamed(optimizer_state, model.current_name)
    distributed.load_optimizer_state(model, optimizer, optimizer_state)
    scaler.load_state_dict(state["grad_scaler"])
    generator.set_state(state["data_rng"])
    torch.set_rng_state(state["torch_rng"])
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return state["step"], state["best_val_loss"]


def renamed(optimizer_state: dict, current_name: Callable[[str], str]) -> dict:
    """An optimizer state keyed by parameter names, under today's names (one numbering its
    parameters stays as it is)."""

    def rename(key):
        return current_name(key) if isinstance(key, str) else key

    groups = [
        {**group, "params": [rename(p) for p in group["params"]]}
        for group in optimizer_state["param_groups"]
    ]
    state = {rename(key): value for key, value in optimizer_state["state"].items()}
    return {**optimizer_state, "state": state, "param_groups": groups}
