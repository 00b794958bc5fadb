"""`tformer tokenize`: show how a tokenizer splits text."""

import sys

from tformer.cli.common import print_json
from tformer.tokenizers import GPT2Tokenizer, load_tokenizer


def add_parser(sub) -> None:
    p = sub.add_parser(
        "tokenize",
        help="show the token ids and pieces of a text",
        description="Encode text (an argument, or standard input) and show ids and pieces.",
    )
    p.add_argument("text", nargs="?", help="text to encode (default: read standard input)")
    p.add_argument(
        "--tokenizer", default="gpt2", help="'gpt2' or a checkpoint directory (default: gpt2)"
    )
    p.add_argument(
        "--allow-special", action="store_true", help="turn '<|endoftext|>' in the text into its id"
    )
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(run=run)


def run(args) -> None:
    text = args.text if args.text is not None else sys.stdin.read()
    tokenizer = GPT2Tokenizer() if args.tokenizer == "gpt2" else load_tokenizer(args.tokenizer)
    ids = tokenizer.encode(text, allow_special=args.allow_special)
    pieces = [tokenizer.decode([i]) for i in ids]
    if args.json:
        print_json({"ids": ids, "pieces": pieces, "count": len(ids)})
        return
    print(f"{len(ids)} tokens")
    for i, piece in zip(ids, pieces, strict=True):
        print(f"{i:>7}  {piece!r}")
