"""What a training run is asked to do: one field per `tformer train` flag.

A TrainSpec is the whole request, from the command line or from Python:

    from tformer.recipes import TrainSpec, train
    result = train(TrainSpec(task="lm", data="shakespeare", steps=200, out="runs/small"))

Fields left at None take the task's default (`with_task_defaults`), or with --init the
checkpoint's setting. A resumed run (resume=True) is what it was: its own data, model and
training settings come from its run directory, and only the fields that say how this
process runs (device, threads, out, progress, messages, parallel, activation_checkpointing,
compile) apply.
"""

from dataclasses import asdict, dataclass, replace

from tformer.train import TrainConfig

TASKS = ("lm", "translation", "qa", "sft")
DEFAULT_OUT = {
    "lm": "runs/shakespeare-char",
    "translation": "runs/translation",
    "qa": "runs/qa",
    "sft": "runs/sft",
}


@dataclass
class TrainSpec:
    task: str = "lm"  # lm, translation, qa, sft
    # data
    data: str | None = None  # a file, a directory of .txt files, or a built-in name
    train_file: str | None = None  # with val_file, instead of data
    val_file: str | None = None
    tokenizer: str | None = None  # char, gpt2, bpe; None: char
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
    steps: int = TrainConfig.steps
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
    sample_tokens: int = 300
    progress: bool = True  # a progress bar
    messages: bool = True  # the run's opening lines and evaluations

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; choose one of {', '.join(TASKS)}")


def with_task_defaults(spec: TrainSpec) -> TrainSpec:
    """The spec with the defaults the tasks share filled in, after checking the flags
    that do not go together (a resumed run's own settings are read later, from its
    directory)."""
    if not spec.resume:
        check_new_run(spec)
    translation = spec.task == "translation"
    defaults = {
        "tokenizer": "char",
        "activation": "gelu",
        "norm_position": "post" if translation else "pre",
        "label_smoothing": 0.1 if translation else 0.0,
    }
    return replace(spec, **{k: v for k, v in defaults.items() if getattr(spec, k) is None})


def check_new_run(spec: TrainSpec) -> None:
    """Refuse flags that a new run of this task cannot use, naming them."""
    if spec.init is not None:
        if spec.task == "translation":
            raise ValueError("--init starts GPT-2 models (--task lm, qa or sft), not translation")
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
            raise ValueError(
                f"--init takes the model's shape and tokenizer from {spec.init}; drop "
                f"{', '.join(given)}"
            )
    if spec.task != "qa" and spec.reader is not None:
        raise ValueError("--reader picks the kind of question-answering model: add --task qa")


def train_options(spec: TrainSpec) -> dict:
    """The spec's TrainConfig fields (dtype aside, which is resolved for the device)."""
    fields = asdict(TrainConfig())
    return {name: getattr(spec, name) for name in fields if name != "dtype"}
