import pytest
import torch
from torch import nn

from tformer import GPT2, GPT2Config
from tformer.nn.lora import LoRAConfig, LoRALinear, add_lora, lora_layers, merge_lora


def tiny_gpt(seed=0):
    config = GPT2Config(vocab_size=50, max_len=16, d_model=24, n_layers=2, n_heads=3, dropout=0.0)
    return GPT2(config, seed=seed).eval()


def randomise_adapters(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.1)


def test_lora_linear_is_the_formula():
    base = nn.Linear(6, 5)
    layer = LoRALinear(base, LoRAConfig(rank=2, alpha=3.0))
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(4, 6)
    a, b = layer.lora_A.weight, layer.lora_B.weight  # (r, in), (out, r)
    expected = x @ base.weight.T + base.bias + (3.0 / 2) * x @ a.T @ b.T
    torch.testing.assert_close(layer(x), expected)
    assert layer.weight is base.weight and not layer.weight.requires_grad  # frozen, not copied


def test_lora_at_initialisation_changes_no_output():
    model = tiny_gpt()
    ids = torch.randint(0, 50, (2, 9))
    before = model(ids)
    add_lora(model, LoRAConfig(rank=4, targets=("w_qkv", "w_o", "w1", "w2")))
    torch.testing.assert_close(model(ids), before, rtol=0, atol=0)  # B = 0


def test_only_the_adapters_train_and_their_count_is_r_in_plus_out():
    model = tiny_gpt()
    names = add_lora(model, LoRAConfig(rank=4, targets=("w_qkv", "w_o")))
    assert names == [
        "blocks.0.attn.w_qkv",
        "blocks.0.attn.w_o",
        "blocks.1.attn.w_qkv",
        "blocks.1.attn.w_o",
    ]
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert set(trainable) == {f"{name}.lora_{ab}.weight" for name in names for ab in "AB"}
    # r (in + out) per layer: w_qkv 24 -> 72, w_o 24 -> 24
    assert sum(trainable.values()) == 2 * (4 * (24 + 72) + 4 * (24 + 24))
    ids = torch.randint(0, 50, (2, 9))
    model(ids).sum().backward()
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_merged_model_equals_the_adapted_one():
    model = tiny_gpt()
    add_lora(model, LoRAConfig(rank=3, alpha=6.0, targets=("w_qkv", "w2")))
    randomise_adapters(model)
    ids = torch.randint(0, 50, (2, 9))
    adapted = model(ids)
    assert not torch.allclose(adapted, tiny_gpt()(ids))  # the adapters do something
    merged = merge_lora(model)
    assert len(merged) == 4 and not lora_layers(model)
    assert not any(p.requires_grad for p in model.parameters())  # frozen like the base
    torch.testing.assert_close(model(ids), adapted, rtol=1e-5, atol=1e-5)


def test_bad_lora_settings_are_refused():
    with pytest.raises(ValueError, match="rank must be positive"):
        LoRAConfig(rank=0)
    model = tiny_gpt()
    with pytest.raises(ValueError, match="no linear layer named c_attn; this model's are"):
        add_lora(model, LoRAConfig(targets=("c_attn",)))
    add_lora(model, LoRAConfig())
    with pytest.raises(ValueError, match="already has LoRA layers"):
        add_lora(model, LoRAConfig())
    with pytest.raises(ValueError, match="not loaded from a checkpoint"):
        model.save_pretrained("/nonexistent")  # its adapters could not name their base


def test_the_same_seed_draws_the_same_adapters():
    def drawn(seed):
        model = tiny_gpt()
        torch.manual_seed(seed)  # the global generator must not matter
        add_lora(model, LoRAConfig(rank=2, targets=("w_qkv", "w1")), seed=7)
        return [layer.lora_A.weight for layer in lora_layers(model).values()]

    first, second = drawn(0), drawn(1)
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(first[0], first[1])  # each layer its own draw


def test_while_adapters_read_a_norm_it_writes_float32_for_them():
    """Under CPU bf16 autocast a pre-LN norm writes bf16 for its one reader (nn/norm.py);
    with LoRA two layers read it, whose gradients must add in float32: not while adapted."""
    from tformer.nn.sublayer import SublayerConnection

    model = GPT2(GPT2Config(vocab_size=50, max_len=16, d_model=32, n_layers=2, n_heads=2))
    sublayers = [m for m in model.modules() if isinstance(m, SublayerConnection)]
    seen = []
    sublayers[0].norm.register_forward_hook(lambda module, args, out: seen.append(out.dtype))

    def norm_dtype():
        seen.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(torch.zeros(1, 4, dtype=torch.long))
        return seen[0]

    assert all(s.norm_writes_bf16 for s in sublayers)
    plain = norm_dtype()  # bf16 where the compiled kernels are built
    add_lora(model, LoRAConfig(rank=2, targets=("w_qkv", "w1")), seed=0)
    assert not any(s.norm_writes_bf16 for s in sublayers) and norm_dtype() == torch.float32
    merge_lora(model)
    assert all(s.norm_writes_bf16 for s in sublayers) and norm_dtype() == plain
