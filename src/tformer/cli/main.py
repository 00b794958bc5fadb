"""`tformer COMMAND ...`: parse, call the library, print."""

import argparse
import gc
import os
import sys

from tformer import __version__
from tformer.cli import (
    answer,
    attention,
    data,
    demo,
    evaluate,
    generate,
    info,
    init,
    inspect,
    lab,
    plot,
    tokenize,
    train,
    translate,
)

COMMANDS = [
    demo,
    train,
    evaluate,
    generate,
    translate,
    answer,
    data,
    plot,
    lab,
    inspect,
    attention,
    info,
    init,
    tokenize,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tformer",
        description="The Transformer from first principles: GPT-2 models, checkpoint-compatible "
        "with Hugging Face transformers.",
        epilog="Run 'tformer COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"tformer {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, OSError, RuntimeError, ArithmeticError) as e:
        # Errors at the boundary (bad checkpoint, bad option, a missing or unreadable file)
        # are the user's to fix: say what is wrong without a stack trace, unless asked.
        if os.environ.get("TFORMER_DEBUG"):
            raise
        print(f"tformer {args.command}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


def entry() -> None:
    """The `tformer` program: main(), then the interpreter's exit without its last sweep.

    At exit Python's garbage collector walks every live object (~200,000 once torch and
    matplotlib are loaded): most of the time a process takes to end (docs/LOG.md). Every
    file is written and closed by then, so the objects are frozen (left out of that walk)
    instead; they are freed with the process all the same.
    """
    try:
        main()
    finally:  # an error's exit (sys.exit) ends the process just the same
        gc.freeze()
