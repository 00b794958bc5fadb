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
    export,
    generate,
    info,
    init,
    inspect,
    lab,
    plot,
    serve,
    tokenize,
    train,
    translate,
)
from tformer.cli.common import warnings_as_lines
from tformer.devices import keep_freed_memory
from tformer.errors import TrainingInterrupted

COMMANDS = [
    demo,
    train,
    evaluate,
    generate,
    translate,
    answer,
    serve,
    export,
    data,
    plot,
    lab,
    inspect,
    attention,
    info,
    init,
    tokenize,
]


class Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line: what is wrong and where to read more."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
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
        with warnings_as_lines(args.command):
            args.run(args)
    except (ValueError, OSError, RuntimeError, ArithmeticError, LookupError) as e:
        # Errors at the boundary (bad checkpoint, bad option, a missing or unreadable file)
        # are the user's to fix: say what is wrong without a stack trace, unless asked.
        if os.environ.get("TFORMER_DEBUG"):
            raise
        print(f"tformer {args.command}: error: {one_line(e)}", file=sys.stderr)
        sys.exit(2)
    except TrainingInterrupted as e:  # stopped at a signal after saving: how to go on
        if os.environ.get("RANK", "0") == "0":  # under torchrun, every process stops: say it once
            print(f"tformer {args.command}: {one_line(e)}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print(f"tformer {args.command}: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # a failure nobody foresaw: still one line, the traceback on request
        if os.environ.get("TFORMER_DEBUG"):
            raise
        print(
            f"tformer {args.command}: unexpected error: {type(e).__name__}: {one_line(e)} "
            "(run with TFORMER_DEBUG=1 for the traceback, and please report it)",
            file=sys.stderr,
        )
        sys.exit(1)


def one_line(error: BaseException) -> str:
    """An error's message on one line (an OSError's with its file: `str` of one names it)."""
    text = str(error) or type(error).__name__
    return " ".join(text.split())


def entry() -> None:
    """The `tformer` program: main(), then the interpreter's exit without its last sweep.

    Its C allocator keeps freed memory for reuse (tformer.devices.keep_freed_memory): a
    training step, a decoding step and a layer of a batch allocate and free the same
    buffers of a few MB each time, which glibc would otherwise map afresh, with page faults
    (~10% of translating short sentences, docs/LOG.md).

    At exit Python's garbage collector walks every live object (~200,000 once torch and
    matplotlib are loaded): most of the time a process takes to end (docs/LOG.md). Every
    file is written and closed by then, so the objects are frozen (left out of that walk)
    instead; they are freed with the process all the same.
    """
    keep_freed_memory()
    try:
        main()
    finally:  # an error's exit (sys.exit) ends the process just the same
        gc.freeze()
