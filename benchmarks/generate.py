"""Decoding speed of GPT-2 124M: tformer against transformers' `generate`, same weights, one run.

Builds the `gpt2` architecture with random weights and saves it once with tformer; both
libraries load that directory. Then, with the two libraries' runs interleaved so that both
see the same moments of a noisy host:

1. batch 1: a 32-token prompt, 256 new tokens, sampling (top-k 50, temperature 1; the end of
   text is not allowed to stop it early), new tokens per second over the whole call;
2. batch 8: eight such prompts at once, new tokens per second over all rows;
3. time to the first token of a 512-token prompt (prefill plus one sampled token).

tformer runs with the model's float32 weights as they are ("float32 unpacked", the plain
path) and packed for decoding with float32, bfloat16 and int8 weights (tformer.generate.fast);
transformers in float32 and (on a CPU with native bf16) bfloat16. Ratios are to
transformers in float32. Each figure is the median of --repeats runs.

    python benchmarks/generate.py [--repeats 3] [--new-tokens 256] [--json]
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine_line  # noqa: E402

from tformer import GPT2, GPT2Config  # noqa: E402
from tformer.devices import bf16_supported  # noqa: E402
from tformer.generate import SamplingConfig, generate_batch, generate_ids  # noqa: E402
from tformer.generate.decode import next_token, prefill  # noqa: E402
from tformer.generate.fast import pack_for_decoding  # noqa: E402

PROMPT_LEN, BATCH, TTFT_PROMPT_LEN, TOP_K = 32, 8, 512, 50


class Runner:
    """One way of generating: (prompts (B, T), new tokens) -> seconds; and time to first token."""

    def __init__(self, name: str, generate: Callable, first_token: Callable) -> None:
        self.name, self.generate, self.first_token = name, generate, first_token


def tformer_runner(directory: str, weights: str | None) -> Runner:
    model = GPT2.from_pretrained(directory).eval()
    if weights is not None:
        pack_for_decoding(model, weights)
    name = f"tformer {weights}" if weights else "tformer float32 unpacked"

    def generate(prompts: torch.Tensor, new_tokens: int) -> float:
        # The end-of-text token is not declared, so every row runs the full length.
        config = SamplingConfig(max_new_tokens=new_tokens, top_k=TOP_K, seed=0)
        start = time.perf_counter()
        if prompts.shape[0] == 1:
            out = [generate_ids(model, prompts, config)]
        else:
            out = generate_batch(model, prompts.tolist(), config)
        seconds = time.perf_counter() - start
        assert all(len(row) == new_tokens for row in out)
        return seconds

    @torch.inference_mode()
    def first_token(prompt: torch.Tensor) -> float:
        config = SamplingConfig(max_new_tokens=1, top_k=TOP_K, seed=0)
        start = time.perf_counter()
        caches = model.new_caches(batch_size=1)
        next_token(prefill(model, prompt, caches), config, None).item()
        return time.perf_counter() - start

    return Runner(name, generate, first_token)


def transformers_runner(directory: str, dtype: torch.dtype) -> Runner:
    import transformers

    model = transformers.GPT2LMHeadModel.from_pretrained(directory, dtype=dtype).eval()
    name = f"transformers {str(dtype).removeprefix('torch.')}"

    def run(prompts: torch.Tensor, new_tokens: int) -> tuple[float, torch.Tensor]:
        torch.manual_seed(0)
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                prompts,
                attention_mask=torch.ones_like(prompts),
                do_sample=True,
                top_k=TOP_K,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                pad_token_id=model.config.eos_token_id,
            )
        return time.perf_counter() - start, out

    def generate(prompts: torch.Tensor, new_tokens: int) -> float:
        seconds, out = run(prompts, new_tokens)
        assert out.shape[1] == prompts.shape[1] + new_tokens
        return seconds

    return Runner(name, generate, lambda prompt: run(prompt, 1)[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    print(machine_line(), file=sys.stderr)
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 50257, (1, PROMPT_LEN), generator=generator)
    batch = torch.randint(0, 50257, (BATCH, PROMPT_LEN), generator=generator)
    long_prompt = torch.randint(0, 50257, (1, TTFT_PROMPT_LEN), generator=generator)
    with tempfile.TemporaryDirectory() as directory:
        GPT2(GPT2Config.from_preset("gpt2", dropout=0.0), seed=0).save_pretrained(directory)
        runners = [transformers_runner(directory, torch.float32)]
        # Without native bf16 a CPU emulates transformers' bf16 matmuls ~100x slower than
        # float32 (tformer's packed bf16 weights are read by kernels that compute in float32).
        if bf16_supported(torch.device("cpu")):
            runners.append(transformers_runner(directory, torch.bfloat16))
        else:
            print("transformers bfloat16 left out: this CPU has no native bf16", file=sys.stderr)
        runners += [
            tformer_runner(directory, None),
            tformer_runner(directory, "float32"),
            tformer_runner(directory, "bfloat16"),
            tformer_runner(directory, "int8"),
        ]
        for runner in runners:  # warm-up: first-call allocations, kernel selection
            runner.generate(prompt, 8)
        times: dict[str, dict[str, list[float]]] = {
            r.name: {"batch1": [], "batch8": [], "ttft": []} for r in runners
        }
        for _ in range(args.repeats):
            for runner in runners:
                t = times[runner.name]
                t["batch1"].append(runner.generate(prompt, args.new_tokens))
                t["batch8"].append(runner.generate(batch, args.new_tokens))
                t["ttft"].append(runner.first_token(long_prompt))

    rows = []
    for runner in runners:
        t = {k: statistics.median(v) for k, v in times[runner.name].items()}
        rows.append(
            {
                "name": runner.name,
                "batch1_tokens_per_second": round(args.new_tokens / t["batch1"], 1),
                "batch8_tokens_per_second": round(BATCH * args.new_tokens / t["batch8"], 1),
                "ttft_512_seconds": round(t["ttft"], 3),
            }
        )
    peer = rows[0]
    print(
        f"{'':26} {'batch 1 tok/s':>14} {'ratio':>6} {'batch 8 tok/s':>14} {'ratio':>6} "
        f"{'TTFT 512 (s)':>13}",
        file=sys.stderr,
    )
    for row in rows:
        row["batch1_ratio"] = round(
            row["batch1_tokens_per_second"] / peer["batch1_tokens_per_second"], 2
        )
        row["batch8_ratio"] = round(
            row["batch8_tokens_per_second"] / peer["batch8_tokens_per_second"], 2
        )
        print(
            f"{row['name']:26} {row['batch1_tokens_per_second']:14.1f} "
            f"{row['batch1_ratio']:5.2f}x {row['batch8_tokens_per_second']:14.1f} "
            f"{row['batch8_ratio']:5.2f}x {row['ttft_512_seconds']:13.3f}",
            file=sys.stderr,
        )
    if args.json:
        print(json.dumps({"machine": machine_line(), "new_tokens": args.new_tokens, "rows": rows}))


if __name__ == "__main__":
    main()
