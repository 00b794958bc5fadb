"""`tformer export gguf CHECKPOINT`, `tformer export marian RUN`: a model in another engine's
format."""

from pathlib import Path

import torch
from tqdm import tqdm

from tformer.checkpoints import read_model_config, resolve_checkpoint
from tformer.checkpoints.gguf import TYPE_NAMES
from tformer.cli.common import print_json
from tformer.models.gpt2_gguf import check_writable, name_table
from tformer.models.load import (
    LANGUAGE,
    QA,
    TRANSLATION,
    checkpoint_kind,
    load_gpt2_with_tokenizer,
    load_translation_model,
)
from tformer.models.seq2seq_marian import check_marian_writable, is_marian


def add_parser(sub) -> None:
    p = sub.add_parser(
        "export",
        help="write a model in another engine's format (GGUF for llama.cpp, Marian for "
        "transformers and CTranslate2)",
        description="Write a checkpoint in another engine's format.",
    )
    formats = p.add_subparsers(dest="format", metavar="FORMAT", required=True)
    g = formats.add_parser(
        "gguf",
        help="a GPT-2 checkpoint as one GGUF file that llama.cpp runs",
        description="Write a GPT-2 checkpoint (a run, a checkpoint directory, a LoRA "
        "adapter, which is folded into its base, or a GGUF file) and its tokenizer as one "
        "GGUF file in llama.cpp's gpt2 layout: weight matrices as --type, norms, biases and "
        "position embeddings in f32 (q4_0 keeps the token embedding, also the output head, "
        "in q8_0). Every tformer tokenizer carries over: GPT-2's BPE, a BPE trained here, "
        "characters. `GPT2.from_pretrained(FILE)` and every command that takes a checkpoint "
        "read the file back.",
    )
    g.add_argument("checkpoint", help="run or checkpoint directory (or a GGUF file)")
    g.add_argument(
        "--type",
        default="f32",
        choices=TYPE_NAMES,
        help="the weight matrices' type: f32 (exact), f16, bf16, or block-quantised q8_0, "
        "q4_0 (32 values per scale) (default: f32)",
    )
    g.add_argument("--out", type=Path, help="the file (default: CHECKPOINT/model-TYPE.gguf)")
    g.add_argument(
        "--approximate-gelu",
        action="store_true",
        help="export a model trained with exact GELU; llama.cpp computes GELU's tanh "
        "approximation (at most 1e-3 apart per activation)",
    )
    g.add_argument("--json", action="store_true", help="print what was written as JSON")
    g.set_defaults(run=run_gguf)
    m = formats.add_parser(
        "marian",
        help="a translation model as a Hugging Face Marian directory (transformers, CTranslate2)",
        description="Write a translation run's encoder-decoder (post-LN) and its tokenizer as "
        "a Hugging Face MarianMTModel directory: config.json, model.safetensors, "
        "generation_config.json, tokenizer.json (renumbered as the model: Marian's padding "
        "token is its last id) and tokenizer_config.json. transformers' "
        "MarianMTModel.from_pretrained and AutoTokenizer load it, CTranslate2's "
        "ct2-transformers-converter converts it, and tformer reads it back (tformer "
        "translate DIR).",
    )
    m.add_argument("checkpoint", help="translation run or checkpoint directory")
    m.add_argument("--out", type=Path, help="the directory (default: CHECKPOINT/marian)")
    m.add_argument("--json", action="store_true", help="print what was written as JSON")
    m.set_defaults(run=run_marian)


def run_gguf(args) -> None:
    checkpoint = Path(args.checkpoint).expanduser()
    out = args.out
    if out is None:
        where = checkpoint if checkpoint.is_dir() else checkpoint.parent
        out = where / f"model-{args.type}.gguf"
    if out.exists() and out.resolve() == checkpoint.resolve():
        raise ValueError(f"--out {out} is the checkpoint itself; name another file")
    kind = checkpoint_kind(resolve_checkpoint(args.checkpoint))
    if kind != LANGUAGE:
        what = {TRANSLATION: "a translation model (an encoder-decoder)",
                QA: "a question-answering reader (a span head)"}[kind]  # fmt: skip
        raise ValueError(
            f"{args.checkpoint} holds {what}; GGUF carries llama.cpp's gpt2 architecture, "
            "a GPT-2 language model, and nothing else"
        )
    model, tokenizer = load_gpt2_with_tokenizer(str(args.checkpoint), torch.device("cpu"),
                                                torch.float32)  # fmt: skip
    check_writable(model.config, args.type, args.approximate_gelu, tokenizer)  # before the bar
    total = len(name_table(model.config))
    with tqdm(total=total, unit="tensor", desc=out.name, disable=args.json) as bar:
        model.save_gguf(out, tokenizer, args.type, args.approximate_gelu,
                        progress=lambda name: bar.update())  # fmt: skip
    report = {
        "file": str(out),
        "type": args.type,
        "bytes": out.stat().st_size,
        "parameters": model.num_parameters(),
        "tokenizer": type(tokenizer).__name__,
    }
    if args.json:
        print_json(report)
        return
    print(
        f"wrote {out} ({report['bytes'] / 2**20:,.1f} MiB, {args.type}, "
        f"{report['parameters']:,} parameters); run it with llama.cpp, e.g. "
        f"llama-cli -m {out}, or read it back with tformer generate {out}"
    )


def run_marian(args) -> None:
    checkpoint = resolve_checkpoint(args.checkpoint)
    if checkpoint_kind(checkpoint) != TRANSLATION:
        raise ValueError(
            f"{args.checkpoint} holds no translation model; Marian is an encoder-decoder "
            "(tformer export gguf takes a GPT-2)"
        )
    if args.out is None and not Path(args.checkpoint).expanduser().is_dir():
        raise ValueError(f"{args.checkpoint} is no local directory: name the output with --out")
    out = args.out if args.out is not None else checkpoint / "marian"
    if out.exists() and (out.resolve() == checkpoint.resolve() or not out.is_dir()):
        raise ValueError(f"--out {out} is the checkpoint itself or a file; name a new directory")
    if (out / "config.json").is_file() and not is_marian(read_model_config(out)):
        raise ValueError(f"--out {out} holds another model (config.json); name a new directory")
    model, tokenizer = load_translation_model(checkpoint, torch.device("cpu"))
    check_marian_writable(model.config)
    model.save_pretrained(out, format="marian", tokenizer=tokenizer)
    report = {"directory": str(out), "parameters": model.num_parameters(),
              "vocab_size": model.config.tgt_vocab_size}  # fmt: skip
    if args.json:
        print_json(report)
        return
    print(
        f"wrote {out} (MarianMTModel, {report['parameters']:,} parameters); load it with "
        f"transformers.MarianMTModel.from_pretrained('{out}'), convert it with "
        f"ct2-transformers-converter --model {out} --output_dir {out}-ct2, or translate with "
        f"tformer translate {out}"
    )
