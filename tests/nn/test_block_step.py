import math

import pytest
import torch
from torch import nn

from tformer import GPT2, GPT2Config
from tformer.models.gpt2 import Block
from tformer.nn import attention_choice as choice
from tformer.nn import block_step, measured, small_products
from tformer.nn.kv_cache import KVCache
from tformer.nn.row_blocks import MIN_WEIGHT
from tformer.nn.weight_copies import kept_between_steps
from tformer.train.optim import build_optimizer


def config(**changes) -> GPT2Config:
    settings = dict(vocab_size=40, max_len=64, d_model=64, n_layers=2, n_heads=2, dropout=0.0)
    settings.update(attention="blocked", activation="gelu")
    return GPT2Config(**{**settings, **changes})


@pytest.fixture(params=["kernel", "pairs", "flash"])
def attention_path(request, compiled, bf16_flash, monkeypatch):
    """The attention kernel the step and the modules' path both take, chosen for every
    shape these tests use: the compiled kernel with float32 products or bf16 pairs (where
    the CPU has AVX-512 BF16), or FlashAttention (on a CPU without AMX, its float32 kernel
    in the bf16 one's place: tests/nn/conftest.py's bf16_flash). Its `calls` are the
    FlashAttention kernel's, as they happen."""
    path = request.param
    if path == "pairs" and not compiled.attention_pairs_available():
        pytest.skip("the bf16 pairs' attention kernel needs a CPU with AVX-512 BF16")

    def choose(b: int, t: int, width: int, heads: int) -> None:
        key = f"{b}x{t}x{width} {heads} heads, short bfloat16"
        monkeypatch.setitem(measured._chosen, (choice.KIND, key, torch.get_num_threads()), path)
        shaped = torch.empty(b, t, width, dtype=torch.bfloat16)
        assert choice.short_attention_kernel(shaped, heads, compiled) == path

    choose.flash = path == "flash"
    choose.calls = bf16_flash
    return choose


def took_flash(attention_path, passes: int) -> None:
    """Since the last look, the FlashAttention kernel ran `passes` forward and backward
    passes if it was chosen, and none if not."""
    calls, passes = attention_path.calls, passes if attention_path.flash else 0
    assert (calls.count("forward"), calls.count("backward"), len(calls)) == (
        passes,
        passes,
        2 * passes,
    )
    calls.clear()


def run(block: Block, x: torch.Tensor, grad: torch.Tensor, step: bool):
    """The block's output and every gradient, as one step or through its modules (a hook
    on its last hook point keeps the modules' path: the same kernels)."""
    block.zero_grad()
    handle = None if step else block.hook_resid_post.register_forward_hook(lambda *args: None)
    x = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert block_step.takes(block, x, None, None) == step
        y = block(x)
    assert ("FusedBlockBackward" in graph_nodes(y)) == step
    y.backward(grad)
    if handle is not None:
        handle.remove()
    return y, [x.grad, *(p.grad.clone() for p in block.parameters())]


@torch.no_grad()
def exact(block: Block, x: torch.Tensor) -> torch.Tensor:
    """The block's output in float64 from the bf16 values its products read."""
    first, second, attention, ffn = block.attn_sublayer, block.mlp_sublayer, block.attn, block.mlp
    x = x.double()
    b, t, c = x.shape
    h = attention.n_heads

    def norm(z: torch.Tensor, ln: nn.Module) -> torch.Tensor:
        z = nn.functional.layer_norm(z, (c,), ln.weight.double(), ln.bias.double(), ln.eps)
        return z.bfloat16().double()

    def product(z: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
        w, bias = (p.detach().bfloat16().double() for p in (layer.weight, layer.bias))
        return z @ w.t() + bias

    qkv = product(norm(x, first.norm), attention.w_qkv).bfloat16().double()
    q, k, v = qkv.view(b, t, 3, h, -1).permute(2, 0, 3, 1, 4)
    scores = q @ k.transpose(-1, -2) / math.sqrt(c // h)
    scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), -math.inf)
    o = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, c).bfloat16().double()
    r = x + product(o, attention.w_o).bfloat16().double()
    hidden = nn.functional.gelu(product(norm(r, second.norm), ffn.w1))
    return r + product(hidden.bfloat16().double(), ffn.w2).bfloat16().double()


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
def test_the_block_in_one_step_trains_as_its_modules(attention_path, activation, products, agree):
    """The same kernels, products and casts: the output and every gradient equal to the
    bit with torch's products (with kernels/products.c's, within a bf16 rounding); the
    output as close to float64's as bf16 products allow."""
    torch.manual_seed(0)
    block = Block(config(activation=activation)).train()
    for p in block.parameters():  # gains and biases away from 1 and 0
        nn.init.normal_(p, mean=p.mean().item(), std=0.1)
    x = torch.randn(3, 50, 64)
    grad = torch.randn(3, 50, 64)
    attention_path(3, 50, 192, 2)
    y, ours = run(block, x, grad, step=True)
    took_flash(attention_path, 1)
    y0, plain = run(block, x, grad, step=False)
    took_flash(attention_path, 1)
    assert y.dtype == torch.float32
    agree(y, y0)
    for g, g0 in zip(ours, plain, strict=True):
        assert g.dtype == torch.float32
        agree(g, g0)
    if activation == "gelu":
        best = exact(block, x)
        torch.testing.assert_close(y.double(), best, rtol=0, atol=2**-7 * best.abs().max().item())


def train_three_steps() -> tuple[list[float], list[torch.Tensor], list[int]]:
    """Three AdamW steps of a two-block model, the weights' bf16 copies written by the
    optimizer: the losses, the weights after, and the blocks taken as one step each time."""
    ids = torch.randint(0, 40, (4, 33), generator=torch.Generator().manual_seed(0))
    model = GPT2(config(), seed=0).train()
    optimizer = build_optimizer(model, 1e-2, 0.1, (0.9, 0.99))
    taken, losses = [], []
    with kept_between_steps():
        for _ in range(3):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = model(ids[:, :-1])
                taken.append(graph_nodes(logits).count("FusedBlockBackward"))
            loss = nn.functional.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
            loss.backward()
            optimizer.step(max_grad_norm=1.0)
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
    return losses, [p.detach().clone() for p in model.parameters()], taken


def test_a_model_trains_the_same_with_its_blocks_in_one_step(attention_path, monkeypatch):
    """With torch's products on both paths: the same losses and weights to the bit as
    through the modules."""
    monkeypatch.setattr(small_products, "chosen", lambda *shape: "torch")
    attention_path(4, 32, 192, 2)
    losses, weights, taken = train_three_steps()
    assert taken == [2] * 3
    took_flash(attention_path, 3 * 2)
    monkeypatch.setattr(block_step, "takes", lambda *args: False)
    losses_0, weights_0, taken = train_three_steps()
    assert taken == [0] * 3
    took_flash(attention_path, 3 * 2)
    assert losses == losses_0
    assert all(torch.equal(w, w0) for w, w0 in zip(weights, weights_0, strict=True))


def test_a_model_trains_alike_with_either_products(compiled, monkeypatch):
    """kernels/products.c's products (float32 weight gradients, not rounded) train the
    model as torch's do: three steps' losses within a bf16 rounding, nearly every weight
    within 1e-3. (The keys' bias has a gradient of 0 up to rounding, which AdamW turns into
    steps of lr either way: its values follow each path's rounding.)"""
    if not compiled.products_available():
        pytest.skip("kernels/products.c needs a CPU with AVX-512 BF16")
    results = []
    for path in ("rows", "torch"):
        monkeypatch.setattr(small_products, "chosen", lambda *shape, path=path: path)
        losses, weights, taken = train_three_steps()
        assert taken == [2] * 3
        results.append((losses, torch.cat([w.flatten() for w in weights])))
    (losses, weights), (losses_0, weights_0) = results
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(losses_0), rtol=2**-7, atol=0)
    apart = (weights - weights_0).abs()
    assert (apart > 1e-3).float().mean() < 0.01 and apart.max() <= 2 * 3 * 1e-2 * 1.5


def graph_nodes(t: torch.Tensor) -> list[str]:
    """The names of the autograd nodes behind t."""
    seen, stack, names = set(), [t.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(node.name())
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


def test_frozen_parameters_get_no_gradient_and_the_rest_the_modules_one(attention_path, agree):
    block = Block(config()).train()
    frozen = [block.attn.w_o.bias, block.mlp.w1.weight, block.attn_sublayer.norm.weight]
    for p in frozen:  # one of each pair: a gradient given to its neighbour would show
        p.requires_grad_(False)
    attention_path(2, 8, 192, 2)
    x = torch.randn(2, 8, 64)  # an input that does not train either
    grad = torch.randn(2, 8, 64)
    found = []
    for step in (True, False):
        block.zero_grad()
        handle = None if step else block.hook_resid_post.register_forward_hook(lambda *a: None)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert block_step.takes(block, x, None, None) == step
            y = block(x)
        assert (y.grad_fn.name() == "ViewBackward0") == step  # FusedBlock's output, viewed
        y.backward(grad)
        if handle is not None:
            handle.remove()
        found.append([None if p.grad is None else p.grad.clone() for p in block.parameters()])
    took_flash(attention_path, 2)
    for p, g, g0 in zip(block.parameters(), *found, strict=True):
        if any(p is q for q in frozen):
            assert g is None and g0 is None
        else:
            agree(g, g0)


def test_its_output_may_be_changed_in_place_as_the_modules_one(compiled):
    """As the modules' output: a hook on the block that steers it in place, say."""
    block = Block(config()).train()
    handle = block.register_forward_hook(lambda module, args, out: out.add_(0.5))
    x = torch.randn(2, 8, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert block_step.takes(block, x, None, None)
        y = block(x)
    handle.remove()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y0 = block(x)
    assert torch.equal(y, y0 + 0.5)
    y.sum().backward()
    assert x.grad is not None and block.mlp.w2.weight.grad is not None


def test_it_is_taken_only_where_it_applies(compiled):
    block = Block(config()).train()
    x = torch.randn(2, 8, 64)

    def takes(block=block, x=x, mask=None, cache=None) -> bool:
        return block_step.takes(block, x, mask, cache)

    assert not takes()  # float32 products: outside autocast, the modules' path
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert takes()
        with torch.no_grad():  # nothing to train
            assert not takes()
        assert not takes(mask=torch.ones(2, 8))
        assert not takes(cache=KVCache(2, 2, 8, 32, torch.float32, torch.device("cpu")))
        assert not takes(x=torch.randn(2, 200, 64))  # longer than the kernel takes
        for hooked in (block.hook_attn_out, block.attn.w_o, block.mlp_sublayer.norm):
            handle = hooked.register_forward_hook(lambda *args: None)
            assert not takes()  # the hook would not see its module
            handle.remove()
        handle = block.mlp.w1.register_full_backward_hook(lambda *args: None)
        assert not takes()
        handle.remove()
        handle = block.attn.w_qkv.register_full_backward_pre_hook(lambda *args: None)
        assert not takes()
        handle.remove()
        module_hooks = nn.modules.module
        for register in (
            module_hooks.register_module_forward_hook,
            module_hooks.register_module_full_backward_hook,
            module_hooks.register_module_full_backward_pre_hook,
        ):
            handle = register(lambda *args: None)
            assert not takes()  # a global hook would see every module
            handle.remove()
        assert takes()
        block.attn_sublayer.norm_writes_bf16 = False  # as while LoRA adapters read the norm
        assert not takes()
        block.attn_sublayer.norm_writes_bf16 = True
        assert takes()
        assert not takes(Block(config(dropout=0.1)).train())  # dropout while training
        assert takes(Block(config(dropout=0.1)).eval())
        assert not takes(Block(config(attention_dropout=0.1)).train())
        assert not takes(Block(config(norm_position="post")))
        assert not takes(Block(config(residual=False)))
        assert not takes(Block(config(activation="relu")))
        assert not takes(Block(config(attention="explicit")))
        width = 256  # 256 x 1024 weights in the feed-forward network: nn/row_blocks.py's
        assert 4 * width * width >= MIN_WEIGHT
        large = Block(config(d_model=width, n_heads=4))
        assert not takes(large, torch.randn(2, 8, width))
