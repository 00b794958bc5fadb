"""POST /v1/inspect against the lab's instruments on the same model, packed the same way,
in this process; its bounds; and that it leaves generation running beside it untouched."""

import threading

import httpx
import pytest
import torch

from tformer.generate.beam import greedy_search
from tformer.generate.fast import load_for_decoding, pack_for_decoding
from tformer.lab.instruments import logit_lens, residual_norms
from tformer.models.gpt2 import GPT2
from tformer.models.gpt2_config import GPT2Config
from tformer.models.load import load_gpt2_with_tokenizer, load_translation_model
from tformer.serve.inspect import MAX_INSPECT_TOKENS
from tformer.tokenizers import CharTokenizer
from tformer.train.metrics import read_metrics

TEXT = "The quick brown fox jumps over the lazy dog.\nIt ran."


def inspect(server, **fields):
    body = {"model": "tiny", "text": TEXT, **fields}
    return httpx.post(f"{server.url}/v1/inspect", json=body, timeout=60)


@pytest.fixture(scope="module")
def reference(tiny_lm):
    model, tokenizer, _ = load_for_decoding(str(tiny_lm), torch.device("cpu"), "float32", None)
    model.set_attention("explicit")
    return model.eval(), tokenizer


@pytest.mark.parametrize("layer", [0, 1])
def test_inspection_is_the_lab_instruments_on_the_served_model(lm_server, reference, layer):
    model, tokenizer = reference
    response = inspect(lm_server, layer=layer, top=4)
    assert response.status_code == 200, response.text
    got = response.json()
    ids = tokenizer.encode(TEXT)
    t = len(ids)
    assert got["token_ids"] == ids
    assert got["tokens"] == [tokenizer.decode([i]) for i in ids]
    assert "".join(got["tokens"]) == TEXT  # as the tokenizer splits it, nothing lost
    assert (got["n_layers"], got["n_heads"], got["layer"]) == (2, 2, layer)
    x = torch.tensor([ids])
    with torch.inference_mode():
        name = f"blocks.{layer}.attn.hook_pattern"
        _, cache = model.run_with_cache(x, names=[name])
        lens = torch.softmax(logit_lens(model, x).float(), -1)  # (L + 1, 1, T, V)
        norms = residual_norms(model, x)
    attention = torch.tensor(got["attention"])
    assert attention.shape == (2, t, t)
    torch.testing.assert_close(attention, cache[name][0], rtol=0, atol=6e-5)  # 4 decimals
    assert torch.equal(attention.triu(1), torch.zeros(2, t, t))  # causal: nothing ahead
    torch.testing.assert_close(torch.tensor(got["residual_norms"]), torch.tensor(norms))
    assert len(got["logit_lens"]) == 3 and all(len(at) == t for at in got["logit_lens"])
    for depth, layer_lens in enumerate(got["logit_lens"]):
        for position, top in enumerate(layer_lens):
            probs, ids_top = lens[depth, 0, position].topk(4)
            assert [c["id"] for c in top] == ids_top.tolist()
            assert [c["token"] for c in top] == [tokenizer.decode([i]) for i in ids_top.tolist()]
            torch.testing.assert_close(
                torch.tensor([c["probability"] for c in top]), probs, rtol=0, atol=1e-5
            )


@pytest.mark.parametrize(
    ("fields", "param", "message"),
    [
        ({"text": "word " * (MAX_INSPECT_TOKENS + 1)}, "text", "at most 128"),
        ({"text": "   "}, "text", "empty"),
        ({"layer": 2}, "layer", "layers are 0..1"),
        ({"layer": -1}, "layer", "greater than or equal to 0"),
        ({"top": 21}, "top", "less than or equal to 20"),
        ({"heads": 3}, "heads", "heads"),
    ],
)
def test_bad_inspections_are_400s_naming_the_field(lm_server, fields, param, message):
    response = inspect(lm_server, **fields)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and message in error["message"]


def test_inspection_needs_the_served_model_and_a_language_model(lm_server):
    response = inspect(lm_server, model="other")
    assert response.status_code == 404 and "other" in response.json()["error"]["message"]


def test_generation_beside_an_inspection_gives_the_same_tokens(lm_server):
    """The inspection's hooks and its switch of attention path happen between two decoding
    steps: a generation running meanwhile is the same as alone."""
    request = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 60, "temperature": 0}

    def complete() -> str:
        response = httpx.post(f"{lm_server.url}/v1/completions", json=request, timeout=60)
        return response.json()["choices"][0]["text"]

    alone = complete()
    beside: list[str] = []
    thread = threading.Thread(target=lambda: beside.append(complete()))
    thread.start()
    for layer in (0, 1, 0, 1):
        assert inspect(lm_server, layer=layer).status_code == 200
    thread.join(60)
    assert beside == [alone]


def test_a_translation_model_shows_its_alignment_as_the_model_computes_it(
    translator, serve_session
):
    model, tokenizer = load_translation_model(translator, torch.device("cpu"))
    pack_for_decoding(model, "float32")  # as the server packs it
    model.set_attention("explicit")
    with serve_session(translator) as server:
        body = {"model": "translator", "text": "one two", "target": "three", "layer": 0}
        got = httpx.post(f"{server.url}/v1/inspect", json=body, timeout=60).json()
        own = httpx.post(
            f"{server.url}/v1/inspect", json={**body, "target": None}, timeout=60
        ).json()
        too_long = httpx.post(
            f"{server.url}/v1/inspect", json={**body, "target": "x" * 40}, timeout=60
        )
    c = model.config
    src = [*tokenizer.encode("one two"), c.eos_id]
    tgt = [c.bos_id, *tokenizer.encode("three")]
    with torch.inference_mode():
        name = "decoder_layers.0.cross_attn.hook_pattern"
        _, cache = model.run_with_cache(torch.tensor([src]), torch.tensor([tgt]), names=[name])
    assert got["tokens"] == [*"one two", "</s>"] and got["target_tokens"] == ["<s>", *"three"]
    torch.testing.assert_close(torch.tensor(got["attention"]), cache[name][0], rtol=0, atol=6e-5)
    with torch.inference_mode():
        greedy = greedy_search(model, torch.tensor([src]), c.max_len - 1)[0]
    assert own["target"] == tokenizer.decode(greedy)  # the model's own translation
    assert too_long.status_code == 400 and too_long.json()["error"]["param"] == "target"


@pytest.mark.parametrize("field", ["target", "stack"])
def test_a_language_model_takes_no_target_or_stack(lm_server, field):
    response = inspect(lm_server, **{field: "cross"})
    assert response.status_code == 400 and response.json()["error"]["param"] == field


@pytest.mark.parametrize(
    ("stack", "module", "rows", "cols"),
    [
        ("encoder", "encoder_layers.0.self_attn", "source", "source"),
        ("decoder", "decoder_layers.0.self_attn", "target", "target"),
        ("cross", "decoder_layers.0.cross_attn", "target", "source"),
    ],
)
def test_each_stack_of_a_translation_model_and_its_lens(
    translator, translation_server, stack, module, rows, cols
):
    model, tokenizer = load_translation_model(translator, torch.device("cpu"))
    pack_for_decoding(model, "float32")  # as the server packs it
    model.set_attention("explicit")
    body = {"model": "translator", "text": "one two", "target": "three", "stack": stack}
    got = httpx.post(f"{translation_server.url}/v1/inspect", json=body, timeout=60).json()
    c = model.config
    src = torch.tensor([[*tokenizer.encode("one two"), c.eos_id]])
    tgt = torch.tensor([[c.bos_id, *tokenizer.encode("three")]])
    with torch.inference_mode():
        name = f"{module}.hook_pattern"
        _, cache = model.run_with_cache(src, tgt, names=[name])
        lens = torch.softmax(logit_lens(model, src, tgt).float(), -1)  # (L + 1, 1, T, V)
        norms = residual_norms(model, src, tgt)
    tokens = {"source": [*"one two", "</s>"], "target": ["<s>", *"three"]}
    assert got["query_tokens"] == tokens[rows] and got["key_tokens"] == tokens[cols]
    torch.testing.assert_close(torch.tensor(got["attention"]), cache[name][0], rtol=0, atol=6e-5)
    torch.testing.assert_close(torch.tensor(got["residual_norms"]), torch.tensor(norms))
    assert got["residual_layers"] == ["encoder_layers.0", "decoder_layers.0", "out"]
    top = [[position[0]["id"] for position in layer] for layer in got["logit_lens"]]
    assert top == lens[:, 0].argmax(-1).tolist()  # over the target's positions


def test_the_model_details_are_the_checkpoint_s(unicode_lm, serve_session):
    model, _ = load_gpt2_with_tokenizer(str(unicode_lm), torch.device("cpu"), torch.float32)
    with serve_session(unicode_lm) as server:
        details = httpx.get(f"{server.url}/v1/models/run").json()
        missing = httpx.get(f"{server.url}/v1/models/other")
    assert details["parameters"] == model.num_parameters()
    assert details["config"]["n_layers"] == 1 and details["kind"] == "language"
    assert details["tokenizer"] == {"type": "GPT2Tokenizer", "vocab_size": 50257}
    assert details["chat_template"] == "default" and "weights float32" in details["decoding"]
    records = [r for r in read_metrics(unicode_lm) if r["type"] == "train"]
    assert details["training"]["train"][-1] == [records[-1]["step"], records[-1]["loss"]]
    assert missing.status_code == 404


def test_a_tokenizer_smaller_than_the_vocabulary_bounds_the_logit_lens(tmp_path, start_server):
    """The lens ranks only the ids the tokenizer has (the model may have spare ones), and
    no more of them than there are."""
    out = tmp_path / "letters"
    config = GPT2Config(vocab_size=70, max_len=32, d_model=32, n_layers=1, n_heads=2)
    GPT2(config).save_pretrained(out)
    CharTokenizer(list("abcdefgh ")).save(out)
    with start_server(out) as server:
        body = {"model": "letters", "text": "abc def", "top": 20}
        response = httpx.post(f"{server.url}/v1/inspect", json=body, timeout=60)
    assert response.status_code == 200, response.text
    lens = response.json()["logit_lens"]
    assert all(len(top) == 9 for layer in lens for top in layer)
    assert all(choice["id"] < 9 for layer in lens for top in layer for choice in top)
    total = sum(choice["probability"] for choice in lens[0][0])
    assert total == pytest.approx(1.0, abs=1e-4)  # a distribution over those 9
