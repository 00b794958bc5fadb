"""The warm-up finding where Xiong et al. found it: translation.

Xiong et al. (2020) trained post-LN Transformers on IWSLT14 De-En with Adam and the usual
learning-rate warm-up, and without it: without warm-up the model reached ~8 BLEU, with it
~34. Pre-LN trained as well without warm-up as with it. Their explanation is the gradient
measured by tformer.lab.xiong: post-LN's is large near the output at initialisation, so the
first full-size steps go wrong.

`run_warmup` trains four encoder-decoders (tformer.models.seq2seq) on one of the built-in
parallel corpora with the same seed, data order, step budget and peak learning rate:

    post-LN with warm-up      post-LN without      pre-LN with warm-up      pre-LN without

"with warm-up": the learning rate rises linearly to its peak over `warmup_steps`; "without":
it starts at the peak. Both then decay by cosine to min_lr. The models start from the
paper's initialisation (Seq2SeqConfig.init "vaswani"); a variant and its twin without
warm-up start from the same weights. Each run records the gradient of every layer's W2 at
initialisation on one batch, the training loss per step, the validation loss, and the BLEU
and chrF of its greedy translations of the test pairs.

The finding is taken to reproduce if post-LN's BLEU without warm-up is at most half its BLEU
with warm-up while pre-LN's without is at least 0.9 of its own with (STRONG and KEPT,
below); a post-LN ratio between 0.5 and 0.9 (WEAK) is a weaker effect and said so. Each
finished run is saved in OUT/runs as it ends, so a killed track resumes.
"""

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from tformer.data.parallel import BUILTIN_PARALLEL, ParallelBatches, load_parallel
from tformer.generate.translate import corpus_scores, translate
from tformer.lab.experiment import save_run, saved_run
from tformer.lab.instruments import gradient_report, norm_of
from tformer.models.seq2seq import Seq2SeqConfig, Seq2SeqTransformer
from tformer.tokenizers import Tokenizer, train_bpe
from tformer.train.trainer import TrainConfig, fit

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2: the model's pad, bos and eos
VARIANTS = {  # name -> (norm placement, warm-up)
    "post": ("post", True),
    "post-nowarmup": ("post", False),
    "pre": ("pre", True),
    "pre-nowarmup": ("pre", False),
}
LABELS = {
    "post": "post-LN",
    "post-nowarmup": "post-LN, no warm-up",
    "pre": "pre-LN",
    "pre-nowarmup": "pre-LN, no warm-up",
}
STRONG, WEAK, KEPT = 0.5, 0.9, 0.9  # BLEU ratios without / with warm-up: see the docstring


@dataclass
class WarmupConfig:
    data: str = "bible-en-es"
    steps: int = 800
    batch_size: int = 64  # sentence pairs per step
    lr: float = 1e-3  # the peak, reached after warm-up or at once
    min_lr: float = 1e-4
    warmup_steps: int = 200  # for the variants with warm-up
    d_model: int = 256
    n_heads: int = 4
    n_layers: int = 3  # per stack: encoder and decoder
    d_ff: int = 1024
    dropout: float = 0.1
    label_smoothing: float = 0.1
    bpe_vocab_size: int = 8000
    max_len: int = 160
    eval_every: int = 200
    eval_batches: int = 8
    probe_batch_size: int = 32
    test_pairs: int | None = None  # translate and score the first N test pairs; None: all
    seed: int = 0
    dtype: str = "bfloat16"  # autocast, as tformer's translation recipe trains on CPUs with bf16

    def __post_init__(self) -> None:
        if self.data not in BUILTIN_PARALLEL:
            raise ValueError(
                f"data must be one of {', '.join(BUILTIN_PARALLEL)}, got {self.data!r}"
            )
        for name in ("steps", "batch_size", "d_model", "n_heads", "n_layers", "d_ff",
                     "bpe_vocab_size", "max_len", "probe_batch_size", "test_pairs"):  # fmt: skip
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0 < self.warmup_steps < self.steps:
            raise ValueError(
                f"warmup_steps must be between 1 and steps - 1, got {self.warmup_steps}"
            )
        self.model_config("post", 300)  # the model's and the trainer's own checks
        self.train_config(True)

    @classmethod
    def quick(cls) -> "WarmupConfig":
        """number-words with a small model: seconds on two CPU cores, for a first look or a
        test; the differences are a hint, not a result."""
        return cls(data="number-words", steps=60, batch_size=16, warmup_steps=20, d_model=32,
                   n_heads=2, n_layers=1, d_ff=64, bpe_vocab_size=300, max_len=32,
                   eval_every=30, eval_batches=2, probe_batch_size=8, test_pairs=100,
                   dtype="float32")  # fmt: skip

    def model_config(self, placement: str, vocab_size: int) -> Seq2SeqConfig:
        return Seq2SeqConfig(
            vocab_size,
            vocab_size,
            max_len=self.max_len,
            d_model=self.d_model,
            n_heads=self.n_heads,
            n_encoder_layers=self.n_layers,
            n_decoder_layers=self.n_layers,
            d_ff=self.d_ff,
            dropout=self.dropout,
            norm_position=placement,
            share_embeddings=True,
            init="vaswani",
        )

    def train_config(self, warmup: bool) -> TrainConfig:
        return TrainConfig(
            steps=self.steps,
            batch_size=self.batch_size,
            lr=self.lr,
            min_lr=self.min_lr,
            warmup_steps=self.warmup_steps if warmup else 0,
            label_smoothing=self.label_smoothing,
            beta2=0.98,  # the original Transformer's Adam
            eval_every=self.eval_every,
            eval_batches=self.eval_batches,
            final_eval="sample",
            checkpoint_every=0,
            seed=self.seed,
            dtype=self.dtype,
        )

    def fingerprint(self) -> str:
        """The settings a run's result depends on."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class WarmupRun:
    variant: str
    status: str  # "trained" or "diverged"
    final_val_loss: float | None
    bleu: float | None  # greedy translations of the test pairs; None when diverged
    chrf: float | None
    seconds: float  # training, and translating the test pairs
    init_w2_grads: list[float]  # ||dL/dW2|| per layer at initialisation, encoder then decoder
    train_loss: list[float] = field(default_factory=list)
    val_loss: list[tuple[int, float]] = field(default_factory=list)
    example: dict[str, str] = field(default_factory=dict)  # one test pair and its translation


@dataclass
class WarmupData:
    tokenizer: Tokenizer
    train: ParallelBatches
    val: ParallelBatches
    test: list[tuple[str, str]]
    description: str


def load_warmup_data(config: WarmupConfig) -> WarmupData:
    """The corpus, a joint BPE learned from its training pairs, and the batches."""
    corpus = load_parallel(config.data)
    texts = [s for pair in corpus.train for s in pair]
    tokenizer = train_bpe(texts, config.bpe_vocab_size, special_tokens=SPECIAL_TOKENS)
    ids = (0, 1, 2)
    train = ParallelBatches(corpus.train, tokenizer, *ids, config.max_len, "training")
    val = ParallelBatches(corpus.val, tokenizer, *ids, config.max_len, "validation")
    test = corpus.test[: config.test_pairs]
    return WarmupData(tokenizer, train, val, test, corpus.description)


def w2_grads(model: Seq2SeqTransformer) -> list[float]:
    """||dL/dW2|| of every layer's feed-forward output matrix, encoder then decoder, from
    the gradients the last backward pass left."""
    layers = [*model.encoder_layers, *model.decoder_layers]
    return [norm_of([layer.mlp.w2.weight.grad]) for layer in layers]


def run_variant(
    config: WarmupConfig,
    variant: str,
    data: WarmupData,
    device: torch.device,
    progress: bool = False,
) -> WarmupRun:
    placement, warmup = VARIANTS[variant]
    vocab = data.tokenizer.vocab_size
    model = Seq2SeqTransformer(config.model_config(placement, vocab), seed=config.seed)
    model = model.to(device)
    probe = data.train.sample(config.probe_batch_size, torch.Generator().manual_seed(config.seed))
    probe = probe.to(device)
    model.eval()  # the gradient of the model itself, without dropout's noise
    gradient_report(model, probe.inputs, probe.targets)
    grads = w2_grads(model)
    model.zero_grad(set_to_none=True)
    model.train()

    records: list[dict[str, Any]] = []
    started = time.perf_counter()
    diverged = False
    try:
        fit(model, data.train, data.val, config.train_config(warmup), progress=progress,
            on_record=records.append, print_evaluations=False)  # fmt: skip
    except FloatingPointError:
        diverged = True
    train_loss = [r["loss"] for r in records if r["type"] == "train"]
    val_loss = [(r["step"], r["val_loss"]) for r in records if r["type"] == "eval"]
    final = val_loss[-1][1] if val_loss and not diverged else None
    bleu = chrf = None
    example: dict[str, str] = {}
    if final is not None:
        sources = [src for src, _ in data.test]
        references = [tgt for _, tgt in data.test]
        translations = translate(model.eval(), data.tokenizer, sources, None)
        scores = corpus_scores(translations, references)
        bleu, chrf = round(scores["bleu"], 2), round(scores["chrf"], 2)
        example = {"source": sources[0], "translation": translations[0], "reference": references[0]}
    return WarmupRun(
        variant=variant,
        status="diverged" if final is None else "trained",
        final_val_loss=final,
        bleu=bleu,
        chrf=chrf,
        seconds=round(time.perf_counter() - started, 1),
        init_w2_grads=grads,
        train_loss=train_loss,
        val_loss=val_loss,
        example=example,
    )


def run_warmup(
    config: WarmupConfig,
    out_dir: str | Path,
    device: torch.device | str = "cpu",
    fresh: bool = False,
    on_run: Callable[[int, int, str], None] | None = None,
    progress: bool = False,
) -> tuple[list[WarmupRun], WarmupData]:
    """The four variants, each saved in out_dir/runs as it ends and reused by a later call
    with the same settings unless `fresh`. on_run(index, total, name) before each;
    progress: a bar of each run's training steps too."""
    runs_dir = Path(out_dir) / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    data = load_warmup_data(config)
    fingerprint = config.fingerprint()
    results = []
    for index, variant in enumerate(VARIANTS):
        path = runs_dir / f"warmup-{config.data}-{variant}.json"
        if on_run is not None:
            on_run(index, len(VARIANTS), LABELS[variant])
        result = None if fresh else saved_run(path, fingerprint, run_from_dict)
        if result is None:
            result = run_variant(config, variant, data, device, progress)
            save_run(path, fingerprint, result)
        results.append(result)
    return results, data


def run_from_dict(saved: dict) -> WarmupRun:
    saved = dict(saved)
    saved["val_loss"] = [tuple(pair) for pair in saved.get("val_loss", [])]
    return WarmupRun(**saved)


def warmup_effect(results: list[WarmupRun], placement: str) -> float | None:
    """BLEU without warm-up over BLEU with it, for one placement (a diverged run: 0)."""
    by_name = {r.variant: r for r in results}
    with_, without = by_name.get(placement), by_name.get(placement + "-nowarmup")
    if with_ is None or without is None or not with_.bleu:
        return None
    return (without.bleu or 0.0) / with_.bleu


def finding(results: list[WarmupRun]) -> str:
    """Whether Xiong et al.'s finding reproduces here, in words (see the module docstring)."""
    post, pre = warmup_effect(results, "post"), warmup_effect(results, "pre")
    if post is None or pre is None:
        return "cannot be judged: a run with warm-up scored no BLEU"
    if pre < KEPT:
        return (f"does not reproduce cleanly: post-LN without warm-up keeps {post:.2f} of its "
                f"BLEU, but pre-LN also loses (keeps {pre:.2f})")  # fmt: skip
    if post <= STRONG:
        return f"reproduces: post-LN without warm-up keeps {post:.2f} of its BLEU, pre-LN {pre:.2f}"
    if post < WEAK:
        return (f"reproduces weakly: post-LN without warm-up keeps {post:.2f} of its BLEU, "
                f"pre-LN {pre:.2f}")  # fmt: skip
    return f"does not reproduce: post-LN without warm-up keeps {post:.2f} of its BLEU"
