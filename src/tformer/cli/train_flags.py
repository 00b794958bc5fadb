"""`tformer train`'s flags: each is one field of tformer.recipes.TrainSpec."""

import argparse

from tformer.cli.common import DefaultsFormatter, number
from tformer.recipes.spec import CHOICES, RANGES
from tformer.train import TrainConfig


def ranged(field: str):
    """The argparse type of a TrainSpec field's flag: a number in the field's range."""
    return number(**RANGES[field])


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "train",
        formatter_class=DefaultsFormatter,
        help="train a GPT on your text, or on the built-in Shakespeare",
        description="Train a GPT-2-style model. With no data given it trains a character-level "
        "model on the built-in 'shakespeare' corpus. The run directory receives the config, "
        "tokenizer, checkpoints (last, best), metrics.jsonl, loss.png and the final model, "
        "which GPT2.from_pretrained(RUN_DIR) and transformers load. Defaults are nanoGPT's "
        "CPU configuration for Shakespeare (about a minute on 2 cores). Under torchrun, "
        "every process trains on its share of each batch (DDP). With --task translation it "
        "trains the encoder-decoder Transformer on sentence pairs (default: the built-in "
        "'number-words', English to French) with a joint BPE, and reports test BLEU and chrF.",
    )
    p.add_argument(
        "--task",
        default="lm",
        choices=["lm", "translation", "qa", "sft"],
        help="lm: a GPT on text; translation: an encoder-decoder model on sentence pairs; "
        "qa: a GPT-2 reader with a span head on SQuAD-style questions (see 'question "
        "answering' below); sft: supervised fine-tuning of --init on prompt/response pairs, "
        "the loss on the responses only",
    )
    data = p.add_argument_group("data")
    data.add_argument(
        "--data",
        help="a text file, a directory of .txt files, a .jsonl file with a 'text' field, or "
        "'shakespeare' (default); split 90/10. Translation: a TSV (source<TAB>target) or "
        "JSONL ({src, tgt}) file, neither side empty, or 'number-words' (default). QA: a "
        "SQuAD .json or a .jsonl file ({context, question, answers}), its last 10%% of "
        "contexts for validation, or "
        "the built-in bible-qa or shakespeare-qa, or squad / squad-2.0 once 'tformer data squad' "
        "has fetched them. SFT: a .jsonl file ({prompt, response}, neither empty), its "
        "last 10%% for validation",
    )
    data.add_argument("--train", dest="train_file", help="training text (with --val)")
    data.add_argument("--val", dest="val_file", help="validation text (with --train)")
    data.add_argument(
        "--tokenizer",
        choices=["char", "gpt2", "bpe"],
        help="characters, GPT-2's BPE, or a BPE trained on the data (default: char; qa on "
        "bible-qa, shakespeare-qa or squad: bpe); translation always learns a joint BPE of "
        "--bpe-vocab-size",
    )
    data.add_argument(
        "--bpe-vocab-size", type=ranged("bpe_vocab_size"), default=4096, help="for --tokenizer bpe"
    )

    qa = p.add_argument_group("question answering (--task qa)")
    qa.add_argument(
        "--reader",
        choices=["gpt2", "encoder"],
        help="a new model's kind: gpt2, causal (the question before the context), or encoder, "
        "the original Transformer's bidirectional encoder stack with the same span head "
        "(--init: the checkpoint's kind; an encoder-decoder run gives its encoder) "
        "(default: gpt2)",
    )
    qa.add_argument(
        "--stride",
        type=ranged("stride"),
        default=64,
        help="context tokens shared by neighbouring windows of a long context",
    )
    qa.add_argument(
        "--max-answer-tokens",
        type=ranged("max_answer_tokens"),
        default=30,
        help="the longest answer considered",
    )
    qa.add_argument(
        "--null-threshold",
        type=ranged("null_threshold"),
        help="answer 'no answer' when its score beats the best span's by more than this "
        "(default: 0 if the data has unanswerable questions, else never)",
    )

    start = p.add_argument_group("fine-tuning")
    start.add_argument(
        "--init",
        metavar="CHECKPOINT",
        help="start from this model instead of a random one: a tformer run directory (a LoRA "
        "run's adapters are folded in), a Hugging Face GPT-2 directory, or with --task qa "
        "also a translation run, whose encoder then reads. Its shape and tokenizer apply "
        "(the size and tokenizer flags are refused); --dropout, if given, replaces its "
        "dropout; --context may be shorter than its window",
    )
    start.add_argument(
        "--lora-rank",
        type=ranged("lora_rank"),
        metavar="R",
        help="fine-tune with LoRA instead of in full: freeze --init's weights and train rank-R "
        "updates of the --lora-targets layers (and a reader's new span head). Checkpoints "
        "and the run directory then hold the adapters alone, in PEFT's layout, naming "
        "--init as their base",
    )
    start.add_argument(
        "--lora-alpha",
        type=ranged("lora_alpha"),
        help="the updates are scaled by alpha / R (default: 2 R)",
    )
    start.add_argument(
        "--lora-dropout",
        type=ranged("lora_dropout"),
        help="dropout on the adapters' input (default: 0)",
    )
    start.add_argument(
        "--lora-targets",
        help="comma-separated layers to adapt, by Hugging Face's names (c_attn, attn.c_proj, "
        "c_fc, mlp.c_proj) or tformer's (w_qkv, w_o, w1, w2) (default: c_attn, as PEFT's "
        "for GPT-2)",
    )
    start.add_argument(
        "--merge",
        action="store_true",
        help="at the end, fold the LoRA updates into the weights: the run directory then "
        "holds a plain model (as any other run's) and RUN_DIR/adapter the adapters",
    )

    model = p.add_argument_group("model")
    model.add_argument(
        "--preset",
        choices=CHOICES["preset"],
        help="a GPT-2 size (default: the sizes below); translation: small (default) or base",
    )
    model.add_argument(
        "--n-layers", type=ranged("n_layers"), help="blocks (default: 4, or the preset's)"
    )
    model.add_argument(
        "--n-heads", type=ranged("n_heads"), help="heads (default: 4, or the preset's)"
    )
    model.add_argument(
        "--d-model", type=ranged("d_model"), help="width (default: 128, or the preset's)"
    )
    model.add_argument("--d-ff", type=ranged("d_ff"), help="default: 4 x d-model")
    model.add_argument(
        "--context",
        type=ranged("context"),
        help="tokens per window (max_len) (default: 64; translation: 128)",
    )
    model.add_argument(
        "--dropout",
        type=ranged("dropout"),
        help="dropout probability (default: 0; translation: 0.1)",
    )
    model.add_argument(
        "--norm-position",
        choices=CHOICES["norm_position"],
        help="where the LayerNorms sit: pre (GPT-2), post (the paper's), or none (default: "
        "pre; translation: post)",
    )
    model.add_argument(
        "--activation",
        choices=CHOICES["activation"],
        help="gelu (exact, as nanoGPT) or gelu_tanh (GPT-2's) (default: gelu); translation "
        "uses the paper's ReLU",
    )
    model.add_argument(
        "--attention",
        default="auto",
        choices=CHOICES["attention"],
        help="sdpa: PyTorch's fused kernel; explicit: the equation written out; blocked: "
        "tformer's C kernel for bf16 contexts up to 128 without padding; for longer causal "
        "training the fastest on this CPU (measured) of explicit skipping the key blocks a "
        "causal mask hides, sdpa and tformer's FlashAttention kernels; otherwise explicit "
        "(query blocks where long) in bf16, sdpa in float32; auto: blocked for training on a "
        "CPU, else sdpa",
    )

    train = p.add_argument_group("training")
    defaults = TrainConfig()
    train.add_argument(
        "--steps",
        type=ranged("steps"),
        help=f"optimizer steps (default: {defaults.steps}; with --resume: the run's own)",
    )
    train.add_argument(
        "--batch-size",
        type=ranged("batch_size"),
        default=defaults.batch_size,
        help="sequences per optimizer step, over all processes",
    )
    train.add_argument(
        "--grad-accum",
        type=ranged("grad_accum"),
        default=defaults.grad_accum,
        help="micro-batches per step",
    )
    train.add_argument("--lr", type=ranged("lr"), default=defaults.lr, help="peak learning rate")
    train.add_argument(
        "--min-lr",
        type=ranged("min_lr"),
        default=defaults.min_lr,
        help="learning rate at the end of the decay",
    )
    train.add_argument(
        "--warmup-steps",
        type=ranged("warmup_steps"),
        default=defaults.warmup_steps,
        help="linear warm-up steps",
    )
    train.add_argument(
        "--decay-steps",
        type=ranged("decay_steps"),
        help="end of the cosine decay (default: --steps)",
    )
    train.add_argument(
        "--schedule",
        default=defaults.schedule,
        choices=["cosine", "inverse_sqrt"],
        help="cosine decay to --min-lr, or the original Transformer's 1/sqrt(step) decay from "
        "the peak --lr at --warmup-steps",
    )
    train.add_argument(
        "--label-smoothing",
        type=ranged("label_smoothing"),
        help="mix the targets with the uniform distribution, as the original Transformer did "
        "(default: 0; translation: 0.1)",
    )
    train.add_argument(
        "--weight-decay",
        type=ranged("weight_decay"),
        default=defaults.weight_decay,
        help="AdamW decay on matrices",
    )
    train.add_argument("--beta1", type=ranged("beta1"), default=defaults.beta1, help="AdamW beta1")
    train.add_argument("--beta2", type=ranged("beta2"), default=defaults.beta2, help="AdamW beta2")
    train.add_argument(
        "--grad-clip", type=ranged("grad_clip"), default=defaults.grad_clip, help="0: off"
    )
    train.add_argument(
        "--eval-every",
        type=ranged("eval_every"),
        default=defaults.eval_every,
        help="steps; 0: only at the end",
    )
    train.add_argument(
        "--eval-batches",
        type=ranged("eval_batches"),
        default=defaults.eval_batches,
        help="batches per periodic evaluation",
    )
    train.add_argument(
        "--final-eval",
        default=defaults.final_eval,
        choices=["full", "sample"],
        help="score the whole validation set at the end, or --eval-batches like the others",
    )
    train.add_argument(
        "--checkpoint-every",
        type=ranged("checkpoint_every"),
        default=defaults.checkpoint_every,
        help="steps; 0: only at the end and at each better validation loss",
    )
    train.add_argument(
        "--seed",
        type=ranged("seed"),
        default=defaults.seed,
        help="seed for initialisation, data and dropout",
    )
    train.add_argument("--device", default="auto", help="cpu, cuda, ... (default: auto)")
    train.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="autocast dtype; auto: bfloat16 where the hardware has it, float16 with loss "
        "scaling on older GPUs, else float32",
    )
    train.add_argument(
        "--threads", type=ranged("threads"), help="CPU threads (default: torch's choice)"
    )

    train.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        help="torch.compile the model for training: ~4-10%% faster steps on a CPU after "
        "~30 s (small models) to ~3 min (GPT-2 124M) of compiling, so for long runs",
    )

    scale = p.add_argument_group("memory and scale")
    scale.add_argument(
        "--activation-checkpointing",
        action=argparse.BooleanOptionalAction,
        help="keep only each layer's input and recompute its activations in the backward "
        "pass: much less memory for ~1/3 more compute",
    )
    scale.add_argument(
        "--parallel",
        choices=["ddp", "fsdp"],
        help="under torchrun: ddp (default) keeps a full replica per process and averages "
        "gradients; fsdp shards parameters, gradients and optimizer state across processes. "
        "This and the two options above may change when a run resumes",
    )

    out = p.add_argument_group("output")
    out.add_argument(
        "--out",
        help="run directory (default: runs/shakespeare-char; translation: runs/translation; "
        "qa: runs/qa)",
    )
    out.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out exactly; its own data, model and training settings "
        "apply, and the other flags here are ignored (except --threads, --device, output, "
        "the memory and scale options, and --steps N, which extends the run to N steps in "
        "all, its learning-rate schedule kept)",
    )
    out.add_argument(
        "--overwrite",
        action="store_true",
        help="replace tformer's own files in an --out that holds a run; files tformer did not "
        "write are never touched",
    )
    out.add_argument(
        "--sample-tokens",
        type=ranged("sample_tokens"),
        default=300,
        help="tokens to sample at the end (translation shows three test translations instead)",
    )
    out.add_argument("--no-progress", action="store_true", help="no progress bar")
    out.add_argument("--json", action="store_true", help="end with one JSON line of results")
    return p
