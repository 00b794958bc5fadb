"""Choosing between computations that give the same numbers, by timing them on the CPU in use.

Some fast paths win on one CPU and lose on another: torch's fused attention against the
blocked path, the output head's product whole or in slices of the vocabulary (the
measurements are in docs/LOG.md). A constant tuned on one machine would be wrong on the
other, so each such choice is timed where it runs: once per kind and key (a shape and
dtype), the candidates taking turns, the fastest kept in memory for the process and in the
cache directory (choices_file) for later runs on the same CPU, torch version and thread
count. A kind names its version (e.g. "head-v1"): a change to its candidates bumps it, so
that choices timed on the old ones are not read back.

The timing runs forward and backward passes of its own, inside whatever the caller is
doing (a training step's forward pass): saved-tensor hooks (activation checkpointing,
offloading) are kept away from them. Under torch.compile nothing is timed: the first
candidate, the plain path, is taken.
"""

import contextlib
import time
from collections.abc import Callable
from pathlib import Path

import torch

from tformer.devices import cpu_model
from tformer.files import atomic_write_json, cache_dir, read_cached_json

TURNS = 5  # timed turns of each candidate after one warm-up; the fastest of each counts
_chosen: dict[tuple[str, str, int], str] = {}  # this process's choices: (kind, key, threads)


def choices_file(kind: str) -> Path:
    """Where the choices of one kind are kept: a file per CPU, torch version and threads."""
    cpu = "".join(c if c.isalnum() else "-" for c in cpu_model())
    name = f"{kind}.{cpu}.torch-{torch.__version__}.{torch.get_num_threads()}-threads.json"
    return cache_dir() / "kernels" / name


def read_choices(path: Path, names: tuple[str, ...]) -> dict[str, str]:
    """The choices kept in `path` that name one of `names`; {} where there are none or the
    file is not what this writes (they are then measured and written again)."""
    return {key: name for key, name in read_cached_json(path).items() if name in names}


def fastest(
    kind: str,
    key: str,
    names: tuple[str, ...],
    candidates: Callable[[], dict[str, Callable]],
    turns: int = TURNS,
) -> str:
    """Which of `names` runs fastest for `key`. `candidates()` gives, by name, a call that
    does the work once; it is made only when the key is timed: the first time a (kind,
    key) is asked for on this CPU, unless the cache already holds the answer, each name
    taking `turns` timed turns (more where the candidates are close). Under torch.compile,
    or with one name, the first name. The file keeps every key's choice, whatever names
    other keys of the kind are chosen from."""
    if torch.compiler.is_compiling() or len(names) == 1:
        return names[0]
    memo = (kind, key, torch.get_num_threads())
    if memo in _chosen:
        return _chosen[memo]
    store = choices_file(kind)
    known = read_cached_json(store)
    if known.get(key) not in names:
        known[key] = _time(candidates(), turns)
        with contextlib.suppress(OSError):  # a read-only cache: measured again next time
            atomic_write_json(store, known)
    _chosen[memo] = known[key]
    return known[key]


def _time(candidates: dict[str, Callable[[], object]], turns: int) -> str:
    # identity hooks: a checkpointed forward pass around this must not see these tensors
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        for run in candidates.values():
            run()  # warm: torch's first-call work
        best = dict.fromkeys(candidates, float("inf"))
        for _ in range(turns):
            for name, run in candidates.items():
                start = time.perf_counter()
                run()
                best[name] = min(best[name], time.perf_counter() - start)
    return min(best, key=best.get)


def training_runs(
    make_inputs: Callable[[], list[torch.Tensor | None]], paths: dict[str, Callable]
) -> dict[str, Callable[[], None]]:
    """Candidates for `fastest` that each run one path forward and backward, by name.
    `make_inputs()` gives the paths' inputs and, last, the output's gradient (None: ones);
    it is called once, on the first run."""
    made: list[torch.Tensor | None] = []

    def run(path: Callable) -> Callable[[], None]:
        def step() -> None:
            if not made:
                made.extend(make_inputs())
            *inputs, grad = made
            with torch.enable_grad():
                out = path(*(x.detach().requires_grad_() for x in inputs))
                out.backward(torch.ones_like(out) if grad is None else grad)

        return step

    return {name: run(path) for name, path in paths.items()}


def dtype_name(dtype: torch.dtype | None) -> str:
    """ "float32" for torch.float32, as the keys spell dtypes."""
    return str(dtype).removeprefix("torch.")
