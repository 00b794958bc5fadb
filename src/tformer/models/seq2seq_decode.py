"""The encoder-decoder's decoding step in one call of the C kernels, beside the plain path.

A decoding step feeds one new target token per row through every decoder layer: run
module by module it is some twenty PyTorch calls a layer (three sublayers, their norms,
sums, the cache), which for a model of the `small` preset at batch 32 took about half of a
step (docs/LOG.md). When the model is packed for decoding with the C kernels
(tformer.generate.fast), the layers of such a step run in one call instead
(kernels/decode_block.c, tformer_decode_cross_blocks): self-attention over the KV cache,
cross-attention over the memory's keys and values (computed once per sentence), the
feed-forward part, the post-LN norms and the residual sums, in place on the residual
stream. The embedding before it and the output projection after it stay the modules'. The
plain path (DecoderLayer.forward) is the reference; the tests hold the two together.

The output projection (the tied target embedding) is packed too and runs in the kernels
whenever no gradient is recorded (Seq2SeqTransformer.unembed).

The step applies when: the model is post-LN with residuals and ReLU or GELU; every linear
layer of its decoder is packed for the kernels; it is not training and records no
gradient; the step has one new token per row; every cache is a KVCache at the same length
with room left; the memory's keys and values are given (project_memory) in float32 with
d contiguous, one row per target row or per group of them (a sentence's beams); the rows
are no more than the kernels' row limit; and no forward hook would see a decoder layer's
modules. Moving the model (`.to()`) drops the fused step: it holds
the addresses of the packed weights.
"""

import ctypes

import torch
from torch import nn

from tformer import kernels
from tformer.kernels.bindings import CrossBlockLayout
from tformer.nn.blocked_attention import any_hooked, hook_dicts
from tformer.nn.kv_cache import KVCache, fused_step_caches
from tformer.nn.packed_linear import PackedLinear

ACTIVATIONS = {"relu": 0, "gelu_tanh": 1, "gelu": 2}  # decode_block.c's enum activation


def _layers(layer: nn.Module) -> tuple:
    """A decoder layer's six linear layers, in CrossBlockLayout's order."""
    return (layer.self_attn.w_qkv, layer.self_attn.w_o, layer.cross_attn.w_q,
            layer.cross_attn.w_o, layer.mlp.w1, layer.mlp.w2)  # fmt: skip


def _norms(layer: nn.Module) -> tuple:
    return (layer.self_attn_sublayer.norm, layer.cross_attn_sublayer.norm,
            layer.mlp_sublayer.norm)  # fmt: skip


class FusedCrossDecoding:
    """The decoder layers of one encoder-decoder, laid out for kernels/decode_block.c."""

    def __init__(self, model: nn.Module, library) -> None:
        config = model.config
        self.library = library
        self.d_model, self.d_ff, self.heads = config.d_model, config.d_ff, config.n_heads
        self.eps = config.layer_norm_eps
        self.activation = ACTIVATIONS[config.activation]
        self.first_layers = _layers(model.decoder_layers[0])
        # The output projection x E^T, packed as the layers are (int4 models keep it in 8
        # bits, as GPT-2's head: int8, or w8a8 for w4a8): at a step's 32-128 rows the kernels
        # run it ~1.5x as fast as torch's matmul (docs/LOG.md). Not a module of the model:
        # its state is unchanged.
        weights = self.first_layers[0].weight_dtype
        head = {"int4": "int8", "w4a8": "w8a8"}.get(weights, weights)
        self.head = PackedLinear(model.tgt_embedding.weight.detach(), None, head)
        layouts = []
        for layer in model.decoder_layers:
            norms = [p.data_ptr() for norm in _norms(layer) for p in (norm.weight, norm.bias)]
            linears = [linear.layout() for linear in _layers(layer)]
            layouts.append(CrossBlockLayout(*norms, *linears))
        self.blocks = (CrossBlockLayout * len(layouts))(*layouts)
        self.hooks = hook_dicts(m for layer in model.decoder_layers for m in layer.modules())

    @classmethod
    def for_model(cls, model: nn.Module) -> "FusedCrossDecoding | None":
        """The fused step for a model packed for the kernels, or None where it cannot run."""
        config = model.config
        if config.norm_position != "post" or not config.residual:
            return None
        if config.activation not in ACTIVATIONS or not len(model.decoder_layers):
            return None
        library = kernels.load()
        if library is None:
            return None
        for layer in model.decoder_layers:
            if not all(isinstance(linear, PackedLinear) and linear.panels is not None
                       for linear in _layers(layer)):  # fmt: skip
                return None
            if any(norm.weight.dtype != torch.float32 or norm.weight.device.type != "cpu"
                   for norm in _norms(layer)):  # fmt: skip
                return None
        return cls(model, library)

    def applies(
        self,
        model: nn.Module,
        tgt_ids: torch.Tensor,
        src_mask: torch.Tensor,
        caches: list | None,
        memory_kvs: list | None,
    ) -> bool:
        if caches is None or memory_kvs is None or model.training or tgt_ids.shape[1] != 1:
            return False
        if tgt_ids.device.type != "cpu" or torch.is_grad_enabled():
            return False  # the kernels read CPU memory and compute no gradients
        if any(tgt_ids.shape[0] > layer.kernel_max_rows for layer in self.first_layers):
            return False  # calibrated beyond: torch's matmul is faster for this many rows
        b = tgt_ids.shape[0]
        if src_mask is None or src_mask.dtype != torch.bool or src_mask.dim() != 2:
            return False
        sentences = src_mask.shape[0]  # each read by b / sentences consecutive rows
        if sentences == 0 or b % sentences != 0 or not src_mask.is_contiguous():
            return False
        if not fused_step_caches(caches, b, self.heads, self.d_model // self.heads):
            return False
        memory_shape = (sentences, self.heads, src_mask.shape[1], self.d_model // self.heads)
        strides = memory_kvs[0][0].stride()
        for keys, values in memory_kvs:  # one layout for all: one set of strides
            for tensor in (keys, values):
                if tuple(tensor.shape) != memory_shape or tensor.dtype != torch.float32:
                    return False
                if tensor.device.type != "cpu" or tensor.stride() != strides:
                    return False
        if strides[3] != 1:
            return False
        return not any_hooked(self.hooks)

    def features(
        self,
        model: nn.Module,
        tgt_ids: torch.Tensor,
        src_mask: torch.Tensor,
        caches: list[KVCache],
        memory_kvs: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> torch.Tensor:
        """tgt_ids (B, 1) -> the decoder's output (B, 1, C), after its final norm."""
        past = caches[0].length
        x = model.embed(model.tgt_embedding, tgt_ids, past)[:, 0].contiguous()  # (B, C)
        positions = torch.full((x.shape[0],), past, dtype=torch.int64)
        work = torch.empty(x.shape[0], 5 * self.d_model + self.d_ff)
        pointers = ctypes.c_void_p * len(caches)
        keys = pointers(*(cache.k.data_ptr() for cache in caches))
        values = pointers(*(cache.v.data_ptr() for cache in caches))
        memory_k = pointers(*(k.data_ptr() for k, _ in memory_kvs))
        memory_v = pointers(*(v.data_ptr() for _, v in memory_kvs))
        strides = torch.tensor(memory_kvs[0][0].stride()[:3], dtype=torch.int64)
        self.library.decode_cross_blocks(
            self.blocks, x, work, keys, values, positions, caches[0].paths, memory_k, memory_v,
            strides, src_mask, self.d_ff, self.heads, caches[0].max_len, self.eps,
            self.activation,
        )  # fmt: skip
        for cache in caches:
            cache.length = past + 1
        return model.decoder_norm(x)[:, None]
