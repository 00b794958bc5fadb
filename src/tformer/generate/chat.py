"""Chat templates: how a conversation becomes the one text a language model continues.

A chat model sees no messages, only text. Its chat template (Hugging Face's convention) is
a Jinja template that writes the conversation out the way the model was trained to read
it; rendered, it is the prompt, and the model's continuation is the assistant's reply. The
template sees the variables transformers' `apply_chat_template` gives it:

    messages               [{"role": ..., "content": ...}, ...]
    add_generation_prompt  true: end with what opens an assistant's turn
    bos_token, eos_token   the tokenizer's special tokens as text ("" if it has none)
    raise_exception(msg)   refuses the conversation (e.g. roles out of turn) with `msg`
    tools, documents       none (tformer passes no tools)

and it is rendered the way transformers renders it: in Jinja's immutable sandbox (a
template from a checkpoint is untrusted code), with trim_blocks and lstrip_blocks (a block
tag's own line leaves nothing behind), a `tojson` filter that writes plain JSON, `break`
and `continue`, `strftime_now(format)`, and `{% generation %}` blocks rendered as their body.

Where a model's template comes from, first found first (load_chat_template):

    a file given to the command    source "file PATH"
    the checkpoint's own           source "checkpoint": chat_template.jinja, else the
                                   "chat_template" of tokenizer_config.json (a string, or
                                   Hugging Face's list of {"name", "template"}: "default")
    DEFAULT_TEMPLATE               source "default"

bos_token and eos_token are read from tokenizer_config.json, as transformers reads them.

DEFAULT_TEMPLATE, for a model that has no template, writes a plain transcript, one line
per message, and "assistant:" to open the reply:

    system: You are terse.
    user: Hi
    assistant:

The model then writes the reply (" Hello", with its space, as the lines before it have)
and, having seen a transcript, goes on with the next "\\nuser:" line itself. Stopping there
is the caller's choice (a stop string), not the template's.

SFT_TEMPLATE (tformer.data.prompts, beside the sequences it writes out, so that training
does not load jinja2) is what `tformer train --task sft` trains: a prompt's text followed
directly by its response's and the end-of-text token, with no separator and no role names.
So a conversation renders as its system and user messages' contents as they are, and each
assistant message's content followed by eos_token; a generation prompt adds nothing (the
model goes on after the user's text), and more turns are concatenated. The SFT task saves
it with the tokenizer (its tokenizer_config.json), so a fine-tuned checkpoint is prompted
as it was trained.

The rendered text holds special tokens as text (eos_token between turns): encode it with
allow_special=True, so that they become their ids. (Training encodes a prompt and its
response apart; a byte-level BPE may merge across the joint of the rendered text
differently, as it may for any template.)

Messages are checked where they enter (check_messages): a non-empty list of objects, each a
role (system, developer, user or assistant) and a content, which is a string or OpenAI's
list of text parts, [{"type": "text", "text": ...}, ...], joined with newlines (as vLLM
joins them). Every refusal is a ConfigError that names the field (`messages[2].content`);
so is whatever the template raises while rendering: a server answers it with HTTP 400.
"""

import functools
import json
import os
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from tformer.errors import ConfigError
from tformer.files import atomic_write_json, atomic_write_text, read_json

CONFIG_FILE = "tokenizer_config.json"
JINJA_FILE = "chat_template.jinja"  # where transformers saves a template now; read first
ROLES = ("system", "developer", "user", "assistant")
PARTS = '[{"type": "text", "text": ...}, ...]'  # OpenAI's content parts, as messages name them

# "role: content" per line; with add_generation_prompt, "assistant:" (see the docstring).
DEFAULT_TEMPLATE = """\
{% for message in messages %}
{{ message['role'] }}: {{ message['content'] }}
{% endfor %}
{% if add_generation_prompt %}
assistant:
{%- endif %}
"""


class ChatTemplate:
    """A chat template compiled once: `render(messages)` is the prompt text.

    text: the Jinja source; source: where it came from ("file PATH", "checkpoint",
    "default"); where: the same as an error names it (a file, or "tokenizer_config.json of
    DIR"); bos_token, eos_token: the tokenizer's special tokens as text, "" for none.
    A template that does not compile is a ConfigError naming `where` and the line."""

    def __init__(
        self,
        text: str,
        source: str = "default",
        where: str | None = None,
        bos_token: str = "",
        eos_token: str = "",
    ) -> None:
        self.text, self.source, self.where = text, source, where or source
        self.bos_token, self.eos_token = bos_token, eos_token
        self.template = compile_template(text, self.where)

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        """The conversation as prompt text; ConfigError for messages that are not a chat
        (naming the field) and for whatever the template raises (its own message)."""
        if not isinstance(add_generation_prompt, bool):
            raise ConfigError("add_generation_prompt: expected true or false")
        checked = check_messages(messages)
        try:
            return self.template.render(
                messages=checked,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                tools=None,
                documents=None,
            )
        except jinja2.TemplateError as e:  # raise_exception's refusal, an undefined value
            raise ConfigError(f"chat template: {e}") from None
        except Exception as e:  # the template is a checkpoint's code: its failure, not ours
            raise ConfigError(f"chat template: {type(e).__name__}: {e}") from None


def compile_template(text: str, where: str) -> jinja2.Template:
    if not isinstance(text, str):
        raise ConfigError(f"chat template ({where}): {type(text).__name__}, not Jinja text")
    try:
        return environment().from_string(text)
    except jinja2.TemplateSyntaxError as e:
        raise ConfigError(f"chat template ({where}), line {e.lineno}: {e.message}") from None


# ---------------------------------------------------------------------------------------
# The environment transformers renders in


@functools.cache
def environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[GenerationBlock, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


def raise_exception(message: str) -> None:
    """How a template refuses a conversation."""
    raise jinja2.TemplateError(message)


def tojson(
    value: object,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    """Plain JSON: Jinja's own tojson escapes HTML characters (<, >, &, ')."""
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def strftime_now(format: str) -> str:
    """Today's date in a system prompt (Llama 3's templates write it)."""
    return datetime.now().strftime(format)


class GenerationBlock(jinja2.ext.Extension):
    """{% generation %}...{% endgeneration %}: transformers marks the assistant's tokens
    with it for training masks; rendering it renders its body, in a scope of its own."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


# ---------------------------------------------------------------------------------------
# Messages


def check_messages(messages: object) -> list[dict[str, str]]:
    """The conversation as the template sees it, [{"role", "content"}] with content as one
    string; ConfigError naming the first field that is not a chat's."""
    if not isinstance(messages, list | tuple) or not messages:
        raise ConfigError('messages: expected a non-empty list of {"role", "content"} objects')
    return [check_message(message, f"messages[{i}]") for i, message in enumerate(messages)]


def check_message(message: object, where: str) -> dict[str, str]:
    if not isinstance(message, dict):
        raise ConfigError(f'{where}: expected an object with "role" and "content"')
    if "role" not in message:
        raise ConfigError(f"{where}.role: missing; one of {', '.join(ROLES)}")
    role = message["role"]
    if not isinstance(role, str) or role not in ROLES:
        raise ConfigError(f"{where}.role: {role!r} is not one of {', '.join(ROLES)}")
    return {"role": role, "content": message_text(message.get("content"), f"{where}.content")}


def message_text(content: object, where: str) -> str:
    """A message's content as text: a string, or OpenAI's text parts joined with newlines."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        got = "missing" if content is None else f"got {type(content).__name__}"
        raise ConfigError(f"{where}: {got}; expected a string or a list of text parts {PARTS}")
    texts = []
    for i, part in enumerate(content):
        if not isinstance(part, dict):
            raise ConfigError(f'{where}[{i}]: expected a text part {{"type": "text", "text": ...}}')
        if part.get("type") != "text":
            raise ConfigError(
                f"{where}[{i}].type: {part.get('type')!r} parts are not supported; only "
                '"text" parts'
            )
        if not isinstance(part.get("text"), str):
            raise ConfigError(f"{where}[{i}].text: expected a string")
        texts.append(part["text"])
    return "\n".join(texts)


# ---------------------------------------------------------------------------------------
# A checkpoint's template


def load_chat_template(
    directory: str | os.PathLike, override_file: str | os.PathLike | None = None
) -> ChatTemplate:
    """The chat template to prompt the model of `directory` with: the file's, if given,
    else the checkpoint's own, else DEFAULT_TEMPLATE (see the module's docstring)."""
    directory = Path(directory)
    config = read_config(directory)
    tokens = {
        "bos_token": token_text(config, "bos_token"),
        "eos_token": token_text(config, "eos_token"),
    }
    if override_file is not None:
        path = Path(override_file)
        return ChatTemplate(read_template_file(path), f"file {path}", **tokens)
    found = checkpoint_template(directory, config)
    if found is not None:
        text, where = found
        return ChatTemplate(text, "checkpoint", where, **tokens)
    return ChatTemplate(DEFAULT_TEMPLATE, "default", **tokens)


def read_chat_template(directory: str | os.PathLike) -> str | None:
    """The checkpoint's own chat template (chat_template.jinja, else tokenizer_config.json's
    "chat_template"), or None when it has none."""
    directory = Path(directory)
    found = checkpoint_template(directory, read_config(directory))
    return None if found is None else found[0]


def write_chat_template(directory: str | os.PathLike, template: str) -> None:
    """Set "chat_template" in DIR/tokenizer_config.json (created if missing; every other key
    kept), atomically; a chat_template.jinja there, which transformers reads first, is
    rewritten too. A template that does not compile is refused before anything is written."""
    directory = Path(directory)
    path = directory / CONFIG_FILE
    compile_template(template, f"the template for {path}")
    config = read_config(directory)
    atomic_write_json(path, {**config, "chat_template": template})
    if (directory / JINJA_FILE).is_file():
        atomic_write_text(directory / JINJA_FILE, template)


def read_config(directory: Path) -> dict:
    """DIR/tokenizer_config.json, {} when there is none."""
    path = directory / CONFIG_FILE
    return read_json(path, "a tokenizer config") if path.is_file() else {}


def checkpoint_template(directory: Path, config: dict) -> tuple[str, str] | None:
    """-> (the checkpoint's template, where it is), or None."""
    if (directory / JINJA_FILE).is_file():
        return read_template_file(directory / JINJA_FILE), f"{JINJA_FILE} of {directory}"
    where = f"{CONFIG_FILE} of {directory}"
    value = config.get("chat_template")
    if value is None or isinstance(value, str):
        return None if value is None else (value, where)
    if not isinstance(value, list):
        raise ConfigError(
            f"{directory / CONFIG_FILE}: chat_template is a {type(value).__name__}; expected "
            'a Jinja template (a string) or a list of {"name", "template"}'
        )
    named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
    if not isinstance(named.get("default"), str):
        names = ", ".join(repr(name) for name in named) or "none"
        raise ConfigError(
            f"{directory / CONFIG_FILE}: chat_template lists named templates ({names}) but "
            "none named 'default'; give the one to use as a template file"
        )
    return named["default"], f"{where} ('default')"


def read_template_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file (a Jinja chat template)") from None
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); a chat template is "
            "UTF-8 Jinja text"
        ) from None
    except OSError as e:
        raise OSError(f"{path}: cannot read the chat template ({e.strerror or e})") from None


def token_text(config: dict, key: str) -> str:
    """A special token of tokenizer_config.json as text: a string, or an AddedToken object's
    "content"; "" when it has none."""
    value = config.get(key)
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else ""
