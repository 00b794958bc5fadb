"""`tformer train`: train a GPT on your text (or the built-in Shakespeare) and sample from it;
with --task translation, qa or sft, the other training tasks (tformer.recipes)."""

from dataclasses import fields

from tformer.cli import train_flags
from tformer.cli.common import print_json
from tformer.recipes import TrainSpec, train


def add_parser(sub) -> None:
    train_flags.add_parser(sub).set_defaults(run=run)


def spec_from(args) -> TrainSpec:
    """Every flag is one TrainSpec field; --json and --no-progress say how to report."""
    given = {f.name: getattr(args, f.name) for f in fields(TrainSpec) if hasattr(args, f.name)}
    return TrainSpec(**given, progress=not (args.no_progress or args.json), messages=not args.json)


def run(args) -> None:
    result = train(spec_from(args))
    if result is None:  # not the main process
        return
    if args.json:
        print_json(result)
        return
    PRINTERS[result["task"]](result)
    print(f"{result['seconds']} s in all; model {result['run_dir']}")


def print_validation(result: dict, what: str) -> None:
    scope = "whole validation set" if result["val_scope"] == "full" else "sampled batches"
    print(
        f"validation{what}: loss {result['val_loss']:.4f}, accuracy "
        f"{result['val_accuracy']:.3f}, perplexity {result['val_perplexity']:.2f} ({scope})"
    )


def print_lm(result: dict) -> None:
    print_validation(result, "")
    if result["tokens_per_second"] is not None:
        print(
            f"{result['tokens_per_second']:,.0f} tokens/s; loss curve {result['run_dir']}/loss.png"
        )
    if result["sample"]:
        print("sample:\n" + result["sample"])


def print_translation(result: dict) -> None:
    print_validation(result, "")
    for name in ("greedy", "beam4"):
        scores = result[f"test_{name}"]
        print(
            f"test ({result['test_pairs']:,} pairs), {name}: BLEU {scores['bleu']:.2f}, chrF "
            f"{scores['chrf']:.2f}"
        )
    for example in result["examples"]:
        print(
            f"  {example['source']}\n    -> {example['translation']}\n"
            f"    (reference: {example['reference']})"
        )


def print_qa(result: dict) -> None:
    print(
        f"validation loss {result['val_loss']}; {result['scored_on']}: exact match "
        f"{result['exact_match']:.2f}, F1 {result['f1']:.2f} over {result['questions']:,} "
        "questions"
    )
    for example in result["examples"]:
        print(f"  Q: {example['question']}\n  A: {example['answer']!r} (gold {example['gold']})")


def print_sft(result: dict) -> None:
    print_validation(result, " (response tokens)")
    for example in result["examples"]:
        print(
            f"  prompt: {example['prompt']!r}\n  response: {example['response']!r}\n"
            f"  reference: {example['reference']!r}"
        )


PRINTERS = {"lm": print_lm, "translation": print_translation, "qa": print_qa, "sft": print_sft}
