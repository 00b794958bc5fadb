import pytest
import torch
from torch import nn

from tformer.models.seq2seq import DecoderLayer, EncoderLayer, Seq2SeqConfig, Seq2SeqTransformer


def tiny_config(**overrides):
    fields = dict(
        src_vocab_size=23,
        tgt_vocab_size=19,
        max_len=40,
        d_model=32,
        n_heads=4,
        n_encoder_layers=2,
        n_decoder_layers=2,
        d_ff=48,
        dropout=0.0,
    )
    return Seq2SeqConfig(**{**fields, **overrides})


def copy_attention(ours, theirs: nn.MultiheadAttention) -> None:
    if ours.cross:  # W^Q alone, W^K and W^V stacked
        c = ours.d_model
        ours.w_q.weight.copy_(theirs.in_proj_weight[:c])
        ours.w_q.bias.copy_(theirs.in_proj_bias[:c])
        ours.w_kv.weight.copy_(theirs.in_proj_weight[c:])
        ours.w_kv.bias.copy_(theirs.in_proj_bias[c:])
    else:
        ours.w_qkv.weight.copy_(theirs.in_proj_weight)
        ours.w_qkv.bias.copy_(theirs.in_proj_bias)
    ours.w_o.weight.copy_(theirs.out_proj.weight)
    ours.w_o.bias.copy_(theirs.out_proj.bias)


def copy_feedforward_and_norms(ours, theirs, sublayers) -> None:
    ours.mlp.w1.load_state_dict(theirs.linear1.state_dict())
    ours.mlp.w2.load_state_dict(theirs.linear2.state_dict())
    norms = [theirs.norm1, theirs.norm2] + ([theirs.norm3] if hasattr(theirs, "norm3") else [])
    for sub, norm in zip(sublayers, norms, strict=True):
        sub.norm.weight.copy_(norm.weight)
        sub.norm.bias.copy_(norm.bias)


@pytest.mark.parametrize("norm_position", ["post", "pre"])
def test_encoder_layer_equals_torch_transformer_encoder_layer(norm_position):
    config = tiny_config(norm_position=norm_position)
    theirs = nn.TransformerEncoderLayer(
        32, 4, 48, dropout=0.0, batch_first=True, norm_first=norm_position == "pre"
    ).eval()
    ours = EncoderLayer(config).eval()
    with torch.no_grad():
        copy_attention(ours.self_attn, theirs.self_attn)
        copy_feedforward_and_norms(ours, theirs, (ours.attn_sublayer, ours.mlp_sublayer))
    x = torch.randn(3, 9, 32)
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[1, 6:] = False  # padding at the end of one source
    expected = theirs(x, src_key_padding_mask=~mask)
    got = ours(x, mask)
    real = mask[:, :, None].expand_as(got)  # torch leaves padded positions unspecified
    torch.testing.assert_close(got[real], expected[real], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("norm_position", ["post", "pre"])
def test_decoder_layer_equals_torch_transformer_decoder_layer(norm_position):
    config = tiny_config(norm_position=norm_position)
    theirs = nn.TransformerDecoderLayer(
        32, 4, 48, dropout=0.0, batch_first=True, norm_first=norm_position == "pre"
    ).eval()
    ours = DecoderLayer(config).eval()
    with torch.no_grad():
        copy_attention(ours.self_attn, theirs.self_attn)
        copy_attention(ours.cross_attn, theirs.multihead_attn)
        sublayers = (ours.self_attn_sublayer, ours.cross_attn_sublayer, ours.mlp_sublayer)
        copy_feedforward_and_norms(ours, theirs, sublayers)
    x, memory = torch.randn(2, 7, 32), torch.randn(2, 5, 32)
    src_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    causal = nn.Transformer.generate_square_subsequent_mask(7)
    expected = theirs(x, memory, tgt_mask=causal, memory_key_padding_mask=~src_mask)
    torch.testing.assert_close(ours(x, memory, src_mask), expected, rtol=1e-5, atol=1e-5)


def test_embeddings_are_scaled_by_sqrt_d_model_and_add_the_sinusoids():
    model = Seq2SeqTransformer(tiny_config(), seed=0)
    ids = torch.tensor([[3, 4, 5]])
    table = model.positions.table
    expected = model.src_embedding.weight[ids] * 32**0.5 + table[:3]
    torch.testing.assert_close(model.embed(model.src_embedding, ids, 0), expected)


def test_output_projection_is_the_target_embedding_and_sharing_joins_all_three():
    model = Seq2SeqTransformer(tiny_config(), seed=0)
    x = torch.randn(2, 32)
    torch.testing.assert_close(model.unembed(x), x @ model.tgt_embedding.weight.T)
    assert model.src_embedding is not model.tgt_embedding
    shared = Seq2SeqTransformer(tiny_config(tgt_vocab_size=23, share_embeddings=True), seed=0)
    assert shared.src_embedding is shared.tgt_embedding
    separate = Seq2SeqTransformer(tiny_config(tgt_vocab_size=23), seed=0)
    assert shared.num_parameters() == separate.num_parameters() - 23 * 32
    with pytest.raises(ValueError, match="joint vocabulary"):
        tiny_config(share_embeddings=True)


def test_source_padding_never_changes_the_result():
    model = Seq2SeqTransformer(tiny_config(), seed=0).eval()
    src = torch.tensor([[5, 6, 7, 8]])
    tgt = torch.tensor([[1, 9, 10, 11]])
    alone = model(src, tgt)
    padded = model(torch.tensor([[5, 6, 7, 8, 0, 0, 0]]), tgt)  # pad_id 0 on the right
    torch.testing.assert_close(padded, alone, rtol=1e-5, atol=1e-5)
    # ...nor does batching with a longer sentence
    batch_src = torch.tensor([[5, 6, 7, 8, 0, 0], [3, 4, 5, 6, 7, 8]])
    batch_tgt = torch.tensor([[1, 9, 10, 11, 0], [1, 12, 13, 14, 15]])
    torch.testing.assert_close(model(batch_src, batch_tgt)[0, :4], alone[0], rtol=1e-5, atol=1e-5)


def test_cached_decoding_equals_the_full_decoder_pass():
    model = Seq2SeqTransformer(tiny_config(), seed=0).eval()
    src = torch.tensor([[5, 6, 7, 8, 9], [3, 4, 0, 0, 0]])
    tgt = torch.tensor([[1, 9, 10, 11, 12, 13], [1, 4, 4, 5, 6, 7]])
    src_mask = model.source_mask(src)
    memory = model.encode(src, src_mask)
    full = model.decode(tgt, memory, src_mask)
    caches = model.new_caches(batch_size=2)
    steps = [model.decode(tgt[:, t : t + 1], memory, src_mask, caches) for t in range(6)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_a_target_token_never_sees_later_target_tokens():
    model = Seq2SeqTransformer(tiny_config(), seed=0).eval()
    src = torch.tensor([[5, 6, 7]])
    a = model(src, torch.tensor([[1, 9, 10, 11]]))
    b = model(src, torch.tensor([[1, 9, 3, 4]]))  # change the future
    torch.testing.assert_close(a[:, :2], b[:, :2])
    assert not torch.allclose(a[:, 2:], b[:, 2:])


def test_presets_and_bad_input():
    base = Seq2SeqConfig.from_preset("base", 37000, 37000, share_embeddings=True)
    with torch.device("meta"):
        model = Seq2SeqTransformer(base)
    # The paper's base model with a shared 37000-token vocabulary: about 65M parameters
    # (Table 3: 65 x 10^6), here 63.1M with the exact vocabulary and biases.
    assert 60e6 < model.num_parameters() < 66e6
    small = Seq2SeqTransformer(Seq2SeqConfig.from_preset("small", 50, 50, max_len=16), seed=0)
    with pytest.raises(ValueError, match="longer than max_len"):
        small(torch.zeros(1, 20, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        small(torch.tensor([[60]]), torch.tensor([[1]]))
    with pytest.raises(ValueError, match="unknown preset"):
        Seq2SeqConfig.from_preset("large", 10, 10)


@pytest.mark.parametrize("share", [False, True])
def test_save_and_load_give_the_same_model(tmp_path, share):
    config = tiny_config(tgt_vocab_size=23, share_embeddings=share, norm_position="pre")
    model = Seq2SeqTransformer(config, seed=3).eval()
    model.save_pretrained(tmp_path)
    loaded = Seq2SeqTransformer.from_pretrained(tmp_path)
    assert loaded.config == config
    assert (loaded.src_embedding is loaded.tgt_embedding) == share
    src, tgt = torch.tensor([[5, 6, 7, 0]]), torch.tensor([[1, 8, 9]])
    torch.testing.assert_close(loaded(src, tgt), model(src, tgt), rtol=0, atol=0)


def test_loading_another_kind_of_checkpoint_says_so(tmp_path):
    from tformer import GPT2, GPT2Config
    from tformer.checkpoints import CheckpointError

    GPT2(GPT2Config(vocab_size=11, max_len=8, d_model=8, n_layers=1, n_heads=2)).save_pretrained(
        tmp_path
    )
    with pytest.raises(CheckpointError, match="not an encoder-decoder"):
        Seq2SeqTransformer.from_pretrained(tmp_path)


def test_switching_the_attention_path_keeps_the_outputs():
    model = Seq2SeqTransformer(tiny_config(), seed=0).eval()
    src, tgt = torch.tensor([[5, 6, 7, 0]]), torch.tensor([[1, 8, 9]])
    fused = model(src, tgt)
    model.set_attention("explicit")
    assert model.config.attention == "explicit"
    assert all(
        m.implementation == "explicit"
        for m in model.modules()
        if type(m).__name__ == "MultiHeadAttention"
    )
    torch.testing.assert_close(model(src, tgt), fused, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="unknown attention"):
        model.set_attention("flash")


def test_initialisation_is_half_xavier_uniform_and_unit_embeddings():
    config = Seq2SeqConfig.from_preset("small", 1000, 1000, share_embeddings=True)
    model = Seq2SeqTransformer(config, seed=0)
    ff = model.encoder_layers[0].mlp.w1  # (1024, 256)
    bound = 0.5 * (6.0 / (256 + 1024)) ** 0.5
    assert ff.weight.abs().max() <= bound
    assert ff.weight.std().item() == pytest.approx(bound / 3**0.5, rel=0.01)  # uniform
    assert ff.bias.abs().max() == 0
    token = model.tgt_embedding(torch.arange(1000))  # scaled by sqrt(256)
    assert token.std().item() == pytest.approx(1.0, rel=0.02)
    norm = model.encoder_layers[0].mlp_sublayer.norm
    assert torch.equal(norm.weight, torch.ones(256)) and norm.bias.abs().max() == 0


def test_vaswani_initialisation_is_the_papers_as_torch_draws_it():
    import math

    config = Seq2SeqConfig.from_preset("small", 1000, 1000, init="vaswani")
    model = Seq2SeqTransformer(config, seed=0)
    c = 256
    stacked = math.sqrt(6 / (c + 3 * c))  # W^Q, W^K, W^V as one (3C, C) matrix
    reference = torch.nn.MultiheadAttention(c, 4).in_proj_weight.detach()
    for attention in (model.encoder_layers[0].self_attn, model.decoder_layers[0].cross_attn):
        qkv = torch.cat(attention.weight_blocks()[:3])  # (3C, C), however it is stored
        assert qkv.abs().max() <= stacked and qkv.abs().max() > 0.99 * stacked
        assert qkv.var().item() == pytest.approx(stacked**2 / 3, rel=0.02)
        assert qkv.var().item() == pytest.approx(reference.var().item(), rel=0.03)
        w_o = attention.weight_blocks()[3]
        assert w_o.abs().max() <= math.sqrt(6 / (2 * c)) and w_o.abs().max() > 0.99 * math.sqrt(
            6 / (2 * c)
        )
    ff = model.decoder_layers[1].mlp.w2.weight  # (256, 1024): the full bound
    assert ff.var().item() == pytest.approx(6 / (c + 1024) / 3, rel=0.02)
    token = model.src_embedding(torch.arange(1000))
    assert token.std().item() == pytest.approx(1.0, rel=0.02)
    with pytest.raises(ValueError, match="Seq2SeqConfig.init"):
        Seq2SeqConfig.from_preset("small", 10, 10, init="gpt2")


def test_a_checkpoint_with_the_old_attention_layout_is_refused_with_a_reason(tmp_path):
    from safetensors.torch import save_file

    from tformer.checkpoints import CheckpointError

    model = Seq2SeqTransformer(tiny_config(), seed=0)
    model.save_pretrained(tmp_path)
    old = {k: v.contiguous() for k, v in model.state_dict().items() if "w_qkv" not in k}
    for i in range(2):  # the layout before 2026-11-26: separate W^Q, W^K, W^V
        w_q, w_k, w_v = model.encoder_layers[i].self_attn.w_qkv.weight.split(32)
        old.update(
            {
                f"encoder_layers.{i}.self_attn.w_{n}.weight": w.contiguous()
                for n, w in zip("qkv", (w_q, w_k, w_v), strict=True)
            }
        )
    old.pop("src_embedding.weight", None)
    save_file(old, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="earlier tformer"):
        Seq2SeqTransformer.from_pretrained(tmp_path)


def test_activation_checkpointing_saves_memory_and_changes_no_gradient():
    """Same loss and gradients (dropout replayed in the recomputation); fewer bytes kept
    for the backward pass, counted by the saved-tensor hooks."""
    torch.manual_seed(0)
    model = Seq2SeqTransformer(tiny_config(dropout=0.1), seed=0).train()
    src, tgt = torch.randint(3, 23, (4, 12)), torch.randint(3, 19, (4, 10))

    def loss_grads_and_saved_bytes(checkpointing: bool):
        model.set_activation_checkpointing(checkpointing)
        model.zero_grad()
        saved = []

        def pack(t):
            saved.append(t.numel() * t.element_size())
            return t

        torch.manual_seed(1)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(src, tgt).square().mean()
        loss.backward()
        return loss, [p.grad.clone() for p in model.parameters()], sum(saved)

    loss, grads, plain_bytes = loss_grads_and_saved_bytes(False)
    loss_ckpt, grads_ckpt, ckpt_bytes = loss_grads_and_saved_bytes(True)
    torch.testing.assert_close(loss_ckpt, loss, rtol=0, atol=0)
    for g, h in zip(grads, grads_ckpt, strict=True):
        torch.testing.assert_close(h, g, rtol=1e-6, atol=1e-7)
    assert ckpt_bytes < plain_bytes / 2


def test_layers_name_their_parts_and_hook_points_as_gpt2_s_blocks():
    model = Seq2SeqTransformer(tiny_config(), seed=0).eval()
    seen = {}
    for name, module in model.named_modules():
        if name.split(".")[-1].startswith("hook_") and "hook_pattern" not in name:
            module.register_forward_hook(lambda m, a, out, name=name: seen.__setitem__(name, out))
    model(torch.tensor([[5, 6, 7, 8]]), torch.tensor([[1, 9, 10]]))
    for stack, before_mlp in (("encoder_layers.0.", "mid"), ("decoder_layers.0.", "cross")):
        layer = model.get_submodule(stack[:-1])
        resid = seen[f"{stack}hook_resid_{before_mlp}"]
        expected = layer.mlp_sublayer.norm(resid + seen[stack + "hook_mlp_out"])  # post-LN
        torch.testing.assert_close(seen[stack + "hook_resid_post"], expected)
    d = "decoder_layers.0."
    expected = model.decoder_layers[0].cross_attn_sublayer.norm(
        seen[d + "hook_resid_mid"] + seen[d + "hook_cross_attn_out"]
    )
    torch.testing.assert_close(seen[d + "hook_resid_cross"], expected)
    assert d + "hook_attn_out" in seen and "encoder_layers.0.hook_attn_out" in seen


def test_a_checkpoint_with_the_old_feed_forward_names_loads(tmp_path):
    from safetensors.torch import load_file, save_file

    model = Seq2SeqTransformer(tiny_config(), seed=0).eval()
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    old = {  # the names before the sublayer was called mlp
        k.replace(".mlp.", ".ff.").replace(".mlp_sublayer.", ".ff_sublayer."): v
        for k, v in tensors.items()
    }
    assert any(".ff_sublayer." in k for k in old) and any(".ff.w1" in k for k in old)
    save_file(old, str(tmp_path / "model.safetensors"))
    src, tgt = torch.tensor([[5, 6, 7, 0]]), torch.tensor([[1, 8, 9]])
    loaded = Seq2SeqTransformer.from_pretrained(tmp_path)
    torch.testing.assert_close(loaded(src, tgt), model(src, tgt), rtol=0, atol=0)
    other = Seq2SeqTransformer(tiny_config(), seed=5).eval()
    other.load_weights(tmp_path)
    torch.testing.assert_close(other(src, tgt), model(src, tgt), rtol=0, atol=0)
