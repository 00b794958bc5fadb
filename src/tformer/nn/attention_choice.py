"""Which path runs a training step's long causal attention on this CPU, chosen by measurement.

Causal self-attention over more than QUERY_BLOCK positions, with no padding and no attention
dropout, has two paths that compute the same softmax(Q K^T / sqrt(d_k) + M) V with its
gradients: the blocked path (nn/blocked_attention.py, torch's matmuls a block of queries at
a time) and torch's fused kernel (scaled_dot_product_attention, which never forms the
weights). Which one is faster depends on the CPU: where bf16 matmuls run on matrix units
(AMX) the fused kernel's fewer passes over memory can win, where they do not the blocked
path's larger products win (docs/LOG.md, session 21). So each shape (B, H, T, D) and dtype
is timed once on the CPU in use, forward and backward of both paths taking turns, and the
faster one is kept: in memory for the process, and in the cache directory
(choice_file) for later runs on the same CPU, torch version and thread count.
"""

import contextlib
import json
import time
from pathlib import Path

import torch

from tformer.devices import cpu_model
from tformer.files import atomic_write_json, cache_dir

PATHS = ("blocked", "fused")
TURNS = 3  # timed turns of each path; the fastest of each counts
_chosen: dict[str, str] = {}  # this process's choices, by choice_key


def choice_key(q: torch.Tensor) -> str:
    """The entry for a shape: "BxHxTxD dtype"."""
    return f"{'x'.join(map(str, q.shape))} {str(q.dtype).removeprefix('torch.')}"


def choice_file() -> Path:
    """Where the choices are kept: one file per CPU, torch version and thread count."""
    cpu = "".join(c if c.isalnum() else "-" for c in cpu_model())
    name = f"attention.{cpu}.torch-{torch.__version__}.{torch.get_num_threads()}-threads.json"
    return cache_dir() / "kernels" / name


def read_choices(path: Path) -> dict[str, str]:
    """The choices kept in `path`, {} where there are none or the file is not what this
    writes (they are then measured and written again)."""
    try:
        known = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(known, dict):
        return {}
    return {key: path for key, path in known.items() if path in PATHS}


def long_attention_path(q: torch.Tensor, blocked, fused) -> str:
    """ "blocked" or "fused": the faster of the two for q's shape and dtype on this CPU.

    `blocked` and `fused` are the two paths, each (q, k, v) -> out; they are timed on random
    tensors of q's shape (forward and backward) the first time a shape is seen, unless the
    cache already holds the answer. Not on a CPU: "fused"."""
    if q.device.type != "cpu":
        return "fused"
    key = choice_key(q)
    if key in _chosen:
        return _chosen[key]
    store = choice_file()
    known = read_choices(store)
    if key not in known:
        known[key] = _faster(q, {"blocked": blocked, "fused": fused})
        with contextlib.suppress(OSError):  # a read-only cache: measured again next time
            atomic_write_json(store, known)
    _chosen[key] = known[key]
    return known[key]


def _faster(q: torch.Tensor, paths: dict) -> str:
    """The name of the path whose forward and backward take least time on q's shape."""
    g = torch.Generator().manual_seed(0)
    b, h, t, d = q.shape
    # q, k, v and the output's gradient, each (B, H, T, D) laid out as the heads of a
    # projection (B, T, H, D) are, as a model's are
    inputs = [torch.randn(b, t, h, d, generator=g).to(q.dtype).transpose(1, 2) for _ in range(4)]

    def run(path) -> float:
        q, k, v = (x.detach().requires_grad_() for x in inputs[:3])
        start = time.perf_counter()
        with torch.enable_grad():
            path(q, k, v).backward(inputs[3])
        return time.perf_counter() - start

    for path in paths.values():
        run(path)  # warm: torch's first-call work
    best = dict.fromkeys(paths, float("inf"))
    for _ in range(TURNS):
        for name, path in paths.items():
            best[name] = min(best[name], run(path))
    return min(best, key=best.get)
