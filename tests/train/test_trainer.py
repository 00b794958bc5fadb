import json
import math

import numpy as np
import pytest
import torch

from tformer import GPT2, CharTokenizer, GPT2Config
from tformer.data.sources import split_text
from tformer.data.tokens import LMBatches
from tformer.train import TrainConfig, evaluate, fit
from tformer.train import checkpoint as checkpoint_module


def data_and_model(corpus_file, context=16, dropout=0.0):
    text = corpus_file.read_text()
    tok = CharTokenizer.from_text(text)
    train_text, val_text = split_text(text)
    train = LMBatches(np.array(tok.encode(train_text), dtype=np.uint16), context)
    val = LMBatches(np.array(tok.encode(val_text), dtype=np.uint16), context)
    config = GPT2Config(
        vocab_size=tok.vocab_size,
        max_len=context,
        d_model=32,
        n_layers=2,
        n_heads=2,
        dropout=dropout,
    )
    return tok, train, val, GPT2(config, seed=0)


def quick(**overrides) -> TrainConfig:
    base = dict(
        steps=30,
        batch_size=8,
        lr=3e-3,
        min_lr=3e-4,
        warmup_steps=5,
        eval_every=10,
        eval_batches=2,
        checkpoint_every=10,
    )
    return TrainConfig(**{**base, **overrides})


def test_training_lowers_the_loss(corpus_file):
    tok, train, val, model = data_and_model(corpus_file)
    before = evaluate(model, val, 16)
    history = fit(model, train, val, quick(steps=150, eval_every=50), progress=False)
    after = evaluate(model, val, 16)
    assert before["loss"] == pytest.approx(math.log(tok.vocab_size), abs=0.3)  # uniform at start
    assert after["loss"] < 0.5 * before["loss"]
    assert after["accuracy"] > 0.5
    train_losses = [r["loss"] for r in history if r["type"] == "train"]
    assert np.mean(train_losses[-10:]) < 0.5 * np.mean(train_losses[:10])


def test_evaluate_matches_a_direct_computation(corpus_file):
    _, _, val, model = data_and_model(corpus_file)
    metrics = evaluate(model, val, batch_size=5)
    logits, targets = [], []
    with torch.no_grad():
        for batch in val.sequential(7):
            logits.append(model(*batch.inputs).flatten(0, 1))
            targets.append(batch.targets.flatten())
    logits, targets = torch.cat(logits), torch.cat(targets)
    loss = torch.nn.functional.cross_entropy(logits, targets).item()
    assert metrics["loss"] == pytest.approx(loss, rel=1e-6)
    assert metrics["perplexity"] == pytest.approx(math.exp(loss), rel=1e-6)
    accuracy = (logits.argmax(-1) == targets).float().mean().item()
    assert metrics["accuracy"] == pytest.approx(accuracy, abs=1e-9)


def test_gradient_accumulation_gives_the_same_training(corpus_file):
    _, train, val, model_a = data_and_model(corpus_file)
    _, _, _, model_b = data_and_model(corpus_file)
    a = fit(model_a, train, None, quick(steps=5, eval_every=0), progress=False)
    b = fit(model_b, train, None, quick(steps=5, eval_every=0, grad_accum=4), progress=False)
    for ra, rb in zip(a, b, strict=True):
        assert ra["loss"] == pytest.approx(rb["loss"], abs=1e-5)
    for pa, pb in zip(model_a.parameters(), model_b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-5)


def test_bfloat16_autocast_trains_close_to_float32(corpus_file):
    _, train, _, model_a = data_and_model(corpus_file)
    _, _, _, model_b = data_and_model(corpus_file)
    a = fit(model_a, train, None, quick(steps=20, eval_every=0), progress=False)
    b = fit(model_b, train, None, quick(steps=20, eval_every=0, dtype="bfloat16"), progress=False)
    assert abs(a[-1]["loss"] - b[-1]["loss"]) < 0.05 * a[-1]["loss"]
    assert a[-1]["loss"] != b[-1]["loss"]  # autocast really computed in bf16


def test_activation_checkpointing_trains_the_same_model(corpus_file):
    """Recomputing each block in the backward pass (dropout replayed) changes no number."""
    _, train, _, model_a = data_and_model(corpus_file, dropout=0.1)
    _, _, _, model_b = data_and_model(corpus_file, dropout=0.1)
    a = fit(model_a, train, None, quick(steps=5, eval_every=0), progress=False)
    config = quick(steps=5, eval_every=0, activation_checkpointing=True)
    b = fit(model_b, train, None, config, progress=False)
    assert model_b.activation_checkpointing and not model_a.activation_checkpointing
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    for pa, pb in zip(model_a.parameters(), model_b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)


def test_compiled_training_equals_eager_training(corpus_file):
    _, train, _, model_a = data_and_model(corpus_file)
    _, _, _, model_b = data_and_model(corpus_file)
    a = fit(model_a, train, None, quick(steps=3, eval_every=0), progress=False)
    b = fit(model_b, train, None, quick(steps=3, eval_every=0, compile=True), progress=False)
    for ra, rb in zip(a, b, strict=True):
        assert ra["loss"] == pytest.approx(rb["loss"], abs=1e-5)
    for pa, pb in zip(model_a.parameters(), model_b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-5)


def test_optimizer_state_by_parameter_name_and_the_older_numbered_one_both_restore(corpus_file):
    from tformer.train import distributed
    from tformer.train.optim import build_optimizer

    _, train, _, model = data_and_model(corpus_file)
    optimizer = build_optimizer(model, 1e-3, 0.1, (0.9, 0.99))
    batch = train.sample(4, torch.Generator().manual_seed(0))
    torch.nn.functional.cross_entropy(
        model(*batch.inputs).flatten(0, 1), batch.targets.flatten()
    ).backward()
    optimizer.step()
    by_name = distributed.optimizer_state(model, optimizer)
    assert "blocks.0.attn.w_qkv.weight" in by_name["state"]
    model.zero_grad(set_to_none=True)  # as in a resumed run
    for saved in (by_name, optimizer.state_dict()):
        fresh = build_optimizer(model, 1e-3, 0.1, (0.9, 0.99))
        distributed.load_optimizer_state(model, fresh, saved)
        for key, state in optimizer.state_dict()["state"].items():
            torch.testing.assert_close(fresh.state_dict()["state"][key], state, rtol=0, atol=0)


def test_run_directory_holds_metrics_checkpoints_and_a_loadable_model(corpus_file, tmp_path):
    tok, train, val, model = data_and_model(corpus_file)
    run = tmp_path / "run"
    fit(model, train, val, quick(), run, tok, progress=False)
    assert (run / "last").resolve().name == "step-000030"
    assert (run / "best").is_symlink()
    kept = {p.name for p in (run / "checkpoints").iterdir()}
    assert kept == {(run / "last").resolve().name, (run / "best").resolve().name}
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["type"] == "train"] == list(range(1, 31))
    assert [r["step"] for r in records if r["type"] == "eval"] == [10, 20, 30]
    assert (run / "loss.png").stat().st_size > 1000
    loaded = GPT2.from_pretrained(run)
    ids = torch.tensor([tok.encode("the cat")])
    torch.testing.assert_close(loaded(ids), model.eval()(ids))
    transformers = pytest.importorskip("transformers")
    theirs = transformers.GPT2LMHeadModel.from_pretrained(run).eval()
    torch.testing.assert_close(theirs(ids).logits, loaded(ids), rtol=1e-4, atol=1e-4)


def test_resume_continues_with_identical_losses_in_process(corpus_file, tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint_module, "prune", lambda run_dir: None)  # keep step 20
    tok, train, val, model = data_and_model(corpus_file, dropout=0.1)  # dropout RNG matters
    whole = fit(model, train, val, quick(), tmp_path / "whole", tok, progress=False)
    _, _, _, model = data_and_model(corpus_file, dropout=0.1)
    fit(model, train, val, quick(steps=30), tmp_path / "cut", tok, progress=False)
    # pretend the run stopped after step 20: point `last` back there and resume
    checkpoint_module.point(
        tmp_path / "cut" / "last", tmp_path / "cut" / "checkpoints" / "step-000020"
    )
    _, _, _, fresh = data_and_model(corpus_file, dropout=0.1)
    resumed = fit(fresh, train, val, quick(), tmp_path / "cut", tok, resume=True, progress=False)
    later = [r for r in whole if r["step"] > 20]
    assert [(r["type"], r.get("loss"), r.get("val_loss")) for r in resumed] == [
        (r["type"], r.get("loss"), r.get("val_loss")) for r in later
    ]


def test_crash_during_checkpoint_leaves_previous_one_loadable(corpus_file, tmp_path, monkeypatch):
    tok, train, val, model = data_and_model(corpus_file)
    run = tmp_path / "run"
    real_save = torch.save
    calls = {"n": 0}

    def crashing_save(obj, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint: write half a file, then die
            with open(path, "wb") as f:
                f.write(b"partial")
            raise OSError("disk full")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module.torch, "save", crashing_save)
    with pytest.raises(OSError, match="disk full"):
        fit(model, train, val, quick(), run, tok, progress=False)
    assert (run / "last").resolve().name == "step-000010"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000010"]
    GPT2.from_pretrained(run / "last")
    state = checkpoint_module.load_state(run / "last")
    assert state["step"] == 10


def test_starting_over_an_existing_run_is_refused(corpus_file, tmp_path):
    tok, train, val, model = data_and_model(corpus_file)
    fit(model, train, val, quick(steps=10), tmp_path / "run", tok, progress=False)
    with pytest.raises(FileExistsError, match="pass --resume"):
        fit(model, train, val, quick(steps=10), tmp_path / "run", tok, progress=False)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(batch_size=10, grad_accum=4), "divisible by grad_accum"),
        (dict(min_lr=1.0), "min_lr must be <= lr"),
        (dict(dtype="int8"), "dtype"),
        (dict(steps=0), "steps must be an integer >= 1"),
        (dict(parallel="zero3"), "parallel must be one of 'ddp', 'fsdp'"),
    ],
)
def test_bad_training_config_is_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        quick(**overrides)


def test_best_follows_every_better_evaluation_between_checkpoints(corpus_file, tmp_path):
    tok, train, val, model = data_and_model(corpus_file)
    run = tmp_path / "run"
    config = quick(steps=40, eval_every=10, checkpoint_every=25)
    history = fit(model, train, val, config, run, tok, progress=False)
    evals = {r["step"]: r["val_loss"] for r in history if r["type"] == "eval"}
    best_step = min(evals, key=evals.get)
    assert (run / "best").resolve().name == f"step-{best_step:06d}"
    # the bar kept in the state is the periodic (sample) evaluations' best: a final full
    # evaluation may become `best`, but a run extended later compares like with like
    periodic = [r["val_loss"] for r in history if r["type"] == "eval" and not r["full"]]
    assert checkpoint_module.load_state(run / "best")["best_val_loss"] == min(periodic)


def test_a_loss_that_diverges_stops_training_with_a_clear_error(corpus_file):
    _, train, _, model = data_and_model(corpus_file)
    config = quick(steps=30, lr=1e4, min_lr=1e4, warmup_steps=0, grad_clip=0, eval_every=0)
    with pytest.raises(FloatingPointError, match="lower --lr"):
        fit(model, train, None, config, progress=False)


def test_scored_logits_skip_padding_with_the_same_loss_and_gradients():
    from tformer.data.tokens import IGNORE_INDEX
    from tformer.models.seq2seq import Seq2SeqConfig, Seq2SeqTransformer
    from tformer.train.losses import label_smoothed_cross_entropy
    from tformer.train.trainer import ScoredLogits

    config = Seq2SeqConfig(
        src_vocab_size=20,
        tgt_vocab_size=20,
        max_len=12,
        d_model=16,
        n_heads=2,
        n_encoder_layers=1,
        n_decoder_layers=1,
        d_ff=24,
        dropout=0.0,
    )
    model = Seq2SeqTransformer(config, seed=0)
    src = torch.randint(3, 20, (3, 6), generator=torch.Generator().manual_seed(0))
    tgt_in = torch.randint(3, 20, (3, 5), generator=torch.Generator().manual_seed(1))
    targets = torch.randint(3, 20, (3, 5), generator=torch.Generator().manual_seed(2))
    targets[0, 3:] = IGNORE_INDEX  # padding at the end of two rows
    targets[2, 1:] = IGNORE_INDEX

    def loss_and_grads(logits, kept):
        model.zero_grad()
        loss = label_smoothed_cross_entropy(logits, kept, 0.1, IGNORE_INDEX)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    logits, kept = ScoredLogits(model)((src, tgt_in), targets)
    assert logits.shape == (15 - 2 - 4, 20) and torch.all(kept != IGNORE_INDEX)
    loss, grads = loss_and_grads(logits, kept)
    full_loss, full_grads = loss_and_grads(model(src, tgt_in), targets)  # every position
    torch.testing.assert_close(loss, full_loss)
    for g, full in zip(grads, full_grads, strict=True):
        torch.testing.assert_close(g, full, rtol=1e-5, atol=1e-7)
    # Without padding, or for a model without features/unembed: every position, in order.
    logits, kept = ScoredLogits(model)((src, tgt_in), targets.clamp(min=0))
    assert logits.shape == (15, 20) and torch.equal(kept, targets.clamp(min=0).flatten())
    linear = torch.nn.Linear(4, 20)
    x = torch.randn(3, 5, 4)
    logits, kept = ScoredLogits(linear)((x,), targets)
    torch.testing.assert_close(logits, linear(x).flatten(0, 1))
    assert torch.equal(kept, targets.flatten())


def test_scored_logits_of_a_tied_gpt2_in_bf16_sum_the_table_s_gradients_in_place(
    monkeypatch, tied_sums
):
    # padding takes features + unembed, with the forward pass's TiedTable as GPT2.forward
    # has it; against the plain lookup and head, the same sums in another order
    from tformer import GPT2, GPT2Config
    from tformer.data.tokens import IGNORE_INDEX
    from tformer.models import gpt2 as gpt2_module
    from tformer.nn import head_product
    from tformer.train.trainer import ScoredLogits

    monkeypatch.setattr(head_product, "VOCAB_SLICE", 16)  # 50 words: more than two slices
    monkeypatch.setattr(gpt2_module, "forward_path", lambda x, w: "whole")
    model = GPT2(GPT2Config(vocab_size=50, max_len=16, d_model=16, n_layers=1, n_heads=2), seed=0)
    model.eval()  # no dropout
    ids = torch.randint(0, 50, (3, 9), generator=torch.Generator().manual_seed(0))
    targets = ids[:, 1:].clone()
    targets[0, 5:] = IGNORE_INDEX
    made = []
    make_table = gpt2_module.TiedTable
    monkeypatch.setattr(gpt2_module, "TiedTable", lambda w: made.append(1) or make_table(w))
    in_place = tied_sums  # whether the table's node summed into the head's own gradient

    def grads(one_path=False, tied=True):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits, kept = ScoredLogits(model, one_path)((ids[:, :-1],), targets)
        assert logits.shape[0] == 24 - 3
        assert ("HeadProduct" in logits.grad_fn.name()) == (tied and not one_path)
        torch.nn.functional.cross_entropy(logits.float(), kept).backward()
        return [p.grad.clone() for p in model.parameters()]

    with_table = grads()
    assert made == [1] and in_place == [True]  # the head and the lookup both took the table
    sharded = grads(one_path=True)  # a sharded model's path: never tied
    assert made == [1] and in_place == [True]
    monkeypatch.setattr(gpt2_module.GPT2, "tied_table", lambda self: None)
    plain = grads(tied=False)
    for a, b, c in zip(with_table, plain, sharded, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(c, b, rtol=0, atol=0)


def test_fit_flushes_denormals_while_it_trains_and_restores_the_caller_s_setting(corpus_file):
    from tformer import kernels
    from tformer.devices import flush_denormals

    library = kernels.load()
    assert library is not None, kernels.unavailable_reason()
    _, train, _, model = data_and_model(corpus_file)
    seen = []
    config = quick(steps=2, eval_every=0)
    for caller_flushes in (False, True):
        flush_denormals(caller_flushes)
        record = lambda _: seen.append(library.denormals_flushed())  # noqa: E731
        fit(model, train, None, config, progress=False, on_record=record)
        assert library.denormals_flushed() is caller_flushes
    flush_denormals(False)
    assert seen == [True, True, True, True]  # flushed during every step


def test_training_leaves_the_objects_alive_before_it_out_of_the_collectors_passes():
    import gc

    from tformer.train.trainer import long_lived_objects_frozen

    before = gc.get_freeze_count()
    with long_lived_objects_frozen():
        assert gc.get_freeze_count() > before
        garbage = [[]]
        garbage[0].append(garbage)  # a cycle made inside is still collected
        del garbage
        assert gc.collect() >= 1
    assert gc.get_freeze_count() == before
    callers = [[]]  # the caller's own freeze is left as it is: its objects stay frozen
    gc.freeze()
    try:
        with long_lived_objects_frozen():
            pass
        # Frozen objects are in no generation. (The freeze count is no witness: frozen
        # objects other threads drop meanwhile leave it.)
        assert gc.get_freeze_count() > 0
        assert not any(o is callers for o in gc.get_objects())
    finally:
        gc.unfreeze()
    assert any(o is callers for o in gc.get_objects())
