"""The residual / LayerNorm experiment: which deep GPTs train, and why.

A grid of character-level GPTs on the built-in Shakespeare, over depth and over how each
sublayer F is wrapped (tformer.nn.sublayer), x being the residual stream:

    pre-LN          x + F(LN(x))     GPT-2; Xiong et al. (2020): needs no warm-up
    post-LN         LN(x + F(x))     the original Transformer; needs warm-up (Xiong et al.)
    no LayerNorm    x + F(x)
    no residual     F(LN(x))         pre-LN's norm with the skip path cut

pre-LN and post-LN each run with and without learning-rate warm-up. Every run has the same
seed, data order, optimiser, schedule and number of steps; only the variant and the depth
change. Each run records, on one fixed probe batch, the gradient norms and the residual
stream's norm layer by layer at initialisation (tformer.lab.instruments), the loss during
training, and the residual stream's norm again at the end.

A run's status: "diverged" if its loss became NaN or infinite, "failed" if it ended no
better than predicting each character from its frequency alone (the unigram loss: it
learned nothing from context), else "trained".
"""

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from tformer.data.sources import load_corpus
from tformer.data.tokens import LMBatches, tokenize_cached
from tformer.files import atomic_write_json, read_json
from tformer.lab.instruments import gradient_report, residual_norms
from tformer.models.gpt2 import GPT2, GPT2Config
from tformer.nn.sublayer import NormPosition
from tformer.tokenizers import CharTokenizer
from tformer.train.trainer import TrainConfig, fit

T = TypeVar("T")

# each initialisation with the positions of the model family it comes from
POSITIONS_OF = {"vaswani": "sinusoidal", "gpt2": "learned", "xavier": "learned"}


@dataclass(frozen=True)
class Variant:
    label: str
    norm_position: NormPosition
    residual: bool = True
    warmup: bool = True


VARIANTS: dict[str, Variant] = {
    "pre": Variant("pre-LN", "pre"),
    "pre-nowarmup": Variant("pre-LN, no warm-up", "pre", warmup=False),
    "post": Variant("post-LN", "post"),
    "post-nowarmup": Variant("post-LN, no warm-up", "post", warmup=False),
    "nonorm": Variant("no LayerNorm", "none"),
    "noresidual": Variant("no residual", "pre", residual=False),
}


@dataclass
class LabConfig:
    depths: tuple[int, ...] = (2, 6, 12, 24)
    variants: tuple[str, ...] = tuple(VARIANTS)
    steps: int = 800
    d_model: int = 64
    n_heads: int = 4
    context: int = 64
    batch_size: int = 16
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100  # for the variants with warm-up
    eval_every: int = 100
    eval_batches: int = 8
    probe_batch_size: int = 32  # windows in the batch the instruments measure
    seed: int = 0
    dtype: str = "float32"
    init: str = "vaswani"  # the original Transformer's, as Xiong et al. used; GPT2Config.init

    def __post_init__(self) -> None:
        self.depths = tuple(self.depths)
        self.variants = tuple(self.variants)
        if not self.depths or any(not isinstance(d, int) or d <= 0 for d in self.depths):
            raise ValueError(f"depths must be positive integers, got {self.depths}")
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown or not self.variants:
            raise ValueError(
                f"unknown variant(s) {', '.join(unknown) or '(none given)'}; choose from "
                f"{', '.join(VARIANTS)}"
            )
        for name in ("steps", "d_model", "n_heads", "context", "batch_size", "probe_batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads")
        # The model's and the trainer's own checks (init; learning rates, dtype) apply too.
        self.model_config(self.depths[0], VARIANTS[self.variants[0]], vocab_size=2)
        self.train_config(VARIANTS[self.variants[0]])

    @classmethod
    def quick(cls) -> "LabConfig":
        """A small grid that runs in about 20 seconds on two CPU cores: every variant learns
        something, and the differences are a first hint, not a result."""
        return cls(
            depths=(2, 6),
            steps=200,
            d_model=32,
            n_heads=2,
            context=32,
            batch_size=8,
            lr=3e-3,
            warmup_steps=30,
            eval_every=100,
            eval_batches=4,
            probe_batch_size=8,
        )

    def model_config(self, depth: int, variant: Variant, vocab_size: int) -> GPT2Config:
        return char_gpt(vocab_size, self.context, self.d_model, self.n_heads, depth,
                        variant.norm_position, self.init, variant.residual)  # fmt: skip

    def train_config(self, variant: Variant) -> TrainConfig:
        return TrainConfig(
            steps=self.steps,
            batch_size=self.batch_size,
            lr=self.lr,
            min_lr=self.min_lr,
            warmup_steps=self.warmup_steps if variant.warmup else 0,
            eval_every=self.eval_every,
            eval_batches=self.eval_batches,
            final_eval="sample",
            checkpoint_every=0,
            seed=self.seed,
            dtype=self.dtype,
        )

    def fingerprint(self) -> str:
        """Identifies the settings a run's result depends on (not the grid's extent)."""
        settings = {k: v for k, v in asdict(self).items() if k not in ("depths", "variants")}
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def char_gpt(
    vocab_size: int,
    context: int,
    d_model: int,
    n_heads: int,
    depth: int,
    norm_position: NormPosition,
    init: str,
    residual: bool = True,
) -> GPT2Config:
    """The lab's character-level GPT: no dropout, exact GELU (faster than tanh's on CPUs,
    docs/LOG.md), d_ff 4 d_model, the positions of the initialisation's model family."""
    return GPT2Config(
        vocab_size=vocab_size,
        max_len=context,
        d_model=d_model,
        n_layers=depth,
        n_heads=n_heads,
        dropout=0.0,
        activation="gelu",
        norm_position=norm_position,
        residual=residual,
        init=init,
        positions=POSITIONS_OF.get(init, "learned"),  # an unknown init: GPT2Config says so
    )


@dataclass
class LabData:
    tokenizer: CharTokenizer
    train: LMBatches
    val: LMBatches
    unigram_loss: float  # cross-entropy of the validation text under training frequencies


def unigram_loss(train_ids: np.ndarray, val_ids: np.ndarray, vocab_size: int) -> float:
    """Mean -ln p(c) over the validation tokens, p the training frequencies (add-one)."""
    counts = np.bincount(train_ids, minlength=vocab_size) + 1.0
    log_p = np.log(counts / counts.sum())  # (V,)
    return float(-log_p[val_ids].mean())


def load_lab_data(context: int) -> LabData:
    corpus = load_corpus("shakespeare")
    tokenizer = CharTokenizer.from_text(corpus.train + corpus.val)
    train_ids = tokenize_cached(corpus.train, tokenizer)
    val_ids = tokenize_cached(corpus.val, tokenizer)
    return LabData(
        tokenizer,
        LMBatches(train_ids, context, "training"),
        LMBatches(val_ids, context, "validation"),
        unigram_loss(train_ids, val_ids, tokenizer.vocab_size),
    )


@dataclass
class RunResult:
    depth: int
    variant: str
    status: str  # "trained", "failed" or "diverged"
    final_val_loss: float | None  # None when the run diverged
    steps_done: int
    seconds: float
    grad_ratio: float  # ||dL/dθ|| of the last layer / the first, at initialisation
    init_param_grads: list[float]  # per layer, at initialisation
    init_sublayer_grads: list[dict[str, float]]
    init_residual_grads: list[float]  # ||dL/dx_l|| entering each layer, at initialisation
    init_residual_norms: list[float]  # entering each layer, then leaving the last
    final_residual_norms: list[float] | None
    train_loss: list[float] = field(default_factory=list)  # per step
    val_loss: list[tuple[int, float]] = field(default_factory=list)  # (step, loss)


def status_of(final_val_loss: float | None, unigram: float) -> str:
    if final_val_loss is None or not math.isfinite(final_val_loss):
        return "diverged"
    return "trained" if final_val_loss < unigram else "failed"


def run_one(
    config: LabConfig, depth: int, variant_name: str, data: LabData, device: torch.device
) -> RunResult:
    """Build, probe and train one GPT of the grid."""
    variant = VARIANTS[variant_name]
    model_config = config.model_config(depth, variant, data.tokenizer.vocab_size)
    model = GPT2(model_config, seed=config.seed).to(device)
    probe = data.train.sample(config.probe_batch_size, torch.Generator().manual_seed(config.seed))
    probe = probe.to(device)
    model.train()
    grads = gradient_report(model, probe.inputs, probe.targets)
    init_norms = residual_norms(model, *probe.inputs)
    model.zero_grad(set_to_none=True)  # the probe's gradients must not reach the first step

    records: list[dict[str, Any]] = []
    started = time.perf_counter()
    diverged = False
    try:
        fit(
            model,
            data.train,
            data.val,
            config.train_config(variant),
            progress=False,
            on_record=records.append,
            print_evaluations=False,
        )
    except FloatingPointError:
        diverged = True
    seconds = time.perf_counter() - started
    train_loss = [r["loss"] for r in records if r["type"] == "train"]
    val_loss = [(r["step"], r["val_loss"]) for r in records if r["type"] == "eval"]
    # The trainer's last evaluation (always at the last step) gives the final loss.
    final = val_loss[-1][1] if val_loss and not diverged else None
    final_norms = None if diverged else residual_norms(model.eval(), *probe.inputs)
    return RunResult(
        depth=depth,
        variant=variant_name,
        status=status_of(final, data.unigram_loss),
        final_val_loss=final,
        steps_done=len(train_loss),
        seconds=round(seconds, 1),
        grad_ratio=grads.first_to_last(),
        init_param_grads=grads.parameters,
        init_sublayer_grads=grads.sublayers,
        init_residual_grads=grads.residual,
        init_residual_norms=init_norms,
        final_residual_norms=final_norms,
        train_loss=train_loss,
        val_loss=val_loss,
    )


def run_lab(
    config: LabConfig,
    out_dir: str | Path,
    device: torch.device,
    fresh: bool = False,
    on_run: Callable[[int, int, str], None] | None = None,
) -> tuple[list[RunResult], LabData]:
    """Run the grid, depth by depth; each finished run is saved at once in out_dir/runs, and
    a later call with the same settings reuses it (so a killed lab resumes where it stopped)
    unless `fresh`. on_run(index, total, name) is called before each run."""
    runs_dir = Path(out_dir) / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    data = load_lab_data(config.context)
    fingerprint = config.fingerprint()
    grid = [(depth, variant) for depth in config.depths for variant in config.variants]
    results = []
    for index, (depth, variant) in enumerate(grid):
        path = runs_dir / f"{depth}-{variant}.json"
        if on_run is not None:
            on_run(index, len(grid), f"{depth} layers, {VARIANTS[variant].label}")
        result = None if fresh else saved_run(path, fingerprint, result_from_dict)
        if result is None:
            result = run_one(config, depth, variant, data, device)
            save_run(path, fingerprint, result)
        results.append(result)
    return results, data


def saved_run(path: Path, fingerprint: str, load: Callable[[dict], T]) -> T | None:
    """The run saved at `path` by save_run with the same settings (fingerprint), made by
    load(its fields); None if there is none, or it was saved with other settings or by
    another version (whose fields load refuses)."""
    if not path.is_file():
        return None
    saved = read_json(path, "a saved lab run")
    if saved.get("fingerprint") != fingerprint:
        return None
    try:
        return load(saved["result"])
    except (KeyError, TypeError):
        return None


def save_run(path: Path, fingerprint: str, result) -> None:
    """A finished run (a dataclass), at once and atomically: a killed lab resumes from it."""
    atomic_write_json(path, {"fingerprint": fingerprint, "result": asdict(result)})


def result_from_dict(saved: dict) -> RunResult:
    saved = dict(saved)
    saved["val_loss"] = [tuple(pair) for pair in saved.get("val_loss", [])]
    return RunResult(**saved)
