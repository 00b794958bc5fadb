"""Translation decoding: tformer against CTranslate2 on the same weights, in one run.

A translation run (e.g. the README's best Bible model) is exported with `tformer export
marian` and converted by CTranslate2's own converter, so both engines hold the same
weights. Both then translate the run's test sentences, batches of --batch-size sorted by
length, with greedy search and beam search (4 beams, length penalty 1: a hypothesis'
log-probability over its length in both), taking turns for --repeats rounds (this host's
speed drifts by 10-20% over minutes; each engine's best time counts), at each precision:

    tformer      float32 (the model as trained), and its decoding packs (pack_for_decoding:
                 the linear layers as float32, bfloat16 or int8 panels for the C kernels,
                 which run up to the row counts calibrated on this CPU, as in translate;
                 and w8a8, int8 weights times activations quantised to int8 per row)
    CTranslate2  compute_type float32 and int8 (int8 weights, per row, and activations
                 quantised to int8 per row)

Each timing runs in a process of its own (the model loaded and one batch translated first,
untimed): two engines' thread pools in one process spin against each other on 2 cores.
It prints target tokens per second (the translations re-tokenised with the run's
tokenizer, the same count for both engines), BLEU and chrF (sacrebleu) of each, how many
translations equal tformer's float32 ones, and the ratios to CTranslate2 at float32 and at
each engine's fastest precision, with the CPU line.

    python benchmarks/translation_decoding.py RUN [--data bible-en-es] [--limit N] [--json]
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine_line  # noqa: E402

from tformer import kernels  # noqa: E402
from tformer.data.parallel import load_parallel  # noqa: E402
from tformer.devices import keep_freed_memory  # noqa: E402
from tformer.generate.beam import BeamConfig  # noqa: E402
from tformer.generate.fast import pack_for_decoding  # noqa: E402
from tformer.generate.translate import corpus_scores, translate  # noqa: E402
from tformer.models.load import load_translation_model  # noqa: E402
from tformer.nn.packed_linear import calibrate_kernel_rows  # noqa: E402

TFORMER = ("float32", "packed float32", "packed bfloat16", "packed int8", "packed w8a8")
CT2 = ("float32", "int8")


def tformer_engine(run: Path, setting: str, batch: int, beam: int):
    keep_freed_memory()  # as the `tformer` program does (cli/main.py)
    model, tokenizer = load_translation_model(run, torch.device("cpu"))
    if setting != "float32":
        pack_for_decoding(model, setting.split()[-1])
        if kernels.load() is not None:  # kernels or torch's matmul, by rows: as translate
            calibrate_kernel_rows(model, batch * beam, cached=True,
                                  heads=("fused_decoding.head",))  # fmt: skip

    def run_it(sources: list[str], beam: int, max_new_tokens: int) -> list[str]:
        # early_stopping: a sentence ends with its beam_size-th finished hypothesis, as in
        # CTranslate2 (patience 1): the same search, the same translations
        config = BeamConfig(beam_size=beam, max_new_tokens=max_new_tokens, early_stopping=True)
        return translate(model, tokenizer, sources, config if beam > 1 else None,
                         batch, max_new_tokens)  # fmt: skip

    return run_it


def ct2_engine(marian: Path, converted: Path, compute_type: str, threads: int, batch: int):
    import ctranslate2
    import transformers

    translator = ctranslate2.Translator(str(converted), device="cpu", compute_type=compute_type,
                                        intra_threads=threads, inter_threads=1)  # fmt: skip
    tokenizer = transformers.AutoTokenizer.from_pretrained(marian)

    def run_it(sources: list[str], beam: int, max_new_tokens: int) -> list[str]:
        tokens = [tokenizer.convert_ids_to_tokens(tokenizer(s).input_ids) for s in sources]
        results = translator.translate_batch(
            tokens, beam_size=beam, length_penalty=1.0, max_batch_size=batch,
            batch_type="examples", max_decoding_length=max_new_tokens,
        )  # fmt: skip
        return [
            tokenizer.decode(
                tokenizer.convert_tokens_to_ids(r.hypotheses[0]), skip_special_tokens=True
            )  # fmt: skip
            for r in results
        ]

    return run_it


def engine(spec: dict):
    """The translate function of one engine at one precision (in the child process)."""
    if spec["engine"] == "tformer":
        return tformer_engine(Path(spec["run"]), spec["precision"], spec["batch"], spec["beam"])
    return ct2_engine(Path(spec["marian"]), Path(spec["ct2"]), spec["precision"],
                      spec["threads"], spec["batch"])  # fmt: skip


def child(spec_file: Path) -> None:
    """Time one engine on the sentences, after an untimed first batch; print JSON."""
    spec = json.loads(spec_file.read_text())
    torch.set_num_threads(spec["threads"])
    run_it = engine(spec)
    run_it(spec["sources"][: spec["batch"]], spec["beam"], spec["max_new_tokens"])  # warm
    start = time.perf_counter()
    outputs = run_it(spec["sources"], spec["beam"], spec["max_new_tokens"])
    print(json.dumps({"seconds": time.perf_counter() - start, "outputs": outputs}))


def timed(spec: dict, work: Path) -> dict:
    path = work / "spec.json"
    path.write_text(json.dumps(spec))
    result = subprocess.run([sys.executable, __file__, "--child", str(path)],
                            capture_output=True, text=True)  # fmt: skip
    if result.returncode != 0:
        raise SystemExit(f"{spec['engine']} {spec['precision']} failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child(Path(sys.argv[2]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a translation run or checkpoint directory")
    parser.add_argument("--data", default="bible-en-es", help="whose test sentences")
    parser.add_argument("--limit", type=int, help="only the first N test sentences")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2, help="rounds (default: 2)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    threads = torch.get_num_threads()
    machine = machine_line()
    print(machine, file=sys.stderr)

    corpus = load_parallel(args.data)
    pairs = corpus.test[: args.limit] if args.limit else corpus.test
    sources, references = [s for s, _ in pairs], [t for _, t in pairs]
    model, tokenizer = load_translation_model(args.run, torch.device("cpu"))
    work = Path(tempfile.mkdtemp(prefix="tformer-ct2-"))
    model.save_pretrained(work / "marian", format="marian", tokenizer=tokenizer)
    from ctranslate2.converters import TransformersConverter

    TransformersConverter(str(work / "marian")).convert(str(work / "ct2"))
    del model
    keys = [("tformer", s) for s in TFORMER] + [("ctranslate2", s) for s in CT2]
    base = {"run": str(args.run), "marian": str(work / "marian"), "ct2": str(work / "ct2"),
            "threads": threads, "batch": args.batch_size, "sources": sources,
            "max_new_tokens": args.max_new_tokens}  # fmt: skip
    rows = []
    for beam in (1, 4):
        best = {key: float("inf") for key in keys}
        outputs = {}
        for round_ in range(args.repeats):
            for key in keys if round_ % 2 == 0 else list(reversed(keys)):
                # the engines take turns, the order reversed each round
                spec = {**base, "engine": key[0], "precision": key[1], "beam": beam}
                result = timed(spec, work)
                outputs[key] = result["outputs"]
                best[key] = min(best[key], result["seconds"])
        reference = outputs[("tformer", "float32")]
        for key, seconds in best.items():
            tokens = sum(len(tokenizer.encode(t)) for t in outputs[key])
            scores = corpus_scores(outputs[key], references)
            same = sum(a == b for a, b in zip(outputs[key], reference, strict=True))
            rows.append({"engine": key[0], "precision": key[1], "beam": beam,
                         "seconds": seconds, "target_tokens_per_s": tokens / seconds,
                         "bleu": scores["bleu"], "chrf": scores["chrf"],
                         "same_as_tformer_float32": same})  # fmt: skip
            print(f"beam {beam} {key[0]:>11} {key[1]:<15} {tokens / seconds:8.0f} tok/s  "
                  f"BLEU {scores['bleu']:5.2f} chrF {scores['chrf']:5.2f}  "
                  f"{same}/{len(sources)} as tformer float32", file=sys.stderr)  # fmt: skip

    print(f"\n{machine}; {len(sources)} test sentences of {args.data}, batches of "
          f"{args.batch_size}\n", file=sys.stderr)  # fmt: skip
    print("| beam | engine | precision | target tokens/s | BLEU | chrF | same as tformer float32 |")
    print("|---|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['beam']} | {r['engine']} | {r['precision']} | "
              f"{r['target_tokens_per_s']:,.0f} | {r['bleu']:.2f} | {r['chrf']:.2f} | "
              f"{r['same_as_tformer_float32']}/{len(sources)} |")  # fmt: skip
    print()
    for beam in (1, 4):
        mine = {r["precision"]: r for r in rows if r["beam"] == beam and r["engine"] == "tformer"}
        theirs = {r["precision"]: r for r in rows if r["beam"] == beam
                  and r["engine"] == "ctranslate2"}  # fmt: skip
        fastest_mine = max(mine.values(), key=lambda r: r["target_tokens_per_s"])
        fastest_theirs = max(theirs.values(), key=lambda r: r["target_tokens_per_s"])
        f32 = max(mine["float32"]["target_tokens_per_s"],
                  mine["packed float32"]["target_tokens_per_s"])  # fmt: skip
        ratio = fastest_mine["target_tokens_per_s"] / fastest_theirs["target_tokens_per_s"]
        print(f"beam {beam}: float32 {f32 / theirs['float32']['target_tokens_per_s']:.2f}x "
              f"CTranslate2's; fastest ({fastest_mine['precision']} against "
              f"{fastest_theirs['precision']}) {ratio:.2f}x")  # fmt: skip
    if args.json:
        print(json.dumps({"machine": machine, "sentences": len(sources), "rows": rows}))


if __name__ == "__main__":
    main()
