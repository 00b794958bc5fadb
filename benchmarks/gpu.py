"""GPT-2 124M on one CUDA GPU: training and greedy decoding, tformer against transformers.

GPT-2 small (12 layers, 12 heads, 768 wide, context 1024, vocabulary 50257), one run, both
libraries starting from the same weights: tformer's GPT2(seed=0), written in the Hugging
Face layout by its own save_pretrained and read back by transformers' from_pretrained.

1. Training: tokens per second of whole steps (forward, loss, backward, clipping to a
   global norm of 1.0, AdamW) under bf16 autocast, on one batch of --batch x 1024 random
   tokens that both use. tformer steps as `tformer train` does on a GPU (attention "sdpa":
   recipes/start.py's attention_for; its own loss, outside autocast as the trainer computes
   it; the clipping inside its AdamW's step), transformers as its users do (`labels=`,
   clip_grad_norm_ before the same AdamW, which on a GPU is torch's fused kernel), as
   benchmarks/train_throughput.py runs them. After --warmup untimed steps each (cuBLAS's
   and the allocator's first calls), the two take turns, --steps steps at a time, --rounds
   times, each going first in every other round; a turn is timed from one
   torch.cuda.synchronize() to the next, and each side's best turn is its figure.
   MFU = tokens/s x (6 N + 12 L T C) / peak, train_throughput.py's count of FLOPs per token,
   against the peak of a bf16 matmul (8192^3, timed with CUDA events) measured before and
   after the steps, the larger taken (the stricter MFU). Each side's first and last loss
   are printed: from the same weights and tokens the first two agree to bf16's rounding
   (transformers' `labels=` scores the window's last T - 1 targets, tformer all T). Each
   side's peak memory is what its warm-up steps allocated at most above what the GPU held
   before them (both models' weights, and the first side's optimizer state once it ran).
   Beside it, the loss alone on logits of one step's shape, forward and backward: tformer's
   cross_entropy against torch's as transformers calls it (a part of the step where the
   two differ in how many kernels they launch: tformer's runs a block of rows at a time,
   train/losses.py's block_rows).
2. Decoding: greedy, batch 1, a 32-token prompt and --new-tokens new tokens with a KV cache:
   tformer's generate_ids (tformer/generate/decode.py: prefill, then one token a step)
   against transformers' generate(do_sample=False), with the weights in float32 and in
   bfloat16, loaded as `tformer generate --device cuda --dtype ...` loads them
   (generate/fast.py: the model in that dtype, attention "sdpa"). Neither may choose the
   end-of-text token (transformers' min_new_tokens, tformer's vocab_limit), so every call
   makes the full count; tokens/s is new tokens over the whole call, the median of
   --repeats calls taking turns. The two libraries' tokens are compared: in float32 they
   must be the same, or part only where the two models' logits there put the two tokens
   within rounding of each other (a near tie, which float rounding may decide either
   way); in bfloat16 the comparison is reported, not required.

Every figure goes to stderr as it is made, with the GPU's name and the versions; --json
ends with one JSON line on stdout. A part that fails is reported, in the JSON too, and makes
the exit status 1, without stopping the parts after it. --small runs a tiny model for a
few steps: a check of this script itself on any device (`--device cpu --small` takes well
under a minute on a CPU).

    python benchmarks/gpu.py [--device cuda] [--batch 16] [--steps 10] [--warmup 5]
        [--rounds 3] [--new-tokens 256] [--repeats 3] [--small] [--json]
"""

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine_line  # noqa: E402
from train_throughput import flops_per_token  # noqa: E402

from tformer import GPT2, GPT2Config  # noqa: E402
from tformer.generate import SamplingConfig, generate_ids  # noqa: E402
from tformer.nn import weight_copies  # noqa: E402
from tformer.recipes.start import attention_for  # noqa: E402
from tformer.train.optim import build_optimizer  # noqa: E402
from tformer.train.trainer import cross_entropy  # noqa: E402

PROMPT_LEN = 32
# The sizes: GPT-2 small, and --small's tiny model (checks the script, measures nothing).
FULL = dict(vocab_size=50257, max_len=1024, d_model=768, n_layers=12, n_heads=12)
SMALL = dict(vocab_size=512, max_len=128, d_model=64, n_layers=2, n_heads=2)
# Logits of two implementations of one model differ by rounding alone: float32's few units
# in the last place, through 12 layers, stay far below 1e-3 (the tests hold GPT-2 logits
# to 1e-4 on a CPU); bf16's 8-bit mantissa leaves a few hundredths.
TIE_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 5e-2}
WHO = ("tformer", "transformers")


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work: a timing must not end before its kernels do."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, n: int, repeats: int = 20) -> float:
    """FLOP/s of an n x n x n bf16 matmul, the best of `repeats`: this device's practical
    peak. On a GPU each product is timed by CUDA events around it alone."""
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=g).to(device, torch.bfloat16) for _ in range(2))
    out = torch.empty(n, n, dtype=torch.bfloat16, device=device)
    torch.mm(a, b, out=out)  # warm-up: the library's first call chooses its kernel
    synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.mm(a, b, out=out)
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1e3
        else:
            begin = time.perf_counter()
            torch.mm(a, b, out=out)
            seconds = time.perf_counter() - begin
        best = min(best, seconds)
    return 2 * n**3 / best


def tformer_config(sizes: dict, device: torch.device) -> GPT2Config:
    """GPT-2 of these sizes as `tformer train` builds it on `device`: no dropout, the
    attention path it picks there, the last id the end of text (GPT-2's 50256)."""
    return GPT2Config(
        **sizes,
        dropout=0.0,
        eos_id=sizes["vocab_size"] - 1,
        attention=attention_for("auto", device),
    )


def load_transformers(directory: str, dtype: torch.dtype, device: torch.device):
    """transformers' GPT2LMHeadModel from `directory` (tformer's save_pretrained), on its
    fused attention ("sdpa", as tformer's)."""
    import transformers

    model = transformers.GPT2LMHeadModel.from_pretrained(
        directory, dtype=dtype, attn_implementation="sdpa"
    )
    return model.to(device)


# Training


class Side:
    """One library's model on the shared batch: its optimizer, its loss, its turns' times."""

    def __init__(self, name: str, model: torch.nn.Module, ids: torch.Tensor) -> None:
        self.name, self.model, self.ids = name, model.train(), ids
        self.optimizer = build_optimizer(model, 1e-4, 0.1, (0.9, 0.95))
        self.turns: list[float] = []  # tokens/s of each timed turn
        self.losses: list[float] = []  # the first step's and the last step's
        self.peak_memory: int | None = None  # bytes its warm-up added at most (GPU)
        self.last_loss: torch.Tensor | None = None  # the last timed step's

    def loss(self) -> torch.Tensor:
        """This step's loss: tformer's as its trainer computes it, transformers' as its
        users ask for it."""
        x, device_type = self.ids[:, :-1], self.ids.device.type  # (B, T)
        with torch.autocast(device_type, dtype=torch.bfloat16):
            if self.name == "transformers":
                return self.model(input_ids=x, labels=x).loss
            logits = self.model(x)  # (B, T, V)
        return cross_entropy(logits, self.ids[:, 1:])  # as the trainer: outside autocast

    def step(self) -> torch.Tensor:
        loss = self.loss()
        loss.backward()
        if self.name == "tformer":
            self.optimizer.step(max_grad_norm=1.0)  # clipped inside the update's pass
        else:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def turn(self, steps: int) -> None:
        """`steps` timed steps, the device idle before and after."""
        synchronize(self.ids.device)
        start = time.perf_counter()
        for _ in range(steps):
            loss = self.step()
        synchronize(self.ids.device)
        self.turns.append(self.ids[:, 1:].numel() * steps / (time.perf_counter() - start))
        self.last_loss = loss


def training(
    directory: str, config: GPT2Config, device: torch.device, args, peaks: list[float]
) -> dict:
    """Part 1: both models' training steps, taking turns; their figures by name."""
    ours = GPT2(config, seed=0).to(device)
    ours.save_pretrained(directory)  # the weights transformers starts from (and decodes)
    theirs = load_transformers(directory, torch.float32, device)
    theirs.config.use_cache = False  # training: no KV cache to return
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (args.batch, config.max_len + 1), generator=g)
    sides = [Side("tformer", ours, ids.to(device)), Side("transformers", theirs, ids.to(device))]
    with weight_copies.kept_between_steps():  # as tformer's trainer keeps its bf16 copies
        for side in sides:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                held = torch.cuda.memory_allocated(device)  # both models, and what ran before
            for i in range(max(args.warmup, 1)):
                loss = side.step()
                if i == 0:
                    side.losses.append(loss.item())
            synchronize(device)
            if device.type == "cuda":
                side.peak_memory = torch.cuda.max_memory_allocated(device) - held
        peaks.append(matmul_peak(device, args.peak_n))
        for r in range(args.rounds):
            for side in sides if r % 2 == 0 else sides[::-1]:
                side.turn(args.steps)
        peaks.append(matmul_peak(device, args.peak_n))
    per_token = flops_per_token(config.n_layers, config.d_model, config.max_len, config.vocab_size)
    peak = max(peaks)
    result = {
        "batch": args.batch,
        "context": config.max_len,
        "tokens_per_step": args.batch * config.max_len,
        "flops_per_token": per_token,
        "peak_tflops": round(peak / 1e12, 2),
    }
    for side in sides:
        best, memory = max(side.turns), side.peak_memory
        side.losses.append(side.last_loss.item())
        result[side.name] = {
            "tokens_per_second": round(best, 1),
            "mfu": round(best * per_token / peak, 4),
            "turns": [round(t, 1) for t in side.turns],
            "first_loss": round(side.losses[0], 4),
            "last_loss": round(side.losses[-1], 4),
            "peak_memory_gib": None if memory is None else round(memory / 2**30, 2),
        }
    result["ratio"] = round(
        result["tformer"]["tokens_per_second"] / result["transformers"]["tokens_per_second"], 3
    )
    for who in WHO:
        row = result[who]
        memory = row["peak_memory_gib"]
        print(
            f"training {who:>12}: {row['tokens_per_second']:10.1f} tok/s, MFU "
            f"{row['mfu']:.1%}, turns {row['turns']}, loss {row['first_loss']:.4f} -> "
            f"{row['last_loss']:.4f}" + (f", peak memory {memory:.2f} GiB" if memory else ""),
            file=sys.stderr,
        )
    print(
        f"training: tformer / transformers = {result['ratio']:.3f}x (batch {args.batch} x "
        f"{config.max_len}, bf16 autocast, peak {result['peak_tflops']:.1f} TFLOP/s bf16)",
        file=sys.stderr,
    )
    return result


def loss_alone(config: GPT2Config, device: torch.device, args) -> dict:
    """Part 1b: the loss of one training step's logits alone, forward and backward: (B T, V)
    bf16 logits as autocast makes them, tformer's cross_entropy (train/losses.py, which off
    the CPU computes a block of rows at a time) against torch's, as transformers computes it
    (float32 logits, nn.functional.cross_entropy). Milliseconds, the median of 5 calls each,
    taking turns; and the two losses, which must agree."""
    n, v = args.batch * config.max_len, config.vocab_size
    g = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(n, v, generator=g, device=device).to(torch.bfloat16)  # (N, V)
    logits.requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g, device=device)  # (N,)

    def ours() -> torch.Tensor:
        return cross_entropy(logits, targets)

    def torchs() -> torch.Tensor:
        return torch.nn.functional.cross_entropy(logits.float(), targets)

    milliseconds: dict[str, list[float]] = {"tformer": [], "torch": []}
    values = {}
    for r in range(6):  # the first of each is a warm-up
        for name, loss_fn in (("tformer", ours), ("torch", torchs))[:: 1 if r % 2 else -1]:
            synchronize(device)
            start = time.perf_counter()
            loss = loss_fn()
            loss.backward()
            synchronize(device)
            if r > 0:
                milliseconds[name].append((time.perf_counter() - start) * 1e3)
            values[name] = loss.item()
            logits.grad = None
    result = {"rows": n, "vocab": v}
    for name, times in milliseconds.items():
        result[name] = {"milliseconds": round(statistics.median(times), 3), "loss": values[name]}
    result["ratio"] = round(result["tformer"]["milliseconds"] / result["torch"]["milliseconds"], 3)
    print(
        f"loss alone ({n} x {v} bf16 logits, forward and backward): tformer "
        f"{result['tformer']['milliseconds']:.2f} ms | torch {result['torch']['milliseconds']:.2f}"
        f" ms | tformer / torch time {result['ratio']:.2f}x",
        file=sys.stderr,
    )
    assert abs(values["tformer"] - values["torch"]) < 1e-3 * abs(values["torch"]), values
    return result


# Decoding


def timed(device: torch.device, run: Callable[[], list[int]]) -> tuple[float, list[int]]:
    """Seconds of one generation call, the device idle before and after, and its new ids."""
    synchronize(device)
    start = time.perf_counter()
    new = run()
    synchronize(device)
    return time.perf_counter() - start, new


def where_they_part(ours, theirs, context: torch.Tensor, a: int, b: int, dtype) -> dict:
    """Both models' next-token logits after `context` (1, T), recomputed whole: how far
    apart they are, and by how much each prefers its own choice (a: tformer's, b:
    transformers'); a near tie when tformer's logits put a and b within rounding."""
    with torch.inference_mode():
        mine = ours(context)[0, -1].float()  # (V,)
        yours = theirs(input_ids=context).logits[0, -1].float()  # (V,)
    gap = (mine[a] - mine[b]).item()
    difference = (mine - yours).abs().max().item()
    return {
        "tformer_token": a,
        "transformers_token": b,
        "tformer_gap": round(gap, 6),  # its logit of a minus its logit of b
        "transformers_gap": round((yours[b] - yours[a]).item(), 6),
        "logits_max_abs_difference": round(difference, 6),
        "near_tie": abs(gap) <= TIE_TOLERANCE[dtype],
    }


def decoding_row(directory: str, config: GPT2Config, device: torch.device, dtype, args) -> dict:
    """Part 2 for one weight dtype: both libraries' greedy decoding, taking turns."""
    ours = GPT2.from_pretrained(directory, dtype=dtype, device=device)
    ours.set_attention("sdpa")  # as generate/fast.py's load_for_decoding
    theirs = load_transformers(directory, dtype, device).eval()
    eos = config.vocab_size - 1
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, eos, (1, PROMPT_LEN), generator=g).to(device)

    def tformer_run(new_tokens: int) -> list[int]:
        # vocab_limit: ids from eos on are never chosen, as min_new_tokens forbids it below
        sampling = SamplingConfig(max_new_tokens=new_tokens, do_sample=False, vocab_limit=eos)
        return generate_ids(ours, prompt, sampling)

    def transformers_run(new_tokens: int) -> list[int]:
        with torch.inference_mode():
            out = theirs.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                do_sample=False,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                pad_token_id=eos,
                eos_token_id=eos,
            )
        return out[0, PROMPT_LEN:].tolist()

    runs = {"tformer": tformer_run, "transformers": transformers_run}
    for run in runs.values():  # warm-up: first calls, kernel choices
        run(8)
    seconds: dict[str, list[float]] = {who: [] for who in WHO}
    tokens: dict[str, list[int]] = {}
    for r in range(args.repeats):
        for who in WHO if r % 2 == 0 else WHO[::-1]:
            elapsed, tokens[who] = timed(device, lambda who=who: runs[who](args.new_tokens))
            seconds[who].append(elapsed)
    name = str(dtype).removeprefix("torch.")
    row: dict = {"dtype": name}
    for who in WHO:
        assert len(tokens[who]) == args.new_tokens, f"{who} made {len(tokens[who])} tokens"
        median = statistics.median(seconds[who])
        row[who] = {
            "tokens_per_second": round(args.new_tokens / median, 1),
            "runs_seconds": [round(s, 4) for s in seconds[who]],
        }
    row["ratio"] = round(
        row["tformer"]["tokens_per_second"] / row["transformers"]["tokens_per_second"], 3
    )
    a, b = tokens["tformer"], tokens["transformers"]
    row["tokens_match"] = a == b
    if a == b:
        row["verdict"] = "same tokens"
    else:
        i = next(i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y)
        context = torch.cat([prompt, torch.tensor([a[:i]], dtype=prompt.dtype, device=device)], 1)
        parting = where_they_part(ours, theirs, context, a[i], b[i], dtype)
        row["first_difference"] = {"index": i, **parting}
        row["verdict"] = "a near tie" if parting["near_tie"] else "DIFFERENT"
    print(
        f"decoding {name:>8}: tformer {row['tformer']['tokens_per_second']:8.1f} tok/s | "
        f"transformers {row['transformers']['tokens_per_second']:8.1f} tok/s | ratio "
        f"{row['ratio']:.3f}x | {row['verdict']}"
        + (f" at new token {row['first_difference']}" if not row["tokens_match"] else ""),
        file=sys.stderr,
    )
    return row


def decoding(directory: str, config: GPT2Config, device: torch.device, args, failures) -> dict:
    """Part 2: float32 and bfloat16 weights, a row each; a float32 row whose tokens differ
    beyond a near tie is a failure."""
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        name = f"decoding {str(dtype).removeprefix('torch.')}"
        row = run_part(name, failures, decoding_row, directory, config, device, dtype, args)
        if row is None:
            continue
        rows.append(row)
        if dtype == torch.float32 and row["verdict"] == "DIFFERENT":
            failures["decoding float32 tokens"] = (
                f"tformer and transformers chose different tokens: {row['first_difference']}"
            )
    return {"prompt_tokens": PROMPT_LEN, "new_tokens": args.new_tokens, "batch": 1, "rows": rows}


# The run


def run_part(name: str, failures: dict, part: Callable, *arguments):
    """part(*arguments), or None with the error kept under `name` (and printed), the
    device's memory given back for the parts after it."""
    print(f"== {name}", file=sys.stderr)  # where a run cut short by its time stopped
    started = time.perf_counter()
    try:
        result = part(*arguments)
        print(f"== {name}: {time.perf_counter() - started:.1f} s", file=sys.stderr)
        return result
    except Exception as error:  # reported; the other parts still run
        text = "".join(traceback.format_exception(error))
        print(f"{name} FAILED:\n{text}", file=sys.stderr)
        failures[name] = text[-4000:]
        return None
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def environment(device: torch.device) -> dict:
    import transformers

    found = {
        "machine": machine_line(),
        "device": str(device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": sys.version.split()[0],
    }
    if device.type == "cuda":
        found["gpu"] = torch.cuda.get_device_name(device)
        found["cuda"] = torch.version.cuda
        found["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
        found["gpu_memory_gib"] = round(
            torch.cuda.get_device_properties(device).total_memory / 2**30, 1
        )
        found["float32_matmul_precision"] = torch.get_float32_matmul_precision()
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:1, cpu, ...")
    parser.add_argument("--small", action="store_true", help="a tiny model, a few steps")
    parser.add_argument("--batch", type=int, help="training rows of 1024 (default 16)")
    parser.add_argument("--steps", type=int, help="timed steps per turn (default 10)")
    parser.add_argument(
        "--warmup", type=int, help="untimed steps per model (default 5; one at least)"
    )
    parser.add_argument("--rounds", type=int, help="turns of each model (default 3)")
    parser.add_argument("--new-tokens", type=int, help="greedy new tokens (default 256)")
    parser.add_argument("--repeats", type=int, help="decoding calls per library and dtype")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    # --small's defaults check the script in seconds; the others measure
    defaults = dict(batch=16, steps=10, warmup=5, rounds=3, new_tokens=256, repeats=3)
    if args.small:
        defaults = dict(batch=4, steps=2, warmup=1, rounds=2, new_tokens=16, repeats=2)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if min(args.batch, args.steps, args.rounds, args.new_tokens, args.repeats) < 1:
        parser.error("--batch, --steps, --rounds, --new-tokens and --repeats must be at least 1")
    if args.warmup < 0:
        parser.error("--warmup must be at least 0")
    args.peak_n = 1024 if args.small else 8192
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"--device {args.device}: PyTorch sees no CUDA GPU here (try --device cpu)")
    if device.type == "cuda":
        if device.index is None:  # "cuda": the current GPU (set_device needs an index)
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    found = environment(device)
    for key, value in found.items():
        print(f"{key}: {value}", file=sys.stderr)
    config = tformer_config(SMALL if args.small else FULL, device)
    if PROMPT_LEN + args.new_tokens > config.max_len:
        room = config.max_len - PROMPT_LEN
        parser.error(f"--new-tokens: at most {room} after the {PROMPT_LEN}-token prompt")
    failures: dict[str, str] = {}
    peaks: list[float] = []
    report = {**found, "small": args.small, "config": config.to_dict()}
    with tempfile.TemporaryDirectory() as directory:
        peaks.append(matmul_peak(device, args.peak_n))
        report["training"] = run_part(
            "training", failures, training, directory, config, device, args, peaks
        )
        report["loss"] = run_part("loss", failures, loss_alone, config, device, args)
        if not (Path(directory) / "config.json").exists():  # training failed before saving
            GPT2(config, seed=0).save_pretrained(directory)
        report["decoding"] = decoding(directory, config, device, args, failures)
    report["matmul_peaks_tflops"] = [round(p / 1e12, 2) for p in peaks]
    report["failures"] = failures
    print(
        "failures: " + (", ".join(failures) if failures else "none"),
        file=sys.stderr,
    )
    if args.json:
        print(json.dumps(report))
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
