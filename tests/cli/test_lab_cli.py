import json

import pytest
import torch

from tformer.cli.main import main
from tformer.models.seq2seq import Seq2SeqConfig, Seq2SeqTransformer
from tformer.tokenizers import train_bpe

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_cli(capsys, *argv):
    main(list(argv))
    return capsys.readouterr().out


@pytest.fixture(scope="module")
def seq2seq_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("seq2seq")
    sentences = ["the cat sees the moon", "le chat voit la lune", "a dog hears the sea"] * 20
    tokenizer = train_bpe(sentences, 300, special_tokens=("<pad>", "<s>", "</s>"))
    config = Seq2SeqConfig(
        src_vocab_size=tokenizer.vocab_size,
        tgt_vocab_size=tokenizer.vocab_size,
        max_len=24,
        d_model=16,
        n_heads=2,
        n_encoder_layers=2,
        n_decoder_layers=1,
        d_ff=32,
        share_embeddings=True,
    )
    Seq2SeqTransformer(config, seed=0).save_pretrained(out)
    tokenizer.save(out)
    return out


def test_attention_grid_of_all_heads_and_weights_as_json(checkpoint, capsys, tmp_path):
    png = tmp_path / "a.png"
    out = run_cli(
        capsys,
        "attention",
        str(checkpoint),
        "--text",
        "Hello there, world",
        "--layer",
        "1",
        "--out",
        str(png),
        "--json",
    )
    result = json.loads(out)
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert sorted(result["weights"]) == ["0", "1"]
    n = len(result["query_tokens"])
    assert result["query_tokens"] == result["key_tokens"] and n >= 3
    weights = torch.tensor(result["weights"]["1"])
    assert weights.shape == (n, n)
    torch.testing.assert_close(weights.sum(-1), torch.ones(n))
    assert torch.all(weights.triu(1) == 0)


def test_attention_of_one_head_and_bad_choices(checkpoint, capsys, tmp_path):
    png = tmp_path / "h.png"
    run_cli(capsys, "attention", str(checkpoint), "--text", "abc", "--head", "0", "--out", str(png))
    assert png.read_bytes()[:8] == PNG_MAGIC
    for argv, message in [
        (["--head", "2"], "--head must be in 0..1"),
        (["--layer", "5"], "--layer must be in 0..1"),
        (["--stack", "encoder"], "--target and --stack are for translation checkpoints"),
    ]:
        with pytest.raises(SystemExit):
            main(["attention", str(checkpoint), "--text", "abc", "--out", str(png), *argv])
        assert message in capsys.readouterr().err


def test_cross_attention_of_a_translation_checkpoint(seq2seq_checkpoint, capsys, tmp_path):
    png = tmp_path / "cross.png"
    out = run_cli(
        capsys,
        "attention",
        str(seq2seq_checkpoint),
        "--text",
        "the cat sees",
        "--target",
        "le chat",
        "--out",
        str(png),
        "--json",
    )
    result = json.loads(out)
    assert result["kind"] == "cross-attention"
    assert result["query_tokens"][0] == "<s>" and result["key_tokens"][-1] == "</s>"
    weights = torch.tensor(result["weights"]["0"])  # target queries x source keys
    assert weights.shape == (len(result["query_tokens"]), len(result["key_tokens"]))
    torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[0]))


def test_inspect_reports_every_layer_and_the_lens_ends_at_the_loss(checkpoint, capsys):
    out = run_cli(capsys, "inspect", str(checkpoint), "--text", "Hello there, world", "--json")
    result = json.loads(out)
    assert [row["layer"] for row in result["layers"]] == ["blocks.0", "blocks.1"]
    assert set(result["layers"][0]["parameter_grads"]) == {"attn", "mlp"}
    assert len(result["layers"][1]["attention_entropy"]["blocks.1.attn"]) == 2
    lens_loss = result["logit_lens"]["loss"]
    assert len(lens_loss) == 3
    assert lens_loss[-1] == pytest.approx(result["loss"], rel=1e-5)
    text = run_cli(capsys, "inspect", str(checkpoint), "--text", "Hello there")
    assert "logit lens" in text and "blocks.1" in text


def test_inspect_a_translation_checkpoint(seq2seq_checkpoint, capsys):
    out = run_cli(
        capsys,
        "inspect",
        str(seq2seq_checkpoint),
        "--text",
        "a dog",
        "--target",
        "la lune",
        "--json",
    )
    result = json.loads(out)
    layers = [row["layer"] for row in result["layers"]]
    assert layers == ["encoder_layers.0", "encoder_layers.1", "decoder_layers.0"]
    assert len(result["logit_lens"]["loss"]) == 2  # decoder embeddings, one decoder layer
    assert result["logit_lens"]["loss"][-1] == pytest.approx(result["loss"], rel=1e-5)
