"""`tformer info`: a preset's or a checkpoint's configuration and size."""

from pathlib import Path

import torch

from tformer.checkpoints import resolve_checkpoint
from tformer.checkpoints.gguf import is_gguf
from tformer.cli.common import print_json
from tformer.models.gpt2 import GPT2, PRESETS, GPT2Config
from tformer.models.gpt2_gguf import read_gpt2_gguf_config
from tformer.models.gpt2_layout import load_config


def add_parser(sub) -> None:
    p = sub.add_parser(
        "info",
        help="show a model's configuration and parameter count",
        description="Show the configuration and parameter count of a GPT-2 preset "
        f"({', '.join(PRESETS)}), a checkpoint directory or a GPT-2 GGUF file.",
    )
    p.add_argument("source", help="a preset name or a checkpoint directory")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(run=run)


def describe(source: str) -> dict:
    if source in PRESETS and not Path(source).exists():
        config = GPT2Config.from_preset(source)
    elif is_gguf(Path(source).expanduser()):
        config = read_gpt2_gguf_config(Path(source).expanduser())
    else:
        config = load_config(resolve_checkpoint(source))
    with torch.device("meta"):
        n = GPT2(config).num_parameters()
    return {
        "source": source,
        "config": config.to_dict(),
        "parameters": n,
        "megabytes_float32": round(n * 4 / 2**20, 1),
        "megabytes_bfloat16": round(n * 2 / 2**20, 1),
    }


def run(args) -> None:
    d = describe(args.source)
    if args.json:
        print_json(d)
        return
    mb32, mb16 = d["megabytes_float32"], d["megabytes_bfloat16"]
    print(f"{d['source']}: {d['parameters']:,} parameters")
    print(f"  {mb32:,} MB in float32, {mb16:,} MB in bfloat16")
    for key, value in d["config"].items():
        print(f"  {key:<16} {value}")
