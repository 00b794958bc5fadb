"""Question answering: extract the answer to a question from a text (SQuAD-style)."""

from tformer.qa.metrics import exact_match, f1, normalize_answer, squad_scores

__all__ = ["exact_match", "f1", "normalize_answer", "squad_scores"]
