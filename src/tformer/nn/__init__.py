"""Transformer building blocks, one concept per module."""

from tformer.nn.attention import (
    MultiHeadAttention,
    attention_weights,
    causal_mask,
    explicit_attention,
    fused_attention,
)
from tformer.nn.blocked_attention import blocked_causal_attention
from tformer.nn.dropout import Dropout, dropout
from tformer.nn.embedding import (
    LearnedPositionalEmbedding,
    SinusoidalPositionalEncoding,
    TokenEmbedding,
    sinusoidal_table,
)
from tformer.nn.feedforward import FeedForward
from tformer.nn.hooks import HookPoint
from tformer.nn.kv_cache import KVCache
from tformer.nn.norm import LayerNorm
from tformer.nn.sublayer import SublayerConnection

__all__ = [
    "Dropout",
    "FeedForward",
    "HookPoint",
    "KVCache",
    "LayerNorm",
    "LearnedPositionalEmbedding",
    "MultiHeadAttention",
    "SinusoidalPositionalEncoding",
    "SublayerConnection",
    "TokenEmbedding",
    "attention_weights",
    "blocked_causal_attention",
    "causal_mask",
    "dropout",
    "explicit_attention",
    "fused_attention",
    "sinusoidal_table",
]
