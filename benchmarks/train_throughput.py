"""Training throughput and model FLOPs utilisation (MFU): tformer against transformers.

For GPT-2 124M (context 1024, batch 1) and the small character model (6 layers, 384 wide,
6 heads, context 256, vocabulary 65, batch 16), in float32 and with bf16 autocast: training
tokens per second of one full step (forward, loss, backward, gradient clipping, fused
AdamW), for tformer's GPT2 and transformers' GPT2LMHeadModel of the same configuration
(no dropout). tformer runs the way `tformer train` does (the blocked attention path on a
CPU, its own loss, the clipping inside AdamW's pass); transformers the way its users do
(`labels=`, its own loss, clip_grad_norm_ before the same AdamW). Both run under the C
allocator `tformer train` starts under (jemalloc where it is installed:
tformer/cli/launch.py), with huge pages for a large model as `tformer train` gives its own
(tformer/devices.py's allow_huge_pages).

Each model trains in a process of its own, as a user's run does, and the two take turns
(--rounds times, each going first in every other round), because the host's speed drifts
by 10-20% over minutes: a row gives each side's best round. With --in-process both models
live in one process and take turns step by step, which is quicker but costs both: the
other model's memory and caches between one's steps (docs/LOG.md, session 27: tformer's
GPT-2 bf16 5-7% slower than alone, transformers 2-5%).

MFU = tokens/s x FLOPs per token / peak FLOP/s, with FLOPs per token = 6 N + 12 L T C
(N the parameters that multiply, i.e. all but the position embeddings, the head counted
once; Chowdhery et al., 2022, appendix B), and the peak measured by a large matmul of the
row's dtype (torch's and oneDNN's, the faster) just before and just after each run's
steps, the largest of a row's (the larger peak gives the smaller, stricter MFU).

Each model first takes --warmup untimed steps: the first steps fault in the memory that
every later step reuses (the gradients, AdamW's moments, the step's activations), which
under huge pages costs seconds a step on some machines (GPT-2 float32 here: 12.4, 5.3, 4.0,
then 3.0 s), and the figure wanted is the steady step's (nanoGPT's train.py likewise counts
its MFU from the sixth iteration). With the two models taking turns in one process, the
fourth step was still slow in bf16 (GPT-2: tformer 1,060 and 1,249 ms against 870-1,000
after it, transformers 1,950 and 2,065 against 1,470-1,580, in two runs): five are untimed.

    python benchmarks/train_throughput.py [--steps 4] [--warmup 5] [--rounds 2]
        [--in-process] [--only gpt2|char] [--json]
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from tformer.cli.launch import allocator_in_use, start_under_allocator

if __name__ == "__main__":
    # Both models run under the C allocator `tformer train` runs under (jemalloc where it
    # is installed; TFORMER_ALLOCATOR=system for the C library's), chosen before torch loads.
    start_under_allocator(["train"], own_command=True)

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from common import machine_line  # noqa: E402

from tformer import GPT2, GPT2Config  # noqa: E402
from tformer.devices import allow_huge_pages, bf16_supported, keep_freed_memory  # noqa: E402
from tformer.nn import weight_copies  # noqa: E402
from tformer.recipes.start import attention_for  # noqa: E402
from tformer.train.optim import build_optimizer  # noqa: E402
from tformer.train.trainer import cross_entropy  # noqa: E402

# name -> (n_layers, n_heads, d_model, context, vocab_size, batch)
MODELS = {
    "gpt2": (12, 12, 768, 1024, 50257, 1),
    "char": (6, 6, 384, 256, 65, 16),
}


def peak_flops(dtype: torch.dtype, n: int = 4096, repeats: int = 5) -> float:
    """FLOP/s of an n x n x n matmul: this machine's practical peak for the dtype, the
    faster of torch's matmul and oneDNN's (in float32 torch multiplies in MKL, which on
    AMD's Zen 5 runs at half oneDNN's speed: docs/LOG.md, session 41)."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    products = [lambda: a @ b]
    if torch.backends.mkldnn.is_available():
        products.append(lambda: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], ""))
    best = float("inf")
    for product in products:
        product()  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            product()
            best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def flops_per_token(n_layers: int, d_model: int, context: int, vocab: int) -> float:
    """6 N + 12 L T C, N = 12 L C^2 (attention and MLP matrices) + V C (the head)."""
    n = 12 * n_layers * d_model**2 + vocab * d_model
    return 6 * n + 12 * n_layers * context * d_model


def build(name: str, who: str) -> torch.nn.Module:
    """`who`'s model ("tformer" or "transformers") of MODELS[name]'s shape."""
    n_layers, n_heads, d_model, context, vocab, _ = MODELS[name]
    if who == "tformer":
        config = GPT2Config(
            vocab_size=vocab,
            max_len=context,
            d_model=d_model,
            n_layers=n_layers,
            n_heads=n_heads,
            dropout=0.0,
            attention=attention_for("auto", torch.device("cpu")),  # as `tformer train`
        )
        model = GPT2(config, seed=0)
    else:
        import transformers

        model = transformers.GPT2LMHeadModel(
            transformers.GPT2Config(
                vocab_size=vocab,
                n_positions=context,
                n_embd=d_model,
                n_layer=n_layers,
                n_head=n_heads,
                resid_pdrop=0.0,
                embd_pdrop=0.0,
                attn_pdrop=0.0,
                bos_token_id=vocab - 1,  # GPT-2's 50256 is outside a character vocabulary
                eos_token_id=vocab - 1,
            )
        )
    # Huge pages for either side's large model, as tformer's trainer gives its own (the
    # process starts with them withheld, as `tformer train` does: tformer/devices.py).
    allow_huge_pages(model)
    return model


class Trainer:
    """One model's training step on fixed random tokens."""

    def __init__(
        self, model, loss_fn, dtype: str, batch: int, context: int, vocab: int, *, fused_clip: bool
    ):
        self.model, self.loss_fn, self.dtype = model.train(), loss_fn, dtype
        self.fused_clip = fused_clip  # clipped inside AdamW's pass, as `tformer train` does
        self.optimizer = build_optimizer(model, 1e-4, 0.1, (0.9, 0.95))
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (batch, context + 1), generator=g)
        self.seconds, self.tokens = 0.0, 0

    def step(self, timed: bool) -> None:
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.dtype == "bfloat16"):
            loss = self.loss_fn(self.model, self.ids)
        loss.backward()
        if self.fused_clip:
            self.optimizer.step(max_grad_norm=1.0)
        else:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if timed:
            self.seconds += time.perf_counter() - start
            self.tokens += self.ids.shape[0] * (self.ids.shape[1] - 1)


def tformer_loss(model, ids):
    logits = model(ids[:, :-1])
    with torch.autocast("cpu", enabled=False):
        return cross_entropy(logits, ids[:, 1:])


def transformers_loss(model, ids):
    return model(input_ids=ids[:, :-1], labels=ids[:, :-1]).loss


WHO = ("tformer", "transformers")


def trainer(name: str, dtype: str, who: str) -> Trainer:
    _, _, _, context, vocab, batch = MODELS[name]
    loss_fn = tformer_loss if who == "tformer" else transformers_loss
    # tformer's clipping inside AdamW's pass, as `tformer train` does
    return Trainer(
        build(name, who), loss_fn, dtype, batch, context, vocab, fused_clip=who == WHO[0]
    )


def in_process(name: str, dtype: str, steps: int, warmup: int) -> tuple[dict, list[float]]:
    """Both models in this process, taking turns step by step: each one's tokens/s, and the
    peaks measured before and after."""
    runs = {who: trainer(name, dtype, who) for who in WHO}
    peaks = [peak_flops(getattr(torch, dtype))]
    for _ in range(warmup):
        for run in runs.values():
            run.step(timed=False)
    for _ in range(steps):
        for run in runs.values():  # alternate, step by step
            run.step(timed=True)
    peaks.append(peak_flops(getattr(torch, dtype)))
    return {who: [run.tokens / run.seconds] for who, run in runs.items()}, peaks


def alone(name: str, dtype: str, who: str, steps: int, warmup: int) -> dict:
    """`who`'s model alone in this process (--child): its tokens/s, and the peaks measured
    before and after its steps."""
    run = trainer(name, dtype, who)
    peaks = [peak_flops(getattr(torch, dtype))]
    for _ in range(warmup):
        run.step(timed=False)
    for _ in range(steps):
        run.step(timed=True)
    peaks.append(peak_flops(getattr(torch, dtype)))
    return {"tokens_per_second": run.tokens / run.seconds, "peaks": peaks}


def in_turns(
    name: str, dtype: str, steps: int, warmup: int, rounds: int
) -> tuple[dict, list[float]]:
    """Each model in a process of its own, the two taking turns `rounds` times, each going
    first in every other round: each one's tokens/s per round, and every peak measured."""
    figures, peaks = {who: [] for who in WHO}, []
    for r in range(rounds):
        for who in WHO if r % 2 == 0 else WHO[::-1]:
            command = [sys.executable, __file__, "--child", f"{name},{dtype},{who}"]
            command += ["--steps", str(steps), "--warmup", str(warmup)]
            out = subprocess.run(command, capture_output=True, text=True)
            lines = out.stdout.strip().splitlines()
            if out.returncode != 0 or not lines:
                sys.exit(f"{who}'s {name} {dtype} run failed:\n{out.stderr[-2000:]}")
            result = json.loads(lines[-1])
            figures[who].append(result["tokens_per_second"])
            peaks += result["peaks"]
    return figures, peaks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--steps", type=int, default=4, help="timed steps per model, dtype and round"
    )
    parser.add_argument(
        "--warmup", type=int, default=5, help="untimed steps per model before the timed ones"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="turns of the two models' processes per row (not with --in-process)",
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="both models in this process, taking turns step by step (quicker, slower steps)",
    )
    parser.add_argument("--only", choices=list(MODELS))
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # MODEL,DTYPE,WHO: one run, alone
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 0 or args.rounds < 1:
        parser.error("--steps and --rounds must be at least 1 and --warmup at least 0")
    keep_freed_memory()  # for both models, as tformer's trainer does
    if args.child:
        name, dtype, who = args.child.split(",")
        # each weight's bf16 copy kept from step to step, as tformer's trainer keeps it
        with weight_copies.kept_between_steps():
            print(json.dumps(alone(name, dtype, who, args.steps, args.warmup)))
        return
    machine = machine_line()
    allocator = allocator_in_use()
    mode = "both in one process" if args.in_process else f"a process each, {args.rounds} rounds"
    print(f"{machine}; allocator: {allocator}; {mode}", file=sys.stderr)
    # Without native bf16 (AMX or AVX-512-BF16) a CPU emulates it about 100x slower than
    # float32: nobody trains so, and the runs would take hours.
    dtypes = ["float32", "bfloat16"] if bf16_supported(torch.device("cpu")) else ["float32"]
    if dtypes == ["float32"]:
        print("bf16 left out: this CPU has no native bf16", file=sys.stderr)
    rows = []
    for name in [args.only] if args.only else list(MODELS):
        n_layers, _, d_model, context, vocab, batch = MODELS[name]
        per_token = flops_per_token(n_layers, d_model, context, vocab)
        for dtype in dtypes:
            if args.in_process:
                with weight_copies.kept_between_steps():
                    figures, peaks = in_process(name, dtype, args.steps, args.warmup)
            else:
                figures, peaks = in_turns(name, dtype, args.steps, args.warmup, args.rounds)
            peak = max(peaks)
            row = {"model": name, "dtype": dtype, "batch": batch, "context": context}
            row["peak_tflops"] = round(peak / 1e12, 3)
            for who in WHO:
                tokens_per_second = max(figures[who])  # the best round
                row[who] = {
                    "tokens_per_second": round(tokens_per_second, 1),
                    "mfu": round(tokens_per_second * per_token / peak, 4),
                    "rounds": [round(f, 1) for f in figures[who]],
                }
            row["ratio"] = round(
                row["tformer"]["tokens_per_second"] / row["transformers"]["tokens_per_second"], 2
            )
            rows.append(row)
            ours_per_second = row["tformer"]["tokens_per_second"]
            print(
                f"{name:>5} {dtype:>8}: tformer {ours_per_second:8.1f} tok/s "
                f"(MFU {row['tformer']['mfu']:.1%}) | transformers "
                f"{row['transformers']['tokens_per_second']:8.1f} tok/s "
                f"(MFU {row['transformers']['mfu']:.1%}) | ratio {row['ratio']:.2f}x | "
                f"peak {row['peak_tflops']:.3f} TFLOP/s",
                file=sys.stderr,
            )
    if args.json:
        mode = "in-process" if args.in_process else "a process each"
        print(json.dumps({"machine": machine, "allocator": allocator, "mode": mode, "rows": rows}))


if __name__ == "__main__":
    main()
