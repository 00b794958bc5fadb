"""Milliseconds per training step of the nanoGPT CPU Shakespeare model, by code path.

Times one optimizer step (forward, backward, clipping, AdamW) of the 4-layer, 128-wide
character model at batch 12 x 64, for each combination of autocast dtype, attention path
and GELU form, tformer's model against transformers' GPT-2 of the same shape. All the
variants of one dtype and GELU take turns in chunks of steps, so that a change in the
host's speed (this VM has two, minutes apart: docs/LOG.md) falls on all of them alike. As in
`tformer train`, denormals are flushed and freed memory is kept, for both libraries. This
is the measurement behind `tformer train`'s defaults (see docs/LOG.md). Both libraries use
tformer's AdamW (bit-identical to torch's fused one); tformer clips inside its pass, as
`tformer train` does, transformers' loop with torch's clip_grad_norm_, as its users do.

    python benchmarks/train_step.py [--steps 100] [--rounds 10] [--json]
"""

import argparse
import itertools
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine_line  # noqa: E402

from tformer import GPT2, GPT2Config  # noqa: E402
from tformer.devices import flush_denormals, keep_freed_memory  # noqa: E402
from tformer.train.optim import build_optimizer  # noqa: E402

ATTENTION = ("sdpa", "explicit", "blocked")


def training_step(model, forward, dtype: str, clip_in_step: bool) -> Callable[[], None]:
    """One optimizer step of `model` on a fixed batch, as a function; gradients clipped to
    norm 1 inside AdamW's pass (clip_in_step) or by torch's clip_grad_norm_."""
    optimizer = build_optimizer(model, 1e-3, 0.1, (0.9, 0.99))
    x = torch.randint(0, 84, (12, 65), generator=torch.Generator().manual_seed(0))

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            logits = forward(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        if clip_in_step:
            optimizer.step(max_grad_norm=1.0)
        else:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def ms_per_step_in_turns(
    steps: dict[str, Callable[[], None]], total: int, rounds: int
) -> dict[str, float]:
    """Milliseconds per step of each function, timed `total` steps each in `rounds` turns."""
    for step in steps.values():
        for _ in range(10):  # warm-up: allocations, kernel choices
            step()
    chunk = max(1, total // rounds)
    seconds = dict.fromkeys(steps, 0.0)
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            for _ in range(chunk):
                step()
            seconds[name] += time.perf_counter() - start
    return {name: s / (chunk * rounds) * 1000 for name, s in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100, help="steps timed per variant")
    parser.add_argument("--rounds", type=int, default=10, help="turns the steps are split in")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    import transformers

    flush_denormals(True)
    keep_freed_memory()
    print(machine_line(), file=sys.stderr)
    rows = []
    for dtype, activation in itertools.product(("float32", "bfloat16"), ("gelu", "gelu_tanh")):
        hf_config = transformers.GPT2Config(
            vocab_size=84,
            n_positions=64,
            n_embd=128,
            n_layer=4,
            n_head=4,
            activation_function="gelu" if activation == "gelu" else "gelu_new",
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
        peer = transformers.GPT2LMHeadModel(hf_config).train()
        peer_forward = lambda x, m=peer: m(x).logits  # noqa: E731
        steps = {"transformers": training_step(peer, peer_forward, dtype, clip_in_step=False)}
        for attention in ATTENTION:
            config = GPT2Config(
                vocab_size=84,
                max_len=64,
                d_model=128,
                n_layers=4,
                n_heads=4,
                dropout=0.0,
                activation=activation,
                attention=attention,
            )
            model = GPT2(config, seed=0).train()
            steps[attention] = training_step(model, model, dtype, clip_in_step=True)
        ms = ms_per_step_in_turns(steps, args.steps, args.rounds)
        peer_ms = ms.pop("transformers")
        for attention, tformer_ms in ms.items():
            rows.append(
                dict(
                    dtype=dtype,
                    activation=activation,
                    attention=attention,
                    tformer_ms=round(tformer_ms, 2),
                    transformers_ms=round(peer_ms, 2),
                    speedup=round(peer_ms / tformer_ms, 2),
                )
            )
            print(
                f"{dtype:>9} {activation:>9} {attention:>8}: tformer {tformer_ms:6.2f} ms/step, "
                f"transformers {peer_ms:6.2f} ms/step, {peer_ms / tformer_ms:.2f}x",
                file=sys.stderr,
            )
    if args.json:
        print(json.dumps({"machine": machine_line(), "results": rows}))


if __name__ == "__main__":
    main()
