"""`tformer generate`: continue a prompt, streaming the text as it is produced."""

import sys
import time

import torch

from tformer.cli.common import add_device_options, load_model, print_json
from tformer.generate import SamplingConfig, stream_tokens


def add_parser(sub) -> None:
    p = sub.add_parser(
        "generate",
        aliases=["sample"],
        help="generate text from a checkpoint",
        description="Continue a prompt with a GPT-2 checkpoint (a directory in the Hugging Face "
        "layout). The prompt comes from --prompt, --prompt-file, or standard input.",
    )
    p.add_argument("checkpoint", help="checkpoint directory (or a Hub name, with network)")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--prompt", help="the prompt text")
    source.add_argument("--prompt-file", help="read the prompt from this file")
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
    p.add_argument("--seed", type=int, help="seed for reproducible sampling")
    add_device_options(p)
    p.add_argument("--json", action="store_true", help="print the result as JSON, no streaming")
    p.set_defaults(run=run)


def read_prompt(args) -> str:
    if args.prompt is not None:
        return args.prompt
    if args.prompt_file is not None:
        with open(args.prompt_file, encoding="utf-8") as f:
            return f.read()
    if sys.stdin.isatty():
        raise ValueError("no prompt: give --prompt TEXT, --prompt-file FILE, or pipe text in")
    return sys.stdin.read()


def run(args) -> None:
    prompt = read_prompt(args)
    model, tokenizer = load_model(args.checkpoint, args.device, args.dtype)
    ids = tokenizer.encode(prompt)
    if not ids:  # unconditional generation starts after an end-of-text, as GPT-2 was trained
        if tokenizer.eos_id is None:
            raise ValueError("the prompt is empty, and this tokenizer has no end-of-text token")
        ids = [tokenizer.eos_id]
    greedy = args.greedy or args.temperature == 0
    config = SamplingConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=1.0 if greedy else args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        do_sample=not greedy,
        seed=args.seed,
        eos_token_id=tokenizer.eos_id,
        repetition_penalty=args.repetition_penalty,
    )
    prompt_ids = torch.tensor([ids], device=model.token_embedding.weight.device)
    new_ids: list[int] = []
    shown = ""
    start = time.perf_counter()
    if not args.json:
        print(prompt, end="", flush=True)
    # Text that could still turn out to begin a stop string is held back until it cannot.
    hold = max((len(s) for s in args.stop), default=1) - 1
    completion = ""
    for token in stream_tokens(model, prompt_ids, config):
        new_ids.append(token)
        completion = tokenizer.decode(new_ids)
        cut = min((i for i in (completion.find(s) for s in args.stop) if i >= 0), default=-1)
        if cut >= 0:
            completion = completion[:cut]
            break
        # A character split across tokens decodes as U+FFFD until its last byte arrives.
        ready = completion[: len(completion) - hold]
        if not args.json and not ready.endswith("\ufffd") and len(ready) > len(shown):
            print(ready[len(shown) :], end="", flush=True)
            shown = ready
    seconds = time.perf_counter() - start
    if args.json:
        print_json(
            {
                "prompt": prompt,
                "completion": completion,
                "new_tokens": len(new_ids),
                "seconds": round(seconds, 3),
                "tokens_per_second": round(len(new_ids) / seconds, 2) if seconds > 0 else None,
            }
        )
    else:
        print(completion[len(shown) :])
