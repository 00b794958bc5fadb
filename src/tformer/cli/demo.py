"""`tformer demo`: a short tour of what works so far, in a few seconds."""

import tempfile
import time

import torch

from tformer.cli.common import seed
from tformer.generate import SamplingConfig, stream_tokens
from tformer.models.gpt2 import GPT2, PRESETS, GPT2Config
from tformer.tokenizers import GPT2Tokenizer


def add_parser(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="a short tour: tokenizer, presets, save/load, parity, generation",
        description="Tokenize with GPT-2's BPE, count the presets' parameters, save a small "
        "random GPT-2 in the Hugging Face layout, load it back (and into transformers when "
        "installed), and stream a few generated tokens.",
    )
    p.add_argument("--seed", type=seed, default=0, help="(default: 0)")
    p.set_defaults(run=run)


def run(args) -> None:
    tokenizer = GPT2Tokenizer()
    text = "Hello world"
    print(f"1. GPT-2 BPE: {text!r} -> {tokenizer.encode(text)}")

    print("2. Presets (parameters, tied head counted once):")
    for name in PRESETS:
        with torch.device("meta"):
            print(f"   {name:<12} {GPT2(GPT2Config.from_preset(name)).num_parameters():>14,}")

    config = GPT2Config.from_preset("gpt2", n_layers=4, d_model=256, n_heads=4, max_len=256)
    model = GPT2(config, seed=args.seed).eval()
    ids = torch.tensor([tokenizer.encode("The Transformer is")])
    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory)
        reloaded = GPT2.from_pretrained(directory)
        with torch.no_grad():
            diff = (reloaded(ids) - model(ids)).abs().max().item()
        print(f"3. Saved a {model.num_parameters():,}-parameter GPT-2 (random weights) as")
        print(f"   config.json + model.safetensors; reloaded: max |logit difference| = {diff:.1e}")
        try:
            import transformers
        except ImportError:
            print("   (install transformers to check it loads there too)")
        else:
            transformers.utils.logging.disable_progress_bar()
            theirs = transformers.GPT2LMHeadModel.from_pretrained(directory).eval()
            with torch.no_grad():
                diff = (theirs(ids).logits - model(ids)).abs().max().item()
            print(f"   transformers.GPT2LMHeadModel loads it: max |logit difference| = {diff:.1e}")

    print("4. Generation with a KV cache (random weights, so the words are random too):")
    start, count = time.perf_counter(), 0
    print("   The Transformer is", end="", flush=True)
    sampling = SamplingConfig(max_new_tokens=20, seed=args.seed, top_k=50)
    for token in stream_tokens(model, ids, sampling):
        print(tokenizer.decode([token]), end="", flush=True)
        count += 1
    print(f"\n   {count} tokens in {time.perf_counter() - start:.2f} s")
