"""GPT-2 checkpoints against the reference implementation, transformers.GPT2LMHeadModel."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

from tformer import GPT2, CheckpointError, GPT2Config  # noqa: E402

# Unusual shapes on purpose: odd widths, a head count that is not a power of two, a
# vocabulary and context no preset has, a d_ff that is not 4 C.
SHAPES = [
    dict(n_layer=3, n_head=5, n_embd=80, vocab_size=311, n_positions=37),
    dict(n_layer=1, n_head=1, n_embd=16, vocab_size=50, n_positions=8),
    dict(n_layer=2, n_head=4, n_embd=64, vocab_size=1000, n_positions=64, n_inner=100),
    dict(n_layer=2, n_head=2, n_embd=24, vocab_size=77, n_positions=20, layer_norm_epsilon=1e-2),
    dict(n_layer=2, n_head=3, n_embd=48, vocab_size=65, n_positions=32, activation_function="gelu"),
    dict(n_layer=1, n_head=2, n_embd=32, vocab_size=65, n_positions=16, activation_function="relu"),
]


def hf_model(shape, seed=0) -> "transformers.GPT2LMHeadModel":
    torch.manual_seed(seed)
    config = transformers.GPT2Config(**shape, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # random everything, LayerNorms and biases too
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def batch(vocab, max_len, seed=1):
    g = torch.Generator().manual_seed(seed)
    t = min(max_len, 12)
    ids = torch.randint(0, vocab, (3, t), generator=g)
    mask = torch.ones(3, t, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    mask[2, -2:] = 0  # right padding
    return ids, mask


def max_diff(a, b):
    return (a - b).abs().max().item()


def assert_same_logits(model, reference, shape):
    """Within 1e-4 in float32, on a plain batch and on one with left and right padding."""
    ids, mask = batch(shape["vocab_size"], shape["n_positions"])
    with torch.no_grad():
        assert max_diff(model(ids), reference(ids).logits) <= 1e-4
        ours, theirs = model(ids, attention_mask=mask), reference(ids, attention_mask=mask).logits
    real = mask.bool()  # padding positions' outputs are nobody's prediction
    assert max_diff(ours[real], theirs[real]) <= 1e-4


@pytest.mark.parametrize(
    "shape", SHAPES, ids=lambda s: f"{s['n_layer']}L{s['n_head']}H{s['n_embd']}C"
)
def test_hf_checkpoint_loads_with_identical_logits(shape, tmp_path):
    reference = hf_model(shape)
    reference.save_pretrained(tmp_path)
    model = GPT2.from_pretrained(tmp_path)
    assert_same_logits(model, reference, shape)


@pytest.mark.parametrize(
    "shape", SHAPES, ids=lambda s: f"{s['n_layer']}L{s['n_head']}H{s['n_embd']}C"
)
def test_saved_tformer_model_loads_in_transformers_with_identical_logits(shape, tmp_path):
    config = GPT2Config(
        vocab_size=shape["vocab_size"],
        max_len=shape["n_positions"],
        d_model=shape["n_embd"],
        n_layers=shape["n_layer"],
        n_heads=shape["n_head"],
        d_ff=shape.get("n_inner"),
        layer_norm_eps=shape.get("layer_norm_epsilon", 1e-5),
        activation={"gelu": "gelu", "relu": "relu"}.get(
            shape.get("activation_function"), "gelu_tanh"
        ),
        dropout=0.0,
    )
    model = GPT2(config, seed=0).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(tmp_path)
    reference = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    assert_same_logits(model, reference, shape)
    reloaded = GPT2.from_pretrained(tmp_path)
    for (name, a), b in zip(
        model.state_dict().items(), reloaded.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    assert reloaded.config == config


def test_pytorch_bin_and_unprefixed_names_load(tmp_path):
    reference = hf_model(SHAPES[0])
    (tmp_path / "bin").mkdir()
    reference.config.to_json_file(tmp_path / "bin" / "config.json")
    torch.save(reference.state_dict(), tmp_path / "bin" / "pytorch_model.bin")  # the older format
    reference.transformer.save_pretrained(tmp_path / "base")  # GPT2Model: no "transformer."
    assert not any(
        k.startswith("transformer.") for k in load_file(tmp_path / "base" / "model.safetensors")
    )
    ids, _ = batch(311, 37)
    with torch.no_grad():
        expected = reference(ids).logits
        for sub in ("bin", "base"):
            assert max_diff(GPT2.from_pretrained(tmp_path / sub)(ids), expected) <= 1e-4


def test_sharded_safetensors_load(tmp_path):
    reference = hf_model(SHAPES[1])
    reference.config.to_json_file(tmp_path / "config.json")
    names = sorted(k for k in reference.state_dict() if k != "lm_head.weight")  # tied to wte
    shards = {
        "model-00001-of-00002.safetensors": names[::2],
        "model-00002-of-00002.safetensors": names[1::2],
    }
    for shard, keys in shards.items():
        save_file({k: reference.state_dict()[k].contiguous() for k in keys}, tmp_path / shard)
    weight_map = {k: shard for shard, keys in shards.items() for k in keys}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    ids, _ = batch(50, 8)
    with torch.no_grad():
        assert max_diff(GPT2.from_pretrained(tmp_path)(ids), reference(ids).logits) <= 1e-4


def test_bfloat16_load_gives_float32_logits_to_bf16_precision(tmp_path):
    reference = hf_model(SHAPES[0])
    reference.save_pretrained(tmp_path)
    model = GPT2.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    ids, _ = batch(311, 37)
    with torch.no_grad():
        ours, theirs = model(ids).float(), reference(ids).logits
    # bf16 keeps 8 bits of mantissa: errors of a few hundredths on logits of spread ~1
    # (measured 0.04), where a wrong weight would be off by whole units.
    assert max_diff(ours, theirs) <= 0.1


@pytest.fixture
def saved(tmp_path):
    hf_model(SHAPES[1]).save_pretrained(tmp_path)
    return tmp_path


def rewrite_tensors(directory, change):
    tensors = load_file(directory / "model.safetensors")
    change(tensors)
    save_file(tensors, directory / "model.safetensors")


def test_missing_tensor_is_named(saved):
    rewrite_tensors(saved, lambda t: t.pop("transformer.h.0.mlp.c_fc.bias"))
    with pytest.raises(CheckpointError, match=r"missing tensors: h\.0\.mlp\.c_fc\.bias"):
        GPT2.from_pretrained(saved)


def test_mismatched_shape_is_named(saved):
    config = json.loads((saved / "config.json").read_text())
    config["n_embd"] = 32
    config["n_head"] = 2
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        CheckpointError, match=r"shape does not match config.json: wte.weight \(50, 16\)"
    ):
        GPT2.from_pretrained(saved)


def test_unexpected_tensor_is_named(saved):
    rewrite_tensors(
        saved, lambda t: t.__setitem__("transformer.h.7.attn.c_attn.weight", torch.zeros(1))
    )
    with pytest.raises(CheckpointError, match=r"tensors a GPT-2 does not have: h\.7\.attn\.c_attn"):
        GPT2.from_pretrained(saved)


def test_tensor_stored_with_and_without_prefix_is_refused(saved):
    rewrite_tensors(saved, lambda t: t.__setitem__("wte.weight", torch.zeros(50, 16)))
    with pytest.raises(CheckpointError, match="stored twice.*wte.weight"):
        GPT2.from_pretrained(saved)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("layer_norm_epsilon", "x", "layer_norm_eps must be a positive number"),
        ("resid_pdrop", None, "dropout must be a number"),
        ("n_layer", "2", "n_layers must be a positive integer"),
        ("vocab_size", "10", "vocab_size must be a positive integer"),
    ],
)
def test_config_values_of_the_wrong_type_are_named(saved, field, value, message):
    config = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps({**config, field: value}))
    with pytest.raises(CheckpointError, match=message):
        GPT2.from_pretrained(saved)


def test_untied_head_is_refused(saved):
    rewrite_tensors(saved, lambda t: t.__setitem__("lm_head.weight", torch.randn(50, 16)))
    with pytest.raises(CheckpointError, match="untied head is not supported"):
        GPT2.from_pretrained(saved)


def test_truncated_weights_file_is_reported(saved):
    path = saved / "model.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="model.safetensors: cannot read weights"):
        GPT2.from_pretrained(saved)


def test_missing_config_or_weights_are_reported(tmp_path):
    with pytest.raises(CheckpointError, match="config.json: missing"):
        GPT2.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(
        json.dumps(dict(n_embd=16, n_layer=1, n_head=1, vocab_size=50))
    )
    with pytest.raises(CheckpointError, match="no weights found"):
        GPT2.from_pretrained(tmp_path)


def test_other_architectures_are_refused(saved):
    config = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(CheckpointError, match="model_type is 'llama'"):
        GPT2.from_pretrained(saved)
    (saved / "config.json").write_text(json.dumps({**config, "activation_function": "swish"}))
    with pytest.raises(CheckpointError, match="activation_function 'swish'"):
        GPT2.from_pretrained(saved)


def test_pickled_objects_in_bin_are_never_unpickled(tmp_path):
    hf_model(SHAPES[1]).config.to_json_file(tmp_path / "config.json")
    torch.save({"wte.weight": torch.zeros(1), "payload": object()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="cannot read weights"):
        GPT2.from_pretrained(tmp_path)


def test_a_file_instead_of_a_directory_is_reported(saved):
    with pytest.raises(CheckpointError, match="is a file and not a GGUF file; pass the directory"):
        GPT2.from_pretrained(saved / "config.json")


def test_hub_name_without_network_says_how_to_load_locally(monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(CheckpointError, match="point at a local directory that holds config.json"):
        GPT2.from_pretrained("gpt2")


def test_post_ln_model_cannot_be_saved_as_gpt2(tmp_path):
    model = GPT2(
        GPT2Config(vocab_size=20, max_len=8, d_model=8, n_layers=1, n_heads=2, norm_position="post")
    )
    with pytest.raises(CheckpointError, match="only the GPT-2 architecture"):
        model.save_pretrained(tmp_path)
    assert not any(tmp_path.iterdir())  # nothing half-written
