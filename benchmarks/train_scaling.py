"""Data-parallel scaling: `tformer train` in one process against 2 under torchrun (DDP, FSDP).

The character model of the throughput benchmark (6 layers, 384 wide, context 256, 16
sequences a step, bf16 autocast) on the built-in Shakespeare, as whole `tformer train`
processes: one process with 1 and with 2 threads, and 2 processes of 1 thread each under
`torchrun` with DDP and with FSDP (gloo). Reports training tokens/s (of the last step's
running average) and the scaling efficiency

    efficiency = tokens/s of N processes / (N x tokens/s of one process on one thread),

i.e. how much of N times one worker's speed N workers deliver. On one 2-core machine the
"devices" share memory bandwidth and caches, and gloo moves the gradients through the
loopback interface, so expect far from the 90%+ that DDP reaches across GPUs.

    python benchmarks/train_scaling.py [--steps 40] [--json]
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import machine_line  # noqa: E402

MODEL = ["--n-layers", "6", "--n-heads", "6", "--d-model", "384", "--context", "256"]


def train(out: Path, steps: int, processes: int, threads: int, parallel: str) -> dict:
    flags = [*MODEL, "--data", "shakespeare", "--batch-size", "16", "--steps", str(steps)]
    flags += ["--eval-every", "0", "--final-eval", "sample", "--eval-batches", "2"]
    flags += ["--dropout", "0", "--dtype", "bfloat16", "--threads", str(threads)]
    flags += ["--parallel", parallel, "--sample-tokens", "0", "--out", str(out), "--json"]
    if processes == 1:
        command = [sys.executable, "-m", "tformer", "train", *flags]
    else:
        launcher = [sys.executable, "-m", "torch.distributed.run"]
        command = [*launcher, f"--nproc_per_node={processes}", "-m", "tformer", "train", *flags]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {"tokens_per_second": result["tokens_per_second"], "seconds": result["seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    machine = machine_line()
    print(machine, file=sys.stderr)
    setups = [  # name, processes, threads per process, parallel
        ("1 process, 1 thread", 1, 1, "ddp"),
        ("1 process, 2 threads", 1, 2, "ddp"),
        ("2 processes, DDP", 2, 1, "ddp"),
        ("2 processes, FSDP", 2, 1, "fsdp"),
    ]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, processes, threads, parallel) in enumerate(setups):
            row = {"setup": name, "processes": processes, "threads": threads}
            row.update(train(Path(tmp) / str(i), args.steps, processes, threads, parallel))
            rows.append(row)
    one_worker = rows[0]["tokens_per_second"]
    for row in rows:
        workers = row["processes"] * row["threads"]
        row["efficiency"] = round(row["tokens_per_second"] / (workers * one_worker), 3)
        print(
            f"{row['setup']:>22}: {row['tokens_per_second']:8.1f} tok/s, efficiency "
            f"{row['efficiency']:.0%} ({row['seconds']:.1f} s in all)",
            file=sys.stderr,
        )
    if args.json:
        print(json.dumps({"machine": machine, "steps": args.steps, "rows": rows}))


if __name__ == "__main__":
    main()
