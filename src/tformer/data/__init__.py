"""Training text: reading sources, the built-in corpus, tokenised memory-mapped arrays."""

from tformer.data.sources import load_corpus, read_source, split_text
from tformer.data.tokens import LMBatches, tokenize_cached

__all__ = ["LMBatches", "load_corpus", "read_source", "split_text", "tokenize_cached"]
