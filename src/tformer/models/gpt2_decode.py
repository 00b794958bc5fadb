"""GPT-2's decoding step in one call of the C kernels, beside the plain path.

A decoding step feeds one new token per row through every block. Run module by module it
is some fifteen PyTorch calls a block, and at batch 1 on a CPU those calls (each a few
microseconds of Python and dispatch) took about as long as the arithmetic (docs/LOG.md).
When a model is packed for decoding with the C kernels (tformer.generate.fast), such a
step runs in one call instead (kernels/decode_block.c): the token and position embeddings'
sum, then for every block LayerNorm, the packed projections, attention over the KV cache,
GELU and the residual sums, in place on the residual stream, then the final LayerNorm.
The output head after it stays the module's. The plain path (GPT2.features) is the
reference; the tests hold the two together.

The step applies when: the model is pre-LN GPT-2 with residuals, GELU, learned positions
and unscaled token embeddings; every linear layer of its blocks is packed for the kernels;
it is not training; the step has one new token per row; every cache is a KVCache at the
same length with room left; any attention mask is all ones and any positions are the
caches' length (a batch of prompts of one length, as generate_batch passes them); the rows
are no more than the kernels' row limit; no gradient is being recorded; and no forward
hook would see the modules it replaces (hooks see every activation, which the fused step
never materialises). Moving the model (`.to()`) drops the fused step: it holds the
addresses of the packed weights, the embeddings and the norms.
"""

import ctypes

import torch
from torch import nn

from tformer import kernels
from tformer.kernels.bindings import BlockLayout
from tformer.nn.blocked_attention import any_hooked, hook_dicts
from tformer.nn.kv_cache import KVCache, fused_step_caches
from tformer.nn.packed_linear import PackedLinear

GELU_KINDS = {"gelu_tanh": False, "gelu": True}  # -> exact


class FusedDecoding:
    """The blocks of one GPT-2, laid out for kernels/decode_block.c."""

    def __init__(self, model: nn.Module, library) -> None:
        config = model.config
        self.library = library
        self.d_model, self.d_ff, self.heads = config.d_model, config.d_ff, config.n_heads
        self.eps = config.layer_norm_eps
        self.exact_gelu = GELU_KINDS[config.activation]
        first = model.blocks[0]  # every block's layers have these shapes and limits
        self.first_layers = (first.attn.w_qkv, first.attn.w_o, first.mlp.w1, first.mlp.w2)
        layouts = []
        for block in model.blocks:
            norms = (block.attn_sublayer.norm, block.mlp_sublayer.norm)
            linears = [
                layer.layout()
                for layer in (block.attn.w_qkv, block.attn.w_o, block.mlp.w1, block.mlp.w2)
            ]
            layouts.append(
                BlockLayout(
                    norms[0].weight.data_ptr(),
                    norms[0].bias.data_ptr(),
                    norms[1].weight.data_ptr(),
                    norms[1].bias.data_ptr(),
                    *linears,
                )
            )
        self.blocks = (BlockLayout * len(layouts))(*layouts)
        self.embeddings = (model.token_embedding.weight, model.position_embedding.weight)
        self.final_norm = (model.final_norm.weight, model.final_norm.bias)
        # the hooks of the modules whose forward the fused step replaces
        around = (model.token_embedding, model.position_embedding, model.embedding_dropout,
                  model.final_norm)  # fmt: skip
        self.hooks = hook_dicts(
            [m for block in model.blocks for m in block.modules()]
            + [m for module in around for m in module.modules()]
        )

    @classmethod
    def for_model(cls, model: nn.Module) -> "FusedDecoding | None":
        """The fused step for a model packed for the kernels, or None where it cannot run."""
        config = model.config
        if config.norm_position != "pre" or not config.residual:
            return None
        if config.activation not in GELU_KINDS:
            return None
        if config.scale_embeddings or config.positions != "learned":
            return None  # the kernel sums the two tables' rows as they are
        tables = (model.token_embedding.weight, model.position_embedding.weight,
                  model.final_norm.weight, model.final_norm.bias)  # fmt: skip
        if any(t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous()
               for t in tables):  # fmt: skip
            return None
        library = kernels.load()
        if library is None:
            return None
        for block in model.blocks:
            layers = (block.attn.w_qkv, block.attn.w_o, block.mlp.w1, block.mlp.w2)
            if not all(isinstance(layer, PackedLinear) and layer.panels is not None
                       for layer in layers):  # fmt: skip
                return None
            norms = (block.attn_sublayer.norm, block.mlp_sublayer.norm)
            if any(norm.weight.dtype != torch.float32 or norm.weight.device.type != "cpu"
                   for norm in norms):  # fmt: skip
                return None
        return cls(model, library)

    def applies(
        self,
        model: nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        caches: list | None,
    ) -> bool:
        if caches is None or model.training or input_ids.shape[1] != 1:
            return False
        if getattr(caches[0], "paths", None) is not None:  # its kernel reads slot b for row b
            return False
        if input_ids.device.type != "cpu" or torch.is_grad_enabled():
            return False  # the kernels read CPU memory and compute no gradients
        if any(input_ids.shape[0] > layer.kernel_max_rows for layer in self.first_layers):
            return False  # calibrated beyond: torch's matmul is faster for this many rows
        if not fused_step_caches(caches, input_ids.shape[0], self.heads,
                                 self.d_model // self.heads):  # fmt: skip
            return False
        first = caches[0]
        # a batch of prompts of one length: a mask of ones and the positions that follow
        if attention_mask is not None and not bool(attention_mask.all()):
            return False
        if position_ids is not None and not bool((position_ids == first.length).all()):
            return False
        return not any_hooked(self.hooks)

    def features(self, model: nn.Module, input_ids: torch.Tensor, caches: list[KVCache]):
        """input_ids (B, 1) -> the final, normalised residual stream (B, 1, C)."""
        past = caches[0].length
        ids = input_ids
        if ids.dtype != torch.int64 or not ids.is_contiguous():
            ids = ids.to(torch.int64).contiguous()
        x = torch.empty(ids.shape[0], self.d_model)
        work = torch.empty(ids.shape[0], 6 * self.d_model + self.d_ff)
        keys = (ctypes.c_void_p * len(caches))(*(cache.k.data_ptr() for cache in caches))
        values = (ctypes.c_void_p * len(caches))(*(cache.v.data_ptr() for cache in caches))
        self.library.decode_step(
            self.blocks, ids, self.embeddings, self.final_norm, x, work, keys, values, past,
            self.d_ff, self.heads, caches[0].max_len, self.eps, self.exact_gelu,
        )  # fmt: skip
        for cache in caches:
            cache.length = past + 1
        return x[:, None]
