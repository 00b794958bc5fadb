"""The linear layers of one decoding step of GPT-2 124M: tformer's C kernels against torch.

Decoding a token multiplies a few activation rows by all 49 weight matrices of GPT-2 124M
(4 per block, 12 blocks, and the 50257 x 768 head). This times that, for 1 to 64 rows and
float32, bfloat16, int8 and int4 weights (w8a8 and w4a8 on request), three ways in the same
run, taking turns: tformer's PackedLinear through its C kernels (`by_kernels`); through
torch's matmul on (N, K) weights made once beforehand (`F.linear` in the compute dtype;
int8 as `(x q^T) s`, for lack of a faster torch kernel for many rows; int4 and w4a8
dequantised, w4a8 in float32), the peer; and PackedLinear's own torch path, which unpacks
the kernels' panels at each call (`by_torch`), what a row count past the kernels' limit
costs. It prints milliseconds per step (the fastest of --repeats), the effective weight
bandwidth and arithmetic rate, and the ratio to the peer. The matrices total 124M weights,
more than any cache, so every step reads them from memory, as in decoding.

The default row limits up to which PackedLinear uses the C kernels (KERNEL_MAX_ROWS, marked
"default") come from this; a server measures its own (calibrate_kernel_rows).

    python benchmarks/decode_linear.py [--rows 1 2 4 8 16] [--weights float32 bfloat16] [--json]
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine_line  # noqa: E402

from tformer import kernels  # noqa: E402
from tformer.nn import packed_linear  # noqa: E402
from tformer.nn.packed_linear import PackedLinear  # noqa: E402

SHAPES = [(3 * 768, 768), (768, 768), (4 * 768, 768), (768, 4 * 768)] * 12 + [(50257, 768)]
# bytes a weight, scales included: int4 and w4a8 as q4_0 (18 bytes for 32)
BYTES = {"float32": 4, "bfloat16": 2, "int8": 1, "int4": 18 / 32, "w8a8": 1, "w4a8": 18 / 32}


def step_seconds(
    layers: list[PackedLinear], path: str, rows: int, repeats: int, weights: list[torch.Tensor]
) -> float:
    """Seconds for one pass over every layer (the fastest of `repeats` passes): by the C
    kernels, by torch's matmul on `weights` (each layer's torch_weight), or by PackedLinear's
    torch path."""
    inputs = {k: torch.randn(rows, k) for k in (768, 4 * 768)}
    if path == "matmul" and layers[0].weight_dtype == "w4a8":  # its own torch path unpacks
        runs = [
            (lambda x, w=w, b=layer.bias: torch.nn.functional.linear(x, w, b), inputs[w.shape[1]])
            for layer, w in zip(layers, weights, strict=True)
        ]
    elif path == "matmul":
        runs = [
            (lambda x, layer=layer, w=w: layer.by_torch(x, w), inputs[layer.in_features])
            for layer, w in zip(layers, weights, strict=True)
        ]
    else:
        runs = [(getattr(layer, f"by_{path}"), inputs[layer.in_features]) for layer in layers]
    best = float("inf")
    with torch.inference_mode():
        for run, x in runs:  # warm-up
            run(x)
        for _ in range(repeats):
            start = time.perf_counter()
            for run, x in runs:
                run(x)
            best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument(
        "--weights",
        nargs="+",
        choices=packed_linear.WEIGHT_DTYPES,
        default=["float32", "bfloat16", "int8", "int4"],
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    print(machine_line(), file=sys.stderr)
    if kernels.load() is None:
        sys.exit(f"the C kernels are unavailable: {kernels.unavailable_reason()}")
    weights = sum(n * k for n, k in SHAPES)
    generator = torch.Generator().manual_seed(0)
    limits = packed_linear.KERNEL_MAX_ROWS
    results = []
    for dtype in args.weights:
        layers = [
            PackedLinear(torch.randn(n, k, generator=generator) * 0.02, torch.zeros(n), dtype)
            for n, k in SHAPES
        ]
        unpacked = [layer.torch_weight() for layer in layers]
        for rows in args.rows:
            times = {}
            for path in ("kernels", "matmul", "torch"):  # back to back for each row count
                times[path] = step_seconds(layers, path, rows, args.repeats, unpacked)
            row = {
                "weights": dtype,
                "rows": rows,
                "kernels_ms": round(times["kernels"] * 1e3, 2),
                "torch_ms": round(times["matmul"] * 1e3, 2),
                "torch_path_ms": round(times["torch"] * 1e3, 2),
                "kernels_gb_per_s": round(weights * BYTES[dtype] / times["kernels"] / 1e9, 1),
                "kernels_gflop_per_s": round(2 * rows * weights / times["kernels"] / 1e9, 1),
                "ratio": round(times["matmul"] / times["kernels"], 2),
                "uses_kernels": rows <= limits[dtype],
            }
            results.append(row)
            print(
                f"{dtype:>8} x {rows:3d} rows: C kernels {row['kernels_ms']:7.2f} ms "
                f"({row['kernels_gb_per_s']:5.1f} GB/s, {row['kernels_gflop_per_s']:5.1f} GFLOP/s)"
                f" | torch {row['torch_ms']:7.2f} ms ({row['ratio']:.2f}x)"
                f" | unpacking {row['torch_path_ms']:7.2f} ms"
                f"{'  <- default' if row['uses_kernels'] else ''}",
                file=sys.stderr,
            )
        del layers, unpacked
    if args.json:
        print(json.dumps({"machine": machine_line(), "results": results}))


if __name__ == "__main__":
    main()
