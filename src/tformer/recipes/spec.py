"""What a training run is asked to do: one field per `tformer train` flag.

A TrainSpec is the whole request, from the command line or from Python:

    from tformer.recipes import TrainSpec, train
    result = train(TrainSpec(task="lm", data="shakespeare", steps=200, out="runs/small"))

Fields left at None take the task's default (`with_task_defaults`), or with --init the
checkpoint's setting. A resumed run (resume=True) is what it was: its own data, model and
training settings come from its run directory, and only the fields that say how this
process runs (device, threads, out, progress, messages, parallel, activation_checkpointing,
compile) apply, and `steps`, which extends the run to that many steps in all (its
learning-rate schedule kept: tformer.recipes.run_dir.extended).

Every field is checked when a spec is made (`check_spec`): a value of the wrong type or out
of its range (RANGES, CHOICES) is a ConfigError naming the field, as the flag would be.
"""

import os
from dataclasses import asdict, dataclass, fields, replace

from tformer.checks import MAX_SEED, check_choice, check_number
from tformer.errors import ConfigError
from tformer.models import seq2seq
from tformer.models.gpt2_config import PRESETS
from tformer.nn.attention import IMPLEMENTATIONS
from tformer.nn.feedforward import ACTIVATIONS
from tformer.nn.sublayer import NORM_POSITIONS
from tformer.train import TrainConfig

TASKS = ("lm", "translation", "qa", "sft")
DEFAULT_OUT = {
    "lm": "runs/shakespeare-char",
    "translation": "runs/translation",
    "qa": "runs/qa",
    "sft": "runs/sft",
}
# The built-in question-answering data sets are natural text whose questions (a verse, a
# line) take too many character tokens for a window: they read with a BPE by default.
BPE_QA_DATA = ("bible-qa", "shakespeare-qa", "squad", "squad-2.0")

# The range of every numeric field, as check_number's keywords; `tformer train`'s flags
# parse with the same (tformer.cli.train_flags).
UNIT = dict(low=0.0, high=1.0, high_open=True)  # a probability that is not 1: [0, 1)
RANGES: dict[str, dict] = {
    "bpe_vocab_size": dict(integer=True, low=257),  # 256 bytes and an end-of-text token
    "stride": dict(integer=True, low=1),
    "max_answer_tokens": dict(integer=True, low=1),
    "null_threshold": dict(),
    "lora_rank": dict(integer=True, low=1),
    "lora_alpha": dict(low=0.0, low_open=True),
    "lora_dropout": UNIT,
    "n_layers": dict(integer=True, low=1),
    "n_heads": dict(integer=True, low=1),
    "d_model": dict(integer=True, low=1),
    "d_ff": dict(integer=True, low=1),
    "context": dict(integer=True, low=1),
    "dropout": UNIT,
    "steps": dict(integer=True, low=1),
    "batch_size": dict(integer=True, low=1),
    "grad_accum": dict(integer=True, low=1),
    "lr": dict(low=0.0, low_open=True),
    "min_lr": dict(low=0.0, low_open=True),
    "warmup_steps": dict(integer=True, low=0),
    "decay_steps": dict(integer=True, low=1),
    "label_smoothing": UNIT,
    "weight_decay": dict(low=0.0),
    "beta1": UNIT,
    "beta2": UNIT,
    "grad_clip": dict(low=0.0),
    "eval_every": dict(integer=True, low=0),
    "eval_batches": dict(integer=True, low=1),
    "checkpoint_every": dict(integer=True, low=0),
    "seed": dict(integer=True, low=0, high=MAX_SEED),
    "threads": dict(integer=True, low=1),
    "sample_tokens": dict(integer=True, low=0),
}
CHOICES: dict[str, tuple] = {
    "task": TASKS,
    "tokenizer": ("char", "gpt2", "bpe"),
    "reader": ("gpt2", "encoder"),
    "preset": (*PRESETS, *seq2seq.PRESETS),
    "norm_position": NORM_POSITIONS,
    "activation": ACTIVATIONS,
    "attention": ("auto", *IMPLEMENTATIONS),
    "schedule": ("cosine", "inverse_sqrt"),
    "final_eval": ("full", "sample"),
    "dtype": ("auto", "float32", "bfloat16", "float16"),
    "parallel": ("ddp", "fsdp"),
}
PATHS = {"data": "--data", "train_file": "--train", "val_file": "--val", "init": "--init"}
TEXTS = ("lora_targets", "device")
SWITCHES = (
    "merge",
    "compile",
    "activation_checkpointing",
    "resume",
    "overwrite",
    "progress",
    "messages",
)


@dataclass
class TrainSpec:
    task: str = "lm"  # lm, translation, qa, sft
    # data
    data: str | None = None  # a file, a directory of .txt files, or a built-in name
    train_file: str | None = None  # with val_file, instead of data
    val_file: str | None = None
    tokenizer: str | None = None  # char, gpt2, bpe; None: the task's (with_task_defaults)
    bpe_vocab_size: int = 4096
    # question answering
    reader: str | None = None  # gpt2 or encoder; None: gpt2 (or --init's kind)
    stride: int = 64
    max_answer_tokens: int = 30
    null_threshold: float | None = None
    # fine-tuning
    init: str | None = None  # a checkpoint to start from
    lora_rank: int | None = None
    lora_alpha: float | None = None
    lora_dropout: float | None = None
    lora_targets: str | None = None  # comma-separated layer names
    merge: bool = False
    # model
    preset: str | None = None
    n_layers: int | None = None
    n_heads: int | None = None
    d_model: int | None = None
    d_ff: int | None = None
    context: int | None = None
    dropout: float | None = None
    norm_position: str | None = None
    activation: str | None = None
    attention: str = "auto"
    # training (TrainConfig's fields; label_smoothing None: the task's default)
    steps: int | None = None  # None: not given (a new run: TrainConfig's; resumed: its own)
    batch_size: int = TrainConfig.batch_size
    grad_accum: int = TrainConfig.grad_accum
    lr: float = TrainConfig.lr
    min_lr: float = TrainConfig.min_lr
    warmup_steps: int = TrainConfig.warmup_steps
    decay_steps: int | None = None
    schedule: str = TrainConfig.schedule
    label_smoothing: float | None = None
    weight_decay: float = TrainConfig.weight_decay
    beta1: float = TrainConfig.beta1
    beta2: float = TrainConfig.beta2
    grad_clip: float = TrainConfig.grad_clip
    eval_every: int = TrainConfig.eval_every
    eval_batches: int = TrainConfig.eval_batches
    final_eval: str = TrainConfig.final_eval
    checkpoint_every: int = TrainConfig.checkpoint_every
    seed: int = TrainConfig.seed
    device: str = "auto"
    dtype: str = "auto"  # auto: bfloat16 where the hardware has it
    threads: int | None = None
    compile: bool | None = None  # None: not given (a resumed run keeps its own)
    # memory and scale (None: not given)
    activation_checkpointing: bool | None = None
    parallel: str | None = None
    # output
    out: str | None = None  # None: DEFAULT_OUT of the task
    resume: bool = False
    overwrite: bool = False  # replace tformer's own files of a run in `out` (never others)
    sample_tokens: int = 300
    progress: bool = True  # a progress bar
    messages: bool = True  # the run's opening lines and evaluations

    def __post_init__(self) -> None:
        check_spec(self)


def check_spec(spec: TrainSpec) -> None:
    """Every field of the right type and in its range, or a ConfigError naming it: the
    Python API is refused as the flags are."""
    if spec.task not in TASKS:  # the most likely slip from Python, said as it always was
        raise ConfigError(f"unknown task {spec.task!r}; choose one of {', '.join(TASKS)}")
    defaults = {f.name: f.default for f in fields(TrainSpec)}
    for name, limits in RANGES.items():
        check_number(name, getattr(spec, name), **limits, optional=defaults[name] is None)
    for name, choices in CHOICES.items():
        value = getattr(spec, name)
        if value is not None or defaults[name] is not None:
            check_choice(name, value, choices)
    for name in SWITCHES:
        value = getattr(spec, name)
        if not isinstance(value, bool) and not (value is None and defaults[name] is None):
            raise ConfigError(f"{name} must be True or False, got {value!r}")
    for name in TEXTS:
        value = getattr(spec, name)
        if not isinstance(value, str) and not (value is None and defaults[name] is None):
            raise ConfigError(f"{name} must be a string, got {value!r}")
    for name, flag in {**PATHS, "out": "--out"}.items():
        check_path(name, flag, getattr(spec, name))


def check_path(name: str, flag: str, value) -> None:
    """A path field: None (not given) or a non-empty path. An empty one would silently
    mean the current directory."""
    if value is None:
        return
    if not isinstance(value, str | os.PathLike):
        raise ConfigError(f"{name} ({flag}) must be a path, got {value!r}")
    if str(value).strip() == "":
        raise ConfigError(f"{name} ({flag}) must be a path, got an empty one")


def with_task_defaults(spec: TrainSpec) -> TrainSpec:
    """The spec with the defaults the tasks share filled in, after checking the flags
    that do not go together (a resumed run's own settings are read later, from its
    directory)."""
    if not spec.resume:
        check_new_run(spec)
    translation = spec.task == "translation"
    builtin_qa = spec.task == "qa" and spec.data in BPE_QA_DATA
    defaults = {
        "tokenizer": "bpe" if builtin_qa else "char",
        "activation": "gelu",
        "norm_position": "post" if translation else "pre",
        "label_smoothing": 0.1 if translation else 0.0,
    }
    return replace(spec, **{k: v for k, v in defaults.items() if getattr(spec, k) is None})


def check_new_run(spec: TrainSpec) -> None:
    """Refuse flags that a new run of this task cannot use, naming them."""
    if spec.init is not None:
        if spec.task == "translation":
            raise ConfigError("--init starts GPT-2 models (--task lm, qa or sft), not translation")
        shape = {
            "--preset": spec.preset,
            "--n-layers": spec.n_layers,
            "--n-heads": spec.n_heads,
            "--d-model": spec.d_model,
            "--d-ff": spec.d_ff,
            "--tokenizer": spec.tokenizer,
            "--activation": spec.activation,
            "--norm-position": spec.norm_position,
        }
        given = [flag for flag, value in shape.items() if value is not None]
        if given:
            raise ConfigError(
                f"--init takes the model's shape and tokenizer from {spec.init}; drop "
                f"{', '.join(given)}"
            )
    if spec.task != "qa" and spec.reader is not None:
        raise ConfigError("--reader picks the kind of question-answering model: add --task qa")


def train_options(spec: TrainSpec) -> dict:
    """The spec's TrainConfig fields (dtype aside, which is resolved for the device); steps
    only when given, so that a new run takes TrainConfig's."""
    names = [name for name in asdict(TrainConfig()) if name != "dtype"]
    options = {name: getattr(spec, name) for name in names}
    if options["steps"] is None:
        del options["steps"]
    return options
