"""tformer's own endpoints: POST /v1/translations and POST /v1/answers.

A server runs one checkpoint. A translation model (`tformer train --task translation`)
answers /v1/translations; a question-answering reader (`tformer train --task qa`)
answers /v1/answers. Either runs on the service's one worker thread, a request at a time:
the model is touched by that thread only. With more than --max-queue requests waiting for
it, a request gets 429 with Retry-After.

POST /v1/translations: what `tformer translate` does, for one text or a list of them.

    {"model": "my-run", "input": ["one two", "three"],        a text, or a list of texts
     "beam_size": 4,          1..16; 1 is greedy search (as `tformer translate --greedy`)
     "length_penalty": 1.0,   alpha in score = log p / length^alpha (beam search only)
     "max_tokens": 128}       the longest translation, in tokens (also capped by the window)
    ->
    {"id": "trans-...", "object": "translation", "created": 1700000000, "model": "my-run",
     "data": [{"index": 0, "translation": "un deux", "finish_reason": "stop",
               "source_truncated": false}, ...],
     "usage": {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}}

One entry in data per input, in the order given. finish_reason is "stop" (the translation
ended with its end token), "length" (cut at max_tokens) or "context" (it filled the
model's window); source_truncated says the source was longer than the window and only its
beginning was read. prompt_tokens counts the source tokens the encoder read (with each
source's end token), completion_tokens the tokens of the translations. An empty input, an
empty text, or one the tokenizer cannot encode is a 400 naming `input`.

POST /v1/answers: what `tformer answer` does, from a context or from the server's corpus.

    {"model": "my-reader", "question": "Who went up the mountain?",
     "context": "Moses went up the mountain of Sinai.",   optional: else the --corpus
     "top_passages": 5,        passages BM25 picks from the corpus for the reader to read
     "top_answers": 3,         answers returned, best first
     "max_answer_tokens": 30}  the longest answer, in tokens
    ->
    {"id": "ans-...", "object": "answer", "created": 1700000000, "model": "my-reader",
     "question": "Who went up the mountain?",
     "answers": [{"answer": "Moses", "score": 7.1, "passage": "Moses went up ...",
                  "location": "exodus.txt, lines 1-1", "bm25": 1.3}, ...]}

score is the reader's span score s_i + e_j; bm25 the passage's retrieval score. With a
context the reader reads that text alone (in overlapping windows when it is longer than
the model's), and there is one answer: the best span, its passage the context, location
and bm25 null. Without one it reads the top_passages passages of the server's --corpus
that share the most (rare) words with the question and gives up to top_answers answers,
one a passage; a server started without --corpus then answers 400 naming `context`. A
question too long for the model's window, or one with no word to search for, or sharing
none with the corpus, is a 400 naming `question`.
"""

import asyncio
import sys
import time
import uuid
import warnings
from collections.abc import Callable
from typing import TypeVar

import torch

from tformer.errors import ConfigError
from tformer.generate.beam import BeamConfig
from tformer.generate.fast import pack_for_decoding
from tformer.generate.text import check_unicode
from tformer.generate.translate import Translation, translate_sentences
from tformer.models.load import load_translation_model
from tformer.qa.read import answer, answer_from_corpus, load_reader, vocab_size
from tformer.qa.retrieval import PassageIndex
from tformer.qa.windows import QAExample
from tformer.serve.errors import busy, invalid
from tformer.serve.protocol import AnswerRequest, TranslationRequest
from tformer.serve.service import Service
from tformer.tokenizers import tokenizer_for_model

# A translation batch as `tformer translate` makes them: sentences of one request are
# sorted by length and decoded this many at once.
TRANSLATION_BATCH = 32


# -- loading -----------------------------------------------------------------------------


def load_translation(service: Service, device: torch.device) -> None:
    model, tokenizer = load_translation_model(service.directory, device)
    model.set_attention("sdpa")  # the fused kernel decodes faster, whatever trained the model
    pack_weights(service, model, device)
    service.model, service.tokenizer = model, tokenizer
    service.context_length = model.config.max_len


def load_reader_service(service: Service, device: torch.device) -> None:
    """The reader and its tokenizer, and the --corpus's BM25 index (built and cached now,
    so the first question does not wait for it)."""
    model = load_reader(service.directory, device, attention="sdpa", head_required=True)
    pack_weights(service, model, device)
    service.model = model
    service.tokenizer = tokenizer_for_model(service.directory, vocab_size(model))
    service.context_length = model.config.max_len
    if service.config.corpus is not None:
        service.index, _ = PassageIndex.for_corpus(service.config.corpus)


def pack_weights(service: Service, model: torch.nn.Module, device: torch.device) -> None:
    """--dtype and --quantize for a translation model or a reader: on the CPU (or quantised)
    every linear layer packed, as for a language model (tformer.generate.fast); on a GPU
    these models run in float32, which a --dtype there is told."""
    config = service.config
    if device.type == "cpu" and config.dtype == "float16" and not config.quantize:
        raise ValueError("float16 is for GPUs; on the CPU use --dtype bfloat16 or float32")
    service.parameters = model.num_parameters()  # packed layers hold buffers, not parameters
    if device.type == "cpu" or config.quantize:
        path = pack_for_decoding(model, config.quantize or config.dtype)
        service.decoding = path.describe()
        print(f"tformer serve: weights: {service.decoding}", file=sys.stderr)
        return
    service.decoding = f"weights float32, on {device}"
    if config.dtype != "float32":
        print(
            f"tformer serve: --dtype {config.dtype} is for language models on a GPU; "
            "this model runs in float32",
            file=sys.stderr,
        )


# -- the worker thread -------------------------------------------------------------------

T = TypeVar("T")


async def on_worker(service: Service, work: Callable[[], T]) -> T:
    """work() on the service's worker thread, or a 429 when more than --max-queue requests
    are waiting for it already."""
    in_flight = service.worker_waiting  # on the event loop's thread only
    waiting = max(in_flight - 1, 0)  # one of them is running
    if in_flight > 0 and waiting >= service.config.max_queue:
        raise busy(f"{waiting} requests are waiting already")
    service.worker_waiting = in_flight + 1
    report_load(service)
    try:
        return await asyncio.get_running_loop().run_in_executor(service.worker, work)
    finally:
        service.worker_waiting -= 1
        report_load(service)


def report_load(service: Service) -> None:
    in_flight = service.worker_waiting  # on the event loop's thread only
    service.metrics.running.set(min(in_flight, 1))
    service.metrics.waiting.set(max(in_flight - 1, 0))


# -- /v1/translations --------------------------------------------------------------------


def translation_inputs(service: Service, given: str | list[str]) -> list[list[int]]:
    """The input texts' token ids, each text checked: not empty, UTF-8, encodable."""
    texts = [given] if isinstance(given, str) else given
    if not texts:
        raise invalid("input is an empty list: give a text or a list of texts", "input")
    names = ["input"] if isinstance(given, str) else [f"input[{i}]" for i in range(len(texts))]
    return [
        encode_text(service, name, text, "input") for name, text in zip(names, texts, strict=True)
    ]


def encode_text(service: Service, name: str, text: str, param: str) -> list[int]:
    """A request's text -> its ids, or a 400 naming `param` if it is empty, not UTF-8, or
    holds what the tokenizer cannot encode."""
    if not text.strip():
        raise invalid(f"{name} is empty", param)
    try:
        check_unicode(name, text)
    except ConfigError as e:
        raise invalid(str(e), param) from None
    try:
        return service.tokenizer.encode(text)
    except ValueError as e:  # a character tokenizer meets a character it does not know
        raise invalid(f"{name}: {e}", param) from None


async def translations(service: Service, req: TranslationRequest) -> dict:
    texts = [req.input] if isinstance(req.input, str) else list(req.input)
    sources = translation_inputs(service, req.input)
    beam = None  # beam_size 1: greedy search
    if req.beam_size > 1:
        beam = BeamConfig(
            beam_size=req.beam_size,
            length_penalty=req.length_penalty,
            max_new_tokens=req.max_tokens,
        )
    model, tokenizer = service.model, service.tokenizer

    def work() -> list[Translation]:
        # A source cut to fit the window is reported as source_truncated; the warning
        # translate_sentences gives for a command line stays here.
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")  # recorded, never raised, whatever the filters
            return translate_sentences(
                model, tokenizer, texts, beam, TRANSLATION_BATCH, req.max_tokens
            )

    created = int(time.time())
    done = await on_worker(service, work)
    window = service.context_length
    prompt_tokens = sum(min(len(ids), window - 1) + 1 for ids in sources)  # and the end token
    completion_tokens = sum(len(tokenizer.encode(t.text)) for t in done)
    service.metrics.prompt_tokens(prompt_tokens)
    service.metrics.generated(completion_tokens)
    return {
        "id": f"trans-{uuid.uuid4().hex}",
        "object": "translation",
        "created": created,
        "model": service.model_id,
        "data": [
            {
                "index": i,
                "translation": t.text,
                "finish_reason": t.finish_reason,
                "source_truncated": t.source_truncated,
            }
            for i, t in enumerate(done)
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


# -- /v1/answers -------------------------------------------------------------------------


def check_answer_request(service: Service, req: AnswerRequest, stride: int) -> None:
    """A context or a corpus to answer from; a question and context the tokenizer encodes,
    the question short enough to leave room for the context in the model's window."""
    if req.context is None and service.index is None:
        raise invalid(
            "give a context to answer from: this server was started without --corpus, so "
            "it has no text of its own to search",
            "context",
            "missing_field",
        )
    question = encode_text(service, "question", req.question, "question")
    if service.context_length - len(question) - 2 <= stride:  # make_windows' room
        raise invalid(
            f"the question takes {len(question)} tokens, which leaves too little of the "
            f"model's window ({service.context_length} tokens) for the context: shorten "
            "the question",
            "question",
        )
    if req.context is not None:
        encode_text(service, "context", req.context, "context")


async def answers(service: Service, req: AnswerRequest) -> dict:
    window = service.context_length
    stride = window // 4  # windows over a long text share a quarter of their tokens
    check_answer_request(service, req, stride)
    model, tokenizer, index = service.model, service.tokenizer, service.index

    def from_context() -> list[dict]:
        example = QAExample("context", req.question, req.context)
        (best,) = answer(model, tokenizer, [example], window, stride, req.max_answer_tokens)
        return [answer_entry(best.text, best.score, req.context, None, None)]

    def from_corpus() -> list[dict]:
        try:
            found = answer_from_corpus(
                model,
                tokenizer,
                index,
                req.question,
                window,
                stride,
                req.top_passages,
                req.max_answer_tokens,
            )
        except ValueError as e:  # no word to search for, or none the corpus holds
            raise invalid(str(e), "question") from None
        return [
            answer_entry(a.text, a.score, a.passage.text, a.passage.location, a.retrieval_score)
            for a in found
        ]

    created = int(time.time())
    found = await on_worker(service, from_context if req.context is not None else from_corpus)
    return {
        "id": f"ans-{uuid.uuid4().hex}",
        "object": "answer",
        "created": created,
        "model": service.model_id,
        "question": req.question,
        "answers": found[: req.top_answers],
    }


def answer_entry(
    text: str, score: float, passage: str, location: str | None, bm25: float | None
) -> dict:
    return {"answer": text, "score": score, "passage": passage, "location": location, "bm25": bm25}
