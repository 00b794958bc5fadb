"""Text generation: samplers and cached decoding, outside the model."""

from tformer.generate.decode import (
    Continuation,
    SamplingConfig,
    continue_batch,
    continue_prompts,
    generate,
    generate_batch,
    generate_ids,
    left_pad,
    stream_tokens,
)
from tformer.generate.fast import DecodingPath, decoding_path, pack_for_decoding
from tformer.generate.limits import TruncationWarning
from tformer.generate.sampling import (
    apply_temperature,
    greedy,
    mask_beyond,
    repetition_penalty,
    sample,
    top_k_filter,
    top_p_filter,
)

__all__ = [
    "Continuation",
    "TruncationWarning",
    "continue_batch",
    "continue_prompts",
    "mask_beyond",
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
