"""`tformer init`: a new, randomly initialised GPT-2, saved as a checkpoint.

DIR must be new or empty. --overwrite replaces a checkpoint there whose every file is one
`init` writes (OWN_NAMES: an earlier `init`'s, or a GPT-2 checkpoint of the same files). A
directory holding any other file is refused, naming it, with or without --overwrite: a
user's file, a training run, or another tokenizer's file (tokenizer.json, ...), which
writing the GPT-2 tokenizer would remove.
"""

from pathlib import Path

from tformer.cli.common import number, print_json, seed
from tformer.errors import RunDirectoryError
from tformer.files import WRITE_ERRORS, is_write_error, write_failure
from tformer.models.gpt2 import GPT2, PRESETS, GPT2Config
from tformer.recipes.output_dir import existing_names
from tformer.recipes.run_dir import listing, output_directory
from tformer.tokenizers import GPT2Tokenizer

# What `init` writes (the model's files, GPT2Tokenizer.save's): all --overwrite may replace.
OWN_NAMES = (
    "config.json",
    "model.safetensors",
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
)
COUNT = dict(integer=True, low=1)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "init",
        help="create a randomly initialised GPT-2 checkpoint",
        description="Create a GPT-2 with the GPT-2 initialisation and save it in the Hugging "
        "Face layout (config.json, model.safetensors) with the GPT-2 tokenizer. Start from a "
        "preset and override any size.",
    )
    p.add_argument("out", help="directory to write")
    p.add_argument("--preset", default="gpt2", choices=list(PRESETS), help="(default: gpt2)")
    p.add_argument("--n-layers", type=number(**COUNT), help="number of blocks")
    p.add_argument("--n-heads", type=number(**COUNT), help="attention heads per block")
    p.add_argument("--d-model", type=number(**COUNT), help="width of the residual stream")
    p.add_argument("--max-len", type=number(**COUNT), help="context window in tokens")
    p.add_argument("--d-ff", type=number(**COUNT), help="feed-forward width (default: 4 x d-model)")
    p.add_argument(
        "--dropout",
        type=number(low=0.0, high=1.0, high_open=True),
        help="dropout probability (default: 0.1)",
    )
    p.add_argument("--seed", type=seed, default=0, help="initialisation seed (default: 0)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the checkpoint in DIR, if every file there is one init writes "
        "(config.json, model.safetensors, tokenizer files); any other file is refused",
    )
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(run=run)


def run(args) -> None:
    options = dict(
        n_layers=args.n_layers,
        n_heads=args.n_heads,
        d_model=args.d_model,
        max_len=args.max_len,
        d_ff=args.d_ff,
        dropout=args.dropout,
    )
    config = GPT2Config.from_preset(
        args.preset, **{k: v for k, v in options.items() if v is not None}
    )
    out = output_directory(args.out, "DIR")
    check_init_directory(out, args.overwrite)  # before any work
    model = GPT2(config, seed=args.seed)
    try:
        model.save_pretrained(out)
        GPT2Tokenizer().save(out)
    except WRITE_ERRORS as e:  # each file is written whole or not at all
        if not is_write_error(e):
            raise
        raise write_failure(out, e, "no file there is half-written") from None
    if args.json:
        print_json(
            {"out": args.out, "parameters": model.num_parameters(), "config": config.to_dict()}
        )
    else:
        print(
            f"wrote {args.out}: GPT-2 with {model.num_parameters():,} parameters (random weights)"
        )


def check_init_directory(out: Path, overwrite: bool) -> None:
    """Refuse a DIR that `init` may not write (see the module's docstring); writes nothing."""
    names = existing_names(out, "DIR")
    foreign = [name for name in names if name not in OWN_NAMES]
    if foreign:
        raise RunDirectoryError(
            f"{out} is not empty: it holds files `tformer init` does not write "
            f"({listing(foreign)}); pick an empty or new DIR (even --overwrite never "
            "replaces or removes them)"
        )
    if names and not overwrite:
        raise RunDirectoryError(
            f"{out} is not empty ({listing(names)}): pick an empty or new DIR, or add "
            "--overwrite to replace the checkpoint there"
        )
