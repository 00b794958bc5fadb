"""`tformer answer`: answer a question from a whole corpus with a trained reader."""

import json
import sys
import time

from tformer.cli.common import number
from tformer.devices import pick_device
from tformer.qa.read import answer_from_corpus, load_reader, vocab_size
from tformer.qa.retrieval import BUILTIN_CORPORA, PassageIndex
from tformer.tokenizers import tokenizer_for_model


def add_parser(sub) -> None:
    p = sub.add_parser(
        "answer",
        help="answer a question from a corpus with a question-answering checkpoint",
        description="Find the passages of --corpus that share the most (rare) words with the "
        "question (a BM25 index, built once and cached), read the best of them with a reader "
        "trained by 'tformer train --task qa', and print the best answers with their score "
        "and where they were found.",
    )
    p.add_argument("checkpoint", help="a question-answering run or checkpoint directory")
    p.add_argument(
        "--corpus",
        required=True,
        help=f"a directory of .txt files, one text file, or {' or '.join(BUILTIN_CORPORA)}",
    )
    p.add_argument("--question", required=True, help="the question, in plain words")
    count = number(integer=True, low=1)
    p.add_argument("--top-passages", type=count, default=5, help="passages to read (default: 5)")
    p.add_argument("--top-answers", type=count, default=3, help="answers to show (default: 3)")
    p.add_argument(
        "--max-answer-tokens", type=count, default=30, help="the longest answer (default: 30)"
    )
    p.add_argument(
        "--stride",
        type=count,
        help="tokens shared by the windows over a long passage (default: a quarter of the "
        "model's window)",
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (default: auto)")
    p.add_argument("--json", action="store_true", help="print one JSON object with the results")
    p.set_defaults(run=run)


def run(args) -> None:
    device = pick_device(args.device)
    # inference: the fused attention path
    model = load_reader(args.checkpoint, device, attention="sdpa", head_required=True)
    tokenizer = tokenizer_for_model(args.checkpoint, vocab_size(model))
    started = time.perf_counter()
    index, build_seconds = PassageIndex.for_corpus(args.corpus)
    loaded = time.perf_counter()
    answers = answer_from_corpus(
        model,
        tokenizer,
        index,
        args.question,
        model.config.max_len,
        args.stride if args.stride is not None else model.config.max_len // 4,
        args.top_passages,
        args.max_answer_tokens,
    )[: args.top_answers]
    finished = time.perf_counter()
    result = {
        "question": args.question,
        "answers": [
            {
                "answer": a.text,
                "score": round(a.score, 3),
                "location": a.passage.location,
                "passage": a.passage.text,
                "bm25": round(a.retrieval_score, 3),
            }
            for a in answers
        ],
        "passages_indexed": len(index.passages),
        "index_seconds": round(build_seconds if build_seconds else loaded - started, 3),
        "index_built": build_seconds > 0,
        "answer_seconds": round(finished - loaded, 3),
    }
    if args.json:
        print(json.dumps(result))
        return
    how = "built" if build_seconds else "loaded"
    print(
        f"{len(index.passages):,} passages ({how} in {result['index_seconds']:.2f} s); "
        f"read {args.top_passages} in {result['answer_seconds']:.2f} s",
        file=sys.stderr,
    )
    for n, a in enumerate(result["answers"], 1):
        print(f"{n}. {a['answer']!r}  (score {a['score']:.2f}; {a['location']})")
        print(f"   {a['passage'][:300]}")
