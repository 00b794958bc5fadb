"""How fast this machine's two CPUs are right now, together and one at a time.

On the 2-CPU VM of this project the same training step sometimes takes 40% longer for
minutes at a time (docs/LOG.md). This benchmark tells such a phase apart: it times the
nanoGPT-configuration training step (bf16 autocast, batch 12 x 64, the trainer's defaults)
over and over, in turns, on both CPUs with two threads and on each CPU alone with one
thread, and prints one row per turn with the two-thread speed-up over one thread.

If one CPU were slow, its one-thread column would rise. If the two CPUs share one physical
core for a while (the hypervisor may place two virtual CPUs on the two hardware threads of a
core), the one-thread columns stay put and only the two-thread column rises: the speed-up
falls from ~1.6 towards ~1.2.

    python benchmarks/host_speed.py [--seconds 120] [--json]
"""

import argparse
import json
import os
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
from tformer.train.trainer import cross_entropy  # noqa: E402


def training_step() -> Callable[[], None]:
    config = GPT2Config(  # as `tformer train` builds it for this configuration in bf16
        vocab_size=84,
        max_len=64,
        d_model=128,
        n_layers=4,
        n_heads=4,
        dropout=0.0,
        activation="gelu",
        attention="blocked",
    )
    model = GPT2(config, seed=0).train()
    optimizer = build_optimizer(model, 1e-3, 0.1, (0.9, 0.99))
    x = torch.randint(0, 84, (12, 65), generator=torch.Generator().manual_seed(0))

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(x[:, :-1])
        cross_entropy(logits, x[:, 1:]).backward()
        optimizer.step(max_grad_norm=1.0)
        optimizer.zero_grad(set_to_none=True)

    return step


def ms_per_step(step: Callable[[], None], cpus: set[int], seconds: float) -> float:
    os.sched_setaffinity(0, cpus)
    torch.set_num_threads(len(cpus))
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
        n += 1
    return (time.perf_counter() - start) / n * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=120.0, help="how long to watch")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        parser.error(f"needs two CPUs, this process may use {len(cpus)}")
    first, second = cpus[:2]
    keep_freed_memory()
    flush_denormals(True)
    print(machine_line(), file=sys.stderr)
    step = training_step()
    for _ in range(20):
        step()
    turns = {"both": {first, second}, f"cpu{first}": {first}, f"cpu{second}": {second}}
    print("time      " + " ".join(f"{name:>8}" for name in turns) + "  speed-up", file=sys.stderr)
    rows, end = [], time.time() + args.seconds
    while time.time() < end:
        row = {name: round(ms_per_step(step, set(c), 0.4), 1) for name, c in turns.items()}
        row["speedup"] = round(min(row[f"cpu{first}"], row[f"cpu{second}"]) / row["both"], 2)
        row["time"] = time.strftime("%H:%M:%S")
        rows.append(row)
        print(
            f"{row['time']} "
            + " ".join(f"{row[name]:8.1f}" for name in turns)
            + f"  {row['speedup']:8.2f}",
            file=sys.stderr,
        )
    if args.json:
        print(json.dumps({"machine": machine_line(), "ms_per_step": rows}))


if __name__ == "__main__":
    main()
