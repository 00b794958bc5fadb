"""Streaming text: tformer's incremental TextStream against re-decoding everything per token.

The claim: turning a continuation's tokens into text to show, cut at stop strings, costs
time linear in its length. The model is not the point (a tiny model cannot write 100,000
tokens in a 64-token window anyway), so the text side is driven by pre-drawn GPT-2 ids of
a text with accented letters, CJK and emoji (byte-level BPE splits some of their bytes
between tokens), with two stop strings that never occur, so every token is streamed. The
peer is the algorithm tformer streamed with before (re-implemented here): after every
token, decode all tokens so far and search all of the text for the stop strings, which is
quadratic; it runs only up to --old-max tokens, so the run ends.

    python benchmarks/streaming.py [--tokens 1000 16000 100000] [--old-max 16000] [--json]
"""

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import machine_line  # noqa: E402

from tformer.generate.text import StreamedText, cut_at_stop  # noqa: E402
from tformer.tokenizers import GPT2Tokenizer, Tokenizer  # noqa: E402

STOPS = ["\n\nUser:", "###END"]
WORDS = "the of and to a in that is was he for it with as his on be at by café naïve 日本語 😀"


def drawn_ids(tokenizer: Tokenizer, n: int, seed: int = 0) -> list[int]:
    """n ids of random text made of WORDS, as a model might have drawn them."""
    rng = random.Random(seed)
    words, ids = WORDS.split(), []
    while len(ids) < n:
        line = " ".join(rng.choice(words) for _ in range(200)) + ".\n"
        ids += tokenizer.encode(line)
    return ids[:n]


def old_stream(tokenizer: Tokenizer, ids: list[int], stops: list[str]) -> str:
    """tformer's stream before: decode everything and search it all, after every token."""
    hold = max((len(s) for s in stops), default=1) - 1
    new_ids: list[int] = []
    shown, completion = 0, ""
    for token in ids:
        new_ids.append(token)
        completion, stopped = cut_at_stop(tokenizer.decode(new_ids), stops)
        if stopped:
            break
        ready = completion[: len(completion) - hold]
        if not ready.endswith("\ufffd") and len(ready) > shown:
            shown = len(ready)
    return completion


def new_stream(tokenizer: Tokenizer, ids: list[int], stops: list[str]) -> str:
    stream = StreamedText(tokenizer, iter(ids), stops)
    for _ in stream:
        pass
    return stream.completion


def seconds(run, tokenizer: Tokenizer, ids: list[int], repeats: int) -> tuple[float, str]:
    """The best of `repeats` runs (the others only lost time to the machine's other work)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        text = run(tokenizer, ids, STOPS)
        best = min(best, time.perf_counter() - start)
    return best, text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1000, 16000, 100000])
    parser.add_argument("--old-max", type=int, default=16000, help="the peer's longest run")
    parser.add_argument("--repeats", type=int, default=3, help="runs of the new stream")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    machine = machine_line()
    print(machine, file=sys.stderr)
    tokenizer = GPT2Tokenizer()
    results = []
    for n in args.tokens:
        ids = drawn_ids(tokenizer, n)
        new_s, new_text = seconds(new_stream, tokenizer, ids, args.repeats)
        row = {"tokens": n, "new_s": round(new_s, 4), "new_tokens_per_s": round(n / new_s)}
        if n <= args.old_max:
            old_s, old_text = seconds(old_stream, tokenizer, ids, 1)
            if old_text != new_text:
                sys.exit(f"{n} tokens: the two streams disagree")
            row.update(old_s=round(old_s, 3), old_tokens_per_s=round(n / old_s))
            row["ratio"] = round(old_s / new_s, 1)
        results.append(row)
        if not args.json:
            old = "old (not run)"
            if "ratio" in row:
                old = f"old {row['old_s']:8.3f} s ({row['old_tokens_per_s']:>6} tokens/s)"
                old += f"  ratio {row['ratio']:.1f}x"
            speed = f"{row['new_tokens_per_s']:>7} tokens/s"
            print(f"{n:>7} tokens  new {new_s:7.3f} s ({speed})  {old}", flush=True)
    if args.json:
        print(json.dumps({"machine": machine, "stops": STOPS, "results": results}))


if __name__ == "__main__":
    main()
