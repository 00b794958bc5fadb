"""What narrower weights cost a trained model: tformer's validation loss at float32,
bfloat16, int8, int4 and w4a8, and the same model's perplexity in llama.cpp at f32, bf16,
q8_0 and q4_0, on the same text.

A run directory (a GPT-2 with GELU's tanh form, widths a multiple of 32, any of tformer's
tokenizers) is scored on its corpus's validation split (the last 10%, as training split
it) two ways, for each precision:

  tformer loss     `tformer eval`'s: every window of --context tokens, each position
                   scored (packed for decoding as float32, bfloat16, int8, int4, w4a8;
                   and the plain float32 model as the reference)
  chunk perplexity llama-perplexity's way of scoring, computed by tformer: the tokens cut
                   into chunks of --context, the second half of each chunk scored
  llama.cpp        llama-perplexity on `tformer export gguf` of the run (f32, bf16, q8_0,
                   q4_0), the validation text in a file, the same chunks

so that the last two columns compare like with like: they differ by the engines' rounding
and by the quantisation formats (tformer's int8 has one scale per row, q8_0 one per 32
weights; int4 and q4_0 are the same format, and w4a8 also rounds the activations to
8 bits per 32 as llama.cpp does when it multiplies q4_0).

    python benchmarks/quantization.py RUN_DIR [--data shakespeare] [--context 128] [--json]
"""

import argparse
import json
import math
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine_line  # noqa: E402
from llamacpp import CACHE, LLAMA_CPP, TYPES, exported, llama_programs  # noqa: E402

from tformer.data.sources import load_corpus  # noqa: E402
from tformer.data.tokens import LMBatches, tokenize_cached  # noqa: E402
from tformer.generate.fast import pack_for_decoding  # noqa: E402
from tformer.models.load import load_gpt2_with_tokenizer  # noqa: E402
from tformer.train import evaluate  # noqa: E402


def chunk_perplexity(model, tokens: list[int], context: int) -> float:
    """llama-perplexity's score: non-overlapping chunks of `context` tokens, each scored on
    its second half (positions context/2 .. context-2 predicting the next token)."""
    first, nll, count = context // 2, 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(tokens) - context + 1, context):
            ids = torch.tensor([tokens[start : start + context]])
            logits = model(ids)[0, first:-1].double()
            targets = ids[0, first + 1 :]
            nll += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
            count += len(targets)
    return math.exp(nll / count)


def llama_perplexity(binary: Path, model: Path, text: Path, context: int, threads: int) -> float:
    command = [str(binary), "-m", str(model), "-f", str(text), "-c", str(context),
               "-b", str(context), "-t", str(threads)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True)
    found = re.search(r"Final estimate: PPL = ([0-9.]+)", done.stdout + done.stderr)
    if done.returncode != 0 or found is None:
        sys.exit(f"llama-perplexity failed on {model}:\n{(done.stdout + done.stderr)[-2000:]}")
    return float(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--data", default="shakespeare")
    parser.add_argument("--context", type=int, help="default: the model's max_len")
    parser.add_argument("--llama-build", type=Path, default=CACHE / "llama.cpp-build")
    parser.add_argument("--llama-cpp", type=Path, default=LLAMA_CPP)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    bin_dir = llama_programs(args.llama_cpp, args.llama_build, ("llama-perplexity",))
    print(machine_line(), file=sys.stderr)
    cpu = torch.device("cpu")
    model, tokenizer = load_gpt2_with_tokenizer(str(args.run), cpu, torch.float32)
    context = args.context or model.config.max_len
    text = load_corpus(args.data).val
    array = tokenize_cached(text, tokenizer)
    tokens = array.tolist()
    data = LMBatches(array, context, "val")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        text_file = Path(tmp) / "val.txt"
        text_file.write_text(text, encoding="utf-8")
        packings = [(t, p) for t, packing in TYPES.items() for p in packing]
        scored = {}  # llama.cpp's perplexity of each type's file
        for type_name, weights in [(None, None), *packings]:
            model, _ = load_gpt2_with_tokenizer(str(args.run), cpu, torch.float32)
            if weights is not None:
                pack_for_decoding(model, weights)
            loss = evaluate(model, data, 16)["loss"]
            ours = chunk_perplexity(model, tokens, context)
            theirs = None
            if type_name is not None and type_name not in scored:  # once a file
                gguf = exported(args.run, type_name)
                scored[type_name] = llama_perplexity(bin_dir / "llama-perplexity", gguf,
                                                     text_file, context, args.threads)  # fmt: skip
            if type_name is not None:
                theirs = scored[type_name]
            row = {"llama_type": type_name, "tformer": weights or "float32 (not packed)",
                   "loss": loss, "chunk_perplexity": ours, "llama_perplexity": theirs}  # fmt: skip
            rows.append(row)
            print(
                f"{row['tformer']:>20} / {type_name or '-':>5}: loss {loss:.4f} | chunk "
                f"perplexity {ours:.4f} | llama.cpp {theirs if theirs else float('nan'):.4f}",
                file=sys.stderr,
            )
    if args.json:
        print(json.dumps({"machine": machine_line(), "run": str(args.run), "rows": rows}))


if __name__ == "__main__":
    main()
