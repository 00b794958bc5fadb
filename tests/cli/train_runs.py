"""What the training-command tests share: a small model's flags, running `tformer` in a
process of its own, a run's logged losses, and the killed-and-resumed check."""

import json
import os
import signal
import subprocess
import sys
import time

SMALL = [
    "--n-layers",
    "2",
    "--n-heads",
    "2",
    "--d-model",
    "32",
    "--context",
    "16",
    "--batch-size",
    "8",
    "--lr",
    "3e-3",
    "--min-lr",
    "3e-4",
    "--warmup-steps",
    "5",
    "--eval-every",
    "20",
    "--eval-batches",
    "2",
    "--dropout",
    "0.1",
    "--dtype",
    "float32",
    "--threads",
    "1",
    "--sample-tokens",
    "20",
    "--no-progress",
]


def tformer(*args, env, check=True):
    result = subprocess.run(
        [sys.executable, "-m", "tformer", *map(str, args)], capture_output=True, text=True, env=env
    )
    if check and result.returncode != 0:
        raise AssertionError(result.stderr)
    return result


def losses(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["type"], r["step"], r.get("loss"), r.get("val_loss")) for r in records]


def assert_killed_run_resumes_exactly(options, tmp_path, env, delay=0.0):
    """Train with `options` once whole, once killed (SIGKILL) right after its first
    checkpoint plus `delay` seconds and resumed: every logged loss must be the same."""
    whole = tmp_path / "whole"
    tformer("train", *options, "--out", whole, env=env)
    cut = tmp_path / "cut"
    cmd = [sys.executable, "-m", "tformer", "train", *map(str, options), "--out", str(cut)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (cut / "last").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    time.sleep(delay)  # right after a checkpoint, or somewhere in a later step or evaluation
    os.kill(proc.pid, signal.SIGKILL)  # no chance to clean up
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    killed_at = int((cut / "last").resolve().name.split("-")[1])
    assert killed_at < int(options[options.index("--steps") + 1])

    tformer("train", "--out", cut, "--resume", "--no-progress", env=env)
    assert losses(cut) == losses(whole)  # every step, before and after the crash
    assert (cut / "best").resolve() == cut / "checkpoints" / (whole / "best").resolve().name
    return whole, cut
