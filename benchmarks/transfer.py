"""What pre-training buys: a reader fine-tuned from a pre-trained GPT against one from scratch.

On the built-in `shakespeare-qa` cloze task (tformer.qa.cloze; test: Macbeth and Twelfth
Night, never seen in pre-training or fine-tuning):

1. a small GPT (4 layers, 128 wide, context 192, a BPE of 4,096 learned from the training
   works) is pre-trained as a language model on the spoken lines of the training works only;
2. readers are trained on 1%, 10% and 100% of the training questions, each for the same
   number of steps: from scratch (the same shape, random weights), fully fine-tuned from
   the pre-trained model, and with LoRA (rank 8 on every projection, the span head
   trained too);
3. each is scored on the test questions (exact match and F1), with its trainable
   parameters and training time; a plot shows F1 against the number of training questions.

Also, tformer's QA training tokens/s against transformers' GPT2ForQuestionAnswering of the
same configuration, batch and dtype, taking turns step by step.

    python benchmarks/transfer.py [--pretrain-steps 1000] [--steps 400] [--json] [--plot PATH]
    python benchmarks/transfer.py --throughput-only     the tokens/s comparison alone
"""

import argparse
import copy
import json
import random
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine_line  # noqa: E402

from tformer import GPT2, GPT2Config  # noqa: E402
from tformer.data.sources import shakespeare_text  # noqa: E402
from tformer.data.tokens import Batch, LMBatches  # noqa: E402
from tformer.devices import keep_freed_memory  # noqa: E402
from tformer.models.gpt2_qa import GPT2ForQuestionAnswering  # noqa: E402
from tformer.nn.lora import LoRAConfig, add_lora  # noqa: E402
from tformer.qa import make_windows, squad_scores  # noqa: E402
from tformer.qa.batches import QABatches  # noqa: E402
from tformer.qa.cloze import SPLITS, builtin_qa, shakespeare_units  # noqa: E402
from tformer.qa.read import answer  # noqa: E402
from tformer.qa.windows import marker_tokens  # noqa: E402
from tformer.tokenizers import train_bpe  # noqa: E402
from tformer.train import TrainConfig, fit  # noqa: E402

CONTEXT, STRIDE, BATCH = 192, 32, 32
SHAPE = dict(n_layers=4, n_heads=4, d_model=128, max_len=CONTEXT, dropout=0.0)
FRACTIONS = (0.01, 0.1, 1.0)


def training_works_text() -> str:
    """The spoken lines of the works whose questions train (not the validation and test
    works): the pre-training text, and what the BPE is learned from."""
    held_out = {w for works in SPLITS["shakespeare-qa"].values() for w in works}
    works = shakespeare_units(shakespeare_text())
    return "\n".join(
        line for title, lines in works.items() if title not in held_out for line in lines
    )


def pretrain(tokenizer, text: str, steps: int) -> GPT2:
    config = GPT2Config(vocab_size=tokenizer.vocab_size, eos_id=tokenizer.eos_id, **SHAPE)
    model = GPT2(config, seed=0)
    ids = np.array(tokenizer.encode(text), dtype=np.uint16)
    cut = int(0.95 * len(ids))
    train, val = LMBatches(ids[:cut], CONTEXT), LMBatches(ids[cut:], CONTEXT)
    settings = TrainConfig(
        steps=steps,
        batch_size=BATCH,
        lr=2e-3,
        min_lr=2e-4,
        warmup_steps=50,
        eval_every=0,
        eval_batches=4,
        final_eval="sample",
        dtype="bfloat16",
    )
    history = fit(model, train, val, settings, progress=False)
    print(f"pre-trained: validation loss {history[-1]['val_loss']:.3f}", file=sys.stderr)
    return model


def reader(kind: str, pretrained: GPT2) -> GPT2ForQuestionAnswering:
    if kind == "scratch":
        return GPT2ForQuestionAnswering(pretrained.config, seed=1)
    model = GPT2ForQuestionAnswering(pretrained.config, seed=1, gpt2=copy.deepcopy(pretrained))
    if kind == "lora":
        add_lora(model.gpt2, LoRAConfig(rank=8, alpha=16, targets=("w_qkv", "w_o", "w1", "w2")))
    return model


def fine_tune(kind, pretrained, tokenizer, questions, test, steps) -> dict:
    separator, null = marker_tokens(tokenizer)
    windows = [
        w for e in questions for w in make_windows(tokenizer, e, CONTEXT, STRIDE, separator, null)
    ]
    model = reader(kind, pretrained)
    lr = 3e-4 if kind == "full" else 2e-3  # a pre-trained model takes smaller steps
    settings = TrainConfig(
        steps=steps,
        batch_size=BATCH,
        lr=lr,
        min_lr=lr / 10,
        warmup_steps=20,
        eval_every=0,
        dtype="bfloat16",
    )
    started = time.perf_counter()
    fit(model, QABatches(windows, separator), None, settings, progress=False)
    seconds = time.perf_counter() - started
    scores = test_scores(model, tokenizer, test)
    return {
        "method": kind,
        "questions": len(questions),
        "exact_match": round(scores["exact_match"], 2),
        "f1": round(scores["f1"], 2),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "train_seconds": round(seconds, 1),
    }


def test_scores(model, tokenizer, test) -> dict:
    """SQuAD exact match and F1 of a reader on the test questions (answers up to 8 tokens)."""
    predictions = answer(model, tokenizer, test, CONTEXT, STRIDE, max_answer_tokens=8)
    return squad_scores(
        (p.text, [a.text for a in e.answers]) for p, e in zip(predictions, test, strict=True)
    )


def qa_throughput(config: GPT2Config, windows, separator: int, steps: int = 10) -> dict:
    """Training tokens/s of the two readers, taking turns step by step on the same batches:
    the task's own windows (right-padded, with attention masks) and, apart, full windows
    without padding. Tokens are the real (unpadded) ones. tformer runs the attention path
    `tformer train` picks for bf16 on a CPU (blocked)."""
    import transformers

    from tformer.train.optim import build_optimizer
    from tformer.train.trainer import cross_entropy

    ours = GPT2ForQuestionAnswering(replace(config, attention="blocked"), seed=0)
    hf_config = transformers.GPT2Config(
        vocab_size=config.vocab_size,
        n_positions=CONTEXT,
        n_embd=config.d_model,
        n_layer=config.n_layers,
        n_head=config.n_heads,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=config.vocab_size - 1,  # GPT-2's 50256 is outside this vocabulary
        eos_token_id=config.vocab_size - 1,
    )
    theirs = transformers.GPT2ForQuestionAnswering(hf_config)
    g = torch.Generator().manual_seed(0)
    padded = [QABatches(windows, separator).sample(BATCH, g) for _ in range(steps + 1)]
    ids = torch.randint(0, config.vocab_size, (BATCH, CONTEXT), generator=g)
    starts = torch.randint(0, CONTEXT, (BATCH,), generator=g)
    full = Batch((ids, torch.ones_like(ids)), torch.stack([starts, (starts + 3) % CONTEXT], 1))

    def our_loss(batch):
        return cross_entropy(ours(*batch.inputs).flatten(0, 1), batch.targets.flatten())

    def their_loss(batch):
        ids, mask = batch.inputs
        start, end = batch.targets.unbind(1)
        return theirs(
            input_ids=ids, attention_mask=mask, start_positions=start, end_positions=end
        ).loss

    runs = {"tformer": (ours, our_loss), "transformers": (theirs, their_loss)}
    optimizers = {k: build_optimizer(m, 1e-4, 0.1, (0.9, 0.95)) for k, (m, _) in runs.items()}
    result = {}
    for name, batches in (("windows", padded), ("full", [full] * (steps + 1))):
        seconds = dict.fromkeys(runs, 0.0)
        for step, batch in enumerate(batches):
            for run, (_, loss_fn) in runs.items():
                started = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = loss_fn(batch)
                loss.backward()
                optimizers[run].step()
                optimizers[run].zero_grad(set_to_none=True)
                if step:  # the first is a warm-up
                    seconds[run] += time.perf_counter() - started
        tokens = sum(int(batch.inputs[1].sum()) for batch in batches[1:])
        rates = {run: round(tokens / s, 1) for run, s in seconds.items()}
        result[name] = {**rates, "ratio": round(rates["tformer"] / rates["transformers"], 2)}
    return result


def plot(rows: list[dict], path: Path) -> None:
    from tformer.train.plots import new_figure

    fig = new_figure(figsize=(6, 4))
    ax = fig.subplots()
    for method, label in (
        ("scratch", "from scratch"),
        ("full", "pre-trained, full"),
        ("lora", "pre-trained, LoRA"),
    ):
        mine = [r for r in rows if r["method"] == method]
        ax.plot([r["questions"] for r in mine], [r["f1"] for r in mine], marker="o", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("training questions")
    ax.set_ylabel("test F1")
    ax.set_title("shakespeare-qa: what pre-training buys")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def report_throughput(config: GPT2Config, windows, separator: int) -> dict:
    throughput = qa_throughput(config, windows, separator)
    for name, rates in throughput.items():
        print(
            f"QA training tokens/s ({name}): tformer {rates['tformer']:,.0f}, transformers "
            f"{rates['transformers']:,.0f} ({rates['ratio']}x)",
            file=sys.stderr,
        )
    return throughput


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pretrain-steps", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=400, help="fine-tuning steps per run")
    parser.add_argument("--plot", default="docs/qa/transfer.png")
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--throughput-only", action="store_true", help="only the QA tokens/s comparison"
    )
    args = parser.parse_args()
    machine = machine_line()
    print(machine, file=sys.stderr)
    keep_freed_memory()
    text = training_works_text()
    tokenizer = train_bpe([text], vocab_size=4096)
    splits = builtin_qa("shakespeare-qa")
    train, test = splits["train"], splits["test"]
    separator, null = marker_tokens(tokenizer)
    windows = [
        w for e in train for w in make_windows(tokenizer, e, CONTEXT, STRIDE, separator, null)
    ]
    if args.throughput_only:
        config = GPT2Config(vocab_size=tokenizer.vocab_size, eos_id=tokenizer.eos_id, **SHAPE)
        throughput = report_throughput(config, windows, separator)
        if args.json:
            print(json.dumps({"machine": machine, "throughput": throughput}))
        return
    started = time.perf_counter()
    pretrained = pretrain(tokenizer, text, args.pretrain_steps)
    pretrain_seconds = time.perf_counter() - started
    rows = []
    for fraction in FRACTIONS:
        questions = random.Random(0).sample(train, max(1, int(fraction * len(train))))
        for kind in ("scratch", "full", "lora"):
            row = fine_tune(kind, pretrained, tokenizer, questions, test, args.steps)
            rows.append(row)
            print(
                f"{row['questions']:>6} questions {kind:>7}: EM {row['exact_match']:5.1f} "
                f"F1 {row['f1']:5.1f}, {row['trainable_parameters']:,} trainable, "
                f"{row['train_seconds']:.0f} s",
                file=sys.stderr,
            )
    throughput = report_throughput(pretrained.config, windows, separator)
    plot(rows, Path(args.plot))
    if args.json:
        print(
            json.dumps(
                {
                    "machine": machine,
                    "pretrain_seconds": round(pretrain_seconds, 1),
                    "test_questions": len(test),
                    "rows": rows,
                    "throughput": throughput,
                }
            )
        )


if __name__ == "__main__":
    main()
