"""Training speed and quality on the built-in Shakespeare, nanoGPT's CPU configuration.

The configuration (nanoGPT's published CPU run for Shakespeare, character level): 4 layers,
4 heads, d_model 128, context 64, batch 12, 2000 steps, lr 1e-3 with 100 warm-up steps and
cosine decay to 1e-4, dropout 0, weight decay 0.1, beta2 0.99, clipping 1.0, evaluation
every 250 steps on 20 batches.

1. `tformer train` with that configuration, timed as a whole process (start-up, data,
   training, evaluations, checkpoints, the loss plot; no sample, as nanoGPT's train.py draws
   none), in bfloat16 and float32; then the final model scored on the whole validation split
   (`tformer eval`, not timed).
2. The issue's peer, nanoGPT's train.py, timed as a whole process in the same run: nanoGPT is
   not on the package index, so `nanogpt_style.py` (next to this file) stands in for it,
   doing the same work with transformers' GPT-2 (float32, torch's AdamW, evaluation of both
   splits, checkpoints); its import of transformers, which nanoGPT does not have, is taken
   off its time. The issue's target, 35 s where nanoGPT takes 55 s, is the ratio
   35 / 55 = 0.636 of the peer's time; on the AMD machine the guide's 63 s against 100 s is
   the same ratio. With --pairs N the bf16 run and the peer take turns N times, each going
   first in every other pair, because this VM's speed changes for seconds to minutes at a
   time (docs/LOG.md): a ratio is read within a pair. tformer's run evaluates less than
   nanoGPT's (the validation split at steps 250-2000; nanoGPT both splits, from step 0):
   ~1.9 s more at ~0.2 s per 20 batches.
3. Tokens per second against transformers' GPT2LMHeadModel of the same shape, trained with
   the same optimizer and schedule on the same windows for the same 2000 steps in a minimal
   loop (no evaluation, no checkpoints), in each dtype. That loop's process keeps freed
   memory for reuse and flushes denormals on every thread, as tformer's trainer does
   (keep_freed_memory, flush_denormals).

    python benchmarks/train_shakespeare.py [--json] [--pairs 1] [--peer-steps 2000]
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine_line  # noqa: E402
from nanogpt_style import gpt2_model  # noqa: E402

from tformer import CharTokenizer  # noqa: E402
from tformer.data.sources import load_corpus  # noqa: E402
from tformer.data.tokens import LMBatches, tokenize_cached  # noqa: E402
from tformer.devices import flush_denormals, keep_freed_memory  # noqa: E402
from tformer.train.optim import build_optimizer, learning_rate  # noqa: E402

# The target as a fraction of nanoGPT's time: 35 s against 55 s (Intel machine).
TARGET_RATIO = 35 / 55

NANOGPT_CPU = [
    "--data",
    "shakespeare",
    "--tokenizer",
    "char",
    "--n-layers",
    "4",
    "--n-heads",
    "4",
    "--d-model",
    "128",
    "--context",
    "64",
    "--batch-size",
    "12",
    "--steps",
    "2000",
    "--lr",
    "1e-3",
    "--min-lr",
    "1e-4",
    "--warmup-steps",
    "100",
    "--dropout",
    "0",
    "--weight-decay",
    "0.1",
    "--beta2",
    "0.99",
    "--grad-clip",
    "1.0",
    "--eval-every",
    "250",
    "--eval-batches",
    "20",
    "--final-eval",
    "sample",
    "--activation",
    "gelu",
    "--sample-tokens",
    "0",
]


def tformer(*args: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "tformer", *args], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def timed_training(dtype: str, run_dir: Path) -> dict:
    start = time.perf_counter()
    result = tformer(
        "train", *NANOGPT_CPU, "--dtype", dtype, "--out", str(run_dir), "--no-progress", "--json"
    )
    wall = time.perf_counter() - start
    full = tformer("eval", str(run_dir), "--data", "shakespeare", "--json")
    return {
        "dtype": dtype,
        "wall_seconds": round(wall, 1),
        "tokens_per_second": result["tokens_per_second"],
        "val_loss_full": full["loss"],
        "val_loss_20_batches": result["val_loss"],
    }


def peer_tokens_per_second(dtype: str, steps: int) -> float:
    """transformers' GPT-2 of the same shape in a plain training loop."""
    corpus = load_corpus("shakespeare")
    tok = CharTokenizer.from_text(corpus.train + corpus.val)
    data = LMBatches(tokenize_cached(corpus.train, tok), 64)
    torch.manual_seed(1337)
    model = gpt2_model(tok.vocab_size).train()
    optimizer = build_optimizer(model, 1e-3, 0.1, (0.9, 0.99))
    generator = torch.Generator().manual_seed(1337)

    def step(i: int) -> None:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(i, 1e-3, 1e-4, 100, steps)
        batch = data.sample(12, generator)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            logits = model(batch.inputs[0]).logits
        loss = torch.nn.functional.cross_entropy(
            logits.float().flatten(0, 1), batch.targets.flatten()
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    start = time.perf_counter()
    for i in range(steps):
        step(i)
    return steps * 12 * 64 / (time.perf_counter() - start)


def nanogpt_style_data(data_dir: Path) -> Path:
    """train.bin, val.bin and meta.json for nanogpt_style.py: the built-in corpus's split,
    character ids as uint16, as nanoGPT's prepare.py writes them (done before timing)."""
    corpus = load_corpus("shakespeare")
    tok = CharTokenizer.from_text(corpus.train + corpus.val)
    data_dir.mkdir(parents=True, exist_ok=True)
    for split, text in (("train", corpus.train), ("val", corpus.val)):
        np.asarray(tokenize_cached(text, tok), dtype=np.uint16).tofile(data_dir / f"{split}.bin")
    (data_dir / "meta.json").write_text(json.dumps({"vocab_size": tok.vocab_size}))
    return data_dir


def timed_nanogpt_style(data_dir: Path, out_dir: Path) -> dict:
    """The stand-in's whole process, less its import of transformers (nanoGPT has none)."""
    script = Path(__file__).with_name("nanogpt_style.py")
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, str(script), str(data_dir), str(out_dir)],
        capture_output=True,
        text=True,
        check=True,
    )
    wall = time.perf_counter() - start
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return {
        "wall_seconds": round(wall - result["transformers_import_seconds"], 1),
        "transformers_import_seconds": result["transformers_import_seconds"],
        "val_loss_20_batches": round(result["val_loss"], 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--pairs", type=int, default=1, help="bf16 runs and nanoGPT-style runs, taking turns"
    )
    parser.add_argument("--peer-steps", type=int, default=2000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    print(machine_line(), file=sys.stderr)
    keep_freed_memory()  # for the peer's loop in this process, as `tformer train` does
    flush_denormals(True)
    rows, pairs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = nanogpt_style_data(Path(tmp) / "nanogpt_data")
        for i in range(args.pairs):  # taking turns at going first
            if i % 2 == 1:
                peer = timed_nanogpt_style(data_dir, Path(tmp) / f"nanogpt_{i}")
            ours = timed_training("bfloat16", Path(tmp) / f"bfloat16_{i}")
            if i % 2 == 0:
                peer = timed_nanogpt_style(data_dir, Path(tmp) / f"nanogpt_{i}")
            ratio = ours["wall_seconds"] / peer["wall_seconds"]
            pairs.append({"tformer": ours, "nanogpt_style": peer, "ratio": round(ratio, 3)})
            print(
                f"pair {i + 1}: tformer train bf16 {ours['wall_seconds']:5.1f} s | "
                f"nanoGPT-style float32 {peer['wall_seconds']:5.1f} s | ratio {ratio:.3f} "
                f"(target <= {TARGET_RATIO:.3f}) | val loss {ours['val_loss_full']:.4f} "
                f"(whole split)",
                file=sys.stderr,
            )
        for dtype in ("bfloat16", "float32"):
            if dtype == "bfloat16" and pairs:
                row = dict(pairs[0]["tformer"])
            else:
                row = timed_training(dtype, Path(tmp) / dtype)
            row["peer_tokens_per_second"] = round(peer_tokens_per_second(dtype, args.peer_steps))
            row["ratio"] = round(row["tokens_per_second"] / row["peer_tokens_per_second"], 2)
            rows.append(row)
            print(
                f"{dtype:>9}: tformer train {row['wall_seconds']:5.1f} s whole process, "
                f"{row['tokens_per_second']:8.0f} tok/s | transformers loop "
                f"{row['peer_tokens_per_second']:8.0f} tok/s | ratio {row['ratio']:.2f}x | "
                f"val loss {row['val_loss_full']:.4f} (whole split), "
                f"{row['val_loss_20_batches']:.4f} (20 batches)",
                file=sys.stderr,
            )
    ratios = sorted(pair["ratio"] for pair in pairs)
    if ratios:
        met = sum(r <= TARGET_RATIO for r in ratios)
        print(
            f"against nanoGPT-style: time ratios {', '.join(f'{r:.3f}' for r in ratios)}; "
            f"{met} of {len(ratios)} within the target {TARGET_RATIO:.3f}",
            file=sys.stderr,
        )
    if args.json:
        summary = {"target_ratio": round(TARGET_RATIO, 3), "pairs": pairs}
        print(json.dumps({"machine": machine_line(), "results": rows, "nanogpt_style": summary}))


if __name__ == "__main__":
    main()
