"""A causal reader against a bidirectional one: GPT-2's span head on GPT-2, and on the
original Transformer's encoder stack, trained from scratch on the same questions.

On the built-in `shakespeare-qa` task (test: Macbeth and Twelfth Night), with the BPE of
4,096 learned from the training works (as benchmarks/transfer.py), readers of one size
(4 layers, 128 wide, d_ff 512, windows of 192 tokens overlapping by 32) train for the same
steps on 10% and 100% of the training questions:

- gpt2: causal attention, learned positions, pre-LN, tanh GELU (the question comes first,
  so every context token has read it, but never the text after it);
- encoder (pre-LN): the same block with bidirectional attention and sinusoidal positions:
  the comparison of attention's direction;
- encoder (post-LN, ReLU): the paper's own encoder layer.

Each is scored on the test questions (exact match, F1), with its parameters, training time
and tokens/s. One seed each.

    python benchmarks/readers.py [--steps 400] [--json]
"""

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine_line  # noqa: E402
from transfer import (  # noqa: E402
    BATCH,
    CONTEXT,
    SHAPE,
    STRIDE,
    test_scores,
    training_works_text,
)

from tformer import GPT2Config  # noqa: E402
from tformer.devices import keep_freed_memory  # noqa: E402
from tformer.models.encoder_qa import EncoderForQuestionAnswering  # noqa: E402
from tformer.models.gpt2_qa import GPT2ForQuestionAnswering  # noqa: E402
from tformer.qa import make_windows  # noqa: E402
from tformer.qa.batches import QABatches  # noqa: E402
from tformer.qa.cloze import builtin_qa  # noqa: E402
from tformer.qa.windows import marker_tokens  # noqa: E402
from tformer.tokenizers import train_bpe  # noqa: E402
from tformer.train import TrainConfig, fit  # noqa: E402

FRACTIONS = (0.1, 1.0)


def build(kind: str, vocab_size: int, eos: int | None) -> torch.nn.Module:
    if kind == "gpt2":
        config = GPT2Config(vocab_size=vocab_size, eos_id=eos, attention="blocked", **SHAPE)
        return GPT2ForQuestionAnswering(config, seed=1)
    norm, activation = ("pre", "gelu_tanh") if kind == "encoder-pre" else ("post", "relu")
    config = EncoderForQuestionAnswering.config_for(
        vocab_size,
        max_len=CONTEXT,
        d_model=SHAPE["d_model"],
        n_heads=SHAPE["n_heads"],
        n_layers=SHAPE["n_layers"],
        d_ff=4 * SHAPE["d_model"],
        dropout=0.0,
        norm_position=norm,
        activation=activation,
        attention="explicit",  # bidirectional: the blocked path is for causal attention
    )
    return EncoderForQuestionAnswering(config, seed=1)


def train_and_score(kind, tokenizer, questions, test, steps) -> dict:
    separator, null = marker_tokens(tokenizer)
    windows = [
        w for e in questions for w in make_windows(tokenizer, e, CONTEXT, STRIDE, separator, null)
    ]
    model = build(kind, tokenizer.vocab_size, tokenizer.eos_id)
    settings = TrainConfig(
        steps=steps,
        batch_size=BATCH,
        lr=2e-3,
        min_lr=2e-4,
        warmup_steps=20,
        eval_every=0,
        dtype="bfloat16",
    )
    started = time.perf_counter()
    history = fit(model, QABatches(windows, separator), None, settings, progress=False)
    seconds = time.perf_counter() - started
    scores = test_scores(model, tokenizer, test)
    return {
        "reader": kind,
        "questions": len(questions),
        "exact_match": round(scores["exact_match"], 2),
        "f1": round(scores["f1"], 2),
        "parameters": model.num_parameters(),
        "train_seconds": round(seconds, 1),
        "tokens_per_second": history[-1]["tokens_per_second"],
        "final_train_loss": round(history[-1]["loss"], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=400, help="training steps per reader")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    machine = machine_line()
    print(machine, file=sys.stderr)
    keep_freed_memory()
    tokenizer = train_bpe([training_works_text()], vocab_size=4096)
    splits = builtin_qa("shakespeare-qa")
    train, test = splits["train"], splits["test"]
    rows = []
    for fraction in FRACTIONS:
        questions = random.Random(0).sample(train, max(1, int(fraction * len(train))))
        for kind in ("gpt2", "encoder-pre", "encoder-post"):
            row = train_and_score(kind, tokenizer, questions, test, args.steps)
            rows.append(row)
            print(
                f"{row['questions']:>6} questions {kind:>12}: EM {row['exact_match']:5.1f} "
                f"F1 {row['f1']:5.1f}, loss {row['final_train_loss']:.3f}, "
                f"{row['parameters']:,} parameters, {row['train_seconds']:.0f} s, "
                f"{row['tokens_per_second']:,.0f} tok/s",
                file=sys.stderr,
            )
    if args.json:
        print(json.dumps({"machine": machine, "test_questions": len(test), "rows": rows}))


if __name__ == "__main__":
    main()
