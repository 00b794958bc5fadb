"""Text generation: samplers and cached decoding, outside the model."""

from tformer.generate.decode import (
    SamplingConfig,
    generate,
    generate_batch,
    generate_ids,
    left_pad,
    stream_tokens,
)
from tformer.generate.fast import DecodingPath, decoding_path, pack_for_decoding
from tformer.generate.sampling import (
    apply_temperature,
    greedy,
    repetition_penalty,
    sample,
    top_k_filter,
    top_p_filter,
)

__all__ = [
    "DecodingPath",
    "decoding_path",
    "pack_for_decoding",
    "SamplingConfig",
    "apply_temperature",
    "generate",
    "generate_batch",
    "left_pad",
    "generate_ids",
    "greedy",
    "repetition_penalty",
    "sample",
    "stream_tokens",
    "top_k_filter",
    "top_p_filter",
]
