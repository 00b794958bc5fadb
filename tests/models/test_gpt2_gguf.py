"""GPT-2 as a GGUF file: tformer -> GGUF -> tformer for each tokenizer and type, a file
written by the gguf package's own writer (not by tformer), and every refusal.

The quantised types are checked twice: the weights read back are exactly the gguf
package's dequantisation of its own quantisation (the reference implementation of ggml's),
and each lies within half a quantisation step of the original, computed here from the
formulas (q8_0: d = max|x| / 127; q4_0: d = m / -8, m the value of largest magnitude)."""

import json

import numpy as np
import pytest
import torch

from tformer import GPT2, CheckpointError, GPT2Config
from tformer.checkpoints.gguf import TYPE_NAMES, decode, encode, read_gguf, write_gguf
from tformer.cli.main import main
from tformer.models.gpt2_gguf import name_table
from tformer.tokenizers import CharTokenizer, GPT2Tokenizer, train_bpe

TEXT = "the cat sees the moon. a dog hears the sea.\nnaïve café, ☃ and 😀 too\n"


@pytest.fixture(scope="module")
def tokenizers():
    return {
        "char": CharTokenizer.from_text(TEXT),
        "bpe": train_bpe([TEXT * 20], vocab_size=300),
        "gpt2": GPT2Tokenizer(),
    }


def model_for(tokenizer, **overrides) -> GPT2:
    torch.manual_seed(0)
    settings = dict(vocab_size=tokenizer.vocab_size, max_len=32, d_model=64, n_layers=2,
                    n_heads=4, d_ff=96, dropout=0.0, eos_id=tokenizer.eos_id)  # fmt: skip
    model = GPT2(GPT2Config(**{**settings, **overrides})).eval()
    with torch.no_grad():  # LayerNorms and biases away from their initial values too
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def logits(model, tokenizer) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([tokenizer.encode(TEXT)[:32]]))


@pytest.mark.parametrize("kind", ["char", "bpe", "gpt2"])
def test_f32_round_trip_is_exact_with_the_same_tokenizer(kind, tokenizers, tmp_path):
    tokenizer = tokenizers[kind]
    model = model_for(tokenizer)
    model.save_gguf(tmp_path / "m.gguf", tokenizer)
    back, read_tokenizer = GPT2.from_gguf(tmp_path / "m.gguf")
    assert back.config == model.config
    assert (logits(back, tokenizer) - logits(model, tokenizer)).abs().max().item() <= 1e-5
    assert type(read_tokenizer) is type(tokenizer)
    assert read_tokenizer.encode(TEXT) == tokenizer.encode(TEXT)
    assert read_tokenizer.decode(tokenizer.encode(TEXT)) == TEXT
    assert read_tokenizer.eos_id == tokenizer.eos_id


@pytest.mark.parametrize("type_name", [t for t in TYPE_NAMES if t != "f32"])
@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_rounded_types_read_back_as_their_dequantised_weights(
    kind, type_name, tokenizers, tmp_path
):
    tokenizer = tokenizers[kind]
    model = model_for(tokenizer)
    model.save_gguf(tmp_path / "m.gguf", tokenizer, type_name)
    back, _ = GPT2.from_gguf(tmp_path / "m.gguf")
    state, read = model.state_dict(), back.state_dict()
    reference = model_for(tokenizer)
    expected_types = read_gguf(tmp_path / "m.gguf", with_tensors=False).types
    for ours, theirs, matrix in name_table(model.config):
        stored = expected_types[theirs]
        assert stored == (("q8_0" if theirs == "token_embd.weight" and type_name == "q4_0"
                           else type_name) if matrix else "f32")  # fmt: skip
        rounded = decode(encode(state[ours].numpy(), stored), stored).reshape(state[ours].shape)
        assert torch.equal(read[ours], torch.from_numpy(rounded)), ours
        reference.state_dict()[ours].copy_(read[ours])
    # the model read back computes what its dequantised weights compute
    assert (logits(back, tokenizer) - logits(reference, tokenizer)).abs().max() <= 1e-5


def blocks(x: np.ndarray) -> np.ndarray:
    return x.reshape(-1, 32)


@pytest.mark.parametrize("type_name", ["q8_0", "q4_0"])
def test_block_quantisation_is_within_half_a_step_of_the_formula(type_name):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((8, 96)) * rng.uniform(0.01, 3, (8, 1))).astype(np.float32)
    x[0, :32] = 0.0  # an all-zero block
    back = blocks(decode(encode(x, type_name), type_name))
    x = blocks(x)
    if type_name == "q8_0":
        step, most = np.abs(x).max(axis=1, keepdims=True) / 127, 127
        error = 0.5 * step
    else:  # q runs from -8 (the largest value's side) to 7: beyond 7.5 steps on the other
        largest = np.take_along_axis(x, np.abs(x).argmax(axis=1)[:, None], axis=1)
        step, most = np.abs(largest) / 8, 8  # side it is clamped, at most one step away
        error = np.maximum(0.5 * step, np.abs(x) - 7 * step)
    # plus the float16 rounding of the scale (2^-11 relative) times |q| <= most
    bound = error + step * most * 2.0**-11 + 1e-12
    assert np.all(np.abs(back - x) <= bound)
    assert np.all(back[0] == 0)


def test_a_file_written_by_the_gguf_package_itself_loads(tokenizers, tmp_path):
    """As llama.cpp's converter writes GPT-2: the ggml names, the hyperparameters through
    gguf's own writer methods, an explicit output.weight equal to the embedding, q8_0."""
    import gguf

    tokenizer = tokenizers["bpe"]
    model = model_for(tokenizer, d_ff=128)
    state = model.state_dict()
    writer = gguf.GGUFWriter(tmp_path / "theirs.gguf", "gpt2")
    writer.add_block_count(2)
    writer.add_context_length(32)
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(128)
    writer.add_head_count(4)
    writer.add_layer_norm_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    spec = json.loads(tokenizer.tokenizer.to_str())["model"]
    tokens = sorted(spec["vocab"], key=spec["vocab"].get)
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t == "<|endoftext|>" else 1 for t in tokens])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["merges"]])
    writer.add_eos_token_id(0)
    q8 = gguf.GGMLQuantizationType.Q8_0
    for ours, theirs, matrix in name_table(model.config):
        array = state[ours].numpy()
        if matrix:
            writer.add_tensor(theirs, gguf.quants.quantize(array, q8), raw_dtype=q8)
        else:
            writer.add_tensor(theirs, array)
    embedding = state["token_embedding.weight"].numpy()
    writer.add_tensor("output.weight", gguf.quants.quantize(embedding, q8), raw_dtype=q8)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    back = GPT2.from_pretrained(tmp_path / "theirs.gguf")  # the usual entry point
    assert back.config.activation == "gelu_tanh" and back.config.eos_id == 0
    assert back.config.d_ff == 128 and back.config.vocab_size == tokenizer.vocab_size
    mine = tmp_path / "mine.gguf"
    model.save_gguf(mine, tokenizer, "q8_0")
    assert (
        logits(back, tokenizer) - logits(GPT2.from_pretrained(mine), tokenizer)
    ).abs().max() <= 1e-5
    _, read_tokenizer = GPT2.from_gguf(tmp_path / "theirs.gguf")
    assert read_tokenizer.encode(TEXT) == tokenizer.encode(TEXT)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(norm_position="post"), "pre-LN blocks with residual connections"),
        (dict(residual=False), "pre-LN blocks with residual connections"),
        (dict(activation="relu"), "this model uses ReLU"),
        (dict(activation="gelu"), "--approximate-gelu"),
        (dict(positions="sinusoidal"), "adds learned positions to unscaled token embeddings"),
        (dict(init="vaswani"), "adds learned positions to unscaled token embeddings"),
    ],
)
def test_what_llama_cpp_cannot_compute_is_refused(overrides, message, tokenizers, tmp_path):
    tokenizer = tokenizers["char"]
    with pytest.raises(ValueError, match=message):
        model_for(tokenizer, **overrides).save_gguf(tmp_path / "m.gguf", tokenizer)
    assert not (tmp_path / "m.gguf").exists()


def test_exact_gelu_exports_when_asked_and_reads_back_exact(tokenizers, tmp_path):
    tokenizer = tokenizers["char"]
    model = model_for(tokenizer, activation="gelu")
    model.save_gguf(tmp_path / "m.gguf", tokenizer, approximate_gelu=True)
    back = GPT2.from_pretrained(tmp_path / "m.gguf")
    assert back.config.activation == "gelu"  # tformer computes what it was trained with
    assert torch.equal(logits(back, tokenizer), logits(model, tokenizer))


def test_blocks_of_32_need_rows_of_whole_blocks(tokenizers, tmp_path):
    tokenizer = tokenizers["char"]
    model = model_for(tokenizer, d_model=48, n_heads=4)
    with pytest.raises(ValueError, match="d_model is 48: export it as f32"):
        model.save_gguf(tmp_path / "m.gguf", tokenizer, "q8_0")
    model.save_gguf(tmp_path / "m.gguf", tokenizer, "bf16")  # any width for the float types


@pytest.mark.parametrize("alignment", [None, 64])
def test_the_reader_reads_what_the_gguf_package_s_reader_reads(alignment, tmp_path):
    """checkpoints/gguf.py parses the layout itself: every metadata type, arrays of
    numbers and of strings, every ggml type tformer writes, another alignment; the same
    values as gguf.GGUFReader, the package llama.cpp maintains."""
    import gguf

    writer = gguf.GGUFWriter(tmp_path / "all.gguf", "gpt2")
    if alignment:
        writer.add_custom_alignment(alignment)
    writer.add_uint8("t.u8", 200)
    writer.add_int8("t.i8", -100)
    writer.add_uint16("t.u16", 60000)
    writer.add_int16("t.i16", -30000)
    writer.add_uint32("t.u32", 4_000_000_000)
    writer.add_int32("t.i32", -2_000_000_000)
    writer.add_float32("t.f32", 0.1)
    writer.add_bool("t.bool", True)
    writer.add_string("t.str", "héllo ☃")
    writer.add_uint64("t.u64", 2**63 + 5)
    writer.add_int64("t.i64", -(2**62))
    writer.add_float64("t.f64", 1 / 3)
    writer.add_array("t.strs", ["a", "", "Ġthe", "😀"])
    writer.add_array("t.ints", [1, -2, 3])
    writer.add_array("t.floats", [0.5, -1.25])
    g = np.random.default_rng(0)
    for type_name in TYPE_NAMES:
        array = g.standard_normal((3, 64)).astype(np.float32)
        raw = None if type_name in ("f32", "f16") else gguf.GGMLQuantizationType[type_name.upper()]
        writer.add_tensor(f"w.{type_name}", encode(array, type_name), raw_dtype=raw)
    writer.add_tensor("bias", g.standard_normal(5).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    ours = read_gguf(tmp_path / "all.gguf")
    theirs = gguf.GGUFReader(tmp_path / "all.gguf")
    expected = {}
    for key, field in theirs.fields.items():
        if not key.startswith("GGUF."):
            value = field.contents()
            expected[key] = value.tolist() if isinstance(value, np.ndarray) else value
    assert ours.metadata == expected
    assert ours.metadata["t.str"] == "héllo ☃" and ours.metadata["t.u64"] == 2**63 + 5
    assert ours.metadata["t.strs"] == ["a", "", "Ġthe", "😀"]
    assert len(ours.tensors) == len(theirs.tensors) == len(TYPE_NAMES) + 1
    for tensor in theirs.tensors:
        type_name = tensor.tensor_type.name.lower()
        shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
        assert ours.types[tensor.name] == type_name and ours.shapes[tensor.name] == shape
        values = decode(np.asarray(tensor.data), type_name).reshape(shape)
        assert torch.equal(ours.tensors[tensor.name], torch.from_numpy(values))


def test_foreign_and_broken_files_are_refused(tokenizers, tmp_path):
    (tmp_path / "text.gguf").write_text("not a model")
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        GPT2.from_gguf(tmp_path / "text.gguf")
    write_gguf(tmp_path / "llama.gguf", "llama", {}, [("x", np.zeros((2, 32), np.float32), "f32")])
    with pytest.raises(CheckpointError, match="general.architecture is 'llama'"):
        GPT2.from_pretrained(tmp_path / "llama.gguf")
    tokenizer = tokenizers["char"]
    model_for(tokenizer).save_gguf(tmp_path / "m.gguf", tokenizer)
    data = (tmp_path / "m.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.gguf"):
        GPT2.from_gguf(tmp_path / "cut.gguf")
    for cut in (10, 30, 200):  # inside the header, a key, the metadata
        (tmp_path / "cut.gguf").write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="cut.gguf: cannot read this GGUF file"):
            read_gguf(tmp_path / "cut.gguf")
    (tmp_path / "v1.gguf").write_bytes(b"GGUF" + (1).to_bytes(4, "little") + data[8:])
    with pytest.raises(CheckpointError, match="GGUF version 1: tformer reads versions 2 and 3"):
        read_gguf(tmp_path / "v1.gguf")


def test_an_untied_output_head_is_refused(tokenizers, tmp_path):
    tokenizer = tokenizers["char"]
    model = model_for(tokenizer)
    state = model.state_dict()
    tensors = [(theirs, state[ours].numpy(), "f32") for ours, theirs, _ in name_table(model.config)]
    tensors.append(("output.weight", np.ones_like(state["token_embedding.weight"].numpy()), "f32"))
    model.save_gguf(tmp_path / "m.gguf", tokenizer)
    metadata = read_gguf(tmp_path / "m.gguf", with_tensors=False).metadata
    del metadata["general.architecture"]  # the writer adds it
    write_gguf(tmp_path / "untied.gguf", "gpt2", metadata, tensors)
    with pytest.raises(CheckpointError, match="untied head is not supported"):
        GPT2.from_gguf(tmp_path / "untied.gguf")


def test_the_cli_exports_a_run_and_reads_the_file_back(tmp_path, capsys, corpus_file):
    run = tmp_path / "run"
    main(["train", "--data", str(corpus_file), "--n-layers", "1", "--d-model", "32",
          "--n-heads", "2", "--context", "16", "--steps", "2", "--batch-size", "2",
          "--activation", "gelu_tanh", "--sample-tokens", "0", "--out", str(run)])  # fmt: skip
    capsys.readouterr()
    main(["export", "gguf", str(run), "--type", "q8_0", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert report["file"] == str(run / "model-q8_0.gguf") and report["type"] == "q8_0"
    main(["generate", report["file"], "--prompt", "the", "--max-new-tokens", "5", "--seed", "1"])
    assert capsys.readouterr().out.startswith("the")
    main(["info", report["file"], "--json"])
    assert json.loads(capsys.readouterr().out)["config"]["d_model"] == 32


def test_the_cli_says_why_it_cannot_export(tmp_path, capsys, corpus_file):
    run = tmp_path / "run"
    main(
        [
            "train",
            "--data",
            str(corpus_file),
            "--n-layers",
            "1",
            "--d-model",
            "32",
            "--n-heads",
            "2",
            "--context",
            "16",
            "--steps",
            "1",
            "--batch-size",
            "2",
            "--sample-tokens",
            "0",
            "--out",
            str(run),
        ]
    )  # fmt: skip  (exact GELU, the default)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["export", "gguf", str(run)])
    err = capsys.readouterr().err
    assert "--approximate-gelu" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit):
        main(["export", "gguf", str(run), "--type", "q3_k"])
    assert "invalid choice" in capsys.readouterr().err


def test_a_translation_model_has_no_gguf_layout(tmp_path, capsys):
    from tformer.models.seq2seq import Seq2SeqConfig, Seq2SeqTransformer

    tokenizer = CharTokenizer(["\x00", "\x01", "\x02", *"abc "])
    config = Seq2SeqConfig(7, 7, max_len=16, d_model=32, n_heads=2, n_encoder_layers=1,
                           n_decoder_layers=1, d_ff=64, share_embeddings=True)  # fmt: skip
    Seq2SeqTransformer(config, seed=0).save_pretrained(tmp_path / "mt")
    tokenizer.save(tmp_path / "mt")
    with pytest.raises(SystemExit):
        main(["export", "gguf", str(tmp_path / "mt")])
    assert "holds a translation model" in capsys.readouterr().err
    assert not list((tmp_path / "mt").glob("*.gguf"))


def test_a_padded_vocabulary_gets_unused_tokens_and_reads_back(tokenizers, tmp_path):
    """An embedding with more rows than the tokenizer has tokens (padded for speed): GGUF
    names one token per row, so the rest are llama.cpp's unused "[PAD<i>]" tokens."""
    tokenizer = tokenizers["char"]
    model = model_for(tokenizer, vocab_size=tokenizer.vocab_size + 7)
    model.save_gguf(tmp_path / "m.gguf", tokenizer)
    metadata = read_gguf(tmp_path / "m.gguf", with_tensors=False).metadata
    assert len(metadata["tokenizer.ggml.tokens"]) == tokenizer.vocab_size + 7
    assert metadata["tokenizer.ggml.tokens"][-1] == f"[PAD{tokenizer.vocab_size + 6}]"
    assert metadata["tokenizer.ggml.token_type"][-7:] == [5] * 7
    back, read_tokenizer = GPT2.from_gguf(tmp_path / "m.gguf")
    assert back.config.vocab_size == tokenizer.vocab_size + 7
    assert read_tokenizer.chars == tokenizer.chars
    too_small = model_for(tokenizer, vocab_size=tokenizer.vocab_size - 1)
    with pytest.raises(ValueError, match="do not belong together"):
        too_small.save_gguf(tmp_path / "small.gguf", tokenizer)


def test_a_head_rounded_wider_than_the_embedding_is_the_same_tied_matrix(tokenizers, tmp_path):
    """llama.cpp's quantiser stores output.weight wider than token_embd (e.g. q8_0 over
    q4_0): the same matrix in two roundings loads, the wider one kept."""
    tokenizer = tokenizers["char"]
    model = model_for(tokenizer)
    state = model.state_dict()
    tensors = []
    for ours, theirs, _ in name_table(model.config):
        type_name = "q4_0" if theirs == "token_embd.weight" else "f32"
        tensors.append((theirs, state[ours].numpy(), type_name))
    tensors.append(("output.weight", state["token_embedding.weight"].numpy(), "q8_0"))
    model.save_gguf(tmp_path / "m.gguf", tokenizer)
    metadata = read_gguf(tmp_path / "m.gguf", with_tensors=False).metadata
    del metadata["general.architecture"]
    write_gguf(tmp_path / "two.gguf", "gpt2", metadata, tensors)
    back = GPT2.from_pretrained(tmp_path / "two.gguf")
    wider = decode(encode(state["token_embedding.weight"].numpy(), "q8_0"), "q8_0")
    assert torch.equal(back.token_embedding.weight, torch.from_numpy(wider))


def test_a_failed_write_leaves_nothing_behind(tmp_path):
    tensors = [("x", np.zeros((2, 32), np.float32), "f32"), ("y", np.zeros(3, np.float32), "q8_0")]
    with pytest.raises(ValueError, match="multiple of 32"):
        write_gguf(tmp_path / "m.gguf", "gpt2", {"a": 1}, tensors)
    with pytest.raises(TypeError, match="cannot store a dict"):
        write_gguf(tmp_path / "m.gguf", "gpt2", {"a": {"b": 1}}, tensors[:1])
    assert list(tmp_path.iterdir()) == []


def test_the_original_initialisation_without_scaled_embeddings_reads_back_as_it_computes(
    tokenizers, tmp_path
):
    """tformer.config keeps init "vaswani", whose scale_embeddings would default to True;
    the file computes unscaled embeddings, and reads back so."""
    tokenizer = tokenizers["char"]
    model = model_for(tokenizer, init="vaswani", scale_embeddings=False)
    model.save_gguf(tmp_path / "m.gguf", tokenizer)
    back = GPT2.from_pretrained(tmp_path / "m.gguf")
    assert back.config.init == "vaswani" and back.config.scale_embeddings is False
    assert back.config.positions == "learned"
    assert (logits(back, tokenizer) - logits(model, tokenizer)).abs().max().item() <= 1e-5
