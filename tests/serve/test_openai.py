"""`tformer serve` through OpenAI's own Python client: completions and chat, streamed and
not, against tformer's generation as the reference."""

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

from tformer.cli.main import main
from tformer.devices import pick_device
from tformer.generate import SamplingConfig
from tformer.generate.decode import generate_ids
from tformer.generate.fast import load_for_decoding
from tformer.generate.text import cut_at_stop

PROMPTS = ["The quick brown fox", "Once upon a time", "def main():", "Hello, world", "1, 2, 3,"]


@pytest.fixture(scope="module")
def client(lm_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{lm_server.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def reference(tiny_lm):
    """The model as `tformer generate` loads it, and its tokenizer, on the device the
    server takes by default (`--device auto`: a seeded draw depends on the device's
    generator)."""
    model, tokenizer, _ = load_for_decoding(str(tiny_lm), pick_device("auto"), "float32", None)
    return model, tokenizer


def greedy_text(reference, prompt: str, tokens: int) -> str:
    model, tokenizer = reference
    config = SamplingConfig(max_new_tokens=tokens, do_sample=False, eos_id=tokenizer.eos_id)
    return tokenizer.decode(generate_ids(model, tokenizer.encode(prompt), config))


def complete(client, prompt, **options):
    return client.completions.create(model="tiny", prompt=prompt, **options)


def test_greedy_completion_equals_model_generate_and_the_cli(client, reference, tiny_lm, capsys):
    for prompt in PROMPTS:
        got = complete(client, prompt, max_tokens=24, temperature=0)
        assert got.choices[0].text == greedy_text(reference, prompt, 24)
        assert got.choices[0].finish_reason == "length"
        assert got.usage.completion_tokens == 24
        assert got.usage.prompt_tokens == len(reference[1].encode(prompt))
    main(["generate", str(tiny_lm), "--prompt", PROMPTS[0], "--greedy", "--max-new-tokens",
          "24", "--json"])  # fmt: skip
    cli = json.loads(capsys.readouterr().out)
    assert (
        complete(client, PROMPTS[0], max_tokens=24, temperature=0).choices[0].text
        == (cli["completion"])
    )


def test_null_fields_take_their_defaults(lm_server):
    body = {"model": "tiny", "prompt": "a", "max_tokens": None, "temperature": None,
            "stop": None, "n": None, "logprobs": None, "stream": None}  # fmt: skip
    r = httpx.post(f"{lm_server.url}/v1/completions", json=body)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 16


def test_prompts_as_token_ids_and_lists(client, reference):
    tokenizer = reference[1]
    ids = [tokenizer.encode(p) for p in PROMPTS[:3]]
    got = complete(client, ids, max_tokens=10, temperature=0)
    assert [c.text for c in got.choices] == [greedy_text(reference, p, 10) for p in PROMPTS[:3]]
    assert [c.index for c in got.choices] == [0, 1, 2]
    one = complete(client, ids[0], max_tokens=10, temperature=0)
    assert one.choices[0].text == got.choices[0].text
    texts = complete(client, PROMPTS[:2], max_tokens=10, temperature=0)
    assert [c.text for c in texts.choices] == [c.text for c in got.choices[:2]]


def test_streamed_pieces_join_to_the_whole_completion(client):
    whole = complete(client, PROMPTS[1], max_tokens=30, temperature=0)
    stream = complete(
        client, PROMPTS[1], max_tokens=30, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    pieces = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(pieces) == whole.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 30
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert all(c.usage is None for c in chunks[:-1])
    plain = list(complete(client, PROMPTS[1], max_tokens=5, temperature=0, stream=True))
    assert all(c.choices for c in plain)  # no usage chunk unless asked


def test_a_stop_string_spanning_tokens_ends_the_text_before_it(client, reference):
    tokenizer = reference[1]
    full = complete(client, PROMPTS[0], max_tokens=30, temperature=0).choices[0].text
    ids = tokenizer.encode(full)
    stop = tokenizer.decode(ids[4:7])  # three tokens' text
    expected, found = cut_at_stop(full, [stop])
    assert found
    got = complete(client, PROMPTS[0], max_tokens=30, temperature=0, stop=[stop, "\x00never"])
    assert got.choices[0].text == expected
    assert got.choices[0].finish_reason == "stop"
    pieces = [
        c.choices[0].text
        for c in complete(client, PROMPTS[0], max_tokens=30, temperature=0, stop=stop, stream=True)
    ]
    assert "".join(pieces) == expected and all(stop not in p for p in pieces)


def test_unicode_streams_whole_characters(unicode_lm, start_server):
    model, tokenizer, _ = load_for_decoding(str(unicode_lm), pick_device("auto"), "float32", None)
    prompt = "中文 🙂"
    with start_server(unicode_lm) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
        for seed in range(3):
            config = SamplingConfig(
                max_new_tokens=25, seed=seed, eos_id=tokenizer.eos_id,
                vocab_limit=tokenizer.vocab_size,
            )  # fmt: skip
            # the reference: the same draws decoded whole, outside the server
            reference = tokenizer.decode(generate_ids(model, tokenizer.encode(prompt), config))
            options = dict(model="run", prompt=prompt, max_tokens=25, seed=seed, temperature=1.0)
            whole = client.completions.create(**options).choices[0].text
            chunks = client.completions.create(**options, stream=True)
            pieces = [c.choices[0].text for c in chunks]
            assert whole == reference and "".join(pieces) == reference
            assert any(ord(ch) > 0x2000 for ch in reference)  # CJK or emoji came out
            shown = ""
            for piece in pieces:  # no piece ends inside a character: each is a prefix
                shown += piece
                assert reference.startswith(shown)


def test_n_choices_with_a_seed_are_reproducible_and_indexed(client):
    first = complete(client, PROMPTS[2], max_tokens=12, n=3, seed=7, temperature=1.0)
    again = complete(client, PROMPTS[2], max_tokens=12, n=3, seed=7, temperature=1.0)
    texts = [c.text for c in first.choices]
    assert texts == [c.text for c in again.choices]
    assert len(set(texts)) > 1  # each choice draws its own
    # choice j is what seed + j gives alone
    alone = complete(client, PROMPTS[2], max_tokens=12, seed=8, temperature=1.0)
    assert alone.choices[0].text == texts[1]
    streamed = {0: "", 1: "", 2: ""}
    for chunk in complete(
        client, PROMPTS[2], max_tokens=12, n=3, seed=7, temperature=1.0, stream=True
    ):
        streamed[chunk.choices[0].index] += chunk.choices[0].text
    assert [streamed[i] for i in range(3)] == texts


def test_logprobs_are_the_models(client, reference):
    model, tokenizer = reference
    got = complete(client, PROMPTS[3], max_tokens=6, temperature=0, logprobs=3)
    lp = got.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert "".join(lp.tokens) == got.choices[0].text
    ids = tokenizer.encode(PROMPTS[3])
    for k in range(6):
        with torch.no_grad():
            here = torch.tensor([ids], device=next(model.parameters()).device)
            logits = model(here)[0, -1, : tokenizer.vocab_size]
        logp = torch.log_softmax(logits.double(), -1)
        token = int(logp.argmax())
        assert lp.token_logprobs[k] == pytest.approx(float(logp[token]), abs=1e-4)
        assert max(lp.top_logprobs[k].values()) == pytest.approx(lp.token_logprobs[k], abs=1e-6)
        assert len(lp.top_logprobs[k]) == 3
        ids.append(token)
    echo = complete(client, PROMPTS[3], max_tokens=2, temperature=0, logprobs=1, echo=True)
    assert echo.choices[0].text.startswith(PROMPTS[3])
    assert echo.choices[0].logprobs.token_logprobs[0] is None
    assert len(echo.choices[0].logprobs.tokens) == len(tokenizer.encode(PROMPTS[3])) + 2


def test_concurrent_requests_give_what_each_gives_alone(client):
    options = [
        dict(prompt=p, max_tokens=20, temperature=t, seed=s)
        for p in PROMPTS
        for t, s in ((0, None), (0.8, 11))
    ]
    alone = [complete(client, **o).choices[0].text for o in options]
    with ThreadPoolExecutor(len(options)) as pool:
        together = list(pool.map(lambda o: complete(client, **o).choices[0].text, options))
    assert together == alone


def test_chat_uses_the_template_and_streams_role_then_content(client, reference, tiny_lm):
    messages = [{"role": "user", "content": "Say hi"}]
    got = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=10, temperature=0
    )
    # the default template: "user: Say hi\nassistant:"
    assert got.choices[0].message.content == greedy_text(reference, "user: Say hi\nassistant:", 10)
    assert got.choices[0].message.role == "assistant"
    chunks = list(
        client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=10, temperature=0, stream=True
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert content == got.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"
    lp = client.chat.completions.create(
        model="tiny", messages=messages, max_completion_tokens=4, temperature=0, logprobs=True,
        top_logprobs=2,
    ).choices[0].logprobs.content  # fmt: skip
    assert len(lp) == 4 and all(len(t.top_logprobs) == 2 for t in lp)


def test_chat_template_file_overrides(tiny_lm, reference, tmp_path, start_server):
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}>")
    with start_server(tiny_lm, "--chat-template", str(template)) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
        got = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=6, temperature=0
        )
    assert got.choices[0].message.content == greedy_text(reference, "<user>hi>", 6)


def test_a_gguf_file_serves_with_the_chat_template_it_carries(
    tiny_lm, reference, tmp_path, start_server
):
    from tformer import GPT2
    from tformer.tokenizers import load_tokenizer

    tokenizer = load_tokenizer(tiny_lm)
    tokenizer.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}>"
    GPT2.from_pretrained(tiny_lm).save_gguf(tmp_path / "tiny.gguf", tokenizer)
    with start_server(tmp_path / "tiny.gguf") as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
        got = client.chat.completions.create(
            model="tiny.gguf",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=6,
            temperature=0,
        )
        details = httpx.get(f"{server.url}/v1/models/tiny.gguf").json()
    assert got.choices[0].message.content == greedy_text(reference, "<user>hi>", 6)
    assert details["chat_template"] == "checkpoint"


@pytest.mark.parametrize(
    ("body", "param", "says"),
    [
        ({"prompt": "a", "temperature": 3}, "temperature", "less than or equal to 2"),
        ({"prompt": "a", "max_tokens": "8"}, "max_tokens", "valid integer"),
        ({"prompt": "a", "max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
        ({"prompt": "a", "logprobs": 6}, "logprobs", "less than or equal to 5"),
        ({"prompt": "a", "n": 0}, "n", "greater than or equal to 1"),
        ({"prompt": "a", "top_p": 0}, "top_p", "greater than 0"),
        ({"prompt": "a", "bogus": 1}, "bogus", "unrecognized"),
        ({}, "prompt", "missing"),
        ({"prompt": []}, "prompt", "empty"),
        ({"prompt": [[1, 2], []]}, "prompt", "empty"),
        ({"prompt": [99999999]}, "prompt", "not a token id"),
        ({"prompt": "a", "stop": [""]}, "stop", "empty"),
        ({"prompt": "a", "seed": -1}, "seed", "greater than or equal to 0"),
        ({"prompt": "a", "suffix": "x"}, "suffix", "not supported"),
        ({"prompt": "a", "logit_bias": {"1": 2}}, "logit_bias", "not supported"),
        ({"prompt": "word " * 200}, "prompt", "context window holds 128"),
        ({"prompt": "a", "max_tokens": 500}, "max_tokens", "at most"),
    ],
)
def test_bad_completion_requests_are_400_naming_the_field(lm_server, body, param, says):
    r = httpx.post(f"{lm_server.url}/v1/completions", json={"model": "tiny", **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert says in error["message"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user"}]}, "messages"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "messages[0].content",
        ),
        ({"messages": [{"role": "user", "content": "x"}], "tools": [{}]}, "tools"),
        ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
    ],
)
def test_bad_chat_requests_are_400(lm_server, body, param):
    r = httpx.post(f"{lm_server.url}/v1/chat/completions", json={"model": "tiny", **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_error_statuses_through_the_client(client, lm_server):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-4", prompt="x")
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="x", temperature=-1)
    r = httpx.get(f"{lm_server.url}/v1/nothing")
    assert r.status_code == 404 and "no route" in r.json()["error"]["message"]
    r = httpx.post(f"{lm_server.url}/v1/translations", json={"model": "tiny", "input": "x"})
    assert r.status_code == 404 and "language model" in r.json()["error"]["message"]
    r = httpx.post(
        f"{lm_server.url}/v1/completions", content=b"{not json", headers={"content-type": "a"}
    )
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(f"{lm_server.url}/v1/completions", content=b"x" * (5 * 1024 * 1024))
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert httpx.post(f"{lm_server.url}/v1/completions", content=b"\xff\xfe").status_code == 400
    lone = b'{"model": "tiny", "prompt": "\\ud800"}'
    r = httpx.post(f"{lm_server.url}/v1/completions", content=lone)
    assert r.status_code == 400 and "not UTF-8" in r.json()["error"]["message"]


def test_models_health_and_metrics(lm_server):
    models = httpx.get(f"{lm_server.url}/v1/models").json()
    assert models["data"][0]["id"] == "tiny" and models["data"][0]["context_length"] == 128
    assert httpx.get(f"{lm_server.url}/health").json() == {"status": "ok"}
    text = httpx.get(f"{lm_server.url}/metrics").text
    for name in (
        "tformer_requests_running",
        "tformer_requests_waiting",
        "tformer_slots_busy",
        "tformer_prompt_tokens_total",
        "tformer_generation_tokens_total",
        "tformer_time_to_first_token_seconds_bucket",
        "tformer_inter_token_latency_seconds_bucket",
    ):
        assert name in text


def test_clients_that_disconnect_free_their_slots_streamed_or_queued(slow_lm, start_server):
    body = {"model": "slow", "prompt": "x", "max_tokens": 1000, "temperature": 0}
    with start_server(slow_lm, "--max-batch", "1") as server:
        url = f"{server.url}/v1/completions"
        with httpx.stream("POST", url, json={**body, "stream": True}) as r:
            lines = r.iter_lines()
            next(lines)
            assert server.metric("tformer_slots_busy") == 1
            # a second, unstreamed request waits for the slot; its client gives up
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(url, json=body, timeout=0.5)
            deadline = time.monotonic() + 5
            while server.metric("tformer_requests_waiting") and time.monotonic() < deadline:
                time.sleep(0.02)
            assert server.metric("tformer_requests_waiting") == 0
        assert server.wait_idle() == 0
        assert server.metric("tformer_generation_tokens_total") < 1000
        server.process.terminate()
        assert server.process.wait(10) == 0  # nothing left running holds the shutdown


def test_api_key_is_required_and_checked(tiny_lm, start_server):
    with start_server(tiny_lm, "--api-key", "sesame") as server:
        good = openai.OpenAI(base_url=f"{server.url}/v1", api_key="sesame", max_retries=0)
        assert good.completions.create(model="tiny", prompt="a", max_tokens=2).choices
        bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key="open", max_retries=0)
        with pytest.raises(openai.AuthenticationError, match="incorrect API key"):
            bad.completions.create(model="tiny", prompt="a", max_tokens=2)
        r = httpx.get(f"{server.url}/v1/models")
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert httpx.get(f"{server.url}/health").status_code == 200


def test_a_full_queue_answers_429_with_retry_after(tiny_lm, start_server):
    body = {"model": "tiny", "prompt": "x", "max_tokens": 120, "temperature": 0}
    with start_server(tiny_lm, "--max-batch", "1", "--max-queue", "1") as server:
        url = f"{server.url}/v1/completions"
        barrier = threading.Barrier(12)

        def post(_):
            barrier.wait()
            return httpx.post(url, json=body, timeout=60)

        with ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(post, range(12)))
        assert server.wait_idle() == 0
    statuses = sorted(r.status_code for r in answers)
    assert 429 in statuses and set(statuses) == {200, 429}, statuses
    refused = next(r for r in answers if r.status_code == 429)
    assert refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["type"] == "rate_limit_error"
    done = [r.json()["choices"][0]["text"] for r in answers if r.status_code == 200]
    assert len(set(done)) == 1  # the ones let in ran as usual


def test_sigterm_finishes_running_requests_refuses_new_ones_and_exits_0(slow_lm, start_server):
    with start_server(slow_lm) as server:
        body = {"model": "slow", "prompt": "x", "max_tokens": 300, "stream": True}
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body) as r:
            lines = r.iter_lines()
            next(lines)
            server.process.terminate()
            time.sleep(0.3)
            try:  # a new connection is refused, or answered 503
                late = httpx.post(f"{server.url}/v1/completions", json=body, timeout=5)
                assert late.status_code == 503
            except httpx.TransportError:
                pass
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        last = json.loads(rest[-2].removeprefix("data: "))
        assert last["choices"][0]["finish_reason"] == "length"  # it ran to the end
        assert server.process.wait(30) == 0
