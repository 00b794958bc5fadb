"""`tformer serve` on a translation model and on a question-answering reader: POST
/v1/translations and /v1/answers against tformer's own translate_sentences and reader."""

import asyncio
import json
import threading

import httpx
import pytest
import torch

from tformer.cli.main import main
from tformer.generate.beam import BeamConfig
from tformer.generate.fast import pack_for_decoding
from tformer.generate.translate import translate_sentences
from tformer.models.load import load_translation_model
from tformer.qa.read import answer, answer_from_corpus, load_reader, vocab_size
from tformer.qa.retrieval import PassageIndex
from tformer.qa.windows import QAExample
from tformer.serve import applications
from tformer.serve.app import LOADERS
from tformer.serve.errors import APIError
from tformer.serve.protocol import TranslationRequest
from tformer.serve.service import ServeConfig, Service
from tformer.tokenizers import tokenizer_for_model

SENTENCES = ["one two three", "four", "five six seven eight nine", "zero zero"]
CONTEXT = "Moses went up the mountain of Sinai with Aaron, and they stayed there forty days."


# -- checkpoints and servers -------------------------------------------------------------


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-texts")
    (root / "animals.txt").write_text("The cat sat on the mat.\n\nDogs bark at night.\n")
    (root / "exodus.txt").write_text("Moses went up the mountain of Sinai with Aaron.\n")
    return root


@pytest.fixture(scope="module")
def corpus_server(reader, texts, serve_session, tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:  # the index's cache, private to the test
        patch.setenv("TFORMER_CACHE", str(tmp_path_factory.mktemp("cache")))
        with serve_session(reader, "--corpus", str(texts)) as server:
            yield server


def post(server, route: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}{route}", json=body, timeout=60)


def translate(server, **body) -> httpx.Response:
    return post(server, "/v1/translations", {"model": "translator", **body})


def ask(server, **body) -> httpx.Response:
    return post(server, "/v1/answers", {"model": "reader", **body})


# -- /v1/translations --------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference_translator(translator):
    model, tokenizer = load_translation_model(translator, torch.device("cpu"))
    model.set_attention("sdpa")
    return model, tokenizer


def test_translations_of_a_list_equal_translate_sentences(translation_server, reference_translator):
    model, tokenizer = reference_translator
    response = translate(translation_server, input=SENTENCES, beam_size=3, max_tokens=10)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "translation" and body["id"].startswith("trans-")
    assert body["model"] == "translator"
    expected = translate_sentences(
        model, tokenizer, SENTENCES, BeamConfig(beam_size=3, max_new_tokens=10), 32, 10
    )
    assert [d["index"] for d in body["data"]] == list(range(len(SENTENCES)))
    assert [d["translation"] for d in body["data"]] == [t.text for t in expected]
    assert [d["finish_reason"] for d in body["data"]] == [t.finish_reason for t in expected]
    assert not any(d["source_truncated"] for d in body["data"])
    usage = body["usage"]
    assert usage["prompt_tokens"] == sum(len(s) + 1 for s in SENTENCES)  # a character a token
    assert usage["completion_tokens"] == sum(len(t.text) for t in expected)
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    one = translate(translation_server, input=SENTENCES[2], beam_size=3, max_tokens=10).json()
    assert [d["translation"] for d in one["data"]] == [expected[2].text]


def test_int8_weights_translate_as_the_same_model_packed_in_process(translator, serve_session):
    # the CPU's int8 kernels on both sides (on a GPU, packed weights compute in bf16)
    with serve_session(translator, "--quantize", "int8", "--device", "cpu") as server:
        response = translate(server, input=SENTENCES, beam_size=2, max_tokens=10)
    assert response.status_code == 200, response.text
    model, tokenizer = load_translation_model(translator, torch.device("cpu"))
    model.set_attention("sdpa")
    assert pack_for_decoding(model, "int8").weights == "int8"
    expected = translate_sentences(
        model, tokenizer, SENTENCES, BeamConfig(beam_size=2, max_new_tokens=10), 32, 10
    )
    assert [d["translation"] for d in response.json()["data"]] == [t.text for t in expected]


def test_beam_size_one_is_the_cli_s_greedy_search(translation_server, translator, tmp_path, capsys):
    lines = tmp_path / "in.txt"
    lines.write_text("\n".join(SENTENCES) + "\n")
    main(["translate", str(translator), "--input", str(lines), "--greedy", "--max-new-tokens",
          "12", "--device", "cpu", "--json"])  # fmt: skip
    cli = json.loads(capsys.readouterr().out)
    body = translate(translation_server, input=SENTENCES, beam_size=1, max_tokens=12).json()
    assert [d["translation"] for d in body["data"]] == cli["translations"]
    assert [d["finish_reason"] for d in body["data"]] == cli["finish_reason"]


def test_a_long_source_is_reported_truncated_and_no_warning_leaks(translation_server):
    long = " ".join(["seven"] * 20)  # 119 characters, the window holds 32
    body = translate(translation_server, input=[long, "one"], beam_size=1, max_tokens=4).json()
    assert [d["source_truncated"] for d in body["data"]] == [True, False]
    assert body["usage"]["prompt_tokens"] == 32 + 4  # what the encoder read, end tokens too
    log = translation_server.log.read_text()
    assert "Warning" not in log and "warning" not in log, log


@pytest.mark.parametrize(
    "given, message",
    [
        ([], "empty list"),
        ("", "input is empty"),
        (["one", "  "], "input[1] is empty"),
        (["one", "ONE"], "input[1]: characters not in this tokenizer's vocabulary"),
    ],
)
def test_bad_input_is_a_400_naming_input(translation_server, given, message):
    response = translate(translation_server, input=given)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "input" and message in error["message"], error


def test_text_that_is_not_utf8_is_a_400(translation_server):
    body = b'{"model": "translator", "input": ["one", "tw\\ud800o"]}'  # a lone surrogate
    response = httpx.post(f"{translation_server.url}/v1/translations", content=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "input" and "not UTF-8" in error["message"]


def test_another_model_name_is_a_404(translation_server):
    response = post(translation_server, "/v1/translations", {"model": "gpt-4", "input": "one"})
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"


def test_a_language_model_server_has_no_translations(lm_server):
    response = post(lm_server, "/v1/translations", {"model": "tiny", "input": "one"})
    assert response.status_code == 404
    assert "/v1/completions" in response.json()["error"]["message"]


def test_requests_past_the_queue_limit_get_429_with_retry_after(translator):
    service = Service(ServeConfig(str(translator), max_queue=0, device=torch.device("cpu")))
    service.load(LOADERS)
    assert service.load_error is None, service.load_error
    gate = threading.Event()
    service.worker.submit(gate.wait)  # the worker is busy until the gate opens
    req = TranslationRequest(model="translator", input="one", beam_size=1, max_tokens=4)

    async def two_requests():
        first = asyncio.create_task(applications.translations(service, req))
        await asyncio.sleep(0.05)  # the first is handed to the worker and waits there
        with pytest.raises(APIError) as refused:
            await applications.translations(service, req)
        gate.set()
        return refused.value, await first

    try:
        refused, first = asyncio.run(two_requests())
    finally:
        gate.set()
        service.close()
    assert refused.status == 429 and refused.headers == {"Retry-After": "1"}
    assert len(first["data"]) == 1


# -- /v1/answers -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference_reader(reader):
    model = load_reader(reader, "cpu", attention="sdpa", head_required=True)
    return model, tokenizer_for_model(reader, vocab_size(model))


def test_an_answer_from_a_context_is_the_reader_s_span_of_it(reader_server, reference_reader):
    question = "Who went up the mountain?"
    response = ask(reader_server, question=question, context=CONTEXT, max_answer_tokens=5)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "answer" and body["id"].startswith("ans-")
    assert body["model"] == "reader" and body["question"] == question
    (got,) = body["answers"]  # a context is one passage: one answer
    assert got["answer"] and got["answer"] in CONTEXT
    assert got["passage"] == CONTEXT and got["location"] is None and got["bm25"] is None
    model, tokenizer = reference_reader
    max_len = model.config.max_len
    example = QAExample("q", question, CONTEXT)
    (expected,) = answer(model, tokenizer, [example], max_len, max_len // 4, 5)
    assert got["answer"] == expected.text
    assert got["score"] == pytest.approx(expected.score, abs=1e-5)


def test_without_a_context_or_a_corpus_the_400_names_context(reader_server):
    response = ask(reader_server, question="Who went up the mountain?")
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "context" and "--corpus" in error["message"]


@pytest.mark.parametrize(
    "body, param",
    [
        ({"question": "Who?", "context": "  "}, "context"),
        ({"question": "mountain " * 200, "context": CONTEXT}, "question"),
        ({"question": " ", "context": CONTEXT}, "question"),
    ],
)
def test_bad_questions_and_contexts_are_400s_naming_them(reader_server, body, param):
    response = ask(reader_server, **body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_answers_from_the_corpus_equal_answer_from_corpus(
    corpus_server, reference_reader, texts, tmp_path, monkeypatch
):
    question = "Who went up the mountain?"
    body = ask(corpus_server, question=question, top_answers=1, max_answer_tokens=8).json()
    (got,) = body["answers"]
    assert got["location"] == "exodus.txt, lines 1-1"  # the one passage sharing a word
    assert got["answer"] in got["passage"] and got["bm25"] > 0
    monkeypatch.setenv("TFORMER_CACHE", str(tmp_path / "cache"))
    index, _ = PassageIndex.for_corpus(str(texts))
    model, tokenizer = reference_reader
    max_len = model.config.max_len
    (expected,) = answer_from_corpus(model, tokenizer, index, question, max_len, max_len // 4, 5, 8)
    assert got["answer"] == expected.text and got["passage"] == expected.passage.text
    assert got["score"] == pytest.approx(expected.score, abs=1e-5)
    assert got["bm25"] == pytest.approx(expected.retrieval_score, abs=1e-5)
    nothing = ask(corpus_server, question="zebra?")
    assert nothing.status_code == 400 and nothing.json()["error"]["param"] == "question"
