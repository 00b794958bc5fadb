import math

import pytest
import torch

from tformer import GPT2, GPT2Config, kernels
from tformer.models import gpt2 as model_module
from tformer.models.gpt2 import PRESETS
from tformer.nn import attention


def tiny(**overrides) -> GPT2Config:
    base = dict(vocab_size=97, max_len=16, d_model=24, n_layers=2, n_heads=3, dropout=0.0)
    return GPT2Config(**{**base, **overrides})


def published_count(n_layers, d_model, vocab=50257, max_len=1024):
    # embeddings + per block (attention 4C^2 + 4C, MLP 8C^2 + 5C, two LayerNorms 4C) + ln_f
    return (
        vocab * d_model
        + max_len * d_model
        + n_layers * (12 * d_model**2 + 13 * d_model)
        + 2 * d_model
    )


@pytest.mark.parametrize(
    "name, expected",
    [
        ("gpt2", 124_439_808),
        ("gpt2-medium", 354_823_168),
        ("gpt2-large", 774_030_080),
        ("gpt2-xl", 1_557_611_200),
    ],
)
def test_preset_parameter_counts_equal_published_checkpoints(name, expected):
    with torch.device("meta"):
        model = GPT2(GPT2Config.from_preset(name))
    assert model.num_parameters() == expected
    n_layers, _, d_model = PRESETS[name]
    assert published_count(n_layers, d_model) == expected


def test_head_is_tied_to_token_embedding():
    model = GPT2(tiny(), seed=0)
    x = torch.randint(0, 97, (1, 5))
    hidden = {}
    model.final_norm.register_forward_hook(lambda m, a, out: hidden.setdefault("h", out))
    logits = model(x)
    torch.testing.assert_close(logits, hidden["h"] @ model.token_embedding.weight.T)


def test_logits_shape():
    assert GPT2(tiny())(torch.randint(0, 97, (3, 7))).shape == (3, 7, 97)


@pytest.mark.parametrize("attention", ["sdpa", "explicit"])
def test_future_tokens_never_change_past_logits(attention):
    model = GPT2(tiny(attention=attention), seed=1).eval()
    x = torch.randint(0, 97, (2, 10))
    changed = x.clone()
    changed[:, 6:] = (changed[:, 6:] + 1) % 97
    torch.testing.assert_close(model(x)[:, :6], model(changed)[:, :6], rtol=0, atol=0)


def test_explicit_and_sdpa_attention_give_the_same_model():
    fast = GPT2(tiny(), seed=2).eval()
    slow = GPT2(tiny(attention="explicit")).eval()
    slow.load_state_dict(fast.state_dict())
    x = torch.randint(0, 97, (2, 12))
    torch.testing.assert_close(fast(x), slow(x), rtol=1e-5, atol=1e-5)


def test_blocked_attention_trains_the_same_model_at_a_long_context(monkeypatch):
    """Past 128 positions the blocked path skips the hidden key blocks: same loss and
    gradients as the fused kernel (the blocked path taken here, whatever this CPU's timing
    would choose: nn/attention_choice.py)."""
    monkeypatch.setattr(attention, "long_attention_path", lambda q, paths: "blocked")
    fast = GPT2(tiny(max_len=300), seed=4)
    blocked = GPT2(tiny(max_len=300, attention="blocked"))
    blocked.load_state_dict(fast.state_dict())
    x = torch.randint(0, 97, (2, 300))
    losses = []
    for model in (fast, blocked):
        logits = model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-5)
    for p, q in zip(fast.parameters(), blocked.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("attention", ["sdpa", "explicit", "blocked"])
def test_cached_decoding_equals_full_forward(attention):
    # prefill 4, then a chunk of 3 (several new queries after cached ones), then one at a time
    model = GPT2(tiny(attention=attention), seed=3).eval()
    x = torch.randint(0, 97, (2, 10))
    full = model(x)
    caches = model.new_caches(batch_size=2)
    parts = [model(x[:, :4], caches=caches), model(x[:, 4:7], caches=caches)]
    parts += [model(x[:, i : i + 1], caches=caches) for i in range(7, 10)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)


def test_left_padded_row_with_cache_equals_the_row_alone():
    model = GPT2(tiny(), seed=9).eval()
    text = torch.randint(0, 97, (1, 6))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), text], dim=1)  # 3 pad tokens
    batch = torch.cat([padded, torch.randint(0, 97, (1, 9))])  # (2, 9)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :3] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    caches = model.new_caches(batch_size=2)
    first = model(batch[:, :5], mask[:, :5], positions[:, :5], caches)
    rest = model(batch[:, 5:], mask, positions[:, 5:], caches)
    together = torch.cat([first, rest], dim=1)[0, 3:]  # the real tokens of row 0
    torch.testing.assert_close(together, model(text)[0], rtol=1e-5, atol=1e-5)


def test_initialisation_is_seeded_and_scales_residual_projections():
    config = tiny(d_model=256, n_layers=8, n_heads=4)
    a, b, c = GPT2(config, seed=7), GPT2(config, seed=7), GPT2(config, seed=8)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.blocks[0].attn.w_qkv.weight, c.blocks[0].attn.w_qkv.weight)
    residual_std = 0.02 / math.sqrt(2 * 8)
    assert a.blocks[3].attn.w_o.weight.std().item() == pytest.approx(residual_std, rel=0.05)
    assert a.blocks[3].mlp.w2.weight.std().item() == pytest.approx(residual_std, rel=0.05)
    assert a.blocks[3].mlp.w1.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert a.token_embedding.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.equal(a.blocks[0].attn.w_qkv.bias, torch.zeros(3 * 256))
    assert torch.equal(a.final_norm.weight, torch.ones(256))


def test_named_hook_points_expose_the_residual_stream():
    model = GPT2(tiny(), seed=4).eval()
    seen = {}
    for name, module in model.named_modules():
        if name.split(".")[-1].startswith("hook_") and "attn.hook_pattern" not in name:
            module.register_forward_hook(lambda m, a, out, name=name: seen.__setitem__(name, out))
    model(torch.randint(0, 97, (1, 5)))
    b0, b1 = "blocks.0.", "blocks.1."
    torch.testing.assert_close(seen[b0 + "hook_resid_post"], seen[b1 + "hook_resid_pre"])
    torch.testing.assert_close(
        seen[b0 + "hook_resid_mid"], seen[b0 + "hook_resid_pre"] + seen[b0 + "hook_attn_out"]
    )
    torch.testing.assert_close(
        seen[b0 + "hook_resid_post"], seen[b0 + "hook_resid_mid"] + seen[b0 + "hook_mlp_out"]
    )


def test_vaswani_initialisation_is_the_original_transformers():
    c = 64
    a = GPT2(tiny(init="vaswani", d_model=c, n_heads=4, n_layers=3), seed=3)
    b = GPT2(tiny(init="vaswani", d_model=c, n_heads=4, n_layers=3), seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert a.config.scale_embeddings and a.token_embedding.multiplier == math.sqrt(c)
    # W^Q, W^K, W^V: the bound of one stacked (3C, C) matrix, written out
    stacked = math.sqrt(6 / (c + 3 * c))
    qkv = torch.cat([b.attn.w_qkv.weight for b in a.blocks])  # (3 layers x 3C, C)
    assert qkv.abs().max() <= stacked and qkv.abs().max() > 0.99 * stacked
    assert qkv.var().item() == pytest.approx(stacked**2 / 3, rel=0.03)  # U(-b, b): b^2 / 3
    # ... which is what torch.nn.MultiheadAttention draws for its stacked in_proj_weight
    reference = torch.cat(
        [torch.nn.MultiheadAttention(c, 4).in_proj_weight.detach() for _ in range(3)]
    )
    assert reference.abs().max() <= stacked
    assert qkv.var().item() == pytest.approx(reference.var().item(), rel=0.05)
    square = math.sqrt(6 / (c + c))
    w_o = torch.cat([b.attn.w_o.weight for b in a.blocks])
    assert w_o.abs().max() <= square and w_o.abs().max() > 0.99 * square
    wide = math.sqrt(6 / (c + 4 * c))
    w1 = torch.cat([b.mlp.w1.weight.flatten() for b in a.blocks])
    assert w1.abs().max() <= wide and w1.var().item() == pytest.approx(wide**2 / 3, rel=0.03)
    assert torch.equal(a.blocks[0].attn.w_qkv.bias, torch.zeros(3 * c))
    # token vectors enter the stream with unit-variance entries (N(0, 1/C) times sqrt(C))
    tokens = a.token_embedding(torch.arange(97))
    assert tokens.std().item() == pytest.approx(1.0, rel=0.05)
    assert a.position_embedding.weight.std().item() == pytest.approx(c**-0.5, rel=0.05)


def test_sinusoidal_positions_and_scaled_tokens_are_what_the_model_adds():
    from tformer.nn.embedding import sinusoidal_table

    config = tiny(init="vaswani", positions="sinusoidal")
    model = GPT2(config, seed=0)
    assert "position_embedding.weight" not in model.state_dict()
    ids = torch.tensor([[5, 1, 7, 7]])
    x = model.token_embedding.weight[ids] * math.sqrt(24) + sinusoidal_table(16, 24)[:4]
    for block in model.blocks:
        x = block(x)
    torch.testing.assert_close(model.features(ids), model.final_norm(x))
    # scale_embeddings is decided by init unless given; either may be set alone
    assert not tiny(init="vaswani", scale_embeddings=False).scale_embeddings
    assert tiny(scale_embeddings=True).scale_embeddings and not tiny().scale_embeddings
    with pytest.raises(ValueError, match="positions"):
        tiny(positions="rotary")
    with pytest.raises(ValueError, match="scale_embeddings"):
        tiny(scale_embeddings="yes")


@pytest.mark.parametrize("change", [{"positions": "sinusoidal"}, {"scale_embeddings": True}])
def test_a_model_that_is_not_gpt2_has_no_hugging_face_or_gguf_layout(tmp_path, change):
    from tformer.checkpoints import CheckpointError
    from tformer.models.gpt2_gguf import check_writable
    from tformer.tokenizers import CharTokenizer

    tokenizer = CharTokenizer.from_text("abcdefgh")
    model = GPT2(tiny(vocab_size=tokenizer.vocab_size, **change), seed=0)
    with pytest.raises(CheckpointError, match="Hugging Face layout"):
        model.save_pretrained(tmp_path / "hf")
    with pytest.raises(ValueError, match="llama.cpp's gpt2 architecture adds learned"):
        check_writable(model.config, "f32", False, tokenizer)


def test_xavier_initialisation_keeps_the_labs_earlier_variant():
    a = GPT2(tiny(init="xavier", d_model=48, n_heads=4), seed=3)
    b = GPT2(tiny(init="xavier", d_model=48, n_heads=4), seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    block = a.blocks[1]
    square = math.sqrt(6 / (48 + 48))  # W^Q, W^K, W^V, W^O: each 48 x 48
    for w in block.attn.weight_blocks():
        assert w.abs().max() <= square
        assert w.std().item() == pytest.approx(square / math.sqrt(3), rel=0.1)
    wide = math.sqrt(6 / (48 + 192))  # the MLP's 48 x 192 and 192 x 48
    for w in (block.mlp.w1.weight, block.mlp.w2.weight):
        assert w.std().item() == pytest.approx(wide / math.sqrt(3), rel=0.1)
    assert a.token_embedding.weight.std().item() == pytest.approx(48**-0.5, rel=0.1)
    assert a.token_embedding.multiplier == 1.0  # not scaled
    assert torch.equal(block.mlp.w2.bias, torch.zeros(48))
    with pytest.raises(ValueError, match="init"):
        tiny(init="orthogonal")


@pytest.mark.parametrize("norm_position", ["pre", "post", "none"])
@pytest.mark.parametrize("residual", [True, False])
def test_block_is_the_two_sublayers_in_the_chosen_wiring(norm_position, residual):
    block = GPT2(tiny(norm_position=norm_position, residual=residual), seed=1).blocks[0]
    x = torch.randn(2, 5, 24)

    def wrap(connection, f, x):  # the sublayer connection, written out (tformer.nn.sublayer)
        norm = connection.norm if norm_position != "none" else (lambda h: h)
        skip = x if residual else 0.0
        if norm_position == "pre":
            return skip + f(norm(x))
        return norm(skip + f(x))

    h = wrap(block.attn_sublayer, block.attn, x)
    expected = wrap(block.mlp_sublayer, block.mlp, h)
    torch.testing.assert_close(block(x), expected)
    if not residual and norm_position == "none":  # no residual, no norm: F(x) alone
        torch.testing.assert_close(block(x), block.mlp(block.attn(x)))


@pytest.mark.parametrize("norm_position", ["post", "none"])
def test_other_norm_placements_build_without_final_norm(norm_position):
    model = GPT2(tiny(norm_position=norm_position), seed=5)
    assert isinstance(model.final_norm, torch.nn.Identity)
    assert model(torch.randint(0, 97, (1, 4))).isfinite().all()


def test_dropout_only_in_training():
    model = GPT2(tiny(dropout=0.5), seed=6)
    x = torch.randint(0, 97, (1, 8))
    model.eval()
    torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)
    model.train()
    assert not torch.allclose(model(x), model(x))


def test_token_id_outside_vocabulary_is_a_clear_error():
    model = GPT2(tiny())
    with pytest.raises(ValueError, match=r"token id 97 is outside the vocabulary \(0..96\)"):
        model(torch.tensor([[1, 97]]))
    with pytest.raises(ValueError, match="token id -1"):
        model(torch.tensor([[-1, 2]]))


def test_input_longer_than_context_is_a_clear_error():
    with pytest.raises(ValueError, match=r"longer than the context window \(max_len=16\)"):
        GPT2(tiny())(torch.zeros(1, 17, dtype=torch.long))


def test_input_without_batch_dimension_is_a_clear_error():
    with pytest.raises(ValueError, match=r"shape \(batch, time\)"):
        GPT2(tiny())(torch.zeros(5, dtype=torch.long))


@pytest.mark.parametrize("dtype", [torch.float32, torch.int16, torch.uint8])
def test_input_of_another_dtype_is_a_clear_error(dtype):
    with pytest.raises(ValueError, match="int64 or int32 token ids"):
        GPT2(tiny())(torch.zeros(1, 5, dtype=dtype))


def test_bad_position_ids_are_a_clear_error():
    model = GPT2(tiny())
    ids = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"position_ids must lie in 0..15"):
        model(ids, position_ids=torch.tensor([[14, 15, 16]]))
    with pytest.raises(ValueError, match=r"position_ids must have shape \(batch, 3\)"):
        model(ids, position_ids=torch.arange(3))


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown GPT-2 preset 'gpt3'.*gpt2-medium"):
        GPT2Config.from_preset("gpt3")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(d_model=30, n_heads=4), "divisible"),
        (dict(n_layers=0), "n_layers must be a positive integer"),
        (dict(dropout=1.0), "dropout"),
        (dict(norm_position="sandwich"), "norm_position"),
        (dict(eos_id=500), "eos_id 500 is outside"),
    ],
)
def test_bad_config_is_rejected(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny(**overrides)


def test_the_output_head_is_the_token_embedding_parameter_itself():
    model = GPT2(tiny(), seed=0)
    assert model.lm_head.weight is model.token_embedding.weight
    assert "lm_head.weight" not in dict(model.named_parameters())  # counted once
    torch.testing.assert_close(model.unembed(torch.eye(24)), model.token_embedding.weight.T)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randint(0, 97, (2, 6))).square().mean().backward()
    optimizer.step()  # one tensor, updated once by both of its uses
    assert model.lm_head.weight is model.token_embedding.weight


def test_the_tied_table_s_gradient_is_dense_and_sums_both_of_its_uses():
    # reference: the head given a copy of the table of its own, the two gradients summed
    model = GPT2(tiny(), seed=0).double()
    ids = torch.randint(0, 97, (3, 6), generator=torch.Generator().manual_seed(1))
    ids[0, :3] = 5  # a token looked up more than once
    model(ids).square().mean().backward()
    tied = model.token_embedding.weight.grad
    assert tied.layout == torch.strided and tied.shape == (97, 24)
    table = model.token_embedding.weight.detach()
    lookup = table.clone().requires_grad_()
    head = table.clone().requires_grad_()
    model.zero_grad()
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.nn.functional.embedding(ids, lookup) + model.position_embedding.weight[:6]
    for block in model.blocks:
        x = block(x)
    (model.final_norm(x) @ head.T).square().mean().backward()
    torch.testing.assert_close(tied, lookup.grad + head.grad, rtol=1e-12, atol=1e-15)
    assert lookup.grad[5].abs().sum() > 0 and head.grad.abs().sum() > 0


def test_loading_by_assignment_ties_the_head_again_and_old_state_dicts_load():
    model = GPT2(tiny(), seed=0).eval()
    old = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}  # before lm_head
    with torch.device("meta"):
        again = GPT2(tiny())
    again.load_state_dict(old, strict=True, assign=True)
    assert again.lm_head.weight is again.token_embedding.weight
    assert again.num_parameters() == model.num_parameters()
    plain = GPT2(tiny(), seed=1).eval()
    plain.load_state_dict(model.state_dict())
    x = torch.randint(0, 97, (1, 7))
    torch.testing.assert_close(again.eval()(x), model(x), rtol=0, atol=0)
    torch.testing.assert_close(plain(x), model(x), rtol=0, atol=0)


def test_load_weights_loads_a_saved_model_in_place(tmp_path):
    model = GPT2(tiny(), seed=0).eval()
    model.save_pretrained(tmp_path)
    other = GPT2(tiny(), seed=1).eval()
    head = other.lm_head.weight
    other.load_weights(tmp_path)
    assert other.lm_head.weight is head is other.token_embedding.weight  # in place
    x = torch.randint(0, 97, (1, 7))
    torch.testing.assert_close(other(x), model(x), rtol=0, atol=0)
    from tformer import CheckpointError

    with pytest.raises(CheckpointError, match="saved with n_layers=2"):
        GPT2(tiny(n_layers=3)).load_weights(tmp_path)


@pytest.mark.skipif(kernels.load() is None, reason="the compiled kernels are not built here")
def test_a_block_s_joined_residual_add_and_norm_train_as_the_plain_block(monkeypatch):
    """Under CPU bf16 autocast a block adds attention's output and takes the MLP's norm in
    one step (nn/norm.py's add_then_norm): the loss and every gradient equal to the bit
    what the sublayers give apart; a hook on resid_mid sees it and keeps the plain path."""
    from tformer.nn import sublayer

    config = GPT2Config(vocab_size=50, max_len=32, d_model=64, n_layers=2, n_heads=4, dropout=0.0)
    model = GPT2(config)
    ids = torch.randint(0, 50, (3, 32), generator=torch.Generator().manual_seed(0))

    def step():
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(ids).float().logsumexp(-1).mean()
        loss.backward()
        return loss, {n: p.grad.clone() for n, p in model.named_parameters()}

    joined = step()
    seen = []
    mid = model.blocks[0].hook_resid_mid
    handle = mid.register_forward_hook(lambda m, a, out: seen.append("forward"))
    hooked = step()
    handle.remove()
    handle = mid.register_full_backward_hook(lambda m, gin, gout: seen.append("backward"))
    step()
    handle.remove()
    assert seen == ["forward", "backward"]  # each hook saw resid_mid: the plain path
    joins = sublayer.SublayerConnection.joins
    monkeypatch.setattr(sublayer.SublayerConnection, "joins", lambda self, other: False)
    apart = step()
    monkeypatch.setattr(sublayer.SublayerConnection, "joins", joins)
    joined_steps = []

    def counted(*args):
        result = real(*args)
        joined_steps.append(result is not None)
        return result

    real = model_module.add_then_norm
    monkeypatch.setattr(model_module, "add_then_norm", counted)
    step()
    assert joined_steps == [True] * config.n_layers  # the joined step was the one taken
    for other in (hooked, apart):
        assert torch.equal(joined[0], other[0])
        for name, grad in joined[1].items():
            assert torch.equal(grad, other[1][name]), name
