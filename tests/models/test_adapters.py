"""LoRA adapters in PEFT's layout, checked against PEFT and transformers themselves."""

import pytest
import torch

from tformer import GPT2, GPT2Config
from tformer.checkpoints import CheckpointError
from tformer.models.adapters import load_adapter, lora_targets, save_adapter
from tformer.models.gpt2_qa import GPT2ForQuestionAnswering
from tformer.nn.lora import LoRAConfig, add_lora, lora_layers

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def base_checkpoint(tmp_path):
    config = GPT2Config(vocab_size=61, max_len=20, d_model=32, n_layers=2, n_heads=4, dropout=0.0)
    model = GPT2(config, seed=0).eval()
    model.save_pretrained(tmp_path / "base")
    return model


def test_a_tformer_adapter_loads_in_peft_with_the_same_logits(tmp_path):
    model = base_checkpoint(tmp_path)
    add_lora(model, LoRAConfig(rank=4, alpha=8.0, targets=("w_qkv", "w_o", "w1", "w2")))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g))
    save_adapter(model, tmp_path / "adapter")

    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base")
    theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    ids = torch.randint(0, 61, (2, 11))
    plain = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base")
    with torch.no_grad():
        expected = theirs(input_ids=ids).logits
        assert not torch.allclose(expected, plain(input_ids=ids).logits, atol=1e-3)  # it adapts
    torch.testing.assert_close(model(ids), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "targets",
    [
        ["c_attn", "c_proj"],  # by suffix: both output projections
        ["attn.c_proj"],
        r".*\.h\.\d+\.mlp\.c_fc",  # a regular expression
        r"transformer\.h\.0\.attn\.c_attn",  # one block only
    ],
)
def test_a_peft_adapter_loads_in_tformer_with_the_same_logits(tmp_path, targets):
    base_checkpoint(tmp_path)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base")
    config = peft.LoraConfig(r=3, lora_alpha=5, target_modules=targets, fan_in_fan_out=True)
    theirs = peft.get_peft_model(hf, config)
    torch.manual_seed(2)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.normal_()
    theirs.save_pretrained(tmp_path / "adapter")
    theirs.eval()

    ours = GPT2.from_pretrained(tmp_path / "base").eval()
    loaded = load_adapter(ours, tmp_path / "adapter")
    assert loaded.rank == 3 and loaded.scaling == pytest.approx(5 / 3)
    ids = torch.randint(0, 61, (2, 11))
    with torch.no_grad():
        expected = theirs(input_ids=ids).logits
    torch.testing.assert_close(ours(ids), expected, rtol=1e-4, atol=1e-4)


def test_a_round_trip_keeps_every_adapter_number(tmp_path):
    model = base_checkpoint(tmp_path)
    add_lora(model, LoRAConfig(rank=2, targets=("w_o", "w2")))
    save_adapter(model, tmp_path / "adapter")
    again = GPT2.from_pretrained(tmp_path / "base")
    config = load_adapter(again, tmp_path / "adapter")
    assert config.targets == ("w2", "w_o")
    for (name, a), (_, b) in zip(
        model.state_dict().items(), again.state_dict().items(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_bad_adapters_are_refused(tmp_path):
    model = base_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="no LoRA layers"):
        save_adapter(model, tmp_path / "none")
    with pytest.raises(CheckpointError, match="no adapter_config.json"):
        load_adapter(model, tmp_path)
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text(
        '{"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}'
    )
    with pytest.raises(CheckpointError, match="name no GPT-2 linear layer"):
        load_adapter(model, tmp_path / "adapter")
    # weights that do not match the configuration: refused before the model is touched
    add_lora(model, LoRAConfig(rank=2, targets=("w_o",)))
    save_adapter(model, tmp_path / "wrong")
    config = (tmp_path / "wrong" / "adapter_config.json").read_text()
    (tmp_path / "wrong" / "adapter_config.json").write_text(
        config.replace("attn.c_proj", "mlp.c_fc")
    )
    fresh = GPT2.from_pretrained(tmp_path / "base")
    with pytest.raises(CheckpointError, match="tensors do not match"):
        load_adapter(fresh, tmp_path / "wrong")
    assert not lora_layers(fresh) and all(p.requires_grad for p in fresh.parameters())


def randomise_adapters(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g))


def test_save_pretrained_writes_the_adapters_naming_their_base(tmp_path):
    base_checkpoint(tmp_path)
    model = GPT2.from_pretrained(tmp_path / "base")
    add_lora(model, LoRAConfig(rank=2, targets=("w_qkv", "w1")))
    randomise_adapters(model)
    model.save_pretrained(tmp_path / "run")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    again = GPT2.from_pretrained(tmp_path / "run")  # the base, then the adapters on it
    assert set(lora_layers(again)) == set(lora_layers(model))
    ids = torch.randint(0, 61, (2, 11))
    torch.testing.assert_close(again(ids), model(ids), rtol=0, atol=0)
    # ... and PEFT reads the base's path from the same file
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "run").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits, model(ids), rtol=1e-4, atol=1e-4)
    peft_config = peft.PeftConfig.from_pretrained(tmp_path / "run")
    assert peft_config.base_model_name_or_path == str((tmp_path / "base").resolve())


def test_an_adapter_whose_base_is_gone_says_so(tmp_path):
    base_checkpoint(tmp_path)
    model = GPT2.from_pretrained(tmp_path / "base")
    add_lora(model, LoRAConfig(rank=2))
    model.save_pretrained(tmp_path / "run")
    (tmp_path / "base" / "config.json").rename(tmp_path / "elsewhere.json")
    with pytest.raises(CheckpointError, match="cannot load the model these adapters"):
        GPT2.from_pretrained(tmp_path / "run")


def qa_base(tmp_path):
    config = GPT2Config(vocab_size=61, max_len=20, d_model=32, n_layers=2, n_heads=4, dropout=0.0)
    GPT2(config, seed=0).save_pretrained(tmp_path / "base")
    return GPT2ForQuestionAnswering.from_pretrained(tmp_path / "base", seed=3)


def test_a_reader_adapter_carries_its_head_both_ways(tmp_path):
    model = qa_base(tmp_path)
    add_lora(model.gpt2, LoRAConfig(rank=2, alpha=4.0, targets=("w_qkv", "w2")))
    assert model.qa_outputs.weight.requires_grad  # the new head trains in full
    randomise_adapters(model)
    model.save_pretrained(tmp_path / "reader")
    ids = torch.randint(0, 61, (2, 11))
    ours = model.eval()(ids)  # (B, 2, T)

    again = GPT2ForQuestionAnswering.from_pretrained(tmp_path / "reader")
    torch.testing.assert_close(again(ids), ours, rtol=0, atol=0)
    # PEFT's reader: the same base, a different head until the adapter's is loaded
    hf = transformers.GPT2ForQuestionAnswering.from_pretrained(tmp_path / "base")
    theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "reader").eval()
    with torch.no_grad():
        out = theirs(input_ids=ids)
    torch.testing.assert_close(out.start_logits, ours[:, 0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.end_logits, ours[:, 1], rtol=1e-4, atol=1e-4)
    with pytest.raises(CheckpointError, match="question-answering adapter"):
        GPT2.from_pretrained(tmp_path / "reader")


def test_a_peft_reader_adapter_loads_in_tformer(tmp_path):
    qa_base(tmp_path)
    hf = transformers.GPT2ForQuestionAnswering.from_pretrained(tmp_path / "base")
    config = peft.LoraConfig(task_type="QUESTION_ANS", r=3, lora_alpha=6, target_modules=["c_fc"])
    theirs = peft.get_peft_model(hf, config)
    torch.manual_seed(4)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name or "qa_outputs" in name:
                p.normal_()
    theirs.save_pretrained(tmp_path / "reader")
    theirs.eval()
    ours = GPT2ForQuestionAnswering.from_pretrained(tmp_path / "base")
    load_adapter(ours, tmp_path / "reader")
    ids = torch.randint(0, 61, (2, 11))
    with torch.no_grad():
        out = theirs(input_ids=ids)
    logits = ours.eval()(ids)
    torch.testing.assert_close(logits[:, 0], out.start_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits[:, 1], out.end_logits, rtol=1e-4, atol=1e-4)


def test_lora_targets_are_named_either_way():
    assert lora_targets(["c_attn", "mlp.c_proj", "w1", "w_qkv"]) == ("w_qkv", "w2", "w1")
    with pytest.raises(ValueError, match="say attn.c_proj or mlp.c_proj"):
        lora_targets(["c_proj"])


def test_a_language_model_s_adapters_start_a_reader_with_a_new_head(tmp_path):
    base_checkpoint(tmp_path)
    model = GPT2.from_pretrained(tmp_path / "base")
    add_lora(model, LoRAConfig(rank=2), seed=0)
    randomise_adapters(model)
    model.save_pretrained(tmp_path / "lm-adapters")
    reader = GPT2ForQuestionAnswering.from_pretrained(tmp_path / "lm-adapters", seed=5)
    ids = torch.randint(0, 61, (2, 11))
    torch.testing.assert_close(reader.gpt2.features(ids), model.features(ids), rtol=0, atol=0)
    with pytest.raises(CheckpointError, match="without a question-answering head"):
        GPT2ForQuestionAnswering.from_pretrained(tmp_path / "lm-adapters", head_required=True)


def test_an_adapter_names_a_hub_model_by_its_name_and_a_directory_by_its_path(tmp_path):
    from tformer.checkpoints import name_or_path

    snapshot = tmp_path / "hub-cache" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    assert name_or_path("gpt2", snapshot) == "gpt2"  # not the machine's cache directory
    assert name_or_path(str(snapshot), snapshot) == str(snapshot.resolve())


def test_load_weights_fills_the_existing_lora_layers_and_head(tmp_path):
    model = qa_base(tmp_path)
    add_lora(model.gpt2, LoRAConfig(rank=2, targets=("w_qkv", "w2")), seed=0)
    randomise_adapters(model)
    model.save_pretrained(tmp_path / "reader")
    other = GPT2ForQuestionAnswering.from_pretrained(tmp_path / "base", seed=9)
    add_lora(other.gpt2, LoRAConfig(rank=2, targets=("w_qkv", "w2")), seed=1)
    layers = lora_layers(other)
    other.load_weights(tmp_path / "reader")
    assert lora_layers(other) == layers  # the same layers, filled in place
    ids = torch.randint(0, 61, (2, 11))
    torch.testing.assert_close(other.eval()(ids), model.eval()(ids), rtol=0, atol=0)
    wrong = GPT2ForQuestionAnswering.from_pretrained(tmp_path / "base")
    add_lora(wrong.gpt2, LoRAConfig(rank=2, targets=("w_o",)))
    with pytest.raises(CheckpointError, match="this model's LoRA layers are"):
        wrong.load_weights(tmp_path / "reader")


def test_load_weights_of_a_language_model_with_lora_layers(tmp_path):
    base_checkpoint(tmp_path)
    model = GPT2.from_pretrained(tmp_path / "base")
    add_lora(model, LoRAConfig(rank=2), seed=0)
    randomise_adapters(model)
    model.save_pretrained(tmp_path / "run")
    other = GPT2.from_pretrained(tmp_path / "base")
    add_lora(other, LoRAConfig(rank=2), seed=1)
    other.load_weights(tmp_path / "run")
    ids = torch.randint(0, 61, (2, 11))
    torch.testing.assert_close(other(ids), model(ids), rtol=0, atol=0)
