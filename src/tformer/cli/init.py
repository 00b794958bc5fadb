"""`tformer init`: a new, randomly initialised GPT-2, saved as a checkpoint.

DIR must be new or empty: --overwrite writes into a directory that holds other files
(replacing a checkpoint's files there: config.json, model.safetensors, the tokenizer's), but
never into a training run's directory.
"""

from tformer.cli.common import print_json
from tformer.files import WRITE_ERRORS, write_failure
from tformer.models.gpt2 import GPT2, PRESETS, GPT2Config
from tformer.recipes.run_dir import check_output_directory, output_directory
from tformer.tokenizers import GPT2Tokenizer


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
    p.add_argument("--n-layers", type=int, help="number of blocks")
    p.add_argument("--n-heads", type=int, help="attention heads per block")
    p.add_argument("--d-model", type=int, help="width of the residual stream")
    p.add_argument("--max-len", type=int, help="context window in tokens")
    p.add_argument("--d-ff", type=int, help="feed-forward width (default: 4 x d-model)")
    p.add_argument("--dropout", type=float, help="dropout probability (default: 0.1)")
    p.add_argument("--seed", type=int, default=0, help="initialisation seed (default: 0)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a directory that is not empty, replacing a checkpoint's files there "
        "(config.json, model.safetensors, tokenizer files); never a training run's directory",
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
    check_output_directory(out, "DIR", overwrite=args.overwrite)  # before any work
    model = GPT2(config, seed=args.seed)
    try:
        model.save_pretrained(out)
        GPT2Tokenizer().save(out)
    except WRITE_ERRORS as e:  # each file is written whole or not at all
        raise write_failure(out, e, "no file there is half-written") from None
    if args.json:
        print_json(
            {"out": args.out, "parameters": model.num_parameters(), "config": config.to_dict()}
        )
    else:
        print(
            f"wrote {args.out}: GPT-2 with {model.num_parameters():,} parameters (random weights)"
        )
