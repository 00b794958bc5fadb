import pytest
import torch

from tformer import GPT2, GPT2Config
from tformer.generate import SamplingConfig, generate_batch, generate_ids
from tformer.generate.fast import decoding_path, pack_for_decoding
from tformer.nn.kv_cache import follow_paths
from tformer.nn.packed_linear import PackedLinear


def sharp_model(seed=0):
    """A tiny model whose logits are far from uniform, so greedy choices are well separated."""
    config = GPT2Config(vocab_size=61, max_len=48, d_model=32, n_layers=2, n_heads=4, dropout=0.0)
    model = GPT2(config, seed=seed).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model


def packed_copy(model, weights):
    copy = GPT2(model.config)
    copy.load_state_dict(model.state_dict())
    path = pack_for_decoding(copy, weights)
    return copy, path


def test_packing_replaces_every_linear_layer_and_the_head():
    model, path = packed_copy(sharp_model(), "int8")
    assert not any(type(m) is torch.nn.Linear for m in model.modules())
    assert isinstance(model.lm_head, PackedLinear)  # the tied head, packed like the rest
    # every module in evaluation mode, the packed layers too: a search leaves it as it is
    assert not any(m.training for m in model.modules())
    assert sum(isinstance(m, PackedLinear) for m in model.modules()) == 4 * 2 + 1
    assert path.weights == "int8" and "int8" in path.describe()


def test_packed_float32_greedy_decoding_equals_the_plain_model_token_for_token():
    model = sharp_model()
    packed, path = packed_copy(model, "float32")
    config = SamplingConfig(max_new_tokens=40, do_sample=False)
    prompt = torch.tensor([[3, 1, 4, 1, 5]])
    assert generate_ids(packed, prompt, config) == generate_ids(model, prompt, config)
    with torch.inference_mode():
        torch.testing.assert_close(packed(prompt), model(prompt), rtol=0, atol=1e-5)


# int4 rounds these random weights coarsely: it is checked against the same rounded weights
@pytest.mark.parametrize("weights, tolerance", [("bfloat16", 0.04), ("int8", 0.15)])
def test_narrow_weights_change_the_logits_only_by_their_rounding(weights, tolerance):
    model = sharp_model()
    packed, _ = packed_copy(model, weights)
    prompt = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.inference_mode():
        caches = packed.new_caches(1)
        step_logits = [packed(prompt[:, :1], caches=caches)]  # one token at a time: C kernels
        for t in range(1, prompt.shape[1]):
            step_logits.append(packed(prompt[:, t : t + 1], caches=caches))
        expected = model(prompt)
    spread = expected.std().item()  # the logits' own scale (measured errors: bf16 ~2% of
    for t, logits in enumerate(step_logits):  # it, int8 ~4-7%)
        error = (logits[0, -1] - expected[0, t]).abs().max().item()
        assert error < tolerance * spread, (t, error, spread)
    # ...and almost never the most likely token
    same = sum(int(s[0, -1].argmax() == expected[0, t].argmax()) for t, s in enumerate(step_logits))
    assert same >= len(step_logits) - 1


@pytest.mark.parametrize("weights", ["int8", "int4", "w8a8", "w4a8"])
def test_packed_batched_generation_equals_each_prompt_alone(weights):
    packed, _ = packed_copy(sharp_model(), weights)
    prompts = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7], [42]]
    config = SamplingConfig(max_new_tokens=10, seed=1, top_k=10)
    alone = [generate_ids(packed, torch.tensor([p]), config) for p in prompts]
    assert generate_batch(packed, prompts, config) == alone


def test_scaled_or_sinusoidal_embeddings_decode_by_the_modules():
    """The fused step sums the two embedding tables' rows as they are: a model that scales
    its tokens or computes its positions keeps the modules' path, and decodes the same."""
    for options in ({"init": "vaswani"}, {"positions": "sinusoidal"}):
        config = GPT2Config(vocab_size=61, max_len=32, d_model=32, n_layers=1, n_heads=2,
                            dropout=0.0, **options)  # fmt: skip
        model = GPT2(config, seed=0).eval()
        packed, path = packed_copy(model, "float32")
        assert packed.fused_decoding is None and not path.fused
        greedy = SamplingConfig(max_new_tokens=8, do_sample=False)
        assert generate_ids(packed, [3, 1, 4], greedy) == generate_ids(model, [3, 1, 4], greedy)


@pytest.mark.parametrize("weights", ["int4", "w4a8"])
def test_four_bit_packings_keep_the_output_head_in_int8(weights):
    packed, path = packed_copy(sharp_model(), weights)
    assert packed.blocks[0].mlp.w1.weight_dtype == weights == path.weights
    assert packed.lm_head.weight_dtype == "int8"  # weight-only: one row a step reads it


def test_int4_packing_computes_what_its_dequantised_weights_compute():
    """A packed int4 model against the unpacked model holding the same dequantised weights
    (quantize_int4's, which equal ggml's q4_0; the head's int8): the logits agree to float
    rounding."""
    from tformer.nn.packed_linear import dequantize_int4, quantize_int4, quantize_int8

    model = sharp_model()
    rounded = GPT2(model.config)
    rounded.load_state_dict(model.state_dict())
    with torch.no_grad():  # the head untied: packing rounds it (to int8), not the embedding
        for name, module in rounded.named_modules():
            if name == "lm_head":
                q, scale = quantize_int8(module.weight)
                module.weight = torch.nn.Parameter(q.float() * scale[:, None])
            elif isinstance(module, torch.nn.Linear):
                module.weight.copy_(dequantize_int4(*quantize_int4(module.weight)))
    packed, path = packed_copy(model, "int4")
    assert packed.blocks[0].mlp.w1.weight_dtype == "int4"
    assert packed.lm_head.weight_dtype == "int8" and path.weights == "int4"
    prompt = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.inference_mode():
        caches = packed.new_caches(1)
        steps = [packed(prompt[:, t : t + 1], caches=caches) for t in range(prompt.shape[1])]
        expected = rounded(prompt)
        torch.testing.assert_close(packed(prompt), expected, rtol=0, atol=1e-4)
    for t, logits in enumerate(steps):
        torch.testing.assert_close(logits[0, -1], expected[0, t], rtol=0, atol=1e-4)


def test_packed_models_refuse_to_be_saved_or_packed_again(tmp_path):
    packed, _ = packed_copy(sharp_model(), "bfloat16")
    with pytest.raises(ValueError, match="packed for decoding"):
        packed.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="packed already"):
        pack_for_decoding(packed, "int8")
    with pytest.raises(ValueError, match="float32 model"):
        pack_for_decoding(sharp_model().to(torch.bfloat16), "int8")


def test_the_path_of_an_unpacked_model_says_so():
    path = decoding_path(sharp_model())
    assert path.weights == "model" and "not packed" in path.describe()
    assert path.to_dict()["description"] == path.describe()


def test_a_model_with_lora_layers_is_refused_until_merged():
    from tformer.nn.lora import LoRAConfig, add_lora, merge_lora

    model = sharp_model()
    add_lora(model, LoRAConfig(rank=2))
    with pytest.raises(ValueError, match="merge them first"):
        pack_for_decoding(model, "int8")
    merge_lora(model)
    assert pack_for_decoding(model, "int8").weights == "int8"


@pytest.mark.parametrize("weights", ["float32", "bfloat16", "int8", "int4", "w8a8", "w4a8"])
@pytest.mark.parametrize("activation", ["gelu_tanh", "gelu"])
def test_the_fused_decoding_step_computes_what_the_modules_compute(weights, activation):
    """models/gpt2_decode.py against the blocks' own forward, on the same packed weights:
    every step's logits for three rows, and greedy generation token for token."""
    config = GPT2Config(vocab_size=61, max_len=48, d_model=64, n_layers=2, n_heads=4,
                        dropout=0.0, activation=activation)  # fmt: skip
    model = GPT2(config, seed=0).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    fused, path = packed_copy(model, weights)
    if fused.fused_decoding is None:
        pytest.skip("no C kernels here: nothing is fused")
    assert path.fused and "in one call" in path.describe()
    plain, _ = packed_copy(model, weights)
    plain.fused_decoding = None
    prompt = torch.tensor([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3], [5, 8, 9, 7, 9]])
    with torch.inference_mode():
        caches = [fused.new_caches(3), plain.new_caches(3)]
        for model_, cache in zip((fused, plain), caches, strict=True):
            model_(prompt, caches=cache)  # the prompt: the modules' path for both
        token = torch.tensor([[7], [1], [2]])
        for _ in range(6):
            ours, theirs = fused(token, caches=caches[0]), plain(token, caches=caches[1])
            torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-5)
            token = theirs[:, -1].argmax(-1, keepdim=True)
    assert caches[0][0].length == caches[1][0].length == 11
    config = SamplingConfig(max_new_tokens=20, do_sample=False)
    assert generate_ids(fused, prompt[:1], config) == generate_ids(plain, prompt[:1], config)
    rows = [[3, 1, 4], [2, 7, 1], [8, 2, 8]]  # one length: generate_batch's steps fuse too
    calls, step = [], fused.fused_decoding.features
    fused.fused_decoding.features = lambda *args: calls.append(1) or step(*args)
    assert generate_batch(fused, rows, config) == generate_batch(plain, rows, config)
    assert len(calls) == config.max_new_tokens - 1  # every step after the prompt's


def test_the_fused_step_steps_aside_where_it_cannot_run():
    model, _ = packed_copy(sharp_model(), "int8")
    fused = model.fused_decoding
    if fused is None:
        pytest.skip("no C kernels here: nothing is fused")
    one = torch.tensor([[4]])
    with torch.inference_mode():
        caches = model.new_caches(1)
        model(torch.tensor([[1, 2]]), caches=caches)
        assert fused.applies(model, one, None, None, caches)
        assert not fused.applies(model, one, torch.tensor([[0, 1, 1]]), None, caches)  # padding
        assert not fused.applies(model, one, None, torch.tensor([[1]]), caches)  # positions
        assert fused.applies(model, one, torch.ones(1, 3), torch.tensor([[2]]), caches)
        assert not fused.applies(model, torch.tensor([[4, 5]]), None, None, caches)  # 2 tokens
        assert not fused.applies(model, one, None, None, None)
        model.blocks[0].mlp.w1.kernel_max_rows = 0  # calibrated: torch's matmul for any rows
        assert not fused.applies(model, one, None, None, caches)
        model.blocks[0].mlp.w1.kernel_max_rows = 32
        seen = []
        hook = model.blocks[1].hook_resid_mid.register_forward_hook(lambda *a: seen.append(1))
        assert not fused.applies(model, one, None, None, caches)
        model(one, caches=caches)  # the modules' path: the hook sees its activation
        assert seen == [1]
        hook.remove()
        assert fused.applies(model, one, None, None, caches)
        for module in (model.token_embedding, model.position_embedding, model.final_norm):
            hook = module.register_forward_hook(lambda *a: None)  # the step sums and norms too
            assert not fused.applies(model, one, None, None, caches)
            hook.remove()
        assert fused.applies(model, one, None, None, caches)
        follow_paths(caches, torch.tensor([0]), torch.tensor([0]))  # its kernel reads slot b
        assert not fused.applies(model, one, None, None, caches)
    assert not fused.applies(model, one, None, None, caches)  # gradients are being recorded
    model.to("cpu")  # moving the model may replace the tensors the fused step points at
    assert model.fused_decoding is None
