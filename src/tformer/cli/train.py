"""`tformer train`: train a GPT on your text (or the built-in Shakespeare) and sample from it;
with --task translation, the encoder-decoder Transformer on sentence pairs."""

import argparse
import hashlib
import json
import sys
import time
from dataclasses import asdict, fields, replace
from pathlib import Path

import torch

from tformer.cli.common import DefaultsFormatter
from tformer.data.sources import BUILTIN_CORPORA, load_corpus
from tformer.data.tokens import LMBatches, tokenize_cached
from tformer.devices import pick_device, training_dtype
from tformer.files import atomic_write_json, read_json
from tformer.generate import SamplingConfig, generate_ids
from tformer.models import adapters, seq2seq
from tformer.models.adapters import lora_targets
from tformer.models.gpt2 import GPT2, PRESETS, GPT2Config
from tformer.models.gpt2_qa import GPT2ForQuestionAnswering
from tformer.nn.attention import IMPLEMENTATIONS
from tformer.nn.feedforward import ACTIVATIONS
from tformer.nn.lora import LoRAConfig, add_lora, lora_layers, merge_lora
from tformer.tokenizers import (
    CharTokenizer,
    GPT2Tokenizer,
    load_tokenizer,
    tokenizer_for_model,
    train_bpe,
)
from tformer.train import TrainConfig, distributed, fit
from tformer.train.plots import read_metrics

SMALL_MODEL = dict(n_layers=4, n_heads=4, d_model=128)
RUN_FILE = "run.json"  # what the run trains on, so --resume needs nothing but the directory


def add_parser(sub) -> None:
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
        "JSONL ({src, tgt}) file, or 'number-words' (default). QA: a SQuAD .json or a .jsonl "
        "file ({context, question, answers}), its last 10%% of contexts for validation, or "
        "the built-in bible-qa or shakespeare-qa, or squad / squad-2.0 once 'tformer data squad' "
        "has fetched them. SFT: a .jsonl file ({prompt, response}), its "
        "last 10%% for validation",
    )
    data.add_argument("--train", dest="train_file", help="training text (with --val)")
    data.add_argument("--val", dest="val_file", help="validation text (with --train)")
    data.add_argument(
        "--tokenizer",
        choices=["char", "gpt2", "bpe"],
        help="characters, GPT-2's BPE, or a BPE trained on the data (default: char); "
        "translation always learns a joint BPE of --bpe-vocab-size",
    )
    data.add_argument("--bpe-vocab-size", type=int, default=4096, help="for --tokenizer bpe")

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
        type=int,
        default=64,
        help="context tokens shared by neighbouring windows of a long context",
    )
    qa.add_argument(
        "--max-answer-tokens", type=int, default=30, help="the longest answer considered"
    )
    qa.add_argument(
        "--null-threshold",
        type=float,
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
        type=int,
        metavar="R",
        help="fine-tune with LoRA instead of in full: freeze --init's weights and train rank-R "
        "updates of the --lora-targets layers (and a reader's new span head). Checkpoints "
        "and the run directory then hold the adapters alone, in PEFT's layout, naming "
        "--init as their base",
    )
    start.add_argument(
        "--lora-alpha", type=float, help="the updates are scaled by alpha / R (default: 2 R)"
    )
    start.add_argument(
        "--lora-dropout", type=float, help="dropout on the adapters' input (default: 0)"
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
        choices=[*PRESETS, *seq2seq.PRESETS],
        help="a GPT-2 size (default: the sizes below); translation: small (default) or base",
    )
    model.add_argument("--n-layers", type=int, help="blocks (default: 4, or the preset's)")
    model.add_argument("--n-heads", type=int, help="heads (default: 4, or the preset's)")
    model.add_argument("--d-model", type=int, help="width (default: 128, or the preset's)")
    model.add_argument("--d-ff", type=int, help="default: 4 x d-model")
    model.add_argument(
        "--context", type=int, help="tokens per window (max_len) (default: 64; translation: 128)"
    )
    model.add_argument(
        "--dropout", type=float, help="dropout probability (default: 0; translation: 0.1)"
    )
    model.add_argument(
        "--norm-position",
        choices=["pre", "post"],
        help="where the LayerNorms sit (default: pre as GPT-2; translation: post, the paper's)",
    )
    model.add_argument(
        "--activation",
        choices=ACTIVATIONS,
        help="gelu (exact, as nanoGPT) or gelu_tanh (GPT-2's) (default: gelu); translation "
        "uses the paper's ReLU",
    )
    model.add_argument(
        "--attention",
        default="auto",
        choices=["auto", *IMPLEMENTATIONS],
        help="sdpa: PyTorch's fused kernel; explicit: the equation written out; blocked: "
        "tformer's C kernel for contexts up to 128 without padding, else explicit skipping "
        "the key blocks a causal mask hides; auto: blocked for bf16 training on a CPU, where "
        "it is fastest, else sdpa",
    )

    train = p.add_argument_group("training")
    defaults = TrainConfig()
    train.add_argument("--steps", type=int, default=defaults.steps, help="optimizer steps")
    train.add_argument(
        "--batch-size",
        type=int,
        default=defaults.batch_size,
        help="sequences per optimizer step, over all processes",
    )
    train.add_argument(
        "--grad-accum", type=int, default=defaults.grad_accum, help="micro-batches per step"
    )
    train.add_argument("--lr", type=float, default=defaults.lr, help="peak learning rate")
    train.add_argument(
        "--min-lr",
        type=float,
        default=defaults.min_lr,
        help="learning rate at the end of the decay",
    )
    train.add_argument(
        "--warmup-steps", type=int, default=defaults.warmup_steps, help="linear warm-up steps"
    )
    train.add_argument("--decay-steps", type=int, help="end of the cosine decay (default: --steps)")
    train.add_argument(
        "--schedule",
        default=defaults.schedule,
        choices=["cosine", "inverse_sqrt"],
        help="cosine decay to --min-lr, or the original Transformer's 1/sqrt(step) decay from "
        "the peak --lr at --warmup-steps",
    )
    train.add_argument(
        "--label-smoothing",
        type=float,
        help="mix the targets with the uniform distribution, as the original Transformer did "
        "(default: 0; translation: 0.1)",
    )
    train.add_argument(
        "--weight-decay", type=float, default=defaults.weight_decay, help="AdamW decay on matrices"
    )
    train.add_argument("--beta1", type=float, default=defaults.beta1, help="AdamW beta1")
    train.add_argument("--beta2", type=float, default=defaults.beta2, help="AdamW beta2")
    train.add_argument("--grad-clip", type=float, default=defaults.grad_clip, help="0: off")
    train.add_argument(
        "--eval-every", type=int, default=defaults.eval_every, help="steps; 0: only at the end"
    )
    train.add_argument(
        "--eval-batches",
        type=int,
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
        type=int,
        default=defaults.checkpoint_every,
        help="steps; 0: only at the end and at each better validation loss",
    )
    train.add_argument(
        "--seed", type=int, default=defaults.seed, help="seed for initialisation, data and dropout"
    )
    train.add_argument("--device", default="auto", help="cpu, cuda, ... (default: auto)")
    train.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="autocast dtype; auto: bfloat16 where the hardware has it",
    )
    train.add_argument("--threads", type=int, help="CPU threads (default: torch's choice)")

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
        "apply, and the other flags here are ignored (except --threads, --device, output, and "
        "the memory and scale options)",
    )
    out.add_argument(
        "--sample-tokens",
        type=int,
        default=300,
        help="tokens to sample at the end (translation shows three test translations instead)",
    )
    out.add_argument("--no-progress", action="store_true", help="no progress bar")
    out.add_argument("--json", action="store_true", help="end with one JSON line of results")
    p.set_defaults(run=run)


def build_tokenizer(kind: str, text: str, bpe_vocab_size: int):
    if kind == "char":
        return CharTokenizer.from_text(text)
    if kind == "gpt2":
        return GPT2Tokenizer()
    return train_bpe([text], vocab_size=bpe_vocab_size)


def attention_for(choice: str, device: torch.device, dtype: str) -> str:
    # Measured (docs/LOG.md): PyTorch's fused CPU attention is slow backwards in bf16.
    if choice == "auto":
        return "blocked" if device.type == "cpu" and dtype != "float32" else "sdpa"
    return choice


DEFAULT_OUT = {
    "lm": "runs/shakespeare-char",
    "translation": "runs/translation",
    "qa": "runs/qa",
    "sft": "runs/sft",
}


def run(args) -> None:
    if args.out is None:
        args.out = DEFAULT_OUT[args.task]
    run_file = Path(args.out) / RUN_FILE
    task = args.task
    if args.resume and run_file.is_file():  # a resumed run is what it was
        task = read_json(run_file, "the description of a training run").get("task", "lm")
    if args.init is not None and not args.resume:
        if task == "translation":
            raise ValueError("--init starts GPT-2 models (--task lm, qa or sft), not translation")
        shape = {"--preset": args.preset, "--n-layers": args.n_layers, "--n-heads": args.n_heads}
        shape.update(
            {"--d-model": args.d_model, "--d-ff": args.d_ff, "--tokenizer": args.tokenizer}
        )
        shape.update({"--activation": args.activation, "--norm-position": args.norm_position})
        given = [flag for flag, value in shape.items() if value is not None]
        if given:
            raise ValueError(
                f"--init takes the model's shape and tokenizer from {args.init}; drop "
                f"{', '.join(given)}"
            )
    if task != "qa" and args.reader is not None and not args.resume:
        raise ValueError("--reader picks the kind of question-answering model: add --task qa")
    args.lora = None if args.resume else lora_settings(args)
    if args.tokenizer is None:
        args.tokenizer = "char"
    if args.activation is None:
        args.activation = "gelu"
    if task == "translation":
        from tformer.cli import train_translation

        if args.norm_position is None:
            args.norm_position = "post"
        if args.label_smoothing is None:
            args.label_smoothing = 0.1
        return train_translation.run(args)
    if args.norm_position is None:
        args.norm_position = "pre"
    if args.label_smoothing is None:
        args.label_smoothing = 0.0
    if task == "qa":
        from tformer.cli import train_qa

        return train_qa.run(args)
    if task == "sft":
        from tformer.cli import train_sft

        return train_sft.run(args)
    init_dropout, init_context = args.dropout, args.context  # None: the checkpoint's
    if args.context is None:
        args.context = 64
    if args.dropout is None:
        args.dropout = 0.0
    started = time.perf_counter()
    device, dist, out, say = start_run(args)
    if args.resume:
        spec, config = read_run(out, args)
    else:
        config = new_train_config(args, device)
        spec = {
            "data": absolute(args.data) if args.data not in (None, *BUILTIN_CORPORA) else args.data,
            "train": absolute(args.train_file),
            "val": absolute(args.val_file),
            "tokenizer": args.tokenizer,
            "bpe_vocab_size": args.bpe_vocab_size,
            "threads": torch.get_num_threads(),
            "init": absolute(args.init),
            **init_settings(
                args, init_dropout, attention_for(args.attention, device, config.dtype)
            ),
        }
    corpus = load_corpus(spec["data"], spec["train"], spec["val"])
    fingerprint = text_fingerprint(corpus.train, corpus.val)
    if args.resume:
        if spec.get("text_sha256") != fingerprint:
            raise ValueError(
                f"the training text of {out} has changed since the run started; resume needs "
                "the same text (or start a new run)"
            )
        model = GPT2.from_pretrained(out / "last", device=device, **saved_settings(spec))
        tokenizer = load_tokenizer(out / "last")
        say(f"resuming {out} from {(out / 'last').resolve().name}; the run's own settings apply")
    elif args.init is not None:
        attention = attention_for(args.attention, device, config.dtype)
        model = GPT2.from_pretrained(
            args.init, device=device, dropout=init_dropout, attention=attention
        )
        tokenizer = tokenizer_for_model(args.init, model.config.vocab_size)
        prepare_init(model, spec, config.seed, say)
        spec["context"] = init_context or model.config.max_len
        if spec["context"] > model.config.max_len:
            raise ValueError(
                f"--context {spec['context']} is longer than the window of {args.init} "
                f"({model.config.max_len} positions)"
            )
        say(f"starting from {args.init} ({model.num_parameters():,} parameters)")
    else:
        # BPE merges are learned from the training text only; a character vocabulary covers
        # both parts, or a validation character unseen in training could not be encoded.
        vocabulary_text = corpus.train if spec["tokenizer"] == "bpe" else corpus.train + corpus.val
        tokenizer = build_tokenizer(spec["tokenizer"], vocabulary_text, spec["bpe_vocab_size"])
        model_config = model_config_from(args, tokenizer, device, config.dtype)
        model = GPT2(model_config, seed=config.seed).to(device)
    context = spec.get("context") or model.config.max_len  # a fine-tuning run may be shorter
    train_data = LMBatches(tokenize_cached(corpus.train, tokenizer), context, "training")
    val_data = LMBatches(tokenize_cached(corpus.val, tokenizer), context, "validation")
    if not args.resume:  # only now that the data is known to be usable
        start_run_directory(out, {**spec, "text_sha256": fingerprint}, dist)
    say(
        f"data: {corpus.description}: {len(train_data):,} training and {len(val_data):,} "
        f"validation tokens ({type(tokenizer).__name__}, vocabulary {tokenizer.vocab_size:,})"
    )
    say(
        f"model: {model.num_parameters():,} parameters; {device}, {config.dtype}, attention "
        f"{model.config.attention}, {torch.get_num_threads()} threads, {dist.world_size} "
        f"process(es){scale_note(dist, config)}; run directory {out}"
    )

    history, model, trainable = train_model(
        args, model, train_data, val_data, config, out, tokenizer, merge=spec.get("merge", False)
    )
    if model is None:  # not the main process
        return
    # The last evaluation of the run, also when a resumed run had nothing left to do.
    val = [r for r in read_metrics(out) if r["type"] == "eval"][-1]
    sample = ""
    if args.sample_tokens > 0:
        prompt = torch.tensor([[start_token(tokenizer)]], device=device)
        sampling = SamplingConfig(
            max_new_tokens=args.sample_tokens, temperature=0.8, top_k=200, seed=config.seed
        )
        sample = tokenizer.decode(generate_ids(model, prompt, sampling))
    train_records = [r for r in history if r["type"] == "train"]
    result = {
        "run_dir": str(out),
        "steps": config.steps,
        "val_loss": round(val["val_loss"], 4),
        "val_accuracy": round(val["val_accuracy"], 4),
        "val_perplexity": round(val["val_perplexity"], 3),
        "val_scope": "full" if val["full"] else "sample",
        "train_loss": round(train_records[-1]["loss"], 4) if train_records else None,
        "tokens_per_second": train_records[-1]["tokens_per_second"] if train_records else None,
        "seconds": round(time.perf_counter() - started, 1),
        "device": str(device),
        "dtype": config.dtype,
        "parameters": model.num_parameters(),
        "trainable_parameters": trainable,
        "sample": sample,
    }
    if args.json:
        print(json.dumps(result), file=sys.stdout)
        return
    scope = "whole validation set" if val["full"] else f"{config.eval_batches} batches"
    print(
        f"validation: loss {result['val_loss']:.4f}, accuracy {result['val_accuracy']:.3f}, "
        f"perplexity {result['val_perplexity']:.2f} ({scope})"
    )
    speed = f"{result['tokens_per_second']:,.0f} tokens/s; " if train_records else ""
    print(f"{speed}{result['seconds']} s in all; loss curve {out / 'loss.png'}; model {out}")
    if sample:
        print("sample:\n" + sample)


def start_run(args):
    """-> device, process group, run directory, and a print that only the main process uses
    (and only without --json); shared by both tasks."""
    device = pick_device(args.device)
    dist = distributed.init_from_env(device)
    if device.type == "cuda" and dist.world_size > 1:
        device = torch.device("cuda", dist.local_rank)
    say = print if dist.is_main and not args.json else (lambda *a, **k: None)
    return device, dist, Path(args.out), say


def start_run_directory(out: Path, record: dict, dist: distributed.Distributed) -> None:
    """A new run's directory with its run.json (what it trains on, for --resume), refusing
    one that holds a run already; the main process writes it."""
    if not dist.is_main:
        return
    if (out / "last").exists():
        raise FileExistsError(f"{out} already holds a run: add --resume, or pick --out")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / RUN_FILE, record)


def new_train_config(args, device: torch.device) -> TrainConfig:
    """The TrainConfig of a new run from its flags (each flag is one field)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    options = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if f.name != "dtype"}
    defaults = TrainConfig()
    for name in ("parallel", "activation_checkpointing", "compile"):  # None: not given
        if options[name] is None:
            options[name] = getattr(defaults, name)
    return TrainConfig(**options, dtype=training_dtype(args.dtype, device))


def train_model(args, model, train_data, val_data, config, out, tokenizer, merge=False):
    """fit() as every task's command runs it; -> (history, the trained model for what the
    main process reports next or None in the other processes, its trainable parameters).
    A sharded model runs only with every process, so the main one reloads the saved whole
    model. With `merge`, LoRA updates are folded into the weights at the end (merge_run)."""
    if config.parallel == "fsdp" and distributed.current().world_size > 1 and lora_layers(model):
        raise ValueError("LoRA runs are not sharded (their adapters are small): use --parallel ddp")
    history = fit(
        model,
        train_data,
        val_data,
        config,
        out,
        tokenizer,
        resume=args.resume,
        progress=not args.no_progress and not args.json,
    )
    if not distributed.current().is_main:
        return history, None, 0
    if distributed.is_sharded(model):
        model = type(model).from_pretrained(out, device=next(model.parameters()).device)
    trainable = trainable_parameters(model)
    if merge:
        merge_run(model, out, tokenizer)
    return history, model, trainable


def lora_settings(args) -> dict | None:
    """The LoRA settings of a new run from its flags; None: the run trains every weight."""
    given = {
        "--lora-alpha": args.lora_alpha,
        "--lora-dropout": args.lora_dropout,
        "--lora-targets": args.lora_targets,
        "--merge": args.merge or None,
    }
    if args.lora_rank is None:
        flags = [flag for flag, value in given.items() if value is not None]
        if flags:
            raise ValueError(f"{', '.join(flags)} go with --lora-rank (LoRA fine-tuning)")
        return None
    if args.init is None:
        raise ValueError("LoRA adapts a trained model: give it with --init CHECKPOINT")
    targets = [t.strip() for t in (args.lora_targets or "c_attn").split(",") if t.strip()]
    lora = LoRAConfig(
        rank=args.lora_rank,
        alpha=args.lora_alpha if args.lora_alpha is not None else 2.0 * args.lora_rank,
        dropout=args.lora_dropout or 0.0,
        targets=lora_targets(targets),
    )
    return {**asdict(lora), "targets": list(lora.targets)}


def init_settings(args, dropout: float | None, attention: str) -> dict:
    """What a run started with --init keeps in run.json: the LoRA settings, and the dropout
    and attention path, which a LoRA run's checkpoints (adapters only) cannot hold."""
    if args.init is None:
        return {}
    return {"lora": args.lora, "merge": args.merge, "dropout": dropout, "attention": attention}


def saved_settings(spec: dict) -> dict:
    """from_pretrained's dropout and attention for resuming a run (None: the checkpoint's)."""
    return {"dropout": spec.get("dropout"), "attention": spec.get("attention")}


def prepare_init(model: GPT2 | GPT2ForQuestionAnswering, spec: dict, seed: int, say) -> None:
    """The model a run starts from with --init: trained in full (an adapter checkpoint's
    adapters folded in first), or frozen with LoRA layers added (a reader's head trains)."""
    if lora_layers(model):
        if spec["lora"]:
            raise ValueError(
                f"{spec['init']} holds LoRA adapters; new adapters start from a plain model "
                "(train that run with --merge, and --init from it)"
            )
        merge_lora(model)
        model.requires_grad_(True)
        adapters.body(model).name_or_path = None  # these weights are no checkpoint's
    if spec["lora"] and not isinstance(model, (GPT2, GPT2ForQuestionAnswering)):
        raise ValueError("LoRA adapts GPT-2 models (PEFT's layout); train this reader in full")
    if spec["lora"]:
        lora = LoRAConfig(**spec["lora"])
        names = add_lora(adapters.body(model), lora, seed=seed)
        say(
            f"LoRA: rank {lora.rank}, alpha {lora.alpha:g} on {len(names)} layers "
            f"({', '.join(lora.targets)}); {trainable_parameters(model):,} of "
            f"{model.num_parameters():,} parameters train"
        )


def merge_run(model: GPT2 | GPT2ForQuestionAnswering, out: Path, tokenizer) -> None:
    """--merge: the adapters move to RUN_DIR/adapter, and the run directory gets the model
    with their updates folded into its weights. Written in that order, a crash leaves a
    loadable model in the run directory at every moment."""
    model.save_pretrained(out / "adapter")
    tokenizer.save(out / "adapter")
    merge_lora(model)
    adapters.body(model).name_or_path = None
    model.save_pretrained(out)
    for name in (adapters.CONFIG_FILE, adapters.WEIGHTS_FILE):
        (out / name).unlink(missing_ok=True)


def trainable_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def scale_note(dist: distributed.Distributed, config: TrainConfig) -> str:
    """The run's speed, memory and scale options, for its opening lines."""
    parts = ["compiled"] if config.compile else []
    if dist.world_size > 1:
        parts.append("FSDP, sharded" if config.parallel == "fsdp" else "DDP, replicated")
    if config.activation_checkpointing:
        parts.append("activation checkpointing")
    return "".join(f", {part}" for part in parts)


def absolute(path: str | None) -> str | None:
    return str(Path(path).expanduser().resolve()) if path is not None else None


def text_fingerprint(train: str, val: str) -> str:
    digest = hashlib.sha256(train.encode("utf-8"))
    digest.update(b"\0")
    digest.update(val.encode("utf-8"))
    return digest.hexdigest()


def read_run(out: Path, args) -> tuple[dict, TrainConfig]:
    """What a run trains on and how, for --resume (on the run's own number of threads, unless
    --threads says otherwise); with errors that say what is missing.
    How the work is spread may change (--parallel, --activation-checkpointing, --compile):
    the arithmetic is the same, up to the order of sums across processes."""
    if not (out / "last").exists():
        raise FileNotFoundError(
            f"{out}: nothing to resume (no 'last' checkpoint: the run saved none yet, or this "
            "is not a run directory)"
        )
    spec = read_json(out / RUN_FILE, "the description of a training run")
    torch.set_num_threads(args.threads or spec["threads"])  # the same sums, the same digits
    saved = read_json(out / "train_config.json", "a training config")
    try:
        config = TrainConfig(**saved)
    except TypeError as e:
        raise ValueError(f"{out / 'train_config.json'}: not a training config ({e})") from None
    given = {
        "parallel": args.parallel,
        "activation_checkpointing": args.activation_checkpointing,
        "compile": args.compile,
    }
    return spec, replace(config, **{k: v for k, v in given.items() if v is not None})


def start_token(tokenizer) -> int:
    """Where an unprompted sample starts: after an end-of-text token, else on a new line."""
    if tokenizer.eos_id is not None:
        return tokenizer.eos_id
    try:
        return tokenizer.encode("\n")[0]
    except (ValueError, IndexError):  # a character vocabulary without a newline
        return 0


def model_config_from(args, tokenizer, device: torch.device, dtype: str) -> GPT2Config:
    # Sizes given on the command line win; the rest come from the preset, else nanoGPT's
    # small CPU model.
    given = dict(n_layers=args.n_layers, n_heads=args.n_heads, d_model=args.d_model)
    given = {k: v for k, v in given.items() if v is not None}
    sizes = given if args.preset else {**SMALL_MODEL, **given}
    common = dict(
        vocab_size=tokenizer.vocab_size,
        max_len=args.context,
        d_ff=args.d_ff,
        dropout=args.dropout,
        activation=args.activation,
        norm_position=args.norm_position,
        attention=attention_for(args.attention, device, dtype),
        eos_token_id=tokenizer.eos_id,
    )
    if args.preset:
        return GPT2Config.from_preset(args.preset, **sizes, **common)
    return GPT2Config(**sizes, **common)
