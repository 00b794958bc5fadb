"""`tformer generate`: continue prompts, streaming the text as it is produced."""

import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from tformer.checkpoints import resolve_checkpoint
from tformer.cli.common import add_weight_flags, non_empty, number, print_json, read_utf8, seed
from tformer.data.prompts import read_prompt_list
from tformer.devices import pick_device
from tformer.errors import ConfigError
from tformer.generate import SamplingConfig
from tformer.generate.decode import continue_prompts
from tformer.generate.fast import load_for_decoding
from tformer.generate.limits import STOP
from tformer.generate.text import StreamedText, TextStream, encode_prompt
from tformer.models.load import is_translation_checkpoint
from tformer.nn.packed_linear import calibrate_kernel_rows


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
        "the path taken is printed to standard error. A prompt cut to fit the context "
        "window, or a batch that fills it, is reported as a warning on standard error and "
        "in --json (finish_reason: stop, length or context).",
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
        "--num-samples",
        type=number(integer=True, low=1),
        default=1,
        help="continuations per prompt (default: 1)",
    )
    p.add_argument(
        "--max-new-tokens", type=number(integer=True, low=0), default=50, help="(default: 50)"
    )
    p.add_argument(
        "--greedy", action="store_true", help="always take the most likely token (no sampling)"
    )
    p.add_argument(
        "--temperature",
        type=number(low=0),
        default=1.0,
        help="(default: 1.0; 0 means greedy)",
    )
    p.add_argument(
        "--top-k", type=number(integer=True, low=1), help="sample from the k most likely tokens"
    )
    p.add_argument(
        "--top-p",
        type=number(low=0, high=1, low_open=True),
        help="sample from the smallest set with probability p",
    )
    p.add_argument(
        "--repetition-penalty",
        type=number(low=0, low_open=True),
        default=1.0,
        help="> 1 makes tokens already in the text less likely (CTRL's rule; default: 1, off)",
    )
    p.add_argument(
        "--stop",
        type=non_empty,
        action="append",
        default=[],
        metavar="TEXT",
        help="stop when the continuation contains TEXT (not printed); may be repeated",
    )
    p.add_argument(
        "--seed",
        type=seed,
        help="seed for reproducible sampling (sample j uses seed + j)",
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: auto)")
    p.add_argument(
        "--threads",
        type=number(integer=True, low=1),
        help="CPU threads for decoding (default: torch's choice)",
    )
    add_weight_flags(p)
    p.add_argument("--json", action="store_true", help="print the result as JSON, no streaming")
    p.set_defaults(run=run)


def read_prompts(args) -> list[str]:
    if args.prompt is not None:
        return args.prompt
    if args.prompt_file is not None:
        return [read_utf8(args.prompt_file)]
    if args.prompts_file is not None:
        return read_prompt_list(Path(args.prompts_file))
    if sys.stdin.isatty():
        raise ValueError("no prompt: give --prompt TEXT, --prompt-file FILE, or pipe text in")
    return [read_utf8(None)]


def check_is_language_model(checkpoint: str) -> str:
    """The checkpoint's directory, refused with a clear message if it holds a translation
    model (which `tformer translate` runs)."""
    directory = resolve_checkpoint(checkpoint)
    if is_translation_checkpoint(directory):
        raise ConfigError(
            f"{checkpoint} holds a translation (encoder-decoder) model, not a language model: "
            "run it with 'tformer translate'"
        )
    return str(directory)


def run(args) -> None:
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
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    checkpoint = check_is_language_model(args.checkpoint)
    device = pick_device(args.device)
    quantize = None if args.quantize == "none" else args.quantize
    model, tokenizer, path = load_for_decoding(checkpoint, device, args.dtype, quantize)
    if path.kernels is not None:  # where torch's matmul overtakes them: measured once a CPU
        rows = len(prompts) * args.num_samples
        calibrate_kernel_rows(model, rows, cached=True, heads=("lm_head",))
    # Never draw an id the tokenizer cannot decode (the embedding table may be larger).
    config = replace(config, eos_id=tokenizer.eos_id, vocab_limit=tokenizer.vocab_size)
    ids = [encode_prompt(tokenizer, prompt) for prompt in prompts]
    if not args.json:
        print(f"decoding: {path.describe()}", file=sys.stderr)
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
            "finish_reason": stream.finish_reason,
            "prompt_truncated": stream.prompt_truncated,
            "seconds": round(seconds, 3),
            "tokens_per_second": round(stream.new_tokens / seconds, 2) if seconds > 0 else None,
            "path": path.to_dict(),
        }
    )


def run_batch(args, model, tokenizer, prompts, ids, config, path) -> None:
    """Every prompt's samples in one left-padded batch; stop strings cut the results as
    they cut a stream: new_tokens counts the tokens kept, up to the one that completes the
    stop string."""
    start = time.perf_counter()
    outputs = continue_prompts(model, ids, config, args.num_samples)
    seconds = time.perf_counter() - start
    results = []
    for row, output in enumerate(outputs):
        index, sample = divmod(row, args.num_samples)
        text = StreamedText(tokenizer, output.ids, args.stop)
        completion = "".join(text)
        results.append(
            {
                "prompt_index": index,
                "sample": sample,
                "prompt": prompts[index],
                "completion": completion,
                "new_tokens": text.new_tokens,
                "finish_reason": STOP if text.stopped else output.finish_reason,
                "prompt_truncated": output.prompt_truncated,
            }
        )
    total = sum(r["new_tokens"] for r in results)
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
