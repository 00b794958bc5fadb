"""Translation: tformer's encoder-decoder Transformer against transformers' Marian, same size,
same data, same tokenizer, the same wall-clock budget, in one run.

Both models are the `small` preset's shape (3 + 3 post-LN layers, d_model 256, 4 heads, FFN
1024, ReLU, sinusoidal positions, embeddings scaled by sqrt(d_model) and shared between
source, target and output, dropout 0.1), initialised from scratch. Both train with the same
loop: AdamW (decay 0.01 on matrices), the paper's inverse-square-root schedule (peak --lr
after --warmup steps, which needs no total step count), label smoothing 0.1, gradient
clipping 1.0 (inside AdamW's pass, as tformer's trainer clips), bf16 autocast where the CPU
has it, batches of --batch-size pairs bucketed by length, drawn from the same seeded
generator. tformer's layers also keep their weights' bf16 copies between steps, as its
trainer has them do (Marian's nn.Linear casts its weights each step). Each computes the
label-smoothed loss its own library's way: tformer's fused loss (tformer.train.losses), and
for Marian the float32 upcast and torch's cross_entropy as transformers' own loss functions
do. The process keeps freed memory for reuse (tformer.devices.keep_freed_memory, which
tformer's trainer sets) for both models. Each trains for --budget seconds, the two taking
turns of --slice seconds so that both meet the same machine (this host's speed drifts by
10-20% over minutes). Then both are scored on the validation pairs (loss, token accuracy)
and translate the test pairs with greedy search and beam search (4 beams), batches of 32;
BLEU and chrF by sacrebleu; decoding speed in target tokens per second.

    python benchmarks/translation.py [--data bible-en-es|number-words] [--budget 300] [--json]
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine_line  # noqa: E402

from tformer.data.parallel import ParallelBatches, load_parallel  # noqa: E402
from tformer.data.tokens import IGNORE_INDEX  # noqa: E402
from tformer.devices import bf16_supported, keep_freed_memory  # noqa: E402
from tformer.generate.beam import BeamConfig  # noqa: E402
from tformer.generate.translate import corpus_scores, translate  # noqa: E402
from tformer.models.seq2seq import Seq2SeqConfig, Seq2SeqTransformer  # noqa: E402
from tformer.nn.weight_copies import kept_between_steps  # noqa: E402
from tformer.recipes.start import attention_for  # noqa: E402
from tformer.tokenizers import train_bpe  # noqa: E402
from tformer.train.losses import label_smoothed_cross_entropy  # noqa: E402
from tformer.train.optim import build_optimizer, inverse_sqrt_learning_rate  # noqa: E402
from tformer.train.trainer import ScoredLogits  # noqa: E402

SPECIALS = ("<pad>", "<s>", "</s>")
PAD, BOS, EOS = 0, 1, 2


def marian(vocab_size: int, max_len: int):
    import transformers

    config = transformers.MarianConfig(
        vocab_size=vocab_size,
        d_model=256,
        encoder_layers=3,
        decoder_layers=3,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=1024,
        decoder_ffn_dim=1024,
        activation_function="relu",
        dropout=0.1,
        attention_dropout=0.0,
        activation_dropout=0.0,
        max_position_embeddings=max_len,
        scale_embedding=True,
        share_encoder_decoder_embeddings=True,
        tie_word_embeddings=True,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
        decoder_start_token_id=BOS,
        forced_eos_token_id=None,
    )
    torch.manual_seed(0)
    return transformers.MarianMTModel(config)


class Contender:
    """A model with a uniform interface for the loop: logits of a batch, its loss,
    translations."""

    def __init__(self, name, model, logits, training_logits, loss, translate_fn):
        self.name, self.model, self.logits = name, model, logits
        self.training_logits = training_logits  # (src, tgt_in, targets) -> logits, targets
        self.loss, self.translate = loss, translate_fn


def transformers_loss(logits, targets):
    """Label-smoothed cross-entropy as transformers computes losses: upcast, then torch's."""
    return torch.nn.functional.cross_entropy(
        logits.float().flatten(0, -2),
        targets.flatten(),
        ignore_index=IGNORE_INDEX,
        label_smoothing=0.1,
    )


def tformer_loss(logits, targets):
    return label_smoothed_cross_entropy(logits, targets, 0.1, IGNORE_INDEX)


def tformer_contender(vocab_size: int, max_len: int, tokenizer, dtype: str) -> Contender:
    config = Seq2SeqConfig.from_preset(
        "small",
        vocab_size,
        vocab_size,
        max_len=max_len,
        share_embeddings=True,
        attention=attention_for("auto", torch.device("cpu")),  # as `tformer train`
    )
    model = Seq2SeqTransformer(config, seed=0)

    def logits(src, tgt_in):
        return model(src, tgt_in)

    scored = ScoredLogits(model)  # what tformer's trainer runs: logits at scored rows only

    def training_logits(src, tgt_in, targets):
        return scored((src, tgt_in), targets)

    def translate_fn(sources, beam):
        config_ = BeamConfig(beam_size=beam, max_new_tokens=max_len - 1) if beam > 1 else None
        return translate(model, tokenizer, sources, config_, 32, max_len - 1)

    return Contender("tformer", model, logits, training_logits, tformer_loss, translate_fn)


def marian_contender(vocab_size: int, max_len: int, tokenizer, dtype: str) -> Contender:
    model = marian(vocab_size, max_len)

    def logits(src, tgt_in):
        return model(input_ids=src, attention_mask=src != PAD, decoder_input_ids=tgt_in).logits

    def training_logits(src, tgt_in, targets):
        return logits(src, tgt_in), targets

    @torch.inference_mode()
    def translate_fn(sources, beam):
        model.eval()
        encoded = [tokenizer.encode(s)[: max_len - 1] + [EOS] for s in sources]
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        results = [""] * len(sources)
        for start in range(0, len(order), 32):
            rows = order[start : start + 32]
            width = max(len(encoded[i]) for i in rows)
            src = torch.full((len(rows), width), PAD, dtype=torch.long)
            for r, i in enumerate(rows):
                src[r, : len(encoded[i])] = torch.tensor(encoded[i])
            out = model.generate(
                input_ids=src,
                attention_mask=src != PAD,
                num_beams=beam,
                do_sample=False,
                max_new_tokens=max_len - 1,
                length_penalty=1.0,
            )
            for r, i in enumerate(rows):
                ids = [t for t in out[r].tolist() if t not in (PAD, BOS, EOS)]
                results[i] = tokenizer.decode(ids)
        model.train()
        return results

    return Contender(
        "transformers Marian", model, logits, training_logits, transformers_loss, translate_fn
    )


class TrainingRun:
    """One contender's training, resumable: the loop runs in slices of wall-clock time."""

    def __init__(self, contender: Contender, data, args, dtype) -> None:
        self.contender, self.data, self.args, self.dtype = contender, data, args, dtype
        self.model = contender.model.train()
        self.optimizer = build_optimizer(self.model, args.lr, 0.01, (0.9, 0.98))
        self.generator = torch.Generator().manual_seed(0)
        self.tokens = self.steps = 0
        self.seconds = 0.0

    def train(self, seconds: float) -> None:
        """Take steps until `seconds` more have passed (the last step may overrun)."""
        args, optimizer = self.args, self.optimizer
        start = time.perf_counter()
        # as tformer's trainer (fit): the weights' bf16 copies kept from step to step (only
        # tformer's layers read them), the gradients clipped inside AdamW's pass
        with kept_between_steps():
            while time.perf_counter() - start < seconds:
                for group in optimizer.param_groups:
                    group["lr"] = inverse_sqrt_learning_rate(self.steps, args.lr, args.warmup)
                batch = self.data.sample(args.batch_size, self.generator)
                src, tgt_in = batch.inputs
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.dtype == "bfloat16"):
                    logits, targets = self.contender.training_logits(src, tgt_in, batch.targets)
                loss = self.contender.loss(logits, targets)
                loss.backward()
                optimizer.step(max_grad_norm=1.0)
                optimizer.zero_grad(set_to_none=True)
                self.tokens += int((batch.targets != IGNORE_INDEX).sum())
                self.steps += 1
        self.seconds += time.perf_counter() - start

    def summary(self) -> dict:
        return {
            "steps": self.steps,
            "train_seconds": round(self.seconds, 1),
            "tokens_per_second": self.tokens / self.seconds,
        }


def train_interleaved(runs: list[TrainingRun], budget: float, slice_seconds: float) -> None:
    """Each run trains `budget` seconds in turns of `slice_seconds`, so that both see the
    same machine: this host's speed drifts by 10-20% over minutes (docs/LOG.md)."""
    while any(run.seconds < budget for run in runs):
        for run in runs:
            if run.seconds < budget:
                run.train(min(slice_seconds, budget - run.seconds))


@torch.inference_mode()
def validation_loss(contender: Contender, data) -> dict:
    model = contender.model.eval()
    total = correct = count = 0.0
    for batch in data.sequential(64):
        logits = contender.logits(*batch.inputs).float()
        scored = batch.targets != IGNORE_INDEX
        total += torch.nn.functional.cross_entropy(
            logits.flatten(0, 1),
            batch.targets.flatten(),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        ).item()
        correct += ((logits.argmax(-1) == batch.targets) & scored).sum().item()
        count += scored.sum().item()
    model.train()
    return {"val_loss": total / count, "val_accuracy": correct / count}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="bible-en-es", help="bible-en-es or number-words")
    parser.add_argument("--budget", type=float, default=300, help="training seconds per model")
    parser.add_argument(
        "--slice", type=float, default=20, help="seconds each model trains before the other's turn"
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--max-len", type=int, default=160)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    print(machine_line(), file=sys.stderr)
    keep_freed_memory()
    dtype = "bfloat16" if bf16_supported(torch.device("cpu")) else "float32"
    corpus = load_parallel(args.data)
    tokenizer = train_bpe([s for p in corpus.train for s in p], args.vocab_size, 2, False, SPECIALS)
    train = ParallelBatches(corpus.train, tokenizer, PAD, BOS, EOS, args.max_len)
    val = ParallelBatches(corpus.val, tokenizer, PAD, BOS, EOS, args.max_len)
    sources = [s for s, _ in corpus.test]
    references = [t for _, t in corpus.test]
    contenders = [
        make(tokenizer.vocab_size, args.max_len, tokenizer, dtype)
        for make in (tformer_contender, marian_contender)
    ]
    runs = [TrainingRun(contender, train, args, dtype) for contender in contenders]
    train_interleaved(runs, args.budget, args.slice)
    rows = []
    for contender, run in zip(contenders, runs, strict=True):
        row = {
            "name": contender.name,
            "parameters": sum(p.numel() for p in contender.model.parameters()),
        }
        row.update(run.summary())
        row.update(validation_loss(contender, val))
        for beam in (1, 4):
            start = time.perf_counter()
            translations = contender.translate(sources, beam)
            seconds = time.perf_counter() - start
            scores = corpus_scores(translations, references)
            produced = sum(len(tokenizer.encode(t)) + 1 for t in translations)
            row[f"beam{beam}"] = {
                "bleu": round(scores["bleu"], 2),
                "chrf": round(scores["chrf"], 2),
                "target_tokens_per_second": round(produced / seconds, 1),
            }
        rows.append(row)
        print(
            f"{row['name']:>20}: {row['parameters']:,} parameters, {row['steps']} steps in "
            f"{row['train_seconds']} s, {row['tokens_per_second']:,.0f} target tok/s | val loss "
            f"{row['val_loss']:.4f} | test BLEU greedy {row['beam1']['bleu']:.2f}, beam 4 "
            f"{row['beam4']['bleu']:.2f} | decoding {row['beam1']['target_tokens_per_second']:,.0f}"
            f" (greedy) / {row['beam4']['target_tokens_per_second']:,.0f} (beam 4) tok/s",
            file=sys.stderr,
        )
    ours, theirs = rows
    ratio = ours["tokens_per_second"] / theirs["tokens_per_second"]
    print(
        f"{args.data}, {args.budget:.0f} s each, {dtype}: training speed ratio {ratio:.2f}x; "
        f"BLEU (beam 4) {ours['beam4']['bleu']:.2f} vs {theirs['beam4']['bleu']:.2f}",
        file=sys.stderr,
    )
    if args.json:
        print(
            json.dumps(
                {
                    "machine": machine_line(),
                    "data": args.data,
                    "dtype": dtype,
                    "budget_seconds": args.budget,
                    "rows": rows,
                    "training_speed_ratio": round(ratio, 2),
                }
            )
        )


if __name__ == "__main__":
    main()
