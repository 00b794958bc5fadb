"""The trainer trains the reader: a toy task where the answer is the one capital letter."""

import random

from tformer import CharTokenizer, GPT2Config
from tformer.models.gpt2_qa import GPT2ForQuestionAnswering
from tformer.qa import Answer, QAExample, make_windows, squad_scores
from tformer.qa.batches import QABatches
from tformer.qa.read import answer
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
    tok = CharTokenizer.from_text(LOWER + LOWER.upper() + "?\n")
    sep = null = tok.encode("\n")[0]  # as tformer.qa.read.marker_tokens picks them
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

    predictions = answer(model, tok, val, max_len=16, stride=4, max_answer_tokens=1)
    pairs = [(p.text, [a.text for a in e.answers]) for p, e in zip(predictions, val, strict=True)]
    assert squad_scores(pairs)["exact_match"] > 80
