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

After each turn it also times a cache line's round trip between the two CPUs (round_trip.c,
compiled here with the system's `cc`; the column is left out without one). On Zen 4 this
was 55 ns in the host's fast phase and 320-340 ns in its slow one, when the two CPUs no
longer share a cache and every kernel that reads what the other CPU wrote pays for it
(docs/LOG.md, session 40).

    python benchmarks/host_speed.py [--seconds 120] [--json]
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
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


def round_trip_timer(directory: str) -> Path | None:
    """round_trip.c compiled into `directory`, or None where there is no C compiler or it
    fails (said on stderr)."""
    compiler = shutil.which("cc")
    if compiler is None:
        print("no C compiler (cc): the round trip is not timed", file=sys.stderr)
        return None
    binary = Path(directory) / "round_trip"
    source = Path(__file__).with_name("round_trip.c")
    built = subprocess.run(
        [compiler, "-O2", "-pthread", "-o", str(binary), str(source)],
        capture_output=True,
        text=True,
    )
    if built.returncode != 0:
        print(f"round_trip.c did not compile: {built.stderr.strip()}", file=sys.stderr)
        return None
    return binary


def round_trip_ns(binary: Path, first: int, second: int, trips: int = 200_000) -> float:
    """Nanoseconds a cache line takes from CPU `first` to `second` and back (round_trip.c)."""
    done = subprocess.run(
        [str(binary), str(first), str(second), str(trips)], capture_output=True, text=True
    )
    if done.returncode != 0:
        raise SystemExit(f"host_speed: {done.stderr.strip()}")
    return float(done.stdout)


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
    machine = machine_line()  # before the turns set the thread count to one and back
    print(machine, file=sys.stderr)
    step = training_step()
    for _ in range(20):
        step()
    turns = {"both": {first, second}, f"cpu{first}": {first}, f"cpu{second}": {second}}
    with tempfile.TemporaryDirectory() as directory:
        timer = round_trip_timer(directory)
        trip = "  round trip" if timer is not None else ""
        header = "time      " + " ".join(f"{name:>8}" for name in turns) + "  speed-up" + trip
        print(header, file=sys.stderr)
        rows, end = [], time.time() + args.seconds
        while time.time() < end:
            row = {name: round(ms_per_step(step, set(c), 0.4), 1) for name, c in turns.items()}
            row["speedup"] = round(min(row[f"cpu{first}"], row[f"cpu{second}"]) / row["both"], 2)
            row["time"] = time.strftime("%H:%M:%S")
            if timer is not None:
                row["round_trip_ns"] = round(round_trip_ns(timer, first, second), 1)
            rows.append(row)
            print(
                f"{row['time']} "
                + " ".join(f"{row[name]:8.1f}" for name in turns)
                + f"  {row['speedup']:8.2f}"
                + (f"  {row['round_trip_ns']:7.1f} ns" if timer is not None else ""),
                file=sys.stderr,
            )
    if args.json:
        print(json.dumps({"machine": machine, "ms_per_step": rows}))


if __name__ == "__main__":
    main()
