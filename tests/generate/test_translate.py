import pytest
import torch

from tformer.data.parallel import ParallelBatches, number_words, split_pairs
from tformer.generate.beam import BeamConfig
from tformer.generate.translate import corpus_scores, translate
from tformer.models.seq2seq import Seq2SeqConfig, Seq2SeqTransformer
from tformer.tokenizers import train_bpe
from tformer.train.trainer import TrainConfig, fit

SPECIALS = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2: the model's pad, bos and eos


@pytest.fixture(scope="module")
def trained():
    """A small model trained for a few seconds on English -> French number words."""
    torch.manual_seed(0)
    train, val, test = split_pairs(number_words(10_000, seed=0), val=200, test=200)
    tokenizer = train_bpe([s for pair in train for s in pair], 400, special_tokens=SPECIALS)
    assert [tokenizer.special_tokens[s] for s in SPECIALS] == [0, 1, 2]
    data = [ParallelBatches(p, tokenizer, 0, 1, 2, max_len=64) for p in (train, val)]
    config = Seq2SeqConfig(
        tokenizer.vocab_size,
        tokenizer.vocab_size,
        max_len=64,
        d_model=64,
        n_heads=4,
        n_encoder_layers=2,
        n_decoder_layers=2,
        d_ff=128,
        dropout=0.0,
        share_embeddings=True,
    )
    model = Seq2SeqTransformer(config, seed=0)
    train_config = TrainConfig(
        steps=300,
        batch_size=64,
        lr=3e-3,
        warmup_steps=50,
        weight_decay=0.0,
        label_smoothing=0.1,
        eval_every=0,
        eval_batches=4,
        final_eval="sample",
        checkpoint_every=0,
    )
    history = fit(model, data[0], data[1], train_config, run_dir=None, progress=False)
    return model, tokenizer, test, history


def test_the_trainer_lowers_the_translation_loss(trained):
    _, _, _, history = trained
    losses = [h["loss"] for h in history if h["type"] == "train"]
    assert sum(losses[-20:]) / 20 < 0.5 * sum(losses[:20]) / 20


@pytest.mark.parametrize("beam", [None, BeamConfig(beam_size=4)], ids=["greedy", "beam4"])
def test_a_small_model_translates_number_words_with_bleu_over_90(trained, beam):
    model, tokenizer, test, _ = trained
    translations = translate(model, tokenizer, [src for src, _ in test], beam)
    scores = corpus_scores(translations, [tgt for _, tgt in test])
    assert scores["bleu"] >= 90, scores
    assert scores["chrf"] >= 90, scores


def test_translations_come_back_in_the_order_given(trained):
    model, tokenizer, test, _ = trained
    sources = [src for src, _ in test[:12]]
    forward = translate(model, tokenizer, sources, batch_size=5)
    backward = translate(model, tokenizer, sources[::-1], batch_size=5)
    assert forward == backward[::-1]
    assert forward == [translate(model, tokenizer, [s])[0] for s in sources]
