"""The playground page in a real browser: headless Chromium (Debian's, driven by
Playwright) against servers started here on tiny checkpoints. Without a browser these
tests skip, saying how to install one.

With TFORMER_SCREENSHOTS=DIR the tests leave a PNG of each tab there (docs/playground/
holds the README's)."""

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tformer.cli.main import main
from tformer.tokenizers import load_tokenizer

TEXT = "The quick brown fox jumps over the lazy dog."


def chromium() -> str | None:
    for name in (os.environ.get("TFORMER_CHROMIUM"), "chromium", "chromium-browser"):
        if name and (found := shutil.which(name)):
            return found
    return None


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the browser tests need Playwright: pip install -e '.[test]'")
    path = chromium()
    if path is None:
        pytest.skip(
            "no Chromium for the browser tests: apt-get install chromium (or set "
            "TFORMER_CHROMIUM to a Chromium or Chrome binary)"
        )
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=path, args=["--no-sandbox"])
        yield launched
        launched.close()


@dataclass
class Opened:
    page: object
    errors: list[str] = field(default_factory=list)  # console errors and uncaught exceptions

    def tabs(self) -> list[str]:
        return self.page.locator("#tabs button").all_inner_texts()

    def tab(self, name: str) -> None:
        self.page.click(f"#tab-button-{name}")

    def screenshot(self, name: str) -> None:
        folder = os.environ.get("TFORMER_SCREENSHOTS")
        if folder:
            Path(folder).mkdir(parents=True, exist_ok=True)
            self.page.screenshot(path=str(Path(folder) / f"{name}.png"), full_page=True)

    def image(self, selector: str) -> str:
        return self.page.eval_on_selector(selector, "canvas => canvas.toDataURL()")


@pytest.fixture
def open_page(browser):
    pages = []

    def open_(server, width: int = 1280, ready: bool = True) -> Opened:
        page = browser.new_page(viewport={"width": width, "height": 900})
        opened = Opened(page)
        page.on("console", lambda m: opened.errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: opened.errors.append(str(e)))
        page.goto(server.url + "/")
        if ready:  # the tabs are built once the page has read the model
            page.wait_for_selector("#tabs button")
        pages.append(page)
        return opened

    yield open_
    for page in pages:
        page.close()


@pytest.fixture(scope="module")
def shakespeare_lm(tmp_path_factory) -> Path:
    """A character-level GPT trained a few seconds on the built-in Shakespeare: a run
    directory (metrics.jsonl) whose model is surer of some characters than of others."""
    out = tmp_path_factory.mktemp("playground") / "shakespeare"
    main(["train", "--data", "shakespeare", "--n-layers", "2", "--d-model", "64",
          "--n-heads", "4", "--context", "64", "--steps", "300", "--batch-size", "16",
          "--lr", "0.01", "--sample-tokens", "0", "--out", str(out)])  # fmt: skip
    return out


@pytest.fixture(scope="module")
def chat_server(shakespeare_lm, serve_session, tmp_path_factory):
    """The trained run, with a chat template of its own."""
    template = tmp_path_factory.mktemp("template") / "chat.jinja"
    template.write_text(
        "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant:"
    )
    with serve_session(shakespeare_lm, "--chat-template", str(template)) as server:
        yield server


@pytest.fixture(scope="module")
def slow_server(slow_lm, serve_session):
    with serve_session(slow_lm) as server:
        yield server


def test_each_kind_of_model_gets_its_tabs_and_no_others(
    open_page, lm_server, chat_server, translation_server, reader_server
):
    expected = [
        (lm_server, ["Generate", "Inside", "Model"]),
        (chat_server, ["Generate", "Chat", "Inside", "Model"]),
        (translation_server, ["Translate", "Inside", "Model"]),
        (reader_server, ["Answer", "Model"]),
    ]
    for server, tabs in expected:
        opened = open_page(server)
        assert opened.tabs() == tabs
        panels = opened.page.eval_on_selector_all("main > section", "s => s.map(e => e.id)")
        assert panels == [f"tab-{name.lower()}" for name in tabs]  # the others are gone
        assert opened.errors == []


def test_a_generation_streams_coloured_tokens_with_alternatives_and_stops(open_page, slow_server):
    opened = open_page(slow_server)
    page = opened.page
    page.fill("#prompt", "Once upon a time")
    page.fill("#max_tokens", "400")
    page.fill("#temperature", "1")
    page.press("#prompt", "Control+Enter")  # the keyboard submits
    page.wait_for_selector("#generate-output .token")
    counts = []
    for _ in range(3):
        time.sleep(0.4)
        counts.append(page.locator("#generate-output .token").count())
    assert counts[0] < counts[1] < counts[2], f"the text did not grow: {counts}"
    first = page.locator("#generate-output .token").first
    assert first.evaluate("e => e.style.background") != ""  # coloured by its probability
    first.hover()
    tooltip = page.locator("#tooltip")
    assert tooltip.is_visible()
    rows = tooltip.locator("tr").count()
    assert 2 <= rows <= 6  # the token drawn, then up to 5 alternatives with probabilities
    assert "%" in tooltip.inner_text()
    page.click("#generate-stop")
    page.wait_for_selector("#generate-status:has-text('stopped after')")
    stopped = page.locator("#generate-output .token").count()
    time.sleep(0.5)
    assert page.locator("#generate-output .token").count() == stopped
    assert stopped < 400
    deadline = time.monotonic() + 5  # the server frees the slot
    while slow_server.metric("tformer_slots_busy") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert slow_server.metric("tformer_slots_busy") == 0
    assert opened.errors == []


def test_the_first_token_comes_as_fast_in_the_page_as_from_the_api(
    open_page, lm_server, record_property
):
    """Measured, not asserted: the page's time to first streamed token (from its Generate
    button's click to the first token on screen) against the API's own on the same request
    (the body the page sent, replayed), from the same browser by a bare `fetch` and from
    Python on a kept-open connection, taking turns, the fastest of seven each; beside them
    what a bare `GET /health` costs each way, which no page can change. Reported in the
    test's properties and printed.

    The page's click is dispatched inside the page (`element.click()`, the same handler a
    person's click runs) and its end is awaited there, not through Playwright's `click` and
    `wait_for_selector`: those keep the driver and the browser talking over the DevTools
    protocol while the request runs, and on a two-core host that costs the page 5-20 ms
    that a person's click does not."""
    opened = open_page(lm_server)
    page = opened.page
    page.fill("#prompt", TEXT)
    page.fill("#max_tokens", "8")
    page.fill("#temperature", "0")
    sent = []
    page.on("request", lambda r: sent.append(r.post_data_json) if "completions" in r.url else 0)
    client = httpx.Client()  # one connection kept open, as the browser keeps its own

    def page_first_token() -> float:
        return (
            page.evaluate(
                """async () => {
                 const button = document.querySelector('#generate-run');
                 const done = new Promise((resolve) => {
                   const watch = new MutationObserver(() => {
                     if (!button.disabled) { watch.disconnect(); resolve(); } });
                   watch.observe(button, { attributes: true });
                 });
                 button.click();
                 await done;
                 return Number(document.querySelector('#generate-output').dataset.firstTokenMs);
               }"""
            )
            / 1e3
        )

    def browser_first_token(body: dict) -> float:
        return (
            page.evaluate(
                """async (body) => {
                 const t = performance.now();
                 const response = await fetch('/v1/completions', { method: 'POST',
                   headers: { 'Content-Type': 'application/json' }, body: JSON.stringify(body) });
                 const reader = response.body.getReader();
                 const decoder = new TextDecoder();
                 let seen = '';
                 for (;;) {
                   const { value, done } = await reader.read();
                   if (done) throw new Error('no text came');
                   seen += decoder.decode(value, { stream: true });
                   for (const line of seen.split('\\n')) {
                     if (!line.startsWith('data: {')) continue;
                     const choice = JSON.parse(line.slice(6)).choices[0];
                     if (choice && choice.text) {
                       const took = performance.now() - t;
                       while (!(await reader.read()).done) {}  // to the end, as the page reads
                       return took;
                     }
                   }
                 }
               }""",
                body,
            )
            / 1e3
        )

    def python_first_token(body: dict) -> float:
        start, took = time.perf_counter(), None
        with client.stream("POST", f"{lm_server.url}/v1/completions", json=body) as response:
            for line in response.iter_lines():
                if took is None and line.startswith("data: {"):
                    choice = json.loads(line[6:])["choices"]
                    if choice and choice[0]["text"]:
                        took = time.perf_counter() - start
        assert took is not None, "no text came"
        return took

    def round_trips() -> tuple[float, float]:
        """The fastest bare request, GET /health, from the page and from Python."""
        browser = page.evaluate(
            """async () => { let best = Infinity;
                 for (let i = 0; i < 5; i++) { const t = performance.now();
                   await (await fetch('/health')).text();
                   best = Math.min(best, performance.now() - t); }
                 return best; }"""
        )
        python = []
        for _ in range(5):
            start = time.perf_counter()
            client.get(f"{lm_server.url}/health").read()
            python.append(time.perf_counter() - start)
        return browser / 1e3, min(python)

    in_page, from_browser, from_python = [], [], []
    for _ in range(7):
        in_page.append(page_first_token())
        from_browser.append(browser_first_token(sent[-1]))
        from_python.append(python_first_token(sent[-1]))
    browser_trip, python_trip = round_trips()
    client.close()
    assert sent[-1]["logprobs"] == 5 and sent[-1]["stream"] is True
    assert page.locator("#generate-output .token").count() == 8  # the page's run completed
    record_property("first_token_page_s", min(in_page))
    record_property("first_token_api_from_browser_s", min(from_browser))
    record_property("first_token_api_from_python_s", min(from_python))
    record_property("bare_request_browser_s", browser_trip)
    record_property("bare_request_python_s", python_trip)
    print(
        f"time to first token: page {min(in_page) * 1e3:.1f} ms, API from the browser "
        f"{min(from_browser) * 1e3:.1f} ms, API from Python {min(from_python) * 1e3:.1f} ms; "
        f"a bare request (GET /health): browser {browser_trip * 1e3:.1f} ms, Python "
        f"{python_trip * 1e3:.1f} ms"
    )
    assert opened.errors == []


def test_the_attention_heatmap_has_a_cell_per_token_pair_and_follows_the_pickers(
    open_page, lm_server, tiny_lm
):
    tokens = len(load_tokenizer(tiny_lm).encode(TEXT))
    opened = open_page(lm_server)
    page = opened.page
    opened.tab("inside")
    page.fill("#inside-text", TEXT)
    page.click("#inside-run")
    page.wait_for_selector("#inside-heatmap canvas")
    assert page.locator("#inside-heatmap canvas").count() == 2  # every head of the layer
    page.select_option("#inside-head", "0")
    canvas = page.locator("#inside-heatmap canvas")
    assert canvas.count() == 1
    assert canvas.get_attribute("data-rows") == canvas.get_attribute("data-cols") == str(tokens)
    assert page.locator("#inside-heatmap .axis.rows li").count() == tokens
    assert page.locator("#inside-heatmap .axis.cols li").count() == tokens
    head_0 = opened.image("#inside-heatmap canvas")
    page.select_option("#inside-head", "1")
    head_1 = opened.image("#inside-heatmap canvas")
    assert head_1 != head_0
    page.select_option("#inside-layer", "1")
    page.wait_for_function("document.querySelector('#inside-layer').value === '1'")
    page.wait_for_function(
        f"document.querySelector('#inside-heatmap canvas').toDataURL() !== {json.dumps(head_1)}"
    )
    assert page.locator("#logit-lens tbody tr").count() == 3  # embeddings, layers 0 and 1
    assert page.locator("#logit-lens thead th").count() == tokens + 1
    assert page.locator("#residual-norms rect").count() == 3
    # From the keyboard: a cell's weight at a cursor the arrows move, a lens cell's
    # alternatives on focus.
    page.focus("#inside-heatmap canvas")
    page.keyboard.press("ArrowDown")
    tooltip = page.locator("#tooltip")
    assert tooltip.is_visible() and "→" in tooltip.inner_text()
    page.focus("#logit-lens tbody td")
    assert tooltip.locator("tr").count() == 5  # the top 5, with their probabilities
    opened.screenshot("inside")
    assert opened.errors == []


def test_the_model_tab_shows_the_training_curve_of_a_run(open_page, chat_server):
    opened = open_page(chat_server)
    opened.tab("model")
    page = opened.page
    facts = page.inner_text("#model-facts")
    assert "parameters" in facts and "CharTokenizer" in facts
    assert "file" in facts.split("chat template")[1]  # where the template came from
    assert page.locator("#training-curve polyline").count() >= 1
    opened.screenshot("model")
    assert opened.errors == []


def test_chat_answers_in_the_page(open_page, chat_server):
    opened = open_page(chat_server)
    opened.tab("chat")
    page = opened.page
    page.fill("#chat-input", "Hello there")
    page.click("#chat-send")
    page.wait_for_selector("#chat-send:not([disabled])")
    assert page.locator(".message.user").inner_text() == "Hello there"
    assert page.locator(".message.assistant").count() == 1
    assert page.locator(".message.assistant").inner_text() != ""
    assert page.locator("#chat-error").is_hidden()
    opened.screenshot("chat")
    # A trained model is surer of some tokens than of others: the colours differ.
    opened.tab("generate")
    page.fill("#prompt", "ROMEO:\nWhat light")
    page.fill("#max_tokens", "40")
    page.fill("#seed", "1")
    page.click("#generate-run")
    page.wait_for_selector("#generate-status:has-text('tokens,')")
    colours = page.eval_on_selector_all(
        "#generate-output .token", "spans => spans.map(s => s.style.background)"
    )
    assert len(set(colours)) > 1, colours
    page.locator("#generate-output .token").nth(5).hover()
    opened.screenshot("generate")
    assert opened.errors == []


def test_a_translation_and_its_alignment_appear(open_page, translation_server):
    body = {"model": "translator", "input": "one two three", "beam_size": 4}
    expected = httpx.post(f"{translation_server.url}/v1/translations", json=body).json()
    opened = open_page(translation_server)
    page = opened.page
    page.fill("#translate-input", "one two three")
    page.click("#translate-run")
    page.wait_for_selector("#translate-heatmap canvas")
    translation = expected["data"][0]["translation"]
    assert page.inner_text("#translate-output") == translation
    page.select_option("#translate-head", "0")
    canvas = page.locator("#translate-heatmap canvas")
    assert canvas.get_attribute("data-cols") == str(len("one two three") + 1)  # characters, </s>
    assert canvas.get_attribute("data-rows") == str(len(translation) + 1)  # <s>, characters
    opened.screenshot("translate")
    assert opened.errors == []


def test_inside_a_translation_model_each_stack_has_its_axes(open_page, translation_server):
    opened = open_page(translation_server)
    page = opened.page
    page.fill("#translate-input", "one two")
    page.click("#translate-run")
    page.wait_for_selector("#translate-heatmap canvas")
    translation = page.inner_text("#translate-output")
    opened.tab("inside")  # the source and its translation come along
    assert page.input_value("#inside-text") == "one two"
    assert page.input_value("#inside-target") == translation
    page.select_option("#inside-stack", "encoder")
    page.click("#inside-run")
    page.wait_for_selector("#inside-heatmap canvas")
    page.select_option("#inside-head", "0")
    canvas = page.locator("#inside-heatmap canvas")
    source = len("one two") + 1  # characters and </s>
    assert canvas.get_attribute("data-rows") == canvas.get_attribute("data-cols") == str(source)
    page.select_option("#inside-stack", "decoder")
    target = len(translation) + 1  # <s> and characters
    page.wait_for_function(
        f"document.querySelector('#inside-heatmap canvas').dataset.cols === '{target}'"
    )
    assert page.locator("#logit-lens tbody tr").count() == 2  # embeddings, decoder layer 0
    assert page.locator("#logit-lens thead th").count() == target + 1
    assert page.locator("#residual-norms rect").count() == 3  # encoder, decoder, out
    assert opened.errors == []


def test_an_answer_appears_highlighted_in_its_passage(open_page, reader_server):
    context = "Moses went up the mountain of Sinai with Aaron, and they stayed forty days."
    body = {"model": "reader", "question": "Who went up?", "context": context}
    expected = httpx.post(f"{reader_server.url}/v1/answers", json=body).json()["answers"]
    opened = open_page(reader_server)
    page = opened.page
    page.fill("#question", "Who went up?")
    page.fill("#context", context)
    page.press("#question", "Control+Enter")
    page.wait_for_selector("#answer-output .answer")
    assert page.locator("#answer-output .answer").count() == len(expected)
    assert page.locator("#answer-output .answer mark").first.inner_text() == expected[0]["answer"]
    opened.screenshot("answer")
    assert opened.errors == []


def test_an_error_from_the_server_is_shown_with_its_message(open_page, lm_server):
    opened = open_page(lm_server)
    page = opened.page
    page.fill("#max_tokens", "100000")
    page.click("#generate-run")
    error = page.locator("#generate-error")
    error.wait_for(state="visible")
    body = {"model": "tiny", "prompt": page.input_value("#prompt"), "max_tokens": 100000}
    expected = httpx.post(f"{lm_server.url}/v1/completions", json=body).json()["error"]
    assert error.inner_text() == expected["message"]
    # The browser reports the failed request itself; the page throws nothing.
    assert [e for e in opened.errors if "status of 400" not in e] == []


def test_the_page_asks_for_the_api_key_once_and_keeps_it(open_page, tiny_lm, start_server):
    with start_server(tiny_lm, "--api-key", "sesame") as server:
        opened = open_page(server, ready=False)
        page = opened.page
        page.wait_for_selector("#key-dialog[open]")
        page.fill("#api-key", "sesame")
        page.click("#key-form button")
        page.wait_for_selector("#model-line:has-text('tiny')")
        page.fill("#max_tokens", "4")
        page.click("#generate-run")
        page.wait_for_selector("#generate-status:has-text('tokens,')")
        assert not page.locator("#key-dialog[open]").count()  # asked once
        assert [e for e in opened.errors if "status of 401" not in e] == []


def test_a_narrow_screen_needs_no_sideways_scrolling(open_page, lm_server):
    opened = open_page(lm_server, width=390)
    page = opened.page
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    for control in ("#prompt", "#temperature", "#max_tokens"):  # controls have labels
        label = page.eval_on_selector(control, "e => e.labels.length ? e.labels[0].innerText : ''")
        assert label.strip()
    opened.screenshot("narrow")
    assert opened.errors == []
