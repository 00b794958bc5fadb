import math

import pytest
import torch

from tformer import GPT2, GPT2Config
from tformer.lab.instruments import (
    attention_entropy,
    gradient_report,
    logit_lens,
    logit_lens_top,
    residual_layers,
    residual_norms,
)
from tformer.models.seq2seq import Seq2SeqConfig, Seq2SeqTransformer
from tformer.nn.capture import run_with_cache


def tiny_gpt(**overrides) -> GPT2:
    fields = dict(vocab_size=31, max_len=12, d_model=16, n_layers=3, n_heads=2, dropout=0.0)
    return GPT2(GPT2Config(**{**fields, **overrides}), seed=0)


def tiny_seq2seq() -> Seq2SeqTransformer:
    config = Seq2SeqConfig(
        src_vocab_size=23,
        tgt_vocab_size=19,
        max_len=16,
        d_model=16,
        n_heads=2,
        n_encoder_layers=2,
        n_decoder_layers=2,
        d_ff=24,
        dropout=0.0,
    )
    return Seq2SeqTransformer(config, seed=0)


def batch(vocab=31, b=2, t=10):
    ids = torch.randint(0, vocab, (b, t + 1), generator=torch.Generator().manual_seed(1))
    return ids[:, :-1], ids[:, 1:]


def loss_of(logits, targets):
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())


@pytest.mark.parametrize("norm_position", ["pre", "post", "none"])
def test_sublayer_gradient_norms_equal_the_norms_of_grad(norm_position):
    model = tiny_gpt(norm_position=norm_position)
    inputs, targets = batch()
    report = gradient_report(model, (inputs,), targets)
    assert report.layers == ["blocks.0", "blocks.1", "blocks.2"]
    with torch.no_grad():
        expected_loss = float(loss_of(model(inputs), targets))
    assert report.loss == pytest.approx(expected_loss, rel=1e-6)
    for i, block in enumerate(model.blocks):
        attn = [*block.attn_sublayer.parameters(), *block.attn.parameters()]
        mlp = [*block.mlp_sublayer.parameters(), *block.mlp.parameters()]
        expected_attn = math.sqrt(sum(float(p.grad.square().sum()) for p in attn))
        expected_mlp = math.sqrt(sum(float(p.grad.square().sum()) for p in mlp))
        expected_all = math.sqrt(sum(float(p.grad.square().sum()) for p in block.parameters()))
        assert set(report.sublayers[i]) == {"attn", "mlp"}
        assert report.sublayers[i]["attn"] == pytest.approx(expected_attn, rel=1e-6)
        assert report.sublayers[i]["mlp"] == pytest.approx(expected_mlp, rel=1e-6)
        assert report.parameters[i] == pytest.approx(expected_all, rel=1e-6)
    assert report.first_to_last() == pytest.approx(report.parameters[-1] / report.parameters[0])


def test_residual_gradient_equals_autograd_of_the_rest_of_the_model():
    model = tiny_gpt()
    inputs, targets = batch()
    report = gradient_report(model, (inputs,), targets)
    positions = torch.arange(inputs.shape[1])[None]
    with torch.no_grad():
        x = model.token_embedding(inputs) + model.position_embedding(positions)
    for i in range(len(model.blocks)):
        # The loss as a function of the stream entering block i: run the rest by hand.
        start = x.clone().requires_grad_()
        h = start
        for block in model.blocks[i:]:
            h = block(h)
        loss = loss_of(model.unembed(model.final_norm(h)), targets)
        (grad,) = torch.autograd.grad(loss, start)
        assert report.residual[i] == pytest.approx(float(grad.norm()), rel=1e-5)
        with torch.no_grad():
            x = model.blocks[i](x)


def test_gradient_report_clears_earlier_gradients():
    model = tiny_gpt()
    inputs, targets = batch()
    first = gradient_report(model, (inputs,), targets)
    second = gradient_report(model, (inputs,), targets)  # not the sum of two backward passes
    assert second.parameters == pytest.approx(first.parameters, rel=1e-6)


def test_residual_norms_follow_the_stream_by_hand():
    model = tiny_gpt(norm_position="post")
    inputs, _ = batch()
    norms = residual_norms(model, inputs)
    positions = torch.arange(inputs.shape[1])[None]
    with torch.no_grad():
        x = model.token_embedding(inputs) + model.position_embedding(positions)
        expected = [float(x.norm(dim=-1).mean())]
        for block in model.blocks:
            x = block(x)
            expected.append(float(x.norm(dim=-1).mean()))
    assert norms == pytest.approx(expected, rel=1e-5)
    # post-LN's stream leaves every layer normalised: ||x|| = sqrt(C) with gain 1, bias 0
    assert norms[1:] == pytest.approx([math.sqrt(16)] * 3, rel=1e-3)


@pytest.mark.parametrize("norm_position", ["pre", "post"])
def test_logit_lens_ends_at_the_models_logits_and_starts_at_the_embeddings(norm_position):
    model = tiny_gpt(norm_position=norm_position).eval()
    inputs, _ = batch()
    lens = logit_lens(model, inputs)
    assert lens.shape == (4, 2, 10, 31)
    torch.testing.assert_close(lens[-1], model(inputs), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        x = model.token_embedding(inputs) + model.position_embedding(torch.arange(10)[None])
        torch.testing.assert_close(lens[0], model.unembed(model.final_norm(x)))


def test_logit_lens_top_is_the_lens_most_likely_tokens_and_their_probabilities():
    model = tiny_gpt().eval()
    inputs, _ = batch()
    probs = torch.softmax(logit_lens(model, inputs), dim=-1)  # (L + 1, B, T, V)
    ids, top = logit_lens_top(model, inputs, k=3)
    assert ids.shape == top.shape == (4, 2, 10, 3)
    expected = probs.topk(3, dim=-1)
    assert torch.equal(ids, expected.indices)
    torch.testing.assert_close(top, expected.values)


def test_uniform_attention_has_entropy_log_of_the_keys_seen():
    model = tiny_gpt()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.w_qkv.weight[:16].zero_()  # Q = 0: every allowed key scores the same
            block.attn.w_qkv.bias[:16].zero_()
    inputs, _ = batch(t=6)
    entropy = attention_entropy(model, inputs)
    assert list(entropy) == ["blocks.0.attn", "blocks.1.attn", "blocks.2.attn"]
    expected = sum(math.log(t + 1) for t in range(6)) / 6  # query t sees t + 1 keys
    for per_head in entropy.values():
        assert per_head.shape == (2,)
        torch.testing.assert_close(per_head, torch.full((2,), expected), rtol=1e-5, atol=1e-6)


def test_a_query_that_sees_one_key_has_entropy_zero():
    model = tiny_gpt(n_layers=1)
    inputs, _ = batch(b=1, t=1)  # one query, one key
    (per_head,) = attention_entropy(model, inputs).values()
    torch.testing.assert_close(per_head, torch.zeros(2), atol=1e-6, rtol=0)


def test_run_with_cache_keeps_named_activations_and_restores_the_attention_path():
    model = tiny_gpt()
    inputs, _ = batch()
    logits, cache = model.run_with_cache(inputs)
    torch.testing.assert_close(logits, model(inputs), rtol=1e-5, atol=1e-5)
    assert cache["blocks.0.hook_resid_pre"].shape == (2, 10, 16)
    pattern = cache["blocks.2.attn.hook_pattern"]
    assert pattern.shape == (2, 2, 10, 10)
    torch.testing.assert_close(pattern.sum(-1), torch.ones(2, 2, 10))
    assert torch.all(pattern.triu(1) == 0)  # causal: nothing after the query
    assert all(block.attn.implementation == "sdpa" for block in model.blocks)
    assert not cache["blocks.1.hook_resid_post"].requires_grad
    only, chosen = run_with_cache(model, inputs, names=["blocks.1.hook_mlp_out"])
    assert list(chosen) == ["blocks.1.hook_mlp_out"]
    with pytest.raises(ValueError, match="no hook point named blocks.9.hook_resid_post"):
        run_with_cache(model, inputs, names=["blocks.9.hook_resid_post"])


def test_the_instruments_work_on_the_encoder_decoder():
    model = tiny_seq2seq()
    src = torch.randint(3, 23, (2, 7), generator=torch.Generator().manual_seed(2))
    tgt = torch.randint(3, 19, (2, 6), generator=torch.Generator().manual_seed(3))
    tgt_in, targets = tgt[:, :-1], tgt[:, 1:]
    assert residual_layers(model) == [
        "encoder_layers.0",
        "encoder_layers.1",
        "decoder_layers.0",
        "decoder_layers.1",
    ]
    report = gradient_report(model, (src, tgt_in), targets)
    assert set(report.sublayers[2]) == {"self_attn", "cross_attn", "mlp"}
    assert all(g > 0 for g in report.parameters + report.residual)
    _, cache = model.run_with_cache(src, tgt_in)
    assert cache["decoder_layers.1.cross_attn.hook_pattern"].shape == (2, 2, 5, 7)
    lens = logit_lens(model.eval(), src, tgt_in)
    torch.testing.assert_close(lens[-1], model(src, tgt_in), rtol=1e-5, atol=1e-5)
    assert len(attention_entropy(model, src, tgt_in)) == 2 + 2 * 2


def test_instruments_refuse_a_model_without_hook_points():
    with pytest.raises(TypeError, match="hook_resid_pre"):
        residual_norms(torch.nn.Linear(3, 3), torch.randn(2, 3))
