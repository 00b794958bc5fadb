"""Training, checkpoints, the optimizer and decoding on the machine's accelerator.

The rest of the suite builds its models on the CPU. These tests put them on the device
`tformer train --device auto` would take: a CUDA GPU where there is one (the GPU check,
benchmarks/gpu_check.sh, runs them there), else the CPU, where they check the same
device-generic code (and themselves). Under autocast they use the dtype `--dtype auto` would
pick there (devices.training_dtype).
"""

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from tformer import GPT2, CharTokenizer, GPT2Config
from tformer.data.sources import split_text
from tformer.data.tokens import LMBatches
from tformer.devices import DTYPES, pick_device, training_dtype
from tformer.generate import SamplingConfig, generate_batch, generate_ids
from tformer.generate.decode import left_pad
from tformer.train import TrainConfig, fit
from tformer.train.optim import build_optimizer

DEVICE = pick_device("auto")
DTYPE = training_dtype("auto", DEVICE)  # the autocast dtype; "float32": none
# float32 on a GPU: its matmuls may sum in another order than the CPU's
CLOSE = {"rtol": 1e-4, "atol": 1e-5} if DEVICE.type == "cpu" else {"rtol": 2e-3, "atol": 2e-4}


PROMPTS = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7], [9, 8, 7, 6, 5], [42]]


def small_model(vocab_size: int, context: int = 32) -> GPT2:
    config = GPT2Config(
        vocab_size=vocab_size, max_len=context, d_model=32, n_layers=2, n_heads=2, dropout=0.0
    )
    return GPT2(config, seed=0)


# --dtype auto's choice here, and on a GPU float16 with loss scaling (auto's on older GPUs)
TRAIN_DTYPES = [DTYPE, *(["float16"] if DEVICE.type == "cuda" and DTYPE != "float16" else [])]


@pytest.mark.parametrize("dtype", TRAIN_DTYPES)
def test_a_model_trains_here_and_its_saved_weights_load_on_the_cpu(corpus_file, tmp_path, dtype):
    text = corpus_file.read_text()
    tok = CharTokenizer.from_text(text)
    train_text, val_text = split_text(text)
    train, val = (
        LMBatches(np.array(tok.encode(part), dtype=np.uint16), 16)
        for part in (train_text, val_text)
    )
    model = small_model(tok.vocab_size, 16).to(DEVICE)
    config = TrainConfig(
        steps=40, batch_size=8, lr=3e-3, min_lr=3e-4, warmup_steps=5, eval_every=20,
        eval_batches=2, checkpoint_every=20, dtype=dtype,
    )  # fmt: skip
    history = fit(model, train, val, config, tmp_path / "run", tok, progress=False)
    losses = [r["loss"] for r in history if r["type"] == "train"]
    assert len(losses) == 40 and all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])
    assert next(model.parameters()).device.type == DEVICE.type
    loaded = GPT2.from_pretrained(tmp_path / "run")  # on the CPU
    ids = torch.tensor([tok.encode(val_text[:16])])
    with torch.no_grad():
        here = model.eval()(ids.to(DEVICE)).cpu()
        torch.testing.assert_close(here, loaded.eval()(ids), **CLOSE)


def test_adamw_here_is_torchs_with_the_same_clipping():
    torch.manual_seed(0)
    ours, theirs = small_model(40).to(DEVICE), small_model(40).to(DEVICE)
    ours_opt = build_optimizer(ours, 1e-2, 0.1, (0.9, 0.99))
    groups = [
        {"params": [p for p in theirs.parameters() if p.dim() >= 2], "weight_decay": 0.1},
        {"params": [p for p in theirs.parameters() if p.dim() < 2], "weight_decay": 0.0},
    ]
    theirs_opt = torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.99), fused=True)
    ids = torch.randint(0, 40, (4, 33), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    for _ in range(3):
        for model in (ours, theirs):
            logits = model(ids[:, :-1])
            nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
        nn.utils.clip_grad_norm_(theirs.parameters(), 0.5)
        ours_opt.step(max_grad_norm=0.5)
        theirs_opt.step()
        ours_opt.zero_grad(set_to_none=True)
        theirs_opt.zero_grad(set_to_none=True)
    # The weights differ in their last bits after a step (the clipping scale: a division
    # here, a multiplication in torch's). The keys' bias then differs by up to ~lr |g| / eps
    # ~ 5e-6: the softmax ignores it, so its gradient is rounding noise, and AdamW turns
    # each model's own noise into steps of that size. A wrong update would move every
    # weight by ~lr.
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_autocast_here_stays_close_to_float32_on_the_cpu():
    model = small_model(50)
    ids = torch.randint(0, 50, (3, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        exact = model.eval()(ids)
        model.to(DEVICE)
        with torch.autocast(DEVICE.type, dtype=DTYPES[DTYPE], enabled=DTYPE != "float32"):
            here = model(ids.to(DEVICE)).float().cpu()
    assert torch.isfinite(here).all()
    scale = exact.abs().max()
    torch.testing.assert_close(here / scale, exact / scale, rtol=0, atol=3e-2)


def test_a_left_padded_batch_here_decodes_each_prompt_as_alone():
    model = small_model(50).to(DEVICE).eval()
    config = SamplingConfig(max_new_tokens=10, do_sample=False)
    together = generate_batch(model, PROMPTS, config)
    alone = [generate_ids(model, torch.tensor([p]), config) for p in PROMPTS]
    assert together == alone and all(len(out) == 10 for out in together)


def test_padding_stays_finite_in_the_autocast_dtype_here():
    """Padded positions attend to nothing (every key masked). Whichever attention kernel
    runs here in the autocast dtype must keep them finite, or their NaN would reach the
    real rows in the next layer; the real rows match each prompt run alone."""
    model = small_model(50).to(DEVICE).eval()
    ids, mask = (x.to(DEVICE) for x in left_pad(PROMPTS))
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with (
        torch.no_grad(),
        torch.autocast(DEVICE.type, dtype=DTYPES[DTYPE], enabled=DTYPE != "float32"),
    ):
        logits = model(ids, attention_mask=mask, position_ids=positions).float()
        assert torch.isfinite(logits).all()
        for row, prompt in enumerate(PROMPTS):
            single = model(torch.tensor([prompt], device=DEVICE)).float()[0]
            scale = single.abs().max()
            ours = logits[row, -len(prompt) :]
            torch.testing.assert_close(ours / scale, single / scale, rtol=0, atol=2e-2)


def test_a_model_made_for_the_cpu_attends_in_torchs_fused_kernel_here(monkeypatch):
    """A model trained on a CPU keeps attention "blocked" in its config; off the CPU that
    path is torch's fused kernel (as "sdpa"), never the explicit one nor query blocks, short
    or long."""
    from tformer.nn import attention

    if DEVICE.type != "cpu":  # the CPU's own paths
        for path in ("explicit_attention", "blocked_causal_attention"):
            monkeypatch.setattr(attention, path, lambda *a, path=path: pytest.fail(path))
    for context in (32, 200):  # the short kernel's length and a long one
        sizes = dict(vocab_size=50, max_len=context, d_model=32, n_layers=1, n_heads=2)
        blocked, sdpa = (
            GPT2(GPT2Config(**sizes, dropout=0.0, attention=path), seed=0)
            for path in ("blocked", "sdpa")
        )
        ids = torch.randint(0, 50, (2, context), generator=torch.Generator().manual_seed(0))
        for model in (blocked, sdpa):
            model.to(DEVICE).train()
        with torch.autocast(DEVICE.type, dtype=DTYPES[DTYPE], enabled=DTYPE != "float32"):
            ours, theirs = (m(ids.to(DEVICE)).float() for m in (blocked, sdpa))
            ours.sum().backward()
        scale = theirs.abs().max()
        torch.testing.assert_close(ours / scale, theirs / scale, rtol=0, atol=2e-2)


def test_an_encoder_decoder_trains_and_translates_here():
    """The original Transformer: a few steps on number words in `--dtype auto`'s autocast
    dtype here, then teacher-forced logits as the same weights give them on the CPU, and
    greedy and beam translations made here."""
    from tformer.data.parallel import ParallelBatches, number_words, split_pairs
    from tformer.generate import TruncationWarning
    from tformer.generate.beam import BeamConfig
    from tformer.generate.translate import translate
    from tformer.models.seq2seq import Seq2SeqConfig, Seq2SeqTransformer
    from tformer.tokenizers import train_bpe

    specials = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2: the model's pad, start and end
    train, val, test = split_pairs(number_words(2_000, seed=0), val=50, test=8)
    tokenizer = train_bpe([s for pair in train for s in pair], 300, special_tokens=specials)
    data = [ParallelBatches(p, tokenizer, 0, 1, 2, max_len=32) for p in (train, val)]
    config = Seq2SeqConfig(
        tokenizer.vocab_size, tokenizer.vocab_size, max_len=32, d_model=32, n_heads=2,
        n_encoder_layers=1, n_decoder_layers=1, d_ff=64, dropout=0.0, share_embeddings=True,
    )  # fmt: skip
    model = Seq2SeqTransformer(config, seed=0).to(DEVICE)
    config = TrainConfig(
        steps=60, batch_size=32, lr=3e-3, warmup_steps=10, weight_decay=0.0, eval_every=0,
        eval_batches=2, final_eval="sample", checkpoint_every=0, dtype=DTYPE,
    )  # fmt: skip
    history = fit(model, data[0], data[1], config, run_dir=None, progress=False)
    losses = [r["loss"] for r in history if r["type"] == "train"]
    assert all(np.isfinite(losses)) and np.mean(losses[-10:]) < 0.7 * np.mean(losses[:10])
    batch = data[1].sample(4, torch.Generator().manual_seed(0))
    src, tgt = batch.inputs
    with torch.no_grad():
        here = model.eval()(src.to(DEVICE), tgt.to(DEVICE)).cpu()
        on_cpu = Seq2SeqTransformer(model.config)
        on_cpu.load_state_dict({k: v.cpu() for k, v in model.state_dict().items()})
        torch.testing.assert_close(here, on_cpu.eval()(src, tgt), **CLOSE)
    sources = [s for s, _ in test]
    for beam in (None, BeamConfig(beam_size=3)):
        with warnings.catch_warnings():  # 60 steps may not have learnt to stop yet
            warnings.simplefilter("ignore", TruncationWarning)
            translations = translate(model, tokenizer, sources, beam, max_new_tokens=16)
        assert len(translations) == len(sources) and all(isinstance(t, str) for t in translations)
