"""`tformer generate`: continue prompts, streaming the text as it is produced."""

import sys
import time
from pathlib import Path

from tformer.cli.common import print_json
from tformer.data.prompts import read_prompt_list
from tformer.devices import DTYPES, pick_device
from tformer.generate import SamplingConfig, generate
from tformer.generate.fast import load_for_decoding
from tformer.generate.text import TextStream, cut_at_stop, encode_prompt


def add_parser(sub) -> None:
    p = sub.add_parser(
        "generate",
        aliases=["sample"],
        help="generate text from a checkpoint",
        description="Continue a prompt with a GPT-2 checkpoint (a directory in the Hugging Face "
        "layout). The prompt comes from --prompt, --prompt-file, or standard input; one "
        "prompt and one sample stream to the terminal as they are produced, several prompts "
        "(--prompt repeated, or --prompts-file) run as one batch. On the CPU the weights are "
        "packed for fast decoding (float32, bfloat16 or int8, read by compiled C kernels); "
        "the path taken is printed to standard error.",
    )
    p.add_argument("checkpoint", help="checkpoint directory (or a Hub name, with network)")
    source = p.add_mutually_exclusive_group()
    source.add_argument(
        "--prompt", action="append", help="the prompt text; repeat for a batch of prompts"
    )
    source.add_argument("--prompt-file", help="read one prompt from this file (all of it)")
    source.add_argument(
        "--prompts-file",
        help='a batch of prompts: one per line, or a .jsonl file of {"prompt": ...} objects',
    )
    p.add_argument(
        "--num-samples", type=int, default=1, help="continuations per prompt (default: 1)"
    )
    p.add_argument("--max-new-tokens", type=int, default=50, help="(default: 50)")
    p.add_argument(
        "--greedy", action="store_true", help="always take the most likely token (no sampling)"
    )
    p.add_argument("--temperature", type=float, default=1.0, help="(default: 1.0; 0 means greedy)")
    p.add_argument("--top-k", type=int, help="sample from the k most likely tokens")
    p.add_argument("--top-p", type=float, help="sample from the smallest set with probability p")
    p.add_argument(
        "--repetition-penalty",
        type=float,
        default=1.0,
        help="> 1 makes tokens already in the text less likely (CTRL's rule; default: 1, off)",
    )
    p.add_argument(
        "--stop",
        action="append",
        default=[],
        metavar="TEXT",
        help="stop when the continuation contains TEXT (not printed); may be repeated",
    )
    p.add_argument(
        "--seed", type=int, help="seed for reproducible sampling (sample j uses seed + j)"
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: auto)")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=list(DTYPES),
        help="weight format; on the CPU activations stay float32 (default: float32)",
    )
    p.add_argument(
        "--quantize",
        choices=["none", "int8"],
        default="none",
        help="int8: weight-only int8 with one scale per output row, a quarter of float32's "
        "memory traffic (default: none)",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON, no streaming")
    p.set_defaults(run=run)


def read_prompts(args) -> list[str]:
    if args.prompt is not None:
        return args.prompt
    if args.prompt_file is not None:
        with open(args.prompt_file, encoding="utf-8") as f:
            return [f.read()]
    if args.prompts_file is not None:
        return read_prompt_list(Path(args.prompts_file))
    if sys.stdin.isatty():
        raise ValueError("no prompt: give --prompt TEXT, --prompt-file FILE, or pipe text in")
    return [sys.stdin.read()]


def run(args) -> None:
    if args.num_samples < 1:
        raise ValueError("--num-samples must be at least 1")
    prompts = read_prompts(args)
    greedy = args.greedy or args.temperature == 0
    config = SamplingConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=1.0 if greedy else args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        do_sample=not greedy,
        seed=args.seed,
        repetition_penalty=args.repetition_penalty,
    )
    device = pick_device(args.device)
    quantize = args.quantize == "int8"
    model, tokenizer, path = load_for_decoding(args.checkpoint, device, args.dtype, quantize)
    config.eos_id = tokenizer.eos_id
    if not args.json:
        print(f"decoding: {path.describe()}", file=sys.stderr)
    ids = [encode_prompt(tokenizer, prompt) for prompt in prompts]
    if len(prompts) == 1 and args.num_samples == 1:
        stream_one(args, model, tokenizer, prompts[0], ids[0], config, path)
    else:
        run_batch(args, model, tokenizer, prompts, ids, config, path)


def stream_one(args, model, tokenizer, prompt, ids, config, path) -> None:
    stream = TextStream(model, tokenizer, ids, config, args.stop)
    start = time.perf_counter()
    if not args.json:
        print(prompt, end="", flush=True)
    for piece in stream:
        if not args.json:
            print(piece, end="", flush=True)
    seconds = time.perf_counter() - start
    if not args.json:
        print()
        return
    print_json(
        {
            "prompt": prompt,
            "completion": stream.completion,
            "new_tokens": stream.new_tokens,
            "seconds": round(seconds, 3),
            "tokens_per_second": round(stream.new_tokens / seconds, 2) if seconds > 0 else None,
            "path": path.to_dict(),
        }
    )


def run_batch(args, model, tokenizer, prompts, ids, config, path) -> None:
    """Every prompt's samples in one left-padded batch; stop strings cut the results."""
    start = time.perf_counter()
    outputs = generate(model, ids, config, args.num_samples)
    seconds = time.perf_counter() - start
    results = []
    for row, new_ids in enumerate(outputs):
        index, sample = divmod(row, args.num_samples)
        completion, _ = cut_at_stop(tokenizer.decode(new_ids), args.stop)
        results.append(
            {
                "prompt_index": index,
                "sample": sample,
                "prompt": prompts[index],
                "completion": completion,
                "new_tokens": len(new_ids),
            }
        )
    total = sum(len(new_ids) for new_ids in outputs)
    if args.json:
        print_json(
            {
                "results": results,
                "new_tokens": total,
                "seconds": round(seconds, 3),
                "tokens_per_second": round(total / seconds, 2) if seconds > 0 else None,
                "path": path.to_dict(),
            }
        )
        return
    for r in results:
        print(f"=== prompt {r['prompt_index'] + 1}, sample {r['sample'] + 1} ===")
        print(r["prompt"] + r["completion"])
