"""The encoder-decoder's fused decoding step (models/seq2seq_decode.py) against the plain
path of the same packed weights."""

import pytest
import torch

from tformer import kernels
from tformer.generate.beam import BeamConfig, beam_search, greedy_search
from tformer.generate.fast import pack_for_decoding
from tformer.models.seq2seq import Seq2SeqConfig, Seq2SeqTransformer
from tformer.nn.kv_cache import follow_paths

pytestmark = pytest.mark.skipif(kernels.load() is None, reason="no C kernels here")

SOURCES = [[5, 6, 7, 8, 9, 2], [3, 4, 2], [10, 11, 12, 13, 14, 15, 16, 2], [7, 2]]


def packed_model(
    activation: str, fused: bool, seed: int = 2, d_model: int = 40, weights: str = "float32"
) -> Seq2SeqTransformer:
    """2 + 2 layers, 40 wide, 5 heads (not a power of two), weights off their start."""
    config = Seq2SeqConfig(src_vocab_size=31, tgt_vocab_size=31, max_len=24, d_model=d_model,
                           n_heads=5, n_encoder_layers=2, n_decoder_layers=2, d_ff=72,
                           dropout=0.0, activation=activation, share_embeddings=True)  # fmt: skip
    model = Seq2SeqTransformer(config, seed=seed).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    pack_for_decoding(model, weights)
    assert model.fused_decoding is not None
    if not fused:
        model.fused_decoding = None
    return model


def padded(rows):
    width = max(len(r) for r in rows)
    return torch.tensor([r + [0] * (width - len(r)) for r in rows])


# w8a8, w4a8: the same integer kernels on both paths (the rows quantised alike)
@pytest.mark.parametrize(
    ("activation", "weights"),
    [
        ("relu", "float32"),
        ("gelu", "float32"),
        ("gelu_tanh", "float32"),
        ("relu", "w8a8"),
        ("relu", "w4a8"),
    ],
)
def test_the_fused_step_computes_the_decoder_layers(activation, weights):
    fused = packed_model(activation, True, weights=weights)
    plain = packed_model(activation, False, weights=weights)
    src = padded(SOURCES)  # padded: the cross-attention's mask matters
    mask = fused.source_mask(src)
    steps = [[1, 1, 1, 1], [9, 10, 11, 12], [13, 3, 14, 2], [4, 4, 4, 4]]
    with torch.inference_mode():
        memory = fused.encode(src, mask)
        outputs = {}
        for name, model in (("fused", fused), ("plain", plain)):
            caches, kvs = model.new_caches(4, 8), model.project_memory(memory)
            # one row dropped after two steps, as a search drops finished sentences: the
            # memory's keys and values are then gathered copies, with other strides
            keep = torch.tensor([0, 2, 3])
            rows, m, out = list(range(4)), mask, []
            for t, step in enumerate(steps):
                ids = torch.tensor([[step[r]] for r in rows])
                out.append(model.decode(ids, memory, m, caches, kvs))
                if t == 1:
                    rows, m = [0, 2, 3], m[keep]
                    kvs = [(k[keep], v[keep]) for k, v in kvs]
                    follow_paths(caches, keep, keep)  # each row stays in its slot
            outputs[name] = out
    for a, b in zip(outputs["fused"], outputs["plain"], strict=True):
        # another order of sums in attention and the norms: float32 rounding
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# d_head 8; d_head 20 (16 + a tail of 4 in the vectorised loops) with 330 rows (the norms
# split over the threads)
@pytest.mark.parametrize(("d_model", "beams"), [(40, 5), (100, 110)])
def test_the_fused_step_reads_one_memory_row_for_each_sentence_s_beams(d_model, beams):
    # 3 sentences of several beams (more than the kernel's 4 queries at a time), the memory
    # one row per sentence; then the second sentence leaves, and beams branch
    fused = packed_model("relu", True, d_model=d_model)
    plain = packed_model("relu", False, d_model=d_model)
    src = padded(SOURCES[:3])
    mask = fused.source_mask(src)
    g = torch.Generator().manual_seed(0)
    steps = [torch.randint(3, 31, (3 * beams, 1), generator=g) for _ in range(3)]
    with torch.inference_mode():
        memory = fused.encode(src, mask)
        outputs = {}
        for name, model in (("fused", fused), ("plain", plain)):
            caches, kvs, m = model.new_caches(3 * beams, 8), model.project_memory(memory), mask
            assert name == "plain" or model.fused_decoding.applies(model, steps[0], m,
                                                                   caches, kvs)  # fmt: skip
            out = [model.decode(steps[0], memory, m, caches, kvs)]
            out.append(model.decode(steps[1], memory, m, caches, kvs))
            sentences = torch.tensor([0, 2])
            # beams branch (beam 0 of each goes on twice, the last beam not at all), and
            # write in their sentences' slots
            first, third = list(range(beams)), list(range(2 * beams, 3 * beams))
            rows = torch.tensor([0, *first[:-1], 2 * beams, *third[:-1]])
            slots = torch.tensor([*first, *third])
            m, kvs = m[sentences], [(k[sentences], v[sentences]) for k, v in kvs]
            follow_paths(caches, rows, slots)
            assert name == "plain" or model.fused_decoding.applies(model, steps[2][rows], m,
                                                                   caches, kvs)  # fmt: skip
            out.append(model.decode(steps[2][rows], memory[sentences], m, caches, kvs))
            outputs[name] = out
    for a, b in zip(outputs["fused"], outputs["plain"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_searches_on_the_fused_step_choose_what_the_plain_path_chooses():
    # float32: the plain path's output projection is the model's own (not packed)
    fused, plain = packed_model("relu", True), packed_model("relu", False)
    src = padded(SOURCES)
    assert greedy_search(fused, src, 12) == greedy_search(plain, src, 12)
    for early in (False, True):
        config = BeamConfig(beam_size=3, max_new_tokens=10, early_stopping=early)
        assert beam_search(fused, src, config) == beam_search(plain, src, config)


def test_the_fused_step_steps_aside_for_hooks_training_and_a_move():
    model = packed_model("gelu", True)
    src = padded(SOURCES[:2])
    mask = model.source_mask(src)
    with torch.inference_mode():
        memory = model.encode(src, mask)
        kvs = model.project_memory(memory)
        caches = model.new_caches(2, 4)
        ids = torch.tensor([[1], [1]])
        assert model.fused_decoding.applies(model, ids, mask, caches, kvs)
        seen = []
        handle = model.decoder_layers[1].mlp.register_forward_hook(lambda *a: seen.append(1))
        assert not model.fused_decoding.applies(model, ids, mask, caches, kvs)
        model.decode(ids, memory, mask, caches, kvs)
        assert seen  # the hook saw its module: the plain path ran
        handle.remove()
        assert not model.fused_decoding.applies(model, ids, mask, caches, None)
    model.to(torch.float32)  # a move replaces the tensors the fused step points at
    assert model.fused_decoding is None and model.fuse_decoding()


@pytest.mark.parametrize(
    ("weights", "head"),
    [("float32", "float32"), ("int4", "int8"), ("w8a8", "w8a8"), ("w4a8", "w8a8")],
)
def test_the_packed_output_projection_computes_x_times_the_embedding(weights, head):
    config = Seq2SeqConfig(src_vocab_size=97, tgt_vocab_size=97, d_model=64, n_heads=4,
                           n_encoder_layers=1, n_decoder_layers=1, d_ff=64)  # fmt: skip
    model = Seq2SeqTransformer(config, seed=0).eval()
    x = torch.randn(5, 3, 64)
    with torch.no_grad():
        expected = model.unembed(x)
    pack_for_decoding(model, weights)
    assert model.fused_decoding.head.weight_dtype == head  # 4 bits keep the head in 8
    with torch.inference_mode():
        got = model.unembed(x)
    # float32: the kernels' order of sums; int8: each weight within half a step of its row
    tolerance = 1e-5 if head == "float32" else 0.05
    torch.testing.assert_close(got, expected, rtol=0, atol=tolerance)
