"""Forward-pass throughput of GPT-2 124M: tformer against transformers, same weights, one run.

Builds the `gpt2` architecture with random weights, saves it once with tformer, loads it in
both libraries, and times full forward passes (the work of scoring text, or of prefilling a
prompt before generation) in float32 and bfloat16. Prints tokens per second and the ratio.

    python benchmarks/forward.py [--json] [--repeats 5]
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine_line  # noqa: E402

from tformer import GPT2, GPT2Config  # noqa: E402

SHAPES = [(1, 512), (8, 128)]  # (batch, time)


def tokens_per_second(forward, ids: torch.Tensor, repeats: int) -> float:
    with torch.inference_mode():
        forward(ids)  # warm-up: first-call allocations and kernel selection
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            forward(ids)
            times.append(time.perf_counter() - start)
    return ids.numel() / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    import transformers

    transformers.utils.logging.disable_progress_bar()
    print(machine_line(), file=sys.stderr)
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        GPT2(GPT2Config.from_preset("gpt2", dropout=0.0), seed=0).save_pretrained(directory)
        for dtype in (torch.float32, torch.bfloat16):
            ours = GPT2.from_pretrained(directory, dtype=dtype).eval()
            theirs = transformers.GPT2LMHeadModel.from_pretrained(directory, dtype=dtype).eval()
            for batch, time_steps in SHAPES:
                ids = torch.randint(0, 50257, (batch, time_steps))
                a = tokens_per_second(ours, ids, args.repeats)
                b = tokens_per_second(lambda x, m=theirs: m(x).logits, ids, args.repeats)
                rows.append(
                    dict(
                        dtype=str(dtype).removeprefix("torch."),
                        batch=batch,
                        time=time_steps,
                        tformer=round(a),
                        transformers=round(b),
                        ratio=round(a / b, 2),
                    )
                )
                r = rows[-1]
                print(
                    f"{r['dtype']:>9} B={batch} T={time_steps:<4} tformer {a:8.0f} tok/s   "
                    f"transformers {b:8.0f} tok/s   ratio {a / b:.2f}x",
                    file=sys.stderr,
                )
            del ours, theirs
    if args.json:
        print(json.dumps({"machine": machine_line(), "results": rows}, indent=2))


if __name__ == "__main__":
    main()
