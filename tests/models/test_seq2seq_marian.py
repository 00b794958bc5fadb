"""The encoder-decoder as a Hugging Face Marian model, checked against transformers'
MarianMTModel and CTranslate2 themselves (tformer.models.seq2seq_marian)."""

import json

import pytest
import torch

from tformer.checkpoints import CheckpointError
from tformer.generate.beam import BeamConfig, beam_search, greedy_search
from tformer.models.seq2seq import Seq2SeqConfig, Seq2SeqTransformer
from tformer.models.seq2seq_marian import vocabulary_order
from tformer.tokenizers import train_bpe

transformers = pytest.importorskip("transformers")

SPECIAL = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2, as the translation recipe has them
SOURCES = [[5, 6, 7, 8, 9, 2], [3, 4, 2], [10, 11, 12, 13, 14, 15, 16, 2]]


def odd_model(activation="gelu", share=True, seed=1, vocab=97, **overrides) -> Seq2SeqTransformer:
    """2 + 1 layers, 40 wide, 5 heads, vocabulary 97 (two of them when not shared); every
    weight moved off its initialisation so that biases and norms matter."""
    fields = dict(
        src_vocab_size=vocab,
        tgt_vocab_size=vocab,
        max_len=32,
        d_model=40,
        n_heads=5,
        n_encoder_layers=2,
        n_decoder_layers=1,
        d_ff=72,
        dropout=0.0,
        activation=activation,
        share_embeddings=share,
    )
    config = Seq2SeqConfig(**{**fields, **overrides})
    model = Seq2SeqTransformer(config, seed=seed).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def padded(rows, pad):
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return ids, mask


def marian_ids(rows, order):
    new = {old: i for i, old in enumerate(order)}
    return [[new[t] for t in r] for r in rows]


def hf_generate(hf, rows, pad, **settings):
    ids, mask = padded(rows, pad)
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, **settings)
    eos = hf.config.eos_token_id
    return [[t for t in r[1:] if t != pad][: r[1:].index(eos) if eos in r[1:] else None]
            for r in out.tolist()]  # fmt: skip


@pytest.mark.parametrize(
    ("activation", "share"), [("gelu", True), ("relu", True), ("gelu_tanh", False)]
)
def test_the_marian_export_computes_tformers_logits_and_translations(tmp_path, activation, share):
    model = odd_model(activation, share)
    c = model.config
    model.save_pretrained(tmp_path, format="marian")
    hf = transformers.MarianMTModel.from_pretrained(tmp_path).eval()
    src_order = vocabulary_order(c.src_vocab_size, c.pad_id)
    order = vocabulary_order(c.tgt_vocab_size, c.pad_id)
    pad = c.tgt_vocab_size - 1  # Marian's padding token, and its decoder's start, is last
    assert hf.config.pad_token_id == hf.config.decoder_start_token_id == pad

    src, mask = padded(SOURCES, c.pad_id)  # padded: the mask matters
    targets = [[c.bos_id, 10, 11, 12], [c.bos_id, 20, 21, 22], [c.bos_id, 30, 31, 32]]
    hf_src, _ = padded(marian_ids(SOURCES, src_order), pad)
    hf_tgt = torch.tensor([[pad] + r[1:] for r in marian_ids(targets, order)])
    with torch.no_grad():
        ours = model(src, torch.tensor(targets))  # (B, T, V) in tformer's ids
        theirs = hf(input_ids=hf_src, attention_mask=mask, decoder_input_ids=hf_tgt).logits
    words = [t for t in range(c.tgt_vocab_size) if t != c.pad_id]
    # float32 through three layers in another order of sums: 1e-4, and 1e-5 of logits ~10
    torch.testing.assert_close(theirs[..., marian_ids([words], order)[0]], ours[..., words],
                               rtol=1e-5, atol=1e-4)  # fmt: skip
    assert bool((theirs[..., pad] == float("-inf")).all())  # padding is never an output

    greedy = greedy_search(model, src, 12)
    hf_rows = marian_ids([r for r in SOURCES], src_order)
    theirs_greedy = hf_generate(hf, hf_rows, pad, num_beams=1, max_new_tokens=12)
    assert [[order[t] for t in r] for r in theirs_greedy] == greedy
    beam = beam_search(model, src, BeamConfig(beam_size=4, max_new_tokens=12))
    theirs_beam = hf_generate(hf, hf_rows, pad, num_beams=4, max_new_tokens=12,
                              length_penalty=1.0, early_stopping=False)  # fmt: skip
    assert [[order[t] for t in r] for r in theirs_beam] == beam


def test_a_marian_model_written_by_transformers_reads_into_tformer(tmp_path):
    """transformers' own save_pretrained (no position tables in the file, padding last and
    the decoder's start): the same logits, and the same greedy translations."""
    config = transformers.MarianConfig(
        vocab_size=97, d_model=40, encoder_layers=2, decoder_layers=1,
        encoder_attention_heads=5, decoder_attention_heads=5, encoder_ffn_dim=72,
        decoder_ffn_dim=72, max_position_embeddings=32, activation_function="relu",
        pad_token_id=96, decoder_start_token_id=96, eos_token_id=0, forced_eos_token_id=None,
        scale_embedding=True,
    )  # fmt: skip
    torch.manual_seed(3)
    hf = transformers.MarianMTModel(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "embed_positions" not in name:
                p.add_(torch.randn_like(p) * 0.3)
    hf.save_pretrained(tmp_path)
    model = Seq2SeqTransformer.from_pretrained(tmp_path)
    c = model.config
    assert (c.pad_id, c.bos_id, c.eos_id, c.activation) == (96, 96, 0, "relu")
    rows = [[5, 6, 7, 8, 0], [3, 4, 0]]
    src, mask = padded(rows, 96)
    tgt = torch.tensor([[96, 10, 11], [96, 20, 21]])
    with torch.no_grad():
        theirs = hf(input_ids=src, attention_mask=mask, decoder_input_ids=tgt).logits
        ours = model(src, tgt)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-4)
    theirs_greedy = hf_generate(hf, rows, 96, num_beams=1, max_new_tokens=10,
                                bad_words_ids=[[96]])  # fmt: skip
    assert greedy_search(model, src, 10) == theirs_greedy


def trained_tokenizer():
    texts = ["the cat sees the moon.", "a dog likes the river.", "el gato ve la luna.",
             "un perro ama el río."] * 20  # fmt: skip
    return train_bpe(texts, 300, special_tokens=SPECIAL)


def test_the_exported_tokenizer_loads_in_transformers_renumbered_as_the_model(tmp_path):
    tokenizer = trained_tokenizer()
    model = odd_model(vocab=300)
    model.save_pretrained(tmp_path, format="marian", tokenizer=tokenizer)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    order = vocabulary_order(300, 0)
    text = "the cat likes el río."
    ids = theirs(text).input_ids
    assert [order[i] for i in ids] == tokenizer.encode(text) + [2]  # </s> ends a source
    assert theirs.decode(ids, skip_special_tokens=True) == text
    assert theirs.pad_token_id == 299 and theirs.eos_token_id == order.index(2)
    # and reading the directory back gives the same translations in the renumbered ids
    back = Seq2SeqTransformer.from_pretrained(tmp_path)
    sources = [tokenizer.encode(s) + [2] for s in ("the cat", "un perro ama el río.")]
    renumbered = marian_ids(sources, order)
    assert [[order[t] for t in r] for r in greedy_search(back, renumbered, 10)] == (
        greedy_search(model, sources, 10)
    )
    config = json.loads((tmp_path / "generation_config.json").read_text())
    assert config["decoder_start_token_id"] == 299 and config["forced_eos_token_id"] is None


def test_ctranslate2_converts_the_export_and_translates_as_tformer(tmp_path):
    ctranslate2 = pytest.importorskip("ctranslate2")
    from ctranslate2.converters import TransformersConverter

    tokenizer = trained_tokenizer()
    model = odd_model(vocab=300)
    model.save_pretrained(tmp_path / "marian", format="marian", tokenizer=tokenizer)
    TransformersConverter(str(tmp_path / "marian")).convert(str(tmp_path / "ct2"))
    translator = ctranslate2.Translator(str(tmp_path / "ct2"), device="cpu")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "marian")
    order = vocabulary_order(300, 0)
    sources = [tokenizer.encode(s) + [2] for s in ("the cat sees the moon.", "un perro.", "a")]
    tokens = [theirs.convert_ids_to_tokens(r) for r in marian_ids(sources, order)]
    for beam in (1, 4):
        results = translator.translate_batch(tokens, beam_size=beam, max_decoding_length=12,
                                             length_penalty=1.0)  # fmt: skip
        ct2 = [[order[i] for i in theirs.convert_tokens_to_ids(r.hypotheses[0])] for r in results]
        if beam == 1:
            assert ct2 == greedy_search(model, sources, 12)
        else:
            # CTranslate2 ends a sentence with its 4th finished hypothesis (patience 1)
            config = BeamConfig(beam_size=4, max_new_tokens=12, early_stopping=True)
            assert ct2 == beam_search(model, sources, config)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"norm_position": "pre"}, "post-LN only"),
        ({"residual": False}, "always add the residual"),
        ({"layer_norm_eps": 1e-6}, "epsilon is fixed"),
        ({"share_embeddings": False, "src_vocab_size": 90}, "one padding id"),
    ],
)
def test_what_marian_cannot_compute_is_refused(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        odd_model(**overrides).save_pretrained(tmp_path, format="marian")
    assert not (tmp_path / "config.json").exists()


def test_a_marian_directory_tformer_cannot_compute_is_refused(tmp_path):
    model = odd_model()
    model.save_pretrained(tmp_path, format="marian")
    config = json.loads((tmp_path / "config.json").read_text())
    for change, message in [
        ({"activation_function": "swish"}, "activation_function 'swish'"),
        ({"scale_embedding": False}, "scaled by sqrt"),
        ({"decoder_ffn_dim": 64}, "one width"),
    ]:
        (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(CheckpointError, match=message):
            Seq2SeqTransformer.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config))
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "model.safetensors")
    for name, edit, message in [
        ("final_logits_bias", lambda t: t.index_fill(1, torch.tensor([3]), 0.5), "final_logits"),
        ("model.encoder.embed_positions.weight", lambda t: t * 2, "not the sinusoids"),
    ]:
        save_file({**tensors, name: edit(tensors[name])}, tmp_path / "model.safetensors")
        with pytest.raises(CheckpointError, match=message):
            Seq2SeqTransformer.from_pretrained(tmp_path)


def test_a_tokenizer_without_tokenizer_json_is_refused_before_writing(tmp_path):
    from tformer.tokenizers import CharTokenizer

    with pytest.raises(ValueError, match="no tokenizer.json"):
        odd_model().save_pretrained(tmp_path, format="marian", tokenizer=CharTokenizer("abc"))
    assert not any(tmp_path.iterdir())


def test_export_marian_and_translate_from_the_command_line(tmp_path, capsys):
    """`tformer export marian` on a checkpoint directory (model and tokenizer), its
    refusals, and `tformer translate` of the export with int8 weights."""
    from tformer.cli.main import main

    run = tmp_path / "run"
    model = odd_model(vocab=300)
    model.save_pretrained(run)
    trained_tokenizer().save(run)
    with pytest.raises(SystemExit) as refused:
        main(["export", "marian", str(run), "--out", str(run)])
    assert refused.value.code == 2 and "the checkpoint itself" in capsys.readouterr().err
    main(["export", "marian", str(run), "--json"])  # default: RUN/marian
    assert json.loads(capsys.readouterr().out)["directory"] == str(run / "marian")
    sources = tmp_path / "sources.txt"
    sources.write_text("the cat sees the moon.\nun perro.\n", encoding="utf-8")
    for directory in (run, run / "marian"):
        main(["translate", str(directory), "--greedy", "--json", "--input", str(sources),
              "--quantize", "int8", "--max-new-tokens", "8"])  # fmt: skip
        result = json.loads(capsys.readouterr().out)
        assert len(result["translations"]) == 2
        if directory == run:
            expected = result["translations"]
    assert result["translations"] == expected  # the export translates as its checkpoint
    with pytest.raises(SystemExit) as refused:
        main(["translate", str(run), "--dtype", "float16", "--input", str(sources)])
    assert refused.value.code == 2 and "float16 is for GPUs" in capsys.readouterr().err
