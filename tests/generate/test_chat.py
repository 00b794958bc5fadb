"""Chat templates render as transformers' apply_chat_template renders them, refuse bad
templates and bad messages with a ConfigError that names the field or the file, and travel
in a checkpoint's tokenizer_config.json."""

import json
import re

import pytest

from tformer.data.prompts import SFT_TEMPLATE
from tformer.errors import ConfigError
from tformer.generate.chat import (
    DEFAULT_TEMPLATE,
    ChatTemplate,
    check_messages,
    load_chat_template,
    read_chat_template,
    write_chat_template,
)

EOS, BOS = "<|endoftext|>", "<s>"
# A ChatML-like template, with what real ones use: bos_token, raise_exception, loop
# variables, namespace, tojson and loop controls.
CHATML = """\
{{ bos_token }}{% set ns = namespace(turns=0) %}
{% for message in messages %}
    {% if message['role'] == 'system' and not loop.first %}
        {{ raise_exception('a system message must come first') }}
    {% endif %}
    {% if message['content'] == '' %}{% continue %}{% endif %}
    {% set ns.turns = ns.turns + 1 %}
<|im_start|>{{ message['role'] }}
{{ message['content'] }}<|im_end|>
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}
{{- '' if ns.turns else raise_exception('nothing to say') }}
{#- a comment -#}
{% if messages | length > 5 %}
{{ {'turns': ns.turns, 'html': '<&>'} | tojson }}
{% endif %}"""
CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi there"}],
    [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": ""},
        {"role": "user", "content": "Again, with\nnewlines & <tags>"},
        {"role": "assistant", "content": "Ünïcode ✓"},
    ],
]


def hf_tokenizer(bos: bool = True):
    """A transformers tokenizer with an end-of-text token (and a start token): its
    apply_chat_template is the reference."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocabulary = {EOS: 0, BOS: 1, "[UNK]": 2}
    backend = Tokenizer(models.WordLevel(vocabulary, unk_token="[UNK]"))
    special = {"bos_token": BOS} if bos else {}
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS, **special)


@pytest.mark.parametrize("template", [DEFAULT_TEMPLATE, SFT_TEMPLATE, CHATML])
@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_templates_render_as_transformers_renders_them(template, messages, add_generation_prompt):
    reference = hf_tokenizer().apply_chat_template(
        messages,
        chat_template=template,
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
    )
    ours = ChatTemplate(template, bos_token=BOS, eos_token=EOS)
    assert ours.render(messages, add_generation_prompt) == reference


def test_a_tokenizer_without_a_start_token_renders_it_as_nothing():
    messages = CONVERSATIONS[0]
    reference = hf_tokenizer(bos=False).apply_chat_template(
        messages, chat_template=CHATML, tokenize=False, add_generation_prompt=True
    )
    assert ChatTemplate(CHATML, eos_token=EOS).render(messages) == reference
    assert reference.startswith("<|im_start|>user")


def test_default_template_is_a_transcript_that_opens_the_reply():
    messages = CONVERSATIONS[1]
    expected = "system: Be terse.\nuser: Hi there\n"
    assert ChatTemplate(DEFAULT_TEMPLATE).render(messages, False) == expected
    assert ChatTemplate(DEFAULT_TEMPLATE).render(messages) == expected + "assistant:"


def test_sft_template_writes_a_pair_as_the_sft_task_trains_it():
    """prompt + response + end of text, no separator, no roles (tformer.data.prompts)."""
    pair = [{"role": "user", "content": "the cat"}, {"role": "assistant", "content": " sees."}]
    template = ChatTemplate(SFT_TEMPLATE, eos_token=EOS)
    assert template.render(pair[:1]) == "the cat"  # the model goes on after the prompt
    assert template.render(pair, False) == "the cat sees." + EOS
    more = [*pair, {"role": "user", "content": " again"}]
    assert template.render(more) == "the cat sees." + EOS + " again"
    assert ChatTemplate(SFT_TEMPLATE).render(pair) == "the cat sees."  # no end-of-text token


def test_text_parts_are_joined_with_newlines():
    parts = [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]
    assert check_messages([{"role": "user", "content": parts}]) == [
        {"role": "user", "content": "one\ntwo"}
    ]


@pytest.mark.parametrize(
    "messages, named",
    [
        ([], "messages: expected a non-empty list"),
        ({"role": "user", "content": "x"}, "messages: expected a non-empty list"),
        ([{"role": "user", "content": "x"}, "hi"], "messages[1]: expected an object"),
        ([{"content": "x"}], "messages[0].role: missing"),
        ([{"role": "tool", "content": "x"}], "messages[0].role: 'tool' is not one of"),
        ([{"role": "user"}], "messages[0].content: missing"),
        ([{"role": "user", "content": 3}], "messages[0].content: got int"),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
            "messages[0].content[0].type: 'image_url' parts are not supported",
        ),
        ([{"role": "user", "content": [{"type": "text", "text": 1}]}], "content[0].text"),
        ([{"role": "user", "content": ["x"]}], "messages[0].content[0]: expected a text"),
    ],
)
def test_messages_that_are_not_a_chat_are_refused_naming_the_field(messages, named):
    with pytest.raises(ConfigError, match=re.escape(named)):
        ChatTemplate(DEFAULT_TEMPLATE).render(messages)


def test_a_template_that_does_not_compile_names_where_it_came_from(tmp_path):
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}\n{{ m['content'] }\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=re.escape(f"chat template (file {bad}), line 2: ")):
        load_chat_template(tmp_path, bad)
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": "{% if %}"}), encoding="utf-8"
    )
    with pytest.raises(
        ConfigError, match=re.escape(f"(tokenizer_config.json of {tmp_path}), line 1")
    ):
        load_chat_template(tmp_path)


def test_what_the_template_raises_is_a_config_error_with_its_message():
    template = ChatTemplate(CHATML)
    late_system = [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]
    with pytest.raises(ConfigError, match="^chat template: a system message must come first$"):
        template.render(late_system)
    with pytest.raises(ConfigError, match="chat template: .*has no attribute 'name'"):
        ChatTemplate("{{ messages[0].name.upper() }}").render(CONVERSATIONS[0])
    with pytest.raises(ConfigError, match="chat template: ZeroDivisionError"):
        ChatTemplate("{{ 1 // 0 }}").render(CONVERSATIONS[0])


def test_the_sandbox_refuses_to_reach_python_internals():
    with pytest.raises(ConfigError, match="chat template: .*unsafe"):
        ChatTemplate("{{ messages.__class__.__mro__ }}").render(CONVERSATIONS[0])


def test_write_then_read_keeps_every_other_key(tmp_path):
    config = {"eos_token": EOS, "model_max_length": 1024, "chat_template": "old"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    write_chat_template(tmp_path, CHATML)
    assert read_chat_template(tmp_path) == CHATML
    saved = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert saved == {**config, "chat_template": CHATML}
    fresh = tmp_path / "fresh"
    write_chat_template(fresh, SFT_TEMPLATE)  # no file yet: created
    assert json.loads((fresh / "tokenizer_config.json").read_text()) == {
        "chat_template": SFT_TEMPLATE
    }


def test_writing_a_template_that_does_not_compile_changes_nothing(tmp_path):
    with pytest.raises(ConfigError, match="line 1"):
        write_chat_template(tmp_path, "{% for %}")
    assert not (tmp_path / "tokenizer_config.json").exists()


def test_a_checkpoint_without_a_template_has_none(tmp_path):
    assert read_chat_template(tmp_path) is None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": EOS}))
    assert read_chat_template(tmp_path) is None


def test_named_templates_use_the_default_one(tmp_path):
    config = tmp_path / "tokenizer_config.json"
    named = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    config.write_text(json.dumps({"chat_template": named}), encoding="utf-8")
    assert read_chat_template(tmp_path) == "D"
    config.write_text(json.dumps({"chat_template": named[:1]}), encoding="utf-8")
    with pytest.raises(ConfigError, match=r"\('tool_use'\) but none named 'default'"):
        read_chat_template(tmp_path)
    config.write_text(json.dumps({"chat_template": 3}), encoding="utf-8")
    with pytest.raises(ConfigError, match="chat_template is a int"):
        read_chat_template(tmp_path)


def test_chat_template_jinja_comes_first_as_in_transformers(tmp_path):
    hf_tokenizer().save_pretrained(tmp_path)  # no template yet
    (tmp_path / "chat_template.jinja").write_text(CHATML, encoding="utf-8")
    write_chat_template(tmp_path, SFT_TEMPLATE)  # rewrites both: they never disagree
    from transformers import PreTrainedTokenizerFast

    assert PreTrainedTokenizerFast.from_pretrained(tmp_path).chat_template == SFT_TEMPLATE
    assert read_chat_template(tmp_path) == SFT_TEMPLATE


def test_bad_json_names_the_file(tmp_path):
    path = tmp_path / "tokenizer_config.json"
    path.write_text('{"chat_template": ', encoding="utf-8")
    with pytest.raises(ValueError, match=f"{path}: not valid JSON"):
        read_chat_template(tmp_path)
    with pytest.raises(ValueError, match=f"{path}: not valid JSON"):
        load_chat_template(tmp_path)


def test_load_picks_the_file_then_the_checkpoint_then_the_default(tmp_path):
    assert load_chat_template(tmp_path).source == "default"
    hf = hf_tokenizer()
    hf.chat_template = CHATML
    hf.save_pretrained(tmp_path)
    template = load_chat_template(tmp_path)
    assert template.source == "checkpoint"
    assert (template.bos_token, template.eos_token) == (BOS, EOS)  # as transformers has them
    messages = CONVERSATIONS[2]
    reference = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert template.render(messages) == reference
    override = tmp_path / "mine.jinja"
    override.write_text(SFT_TEMPLATE, encoding="utf-8")
    from_file = load_chat_template(tmp_path, override)
    assert from_file.source == f"file {override}" and from_file.eos_token == EOS


def test_a_missing_or_unreadable_template_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'no.jinja'}: no such file"):
        load_chat_template(tmp_path, tmp_path / "no.jinja")
    with pytest.raises(OSError, match=f"{tmp_path}: cannot read the chat template"):
        load_chat_template(tmp_path, tmp_path)
    latin = tmp_path / "latin.jinja"
    latin.write_bytes("café".encode("latin-1"))
    with pytest.raises(ConfigError, match=f"{latin}: not UTF-8 text"):
        load_chat_template(tmp_path, latin)


def test_a_saved_tokenizer_carries_its_template_to_a_checkpoint(tmp_path):
    from tformer.tokenizers import CharTokenizer, load_tokenizer, train_bpe

    char = CharTokenizer.from_text("abc")
    char.save(tmp_path / "plain")
    assert not (tmp_path / "plain" / "tokenizer_config.json").exists()
    assert load_tokenizer(tmp_path / "plain").chat_template is None
    char.chat_template = SFT_TEMPLATE
    char.save(tmp_path / "char")
    assert load_tokenizer(tmp_path / "char").chat_template == SFT_TEMPLATE
    assert load_chat_template(tmp_path / "char").eos_token == ""  # it has no end of text
    bpe = train_bpe(["the cat sees the sea"] * 5, vocab_size=270)
    bpe.chat_template = SFT_TEMPLATE
    bpe.save(tmp_path / "bpe")
    assert load_tokenizer(tmp_path / "bpe").chat_template == SFT_TEMPLATE
    assert load_chat_template(tmp_path / "bpe").eos_token == EOS
