"""The encoder-decoder as a Hugging Face Marian model (transformers' MarianMTModel), both ways.

MarianMTModel is the post-LN Transformer of tformer.models.seq2seq: sinusoidal positions,
embeddings times sqrt(C), tied output embedding. Where the two differ it is in conventions,
and each is handled here so that the same weights compute the same logits:

- Positions. Marian's table puts every sine first, then every cosine,
      M(pos, i) = sin(pos / 10000^(2i/C)),   M(pos, ceil(C/2) + i) = cos(pos / 10000^(2i/C)),
  where tformer interleaves them (PE(pos, 2i) = sin, PE(pos, 2i+1) = cos). So M = PE P for
  the permutation P = [0, 2, 4, ..., 1, 3, 5, ...] of the C features, and the two models
  are one model with its residual stream's features reordered: every matrix that reads the
  stream is permuted along its input (W[:, P]), every one that writes it along its output
  (W[P, :], b[P]), LayerNorm's gamma and beta and the embeddings' columns along with them.
- The decoder's first input. Marian starts the decoder from the padding token, whose
  embedding is zero (CTranslate2 starts "from a zero embedding" whatever the file holds);
  tformer from <s>'s. The tables are stored in the file and both engines read them, so
  the export adds sqrt(C) E[<s>] to row 0 of the decoder's table, and the import takes it
  back out into the start token's embedding. transformers' own save_pretrained leaves the
  tables out (it computes them): a directory exported here and saved again by transformers
  has lost its start embedding and translates differently. Convert the exported directory.
- The padding token. Marian's is the last id, the decoder's start, and CTranslate2 drops
  that last row: the export moves tformer's pad to the end (the vocabulary and its
  tokenizer renumbered), its embedding zero.
- The output bias (final_logits_bias): Marian has one; tformer's output is E x alone. The
  export writes zeros and -inf at the padding token, which is never an output (tformer's
  decoding masks it, tformer.generate.beam); the import refuses any other bias.
- LayerNorm's epsilon is 1e-5 in transformers' Marian code, and its layers have no pre-LN
  option, no ReLU-free residual-free variant: those tformer models are refused.

Activations: relu, gelu (erf) and gelu_tanh (Marian's "gelu_pytorch_tanh"; "gelu_new" and
"gelu_fast" read back as gelu_tanh). Marian's own default, swish, is refused on import.
This module works on tensors and plain dicts; tformer.models.seq2seq builds the model.
"""

import json
import math

import torch

from tformer.checkpoints import CheckpointError
from tformer.nn.embedding import sinusoidal_table

MODEL_TYPE = "marian"
ARCHITECTURE = "MarianMTModel"
LAYER_NORM_EPS = 1e-5  # transformers' MarianEncoderLayer and MarianDecoderLayer
# tformer's activation -> Marian's activation_function, and back (with Marian's aliases)
ACTIVATION_OUT = {"relu": "relu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}
ACTIVATION_IN = {
    "relu": "relu",
    "gelu": "gelu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
}
POSITION_TOLERANCE = 1e-5  # a stored position table that is the sinusoids (float rounding)


def check_marian_writable(config) -> None:
    """Refuse, with the reason, a Seq2SeqConfig that Marian's layers cannot compute."""
    if config.norm_position != "post":
        raise ValueError(
            f"norm_position={config.norm_position!r}: transformers' Marian layers are post-LN "
            "only (LayerNorm after each residual sum); only a post-LN model exports"
        )
    if not config.residual:
        raise ValueError("residual=False: Marian's layers always add the residual")
    if config.activation not in ACTIVATION_OUT:
        raise ValueError(
            f"activation {config.activation!r}: Marian computes {', '.join(ACTIVATION_OUT)}"
        )
    if config.src_vocab_size != config.tgt_vocab_size:
        raise ValueError(
            f"src_vocab_size {config.src_vocab_size} != tgt_vocab_size {config.tgt_vocab_size}: "
            "Marian's two vocabularies have one padding id, the last of each"
        )
    if abs(config.layer_norm_eps - LAYER_NORM_EPS) > 1e-12:
        raise ValueError(
            f"layer_norm_eps={config.layer_norm_eps}: Marian's LayerNorm epsilon is fixed at "
            f"{LAYER_NORM_EPS}"
        )


def feature_order(d_model: int) -> torch.Tensor:
    """P: Marian's feature j is tformer's feature P[j] (sines first, then cosines)."""
    return torch.cat([torch.arange(0, d_model, 2), torch.arange(1, d_model, 2)])


def vocabulary_order(vocab_size: int, pad_id: int) -> list[int]:
    """Marian's id -> tformer's: every id in order, the padding token moved to the end."""
    return [i for i in range(vocab_size) if i != pad_id] + [pad_id]


def _sublayer_names(kind: str) -> list[tuple[str, str, str]]:
    """(tformer's module, Marian's module, how it meets the stream) for one layer's parts:
    'in' reads the residual stream, 'out' writes it, 'norm' is a LayerNorm on it."""
    if kind == "encoder":
        return [
            ("attn_sublayer.norm", "self_attn_layer_norm", "norm"),
            ("self_attn.w_o", "self_attn.out_proj", "out"),
            ("mlp.w1", "fc1", "in"),
            ("mlp.w2", "fc2", "out"),
            ("mlp_sublayer.norm", "final_layer_norm", "norm"),
        ]
    return [
        ("self_attn_sublayer.norm", "self_attn_layer_norm", "norm"),
        ("self_attn.w_o", "self_attn.out_proj", "out"),
        ("cross_attn.w_q", "encoder_attn.q_proj", "in"),
        ("cross_attn.w_o", "encoder_attn.out_proj", "out"),
        ("cross_attn_sublayer.norm", "encoder_attn_layer_norm", "norm"),
        ("mlp.w1", "fc1", "in"),
        ("mlp.w2", "fc2", "out"),
        ("mlp_sublayer.norm", "final_layer_norm", "norm"),
    ]


def _stacked(kind: str) -> list[tuple[str, list[str]]]:
    """tformer's stacked projections and the Marian matrices they hold, in order."""
    names = [("self_attn.w_qkv", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"])]
    if kind == "decoder":
        names.append(("cross_attn.w_kv", ["encoder_attn.k_proj", "encoder_attn.v_proj"]))
    return names


def _layer_count(state: dict, prefix: str) -> int:
    found = {int(k[len(prefix) :].split(".")[0]) for k in state if k.startswith(prefix)}
    return max(found) + 1 if found else 0


def to_marian(config, state: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
    """A tformer encoder-decoder's config and state dict -> Marian's config.json fields and
    tensors (by transformers' names; the tied embeddings stored once)."""
    check_marian_writable(config)
    c = config
    order = feature_order(c.d_model)
    src_ids = vocabulary_order(c.src_vocab_size, c.pad_id)
    tgt_ids = vocabulary_order(c.tgt_vocab_size, c.pad_id)
    out: dict[str, torch.Tensor] = {}

    def embedding(weight: torch.Tensor, ids: list[int]) -> torch.Tensor:
        marian = weight[ids][:, order].contiguous()
        marian[-1] = 0.0  # the padding token, Marian's decoder start: a zero embedding
        return marian

    tgt = embedding(state["tgt_embedding.weight"], tgt_ids)
    if c.share_embeddings:
        out["model.shared.weight"] = tgt
    else:
        out["model.encoder.embed_tokens.weight"] = embedding(state["src_embedding.weight"], src_ids)
        out["model.decoder.embed_tokens.weight"] = tgt
    table = sinusoidal_table(c.max_len, c.d_model)[:, order]
    out["model.encoder.embed_positions.weight"] = table.clone()
    start = state["tgt_embedding.weight"][c.bos_id][order] * math.sqrt(c.d_model)
    decoder_table = table.clone()
    decoder_table[0] = start + table[0]  # tformer's order of the sum: E sqrt(C) + PE
    out["model.decoder.embed_positions.weight"] = decoder_table
    bias = torch.zeros(1, c.tgt_vocab_size)
    bias[0, -1] = float("-inf")
    out["final_logits_bias"] = bias

    for kind, count in (("encoder", c.n_encoder_layers), ("decoder", c.n_decoder_layers)):
        for i in range(count):
            ours, theirs = f"{kind}_layers.{i}.", f"model.{kind}.layers.{i}."
            for stacked, parts in _stacked(kind):
                weight = state[ours + stacked + ".weight"]
                bias_ = state.get(ours + stacked + ".bias")
                for j, part in enumerate(parts):
                    rows = slice(j * c.d_model, (j + 1) * c.d_model)
                    out[theirs + part + ".weight"] = weight[rows][:, order].contiguous()
                    out[theirs + part + ".bias"] = (
                        bias_[rows].clone() if bias_ is not None else torch.zeros(c.d_model)
                    )
            for mine, marian, meets in _sublayer_names(kind):
                weight = state[ours + mine + ".weight"]
                bias_ = state.get(ours + mine + ".bias")
                if bias_ is None:
                    bias_ = torch.zeros(weight.shape[0])
                if meets == "in":
                    weight, bias_ = weight[:, order], bias_
                else:  # 'out' and 'norm': along the stream
                    weight, bias_ = weight[order], bias_[order]
                out[theirs + marian + ".weight"] = weight.contiguous()
                out[theirs + marian + ".bias"] = bias_.contiguous()

    fields = {
        "architectures": [ARCHITECTURE],
        "model_type": MODEL_TYPE,
        "vocab_size": c.src_vocab_size,
        "decoder_vocab_size": c.tgt_vocab_size,
        "share_encoder_decoder_embeddings": c.share_embeddings,
        "tie_word_embeddings": True,
        "d_model": c.d_model,
        "encoder_layers": c.n_encoder_layers,
        "decoder_layers": c.n_decoder_layers,
        "encoder_attention_heads": c.n_heads,
        "decoder_attention_heads": c.n_heads,
        "encoder_ffn_dim": c.d_ff,
        "decoder_ffn_dim": c.d_ff,
        "activation_function": ACTIVATION_OUT[c.activation],
        "max_position_embeddings": c.max_len,
        "scale_embedding": True,
        "dropout": c.dropout,
        "attention_dropout": c.attention_dropout,
        "activation_dropout": 0.0,
        "pad_token_id": c.tgt_vocab_size - 1,
        "decoder_start_token_id": c.tgt_vocab_size - 1,
        "eos_token_id": tgt_ids.index(c.eos_id),
        "bos_token_id": tgt_ids.index(c.bos_id),
        "forced_eos_token_id": None,
        "is_encoder_decoder": True,
    }
    return fields, out


def generation_fields(fields: dict) -> dict:
    """generation_config.json for a Marian directory: start, end, padding and length as the
    model has them, and nothing forced (tformer's decoding forces no end token)."""
    return {
        "decoder_start_token_id": fields["decoder_start_token_id"],
        "eos_token_id": fields["eos_token_id"],
        "pad_token_id": fields["pad_token_id"],
        "forced_eos_token_id": None,
        "max_length": fields["max_position_embeddings"],
        "num_beams": 1,
    }


def is_marian(saved: dict) -> bool:
    """Whether a config.json is a Marian model's."""
    return saved.get("model_type") == MODEL_TYPE or ARCHITECTURE in (
        saved.get("architectures") or []
    )


def _field(saved: dict, name: str, where: str):
    if saved.get(name) is None:
        raise CheckpointError(f"{where}: config.json has no {name}")
    return saved[name]


def config_fields_from_marian(saved: dict, where: str) -> dict:
    """A Marian config.json -> the Seq2SeqConfig fields of the same model, or
    CheckpointError naming what tformer's model cannot compute."""
    activation = saved.get("activation_function", "swish")  # MarianConfig's default
    if activation not in ACTIVATION_IN:
        raise CheckpointError(
            f"{where}: activation_function {activation!r}; tformer's feed-forward computes "
            f"{', '.join(ACTIVATION_IN)}"
        )
    if not saved.get("scale_embedding", False):
        raise CheckpointError(
            f"{where}: scale_embedding is false; tformer's embeddings are scaled by sqrt(d_model)"
        )
    for name in ("attention_heads", "ffn_dim"):
        a, b = saved.get(f"encoder_{name}"), saved.get(f"decoder_{name}")
        if a != b:
            raise CheckpointError(
                f"{where}: encoder_{name} {a} != decoder_{name} {b}; tformer's encoder and "
                "decoder have one width"
            )
    if saved.get("normalize_before") or saved.get("normalize_embedding"):
        raise CheckpointError(f"{where}: pre-LN or an embedding LayerNorm, not Marian's layers")
    vocab = int(_field(saved, "vocab_size", where))
    shared = bool(saved.get("share_encoder_decoder_embeddings", True))
    target = vocab if shared else int(saved.get("decoder_vocab_size") or vocab)
    start = int(_field(saved, "decoder_start_token_id", where))
    return {
        "src_vocab_size": vocab,
        "tgt_vocab_size": target,
        "max_len": int(_field(saved, "max_position_embeddings", where)),
        "d_model": int(_field(saved, "d_model", where)),
        "n_heads": int(_field(saved, "encoder_attention_heads", where)),
        "n_encoder_layers": int(_field(saved, "encoder_layers", where)),
        "n_decoder_layers": int(_field(saved, "decoder_layers", where)),
        "d_ff": int(_field(saved, "encoder_ffn_dim", where)),
        "dropout": float(saved.get("dropout", 0.1)),
        "attention_dropout": float(saved.get("attention_dropout", 0.0)),
        "activation": ACTIVATION_IN[activation],
        "norm_position": "post",
        "residual": True,
        "layer_norm_eps": LAYER_NORM_EPS,
        "share_embeddings": shared,
        "pad_id": int(saved.get("pad_token_id", start)),
        "bos_id": start,  # the decoder's start: Marian's padding token
        "eos_id": int(_field(saved, "eos_token_id", where)),
    }


def from_marian(
    fields: dict, tensors: dict[str, torch.Tensor], where: str
) -> dict[str, torch.Tensor]:
    """Marian's tensors (MarianMTModel's names, or MarianModel's without `model.`) -> the
    state dict of the tformer model with Seq2SeqConfig `fields` (config_fields_from_marian)."""
    if not any(k.startswith("model.") for k in tensors):
        tensors = {("model." + k if k != "final_logits_bias" else k): v for k, v in tensors.items()}
    c = fields
    d = c["d_model"]
    order = feature_order(d)
    back = torch.argsort(order)  # tformer's feature i is Marian's back[i]

    def get(name: str) -> torch.Tensor:
        if name not in tensors:
            raise CheckpointError(f"{where}: the Marian weights have no {name}")
        return tensors[name].float()

    shared = tensors.get("model.shared.weight")
    src = tensors.get("model.encoder.embed_tokens.weight", shared)
    tgt = tensors.get("model.decoder.embed_tokens.weight", shared)
    if src is None or tgt is None:
        raise CheckpointError(f"{where}: the Marian weights have no token embeddings")
    head = tensors.get("lm_head.weight")
    if head is not None and not torch.equal(head.float(), tgt.float()):
        raise CheckpointError(
            f"{where}: lm_head differs from the decoder's embedding; tformer's output "
            "projection is the target embedding (tied)"
        )
    if c["share_embeddings"] and not torch.equal(src.float(), tgt.float()):
        raise CheckpointError(f"{where}: share_encoder_decoder_embeddings, but two embeddings")
    bias = tensors.get("final_logits_bias")
    if bias is not None:
        bias = bias.float().flatten()
        other = torch.ones_like(bias, dtype=torch.bool)
        other[c["bos_id"]] = False  # -inf there: the start token is never an output
        start_bias = float(bias[c["bos_id"]])
        if bool((bias[other] != 0).any()) or start_bias not in (0.0, float("-inf")):
            raise CheckpointError(
                f"{where}: a non-zero final_logits_bias; tformer's output is the tied "
                "embedding alone, with no bias"
            )

    standard = sinusoidal_table(c["max_len"], d)[:, order]  # Marian's layout
    start = torch.zeros(d)
    for kind in ("encoder", "decoder"):
        table = tensors.get(f"model.{kind}.embed_positions.weight")
        if table is None:
            continue  # transformers does not save it: its sinusoids, computed
        table = table.float()
        if table.shape != standard.shape:
            raise CheckpointError(
                f"{where}: {kind} position table {tuple(table.shape)}, expected "
                f"{tuple(standard.shape)} (max_position_embeddings x d_model)"
            )
        first = 1 if kind == "decoder" else 0  # the decoder's row 0 may hold its start
        if not torch.allclose(table[first:], standard[first:], atol=POSITION_TOLERANCE, rtol=0):
            raise CheckpointError(f"{where}: the {kind}'s position table is not the sinusoids")
        if kind == "decoder":
            start = table[0] - standard[0]  # sqrt(C) x the start token's own embedding

    if bool(start.any()) and c["bos_id"] != c["pad_id"]:
        raise CheckpointError(
            f"{where}: row 0 of the decoder's position table holds a start embedding, but "
            "the decoder starts from a token that is not the padding token"
        )
    state = {}
    tgt = tgt.float().clone()
    tgt[c["bos_id"]] += start / math.sqrt(d)
    state["tgt_embedding.weight"] = tgt[:, back]
    state["src_embedding.weight"] = (
        state["tgt_embedding.weight"] if c["share_embeddings"] else src.float()[:, back]
    )
    for kind in ("encoder", "decoder"):
        count = c[f"n_{kind}_layers"]
        if _layer_count(tensors, f"model.{kind}.layers.") != count:
            raise CheckpointError(f"{where}: config.json and the weights disagree on {kind}_layers")
        for i in range(count):
            ours, theirs = f"{kind}_layers.{i}.", f"model.{kind}.layers.{i}."
            for stacked, parts in _stacked(kind):
                state[ours + stacked + ".weight"] = torch.cat(
                    [get(theirs + p + ".weight")[:, back] for p in parts]
                )
                state[ours + stacked + ".bias"] = torch.cat(
                    [get(theirs + p + ".bias") for p in parts]
                )
            for mine, marian, meets in _sublayer_names(kind):
                weight, bias_ = get(theirs + marian + ".weight"), get(theirs + marian + ".bias")
                if meets == "in":
                    weight = weight[:, back]
                else:
                    weight, bias_ = weight[back], bias_[back]
                state[ours + mine + ".weight"] = weight.contiguous()
                state[ours + mine + ".bias"] = bias_.contiguous()
    return state


def marian_tokenizer_files(
    tokenizer_json: str, order: list[int], eos_id: int, bos_id: int, pad_id: int, max_len: int
) -> dict[str, dict]:
    """A tformer tokenizer.json (Hugging Face `tokenizers`), renumbered to the Marian ids
    (`order`: Marian's id -> tformer's) and ending every source with </s> as tformer's
    sources end, with the tokenizer_config.json that has transformers load it (as a
    PreTrainedTokenizerFast; a MarianTokenizer is a sentencepiece model, which tformer's
    byte-level BPE is not) -> {file name: JSON}."""
    data = json.loads(tokenizer_json)
    new_id = {old: new for new, old in enumerate(order)}
    vocab = data.get("model", {}).get("vocab")
    if not isinstance(vocab, dict):
        raise ValueError("the tokenizer has no token -> id vocabulary (a BPE's or WordPiece's)")
    data["model"]["vocab"] = {token: new_id[i] for token, i in vocab.items()}
    for added in data.get("added_tokens", []):
        added["id"] = new_id[added["id"]]
    tokens = {i: token for token, i in vocab.items()}
    for added in data.get("added_tokens", []):
        tokens[order[added["id"]]] = added["content"]
    eos, bos, pad = tokens[eos_id], tokens[bos_id], tokens[pad_id]
    data["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"Sequence": {"id": "A", "type_id": 0}},
                   {"SpecialToken": {"id": eos, "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}},
                 {"Sequence": {"id": "B", "type_id": 0}},
                 {"SpecialToken": {"id": eos, "type_id": 0}}],
        "special_tokens": {eos: {"id": eos, "ids": [new_id[eos_id]], "tokens": [eos]}},
    }  # fmt: skip
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": eos,
        "bos_token": bos,
        "pad_token": pad,
        # a byte-level BPE has no unknown token, but CTranslate2's converter needs one
        # named (and kept): <s>, which no source holds, or </s> where <s> is the padding
        "unk_token": bos if bos != pad else eos,
        "model_max_length": max_len,
        "clean_up_tokenization_spaces": False,
    }
    return {"tokenizer.json": data, "tokenizer_config.json": config}
