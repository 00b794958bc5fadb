"""The trainer trains the reader: a toy task where the answer is the one capital letter."""

import random

import torch

from tformer import CharTokenizer, GPT2Config
from tformer.models.gpt2_qa import GPT2ForQuestionAnswering
from tformer.qa import Answer, QAExample, best_answer, make_windows, squad_scores
from tformer.qa.batches import QABatches
from tformer.train import TrainConfig, fit

LOWER = "abcdefghijklmnopqrstuvwxyz"


def examples(n, seed):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        letters = [rng.choice(LOWER) for _ in range(rng.randint(8, 20))]
        where = rng.randrange(len(letters))
        letters[where] = letters[where].upper()
        context = "".join(letters)
        out.append(QAExample(f"{seed}-{i}", "?", context, [Answer(context[where], where)]))
    return out


def test_fit_trains_a_reader_that_finds_the_answers():
    tok = CharTokenizer.from_text(LOWER + LOWER.upper() + "?|#")
    sep, null = tok.encode("|")[0], tok.encode("#")[0]
    config = GPT2Config(
        vocab_size=tok.vocab_size, max_len=16, d_model=32, n_layers=2, n_heads=2, dropout=0.0
    )
    model = GPT2ForQuestionAnswering(config, seed=0)

    def windows(exs):
        return [w for e in exs for w in make_windows(tok, e, 16, 4, sep, null)]

    train, val = examples(400, seed=1), examples(60, seed=2)
    train_data, val_data = QABatches(windows(train), sep), QABatches(windows(val), sep)
    settings = dict(batch_size=16, lr=3e-3, min_lr=3e-4, warmup_steps=10, eval_every=100)
    history = fit(model, train_data, val_data, TrainConfig(steps=300, **settings), progress=False)
    evals = [r for r in history if r["type"] == "eval"]
    assert evals[-1]["val_loss"] < 0.5 * evals[0]["val_loss"]

    model.eval()
    predictions = []
    for example in val:
        ws = make_windows(tok, example, 16, 4, sep, null)
        batch = QABatches(ws, sep).collate(ws)
        with torch.no_grad():
            logits = model(*batch.inputs)
        prediction = best_answer(ws, list(logits), example.context, max_answer_tokens=1)
        predictions.append((prediction.text, [a.text for a in example.answers]))
    assert squad_scores(predictions)["exact_match"] > 80
