"""The slot cache: sequences of different lengths decoded together give each one's logits
alone (a plain forward pass over its whole sequence is the reference)."""

import pytest
import torch

from tformer import kernels
from tformer.models.gpt2 import GPT2
from tformer.models.gpt2_config import GPT2Config
from tformer.nn.slot_cache import SlotCache, decode_mask


def tiny() -> GPT2:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=61, max_len=40, d_model=32, n_layers=2, n_heads=4, dropout=0.0)
    return GPT2(config).eval()


def count_kernel_calls(monkeypatch) -> list:
    """A list that grows by one at each call of the slot-attention kernel."""
    if kernels.load() is None:
        pytest.skip(f"the C kernels are unavailable: {kernels.unavailable_reason()}")
    calls, original = [], kernels.Kernels.slot_attention
    monkeypatch.setattr(
        kernels.Kernels, "slot_attention", lambda self, *a: calls.append(1) or original(self, *a)
    )
    return calls


def test_another_mask_or_a_hook_on_the_weights_takes_the_general_path(monkeypatch):
    model = tiny()
    calls = count_kernel_calls(monkeypatch)
    caches = model.new_slot_caches(2)
    with torch.no_grad():
        for cache in caches:
            cache.prefill(0, 2)
        model.features(torch.tensor([[1, 2, 3], [4, 5, 6]]), caches=caches)
        positions, new = torch.tensor([3, 3]), torch.tensor([[7], [8]])

        def step(mask):
            for cache in caches:
                cache.decode(positions)
            return model.unembed(model.features(new, mask, positions[:, None], caches))

        expected = step(decode_mask(positions))
        assert len(calls) == 2  # the kernel, in each layer
        hidden = decode_mask(positions).clone()
        hidden[:, 0] = False  # not decode_mask: the kernel would ignore it
        assert not torch.allclose(step(hidden), expected, atol=1e-3)
        handle = model.blocks[0].attn.hook_pattern.register_forward_hook(lambda *args: None)
        torch.testing.assert_close(step(decode_mask(positions)), expected, atol=1e-5, rtol=1e-5)
        handle.remove()
        assert len(calls) == 2 + 1  # neither the other mask nor the hooked layer's step


@pytest.mark.parametrize("path", ["kernel", "general"])
def test_rows_at_their_own_positions_match_each_sequence_alone(path, monkeypatch):
    """Both ways of a decoding step: the C kernel (SlotCache.attend) and the general path
    (update, then attention with decode_mask)."""
    calls = count_kernel_calls(monkeypatch)
    if path == "general":
        monkeypatch.setattr(kernels, "load_for", lambda tensor, dtypes: None)
    model = tiny()
    g = torch.Generator().manual_seed(1)
    sequences = [torch.randint(0, 61, (n,), generator=g).tolist() for n in (3, 9, 1, 6)]
    caches = model.new_slot_caches(4)
    with torch.no_grad():
        for slot, seq in enumerate(sequences):  # prefill each prompt into its slot
            for cache in caches:
                cache.prefill(slot)
            model.features(torch.tensor([seq]), caches=caches)
        for _ in range(5):  # then several decoding steps, every row at once
            new = torch.randint(0, 61, (4,), generator=g)
            positions = torch.tensor([len(s) for s in sequences])
            for cache in caches:
                cache.decode(positions)
            logits = model.unembed(
                model.features(new[:, None], decode_mask(positions), positions[:, None], caches)
            )[:, -1]
            for row, seq in enumerate(sequences):
                seq.append(int(new[row]))
                alone = model(torch.tensor([seq]))[0, -1]
                torch.testing.assert_close(logits[row], alone, atol=1e-5, rtol=1e-5)
    assert len(calls) == (5 * 2 if path == "kernel" else 0)  # each step, each layer


def test_move_copies_a_slot_and_decode_mask_covers_each_row():
    cache = SlotCache(3, 2, 8, 4)
    cache.k[2, :, :5] = 7.0
    cache.v[2, :, :5] = 9.0
    cache.move(2, 0, 5)
    assert torch.equal(cache.k[0, :, :5], cache.k[2, :, :5])
    assert torch.equal(cache.v[0, :, :5], cache.v[2, :, :5])
    mask = decode_mask(torch.tensor([0, 3]))
    assert mask.tolist() == [[True, False, False, False], [True, True, True, True]]
