"""Peak memory of a GPT-2 124M training step, with and without activation checkpointing.

GPT-2 124M at context 1024, batches of 1, 4 and 8 sequences, bf16 autocast on the CPU (as
`tformer train` runs it), float32 weights, AdamW: for tformer (`--activation-checkpointing`)
and transformers' GPT2LMHeadModel (`gradient_checkpointing_enable()`), each configuration
in a fresh process, so that the peak resident memory (ru_maxrss) belongs to it alone. Two
optimizer steps each; the second one is timed.

Both libraries run with glibc's default allocator, which returns large blocks to the system
when they are freed, so the peak resident memory follows the peak of live tensors. tformer's
trainer keeps freed memory for reuse instead (`keep_freed_memory`, faster); its peak under
that setting is reported too ("tformer, kept"): fragmentation of the kept heap can add to it.

What the numbers should be: the weights, their gradients and AdamW's two moments take
16 bytes a parameter (2.0 GB); activations, after Korthikanti et al. (2022), about
L (34 B T C + 5 B H T^2) bytes in 16-bit precision plus the float32 logits, and with
checkpointing only the L layer inputs (B, T, C), float32 under autocast, and one layer's
activations at a time.

    python benchmarks/train_memory.py [--batches 1 4 8] [--json]
"""

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import machine_line  # noqa: E402

GIB = 2**30


def one_run(library: str, batch: int, checkpointing: bool, keep: bool) -> dict:
    """Runs in its own process: two training steps, then the peak memory and step time."""
    import torch

    from tformer import GPT2, GPT2Config
    from tformer.devices import keep_freed_memory
    from tformer.train.optim import build_optimizer
    from tformer.train.trainer import cross_entropy

    if keep:
        keep_freed_memory()
    context, vocab = 1024, 50257
    if library == "tformer":
        model = GPT2(GPT2Config(dropout=0.0, attention="blocked"), seed=0)
        model.set_activation_checkpointing(checkpointing)

        def loss_of(ids):
            logits = model(ids[:, :-1])
            with torch.autocast("cpu", enabled=False):
                return cross_entropy(logits, ids[:, 1:])
    else:
        import transformers

        config = transformers.GPT2Config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        model = transformers.GPT2LMHeadModel(config)
        if checkpointing:
            model.gradient_checkpointing_enable()

        def loss_of(ids):
            return model(input_ids=ids[:, :-1], labels=ids[:, :-1]).loss

    model.train()
    optimizer = build_optimizer(model, 1e-4, 0.1, (0.9, 0.95))
    ids = torch.randint(0, vocab, (batch, context + 1), generator=torch.Generator().manual_seed(0))
    seconds = 0.0
    for _ in range(2):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_of(ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
    return {
        "library": library + (", kept" if keep else ""),
        "batch": batch,
        "checkpointing": checkpointing,
        "peak_gib": round(peak / GIB, 2),
        "step_seconds": round(seconds, 2),
        "tokens_per_second": round(batch * context / seconds, 1),
    }


def expected_gib(batch: int, checkpointing: bool) -> float:
    """Weights, gradients and AdamW moments, plus activations by the formula above."""
    layers, heads, width, context, vocab, params = 12, 12, 768, 1024, 50257, 124_439_808
    states = 16 * params
    logits = batch * context * vocab * (2 + 4 + 2)  # bf16 logits, float32 softmax, gradient
    if checkpointing:
        per_layer = 34 * batch * context * width + 5 * batch * heads * context**2
        activations = layers * 4 * batch * context * width + per_layer  # float32 inputs
    else:
        activations = layers * (34 * batch * context * width + 5 * batch * heads * context**2)
    return (states + activations + logits) / GIB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--json", action="store_true")
    # library, batch, checkpointing (1/0), keep freed memory (1/0): one run, in this process
    parser.add_argument("--one", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        library, batch, checkpointing, keep = args.one
        print(json.dumps(one_run(library, int(batch), checkpointing == "1", keep == "1")))
        return
    machine = machine_line()
    print(machine, file=sys.stderr)
    rows = []
    for batch in args.batches:
        for checkpointing in (False, True):
            for library, keep in (("tformer", "0"), ("transformers", "0"), ("tformer", "1")):
                command = [sys.executable, __file__, "--one", library, str(batch)]
                command += ["1" if checkpointing else "0", keep]
                done = subprocess.run(command, capture_output=True, text=True, check=True)
                row = json.loads(done.stdout.strip().splitlines()[-1])
                row["expected_gib"] = round(expected_gib(batch, checkpointing), 2)
                rows.append(row)
                print(
                    f"batch {batch} checkpointing {'on ' if checkpointing else 'off'} "
                    f"{row['library']:>14}: peak {row['peak_gib']:5.2f} GiB (formula "
                    f"{row['expected_gib']:5.2f}), step {row['step_seconds']:6.2f} s, "
                    f"{row['tokens_per_second']:6.1f} tok/s",
                    file=sys.stderr,
                )
    if args.json:
        print(json.dumps({"machine": machine, "rows": rows}))


if __name__ == "__main__":
    main()
