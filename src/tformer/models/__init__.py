"""Models assembled from the building blocks in tformer.nn."""

from tformer.models.gpt2 import GPT2, PRESETS, GPT2Config

__all__ = ["GPT2", "GPT2Config", "PRESETS"]
