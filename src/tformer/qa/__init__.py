"""Question answering: extract the answer to a question from a text (SQuAD-style).

`squad` reads SQuAD JSON and JSONL; `windows` cuts long contexts into overlapping windows
and finds the best span; `metrics` scores answers with SQuAD's exact match and F1. The
reader model is tformer.models.gpt2_qa.GPT2ForQuestionAnswering.
"""

from tformer.qa.metrics import exact_match, f1, normalize_answer, squad_scores
from tformer.qa.squad import read_qa_file
from tformer.qa.windows import Answer, Prediction, QAExample, Window, best_answer, make_windows

__all__ = [
    "Answer",
    "Prediction",
    "QAExample",
    "Window",
    "best_answer",
    "exact_match",
    "f1",
    "make_windows",
    "normalize_answer",
    "read_qa_file",
    "squad_scores",
]
