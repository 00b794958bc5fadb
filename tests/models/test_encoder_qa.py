"""The bidirectional reader: the encoder stack with a span head."""

import pytest
import torch

from tformer.checkpoints import CheckpointError
from tformer.models.encoder_qa import EncoderForQuestionAnswering
from tformer.models.gpt2_qa import GPT2ForQuestionAnswering
from tformer.models.seq2seq import Seq2SeqConfig, Seq2SeqTransformer

SIZES = dict(d_model=32, n_heads=4, n_layers=2, d_ff=64, max_len=24, dropout=0.0)


def reader(seed=0, **overrides):
    config = EncoderForQuestionAnswering.config_for(50, **{**SIZES, **overrides})
    return EncoderForQuestionAnswering(config, seed=seed).eval()


def test_the_span_logits_are_the_head_on_the_encoder_output():
    model = reader()
    ids = torch.randint(0, 50, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    memory = model.transformer.encode(ids, mask.bool())  # (B, T, C)
    expected = (memory @ model.qa_outputs.weight.T + model.qa_outputs.bias).transpose(1, 2)
    torch.testing.assert_close(model(ids, mask), expected, rtol=0, atol=0)
    torch.testing.assert_close(model(ids), expected, rtol=0, atol=0)  # no mask: all real


def test_every_position_reads_the_whole_window_unlike_gpt2():
    model = reader()
    ids = torch.randint(0, 50, (1, 9))
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % 50  # the last token only
    assert not torch.allclose(model(ids)[..., 0], model(changed)[..., 0])  # the first sees it
    from tformer import GPT2Config

    causal = GPT2ForQuestionAnswering(
        GPT2Config(vocab_size=50, max_len=24, d_model=32, n_layers=2, n_heads=4, dropout=0.0),
        seed=0,
    ).eval()
    torch.testing.assert_close(causal(ids)[..., :-1], causal(changed)[..., :-1])


def test_a_window_scores_the_same_whatever_its_batch_pads_it_to():
    model = reader()
    ids = torch.randint(0, 50, (1, 7))
    padded_ids = torch.cat([ids, torch.zeros(1, 5, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(1, 7), torch.zeros(1, 5)], 1).long()
    logits = model(padded_ids, mask)  # the keys are masked: no token reads the padding
    torch.testing.assert_close(logits[..., :7], model(ids), rtol=1e-5, atol=1e-5)
    assert torch.isinf(logits[..., 7:]).all()
    unmasked = model(padded_ids)  # without the mask the padding would be read
    assert not torch.allclose(unmasked[..., :7], model(ids), atol=1e-3)


def test_a_reader_checkpoint_round_trips_exactly(tmp_path):
    model = reader(norm_position="pre")
    model.save_pretrained(tmp_path / "reader")
    again = EncoderForQuestionAnswering.from_pretrained(tmp_path / "reader", head_required=True)
    assert again.config == model.config
    ids = torch.randint(0, 50, (2, 9))
    torch.testing.assert_close(again(ids), model(ids), rtol=0, atol=0)


def test_a_translation_model_s_encoder_becomes_a_reader(tmp_path):
    config = Seq2SeqConfig(
        50,
        50,
        d_model=32,
        n_heads=4,
        n_encoder_layers=2,
        n_decoder_layers=2,
        d_ff=64,
        max_len=24,
        dropout=0.0,
        share_embeddings=True,
    )
    translator = Seq2SeqTransformer(config, seed=3).eval()
    translator.save_pretrained(tmp_path / "translation")
    with pytest.raises(CheckpointError, match="without a question-answering head"):
        EncoderForQuestionAnswering.from_pretrained(tmp_path / "translation", head_required=True)
    model = EncoderForQuestionAnswering.from_pretrained(tmp_path / "translation", seed=4)
    assert model.config.n_decoder_layers == 0 and len(model.transformer.decoder_layers) == 0
    assert model.num_parameters() < translator.num_parameters()
    ids = torch.randint(3, 50, (2, 9))
    memory = translator.encode(ids)
    torch.testing.assert_close(model.transformer.encode(ids), memory, rtol=0, atol=0)
    fresh = EncoderForQuestionAnswering.from_pretrained(tmp_path / "translation", seed=4)
    torch.testing.assert_close(fresh(ids), model(ids), rtol=0, atol=0)  # a seeded head


def test_load_weights_loads_a_saved_reader_in_place(tmp_path):
    model = reader(seed=0)
    model.save_pretrained(tmp_path)
    other = reader(seed=1)
    other.load_weights(tmp_path)
    ids = torch.randint(0, 50, (2, 9))
    torch.testing.assert_close(other(ids), model(ids), rtol=0, atol=0)
