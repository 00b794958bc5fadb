"""The span head against transformers' GPT2ForQuestionAnswering, checkpoints both ways."""

import pytest
import torch

from tformer import GPT2, GPT2Config
from tformer.models.gpt2_qa import GPT2ForQuestionAnswering

transformers = pytest.importorskip("transformers")


def config():
    return GPT2Config(vocab_size=83, max_len=32, d_model=48, n_layers=2, n_heads=4, dropout=0.0)


def batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 83, (3, 20), generator=g)
    mask = torch.ones(3, 20, dtype=torch.long)
    mask[2, 15:] = 0  # right padding in the last row (for the comparison with padding)
    starts, ends = torch.tensor([2, 7, 40]), torch.tensor([4, 7, 41])  # the last: cut off
    return ids, mask, starts, ends


def assert_same_as_transformers(ours, theirs):
    ids, mask, starts, ends = batch()
    with torch.no_grad():
        out = theirs(input_ids=ids, start_positions=starts, end_positions=ends)
        spans = ours(ids)  # (B, 2, T)
        padded = theirs(input_ids=ids, attention_mask=mask).start_logits
        ours_padded = ours(ids, mask)[:, 0]
    torch.testing.assert_close(spans[:, 0], out.start_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(spans[:, 1], out.end_logits, rtol=1e-4, atol=1e-4)
    loss = GPT2ForQuestionAnswering.loss(spans, starts, ends)
    torch.testing.assert_close(loss, out.loss, rtol=1e-4, atol=1e-4)
    # with padding: equal at the real positions, -inf at the padded ones (see forward)
    real = mask.bool()
    torch.testing.assert_close(ours_padded[real], padded[real], rtol=1e-4, atol=1e-4)
    assert torch.isneginf(ours_padded[~real]).all()


def test_a_tformer_qa_checkpoint_loads_in_transformers_with_equal_logits_and_loss(tmp_path):
    ours = GPT2ForQuestionAnswering(config(), seed=0).eval()
    ours.save_pretrained(tmp_path)
    theirs = transformers.GPT2ForQuestionAnswering.from_pretrained(tmp_path).eval()
    assert_same_as_transformers(ours, theirs)


def test_a_transformers_qa_checkpoint_loads_in_tformer(tmp_path):
    torch.manual_seed(5)
    hf_config = transformers.GPT2Config(
        vocab_size=83, n_positions=32, n_embd=48, n_layer=2, n_head=4, resid_pdrop=0.0
    )
    theirs = transformers.GPT2ForQuestionAnswering(hf_config).eval()
    with torch.no_grad():
        theirs.qa_outputs.bias.normal_()  # a head that is not at its initial value
    theirs.save_pretrained(tmp_path)
    ours = GPT2ForQuestionAnswering.from_pretrained(tmp_path)
    assert_same_as_transformers(ours, theirs)
    again = tmp_path / "again"
    ours.save_pretrained(again)
    reloaded = GPT2ForQuestionAnswering.from_pretrained(again)
    for (name, a), (_, b) in zip(
        ours.state_dict().items(), reloaded.state_dict().items(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_a_language_model_checkpoint_gets_a_new_seeded_head(tmp_path):
    lm = GPT2(config(), seed=1).eval()
    lm.save_pretrained(tmp_path)
    a = GPT2ForQuestionAnswering.from_pretrained(tmp_path, seed=7)
    b = GPT2ForQuestionAnswering.from_pretrained(tmp_path, seed=7)
    torch.testing.assert_close(a.qa_outputs.weight, b.qa_outputs.weight, rtol=0, atol=0)
    assert a.qa_outputs.weight.std().item() == pytest.approx(0.02, rel=0.3)
    assert torch.equal(a.qa_outputs.bias, torch.zeros(2))
    ids = batch()[0]
    with torch.no_grad():
        expected = lm.features(ids) @ a.qa_outputs.weight.T  # the body is the language model's
        spans = a(ids)
    torch.testing.assert_close(spans.transpose(1, 2), expected, rtol=1e-5, atol=1e-5)


def test_the_loss_leaves_out_answers_outside_the_window():
    spans = torch.randn(2, 2, 5)
    both = GPT2ForQuestionAnswering.loss(spans, torch.tensor([1, 9]), torch.tensor([2, 9]))
    first = GPT2ForQuestionAnswering.loss(spans[:1], torch.tensor([1]), torch.tensor([2]))
    torch.testing.assert_close(both, first)


def test_the_loss_is_one_cross_entropy_over_start_and_end_rows():
    """What lets the trainer train it: (CE(s) + CE(e)) / 2 = CE over the 2B rows."""
    spans, starts, ends = torch.randn(3, 2, 7), torch.tensor([0, 3, 6]), torch.tensor([1, 3, 6])
    rows = torch.nn.functional.cross_entropy(
        spans.flatten(0, 1), torch.stack([starts, ends], 1).flatten()
    )
    torch.testing.assert_close(GPT2ForQuestionAnswering.loss(spans, starts, ends), rows)


def test_a_window_scores_the_same_whatever_its_batch_pads_it_to():
    model = GPT2ForQuestionAnswering(config(), seed=2).eval()
    ids = torch.randint(0, 83, (1, 10))
    alone = model(ids, torch.ones(1, 10, dtype=torch.long))
    padded_ids = torch.cat([ids, torch.zeros(1, 6, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 10), torch.zeros(1, 6)], dim=1).long()
    padded = model(padded_ids, mask)
    targets = torch.tensor([3]), torch.tensor([5])
    torch.testing.assert_close(
        GPT2ForQuestionAnswering.loss(padded, *targets),
        GPT2ForQuestionAnswering.loss(alone, *targets),
        rtol=1e-5,
        atol=1e-5,
    )


@pytest.mark.parametrize("attention", ["explicit", "sdpa", "blocked"])
def test_padding_gives_the_same_real_logits_on_either_side(attention):
    """Right padding skips the key mask (causality already hides it); left padding keeps
    it. Either way each row's real positions score as the row alone does."""
    model = GPT2ForQuestionAnswering(config(), seed=2).eval()
    model.gpt2.set_attention(attention)
    g = torch.Generator().manual_seed(5)
    lengths = [12, 7, 9]
    rows = [torch.randint(0, 83, (1, n), generator=g) for n in lengths]
    alone = [model(row)[0] for row in rows]  # (2, n) each
    t = max(lengths)
    for side in ("right", "left"):
        ids = torch.zeros(len(rows), t, dtype=torch.long)
        mask = torch.zeros(len(rows), t, dtype=torch.long)
        for i, (row, n) in enumerate(zip(rows, lengths, strict=True)):
            where = slice(0, n) if side == "right" else slice(t - n, t)
            ids[i, where], mask[i, where] = row[0], 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # each row's text from position 0
        logits = model(ids, mask, positions)
        for i, n in enumerate(lengths):
            where = slice(0, n) if side == "right" else slice(t - n, t)
            torch.testing.assert_close(logits[i][:, where], alone[i], rtol=1e-5, atol=1e-5)
            assert torch.isinf(logits[i][:, mask[i] == 0]).all()


def test_load_weights_loads_a_saved_reader_in_place(tmp_path):
    model = GPT2ForQuestionAnswering(config(), seed=0).eval()
    model.save_pretrained(tmp_path)
    other = GPT2ForQuestionAnswering(config(), seed=1).eval()
    other.load_weights(tmp_path)
    ids = batch()[0]
    torch.testing.assert_close(other(ids), model(ids), rtol=0, atol=0)
