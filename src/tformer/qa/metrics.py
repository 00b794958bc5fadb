"""SQuAD's exact match and F1 (Rajpurkar et al., 2016; 2018), as the official scripts count.

Both compare answers after the same normalisation: lower case, punctuation removed, the
articles "a", "an", "the" removed as whole words, whitespace collapsed. Then

    EM = [norm(prediction) == norm(gold)]
    F1 = 2 P R / (P + R),   P = |common| / |prediction tokens|,  R = |common| / |gold tokens|

with tokens split on whitespace and |common| the size of the multiset intersection (a token
counts as often as it occurs in both). A question scores its best over the gold answers;
a data set scores 100 x the mean over its questions. SQuAD 2.0 adds questions without an
answer: their only gold answer is the empty string, and then, as in the official script,
F1 is 1 if both prediction and gold are empty and 0 if only one is. As there too, gold
answers that normalise to nothing ("the") are dropped first.
"""

import re
import string
from collections import Counter
from collections.abc import Iterable, Sequence

ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces: 'The U.S. Army!' -> 'us army'."""
    text = "".join(ch for ch in text.lower() if ch not in PUNCTUATION)
    return " ".join(ARTICLES.sub(" ", text).split())


def gold_answers(golds: Sequence[str]) -> list[str]:
    """The golds that say something after normalisation (the official SQuAD 2.0 script drops
    the others), or [""] for a question without an answer."""
    return [g for g in golds if normalize_answer(g)] or [""]


def exact_match(prediction: str, golds: Sequence[str]) -> float:
    """1.0 if the prediction equals some gold answer after normalisation; no golds: a
    question without an answer, matched by the empty prediction."""
    return float(
        any(normalize_answer(prediction) == normalize_answer(g) for g in gold_answers(golds))
    )


def f1(prediction: str, golds: Sequence[str]) -> float:
    """The best token-overlap F1 of the prediction against the gold answers."""
    return max(_f1(prediction, gold) for gold in gold_answers(golds))


def _f1(prediction: str, gold: str) -> float:
    predicted, expected = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not predicted or not expected:  # a no-answer on either side
        return float(predicted == expected)
    common = sum((Counter(predicted) & Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def squad_scores(pairs: Iterable[tuple[str, Sequence[str]]]) -> dict[str, float]:
    """{'exact_match', 'f1'} in percent over (prediction, gold answers) pairs, and their count."""
    ems, f1s = [], []
    for prediction, golds in pairs:
        ems.append(exact_match(prediction, golds))
        f1s.append(f1(prediction, golds))
    if not ems:
        raise ValueError("no questions to score")
    return {
        "exact_match": 100.0 * sum(ems) / len(ems),
        "f1": 100.0 * sum(f1s) / len(f1s),
        "count": len(ems),
    }
