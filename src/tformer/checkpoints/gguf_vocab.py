"""A tokenizer as GGUF metadata (`tokenizer.ggml.*`), in llama.cpp's byte-level BPE form.

llama.cpp's "gpt2" vocabulary is GPT-2's: every token is spelled in GPT-2's byte-to-unicode
form (bytes_to_unicode: a space is "Ġ"), merges are "left right" strings in rank order, and
each token has a type (1 normal, 3 control, 4 user-defined). All three of tformer's
tokenizers map onto it:

    GPT-2's BPE         the 50,256 ranked tokens, their merges, <|endoftext|> (control)
    a BPE trained here  its vocabulary and merges; added special tokens are control tokens
    characters          one token per character, spelled as its UTF-8 bytes; a character
                        of several bytes gets the merges that join them, in order

llama.cpp refuses a BPE vocabulary without merges, so a vocabulary of one-byte characters
gets one merge that no text reaches (a pair of bytes none of its characters contains).
llama.cpp's BPE vocabulary always has an end-of-generation token (id 11 unless the file
names one); a character vocabulary has none, so llama.cpp stops at character 11 unless told
to ignore the end of generation (`--ignore-eos`, the server's `ignore_eos`).

tokenizer_metadata(tokenizer) -> dict   the keys to write
tokenizer_from_metadata(meta, source)   the tokenizer back (tformer's own kind where the
                                        file says which, else a Hugging Face BPE)
"""

import json
from typing import Any

from tformer.checkpoints.errors import CheckpointError
from tformer.tokenizers import (
    ENDOFTEXT,
    GPT2_EOT_ID,
    CharTokenizer,
    GPT2Tokenizer,
    HFTokenizer,
    Tokenizer,
    merges_from_ranks,
    spell_bytes,
    unspell_bytes,
)

NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5
KIND_KEY = "tformer.tokenizer"  # "gpt2", "bpe" or "char": which of tformer's tokenizers


def unspell(text: str, source: str) -> bytes:
    """A token's bytes from its spelling, refused unless spelled byte by byte."""
    spelled = unspell_bytes(text)
    if spelled is None:
        raise CheckpointError(f"{source}: token {text!r} is not spelled byte by byte")
    return spelled


def check_tokenizer(tokenizer: Tokenizer, rows: int) -> None:
    """Refuse, before anything is written, a tokenizer GGUF cannot carry for a model with
    `rows` embedding rows (a smaller vocabulary is padded: tokenizer_metadata)."""
    if not isinstance(tokenizer, GPT2Tokenizer | CharTokenizer | HFTokenizer):
        raise ValueError(f"a {type(tokenizer).__name__} has no GGUF vocabulary")
    if isinstance(tokenizer, HFTokenizer):
        _bpe_spec(tokenizer)
    if tokenizer.vocab_size > rows:
        raise ValueError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {rows} "
            "embedding rows: they do not belong together"
        )


def tokenizer_metadata(tokenizer: Tokenizer, rows: int | None = None) -> dict[str, Any]:
    """The tokenizer.ggml.* keys (and tformer's own kind) for one of tformer's tokenizers.
    A model with more embedding rows than tokens (a vocabulary padded for speed) gets
    unused tokens "[PAD<i>]" for the rest, as llama.cpp's converter writes them: GGUF names
    one token per row."""
    check_tokenizer(tokenizer, rows or tokenizer.vocab_size)
    if isinstance(tokenizer, GPT2Tokenizer):
        kind, tokens, types, merges = "gpt2", *_gpt2_vocabulary(tokenizer)
    elif isinstance(tokenizer, CharTokenizer):
        kind, tokens, types, merges = "char", *_char_vocabulary(tokenizer)
    elif isinstance(tokenizer, HFTokenizer):
        kind, tokens, types, merges = "bpe", *_bpe_vocabulary(tokenizer)
    else:
        raise ValueError(f"a {type(tokenizer).__name__} has no GGUF vocabulary")
    for i in range(len(tokens), rows or len(tokens)):
        tokens.append(f"[PAD{i}]")
        types.append(UNUSED)
    metadata = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.add_bos_token": False,
        KIND_KEY: kind,
    }
    if tokenizer.eos_id is not None:
        metadata["tokenizer.ggml.bos_token_id"] = tokenizer.eos_id  # GPT-2's: one token
        metadata["tokenizer.ggml.eos_token_id"] = tokenizer.eos_id
    template = tokenizer.chat_template
    if isinstance(template, str):
        metadata["tokenizer.chat_template"] = template
    elif isinstance(template, list):  # named templates: "default" and the others by name
        for named in template:
            name, text = named.get("name"), named.get("template")
            if isinstance(name, str) and isinstance(text, str):
                key = "tokenizer.chat_template" + ("" if name == "default" else f".{name}")
                metadata[key] = text
    return metadata


def _gpt2_vocabulary(tokenizer: GPT2Tokenizer) -> tuple[list[str], list[int], list[str]]:
    tokens = [""] * tokenizer.vocab_size
    for token, rank in tokenizer.ranks.items():
        tokens[rank] = spell_bytes(token)
    tokens[GPT2_EOT_ID] = ENDOFTEXT
    types = [NORMAL] * GPT2_EOT_ID + [CONTROL]
    merges = [f"{spell_bytes(a)} {spell_bytes(b)}" for a, b in merges_from_ranks(tokenizer.ranks)]
    return tokens, types, merges


def _char_vocabulary(tokenizer: CharTokenizer) -> tuple[list[str], list[int], list[str]]:
    tokens, merges = [], []
    for char in tokenizer.chars:
        encoded = char.encode("utf-8", errors="surrogatepass")
        tokens.append(spell_bytes(encoded))
        for end in range(2, len(encoded) + 1):  # "a b", then "ab c": the bytes joined in order
            merges.append(
                f"{spell_bytes(encoded[: end - 1])} {spell_bytes(encoded[end - 1 : end])}"
            )
    if not merges:
        used = {b for char in tokenizer.chars for b in char.encode("utf-8", "surrogatepass")}
        unused = next((b for b in range(256) if b not in used), 0)
        merges.append(f"{spell_bytes(bytes([unused]))} {spell_bytes(bytes([unused]))}")
    return tokens, [NORMAL] * len(tokens), merges


def _bpe_spec(tokenizer: HFTokenizer) -> dict:
    """The tokenizer's JSON, refused unless llama.cpp's GPT-2 BPE computes it."""
    spec = json.loads(tokenizer.tokenizer.to_str())
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or pre.get("type") != "ByteLevel":
        raise ValueError(
            "only a byte-level BPE tokenizer (GPT-2's kind, as `tformer train --tokenizer bpe` "
            f"trains) has a GGUF vocabulary; this one is {model.get('type')} with a "
            f"{pre.get('type')} pre-tokenizer"
        )
    if pre.get("add_prefix_space") or not pre.get("use_regex", True):
        raise ValueError(
            "llama.cpp's GPT-2 pre-tokenizer splits text with GPT-2's pattern and adds no "
            "space in front; this tokenizer's ByteLevel pre-tokenizer does otherwise"
        )
    return spec


def _bpe_vocabulary(tokenizer: HFTokenizer) -> tuple[list[str], list[int], list[str]]:
    spec = _bpe_spec(tokenizer)
    model = spec["model"]
    tokens: list[str | None] = [None] * tokenizer.vocab_size
    types = [NORMAL] * tokenizer.vocab_size
    for token, i in model["vocab"].items():
        tokens[i] = token
    for added in spec.get("added_tokens") or []:
        tokens[added["id"]] = added["content"]
        types[added["id"]] = CONTROL if added.get("special") else USER_DEFINED
    if None in tokens:
        raise ValueError(f"the tokenizer has no token of id {tokens.index(None)}")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    return tokens, types, merges


def tokenizer_from_metadata(metadata: dict[str, Any], source: str) -> Tokenizer:
    """The tokenizer a GGUF file describes: tformer's own kind where the file names it (as
    tformer writes them), else a byte-level BPE from its tokens and merges."""
    model = metadata.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise CheckpointError(
            f"{source}: tokenizer.ggml.model is {model!r}; tformer reads llama.cpp's 'gpt2' "
            "(byte-level BPE) vocabularies"
        )
    tokens = metadata.get("tokenizer.ggml.tokens")
    if not tokens:
        raise CheckpointError(f"{source}: the GGUF metadata has no tokenizer.ggml.tokens")
    types = metadata.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    while tokens and types[len(tokens) - 1] == UNUSED:  # padding rows: no tokens of the text
        tokens = tokens[:-1]
    kind = metadata.get(KIND_KEY)
    if kind == "char":
        chars = [unspell(t, source).decode("utf-8", errors="surrogatepass") for t in tokens]
        tokenizer: Tokenizer = CharTokenizer(chars)
    elif kind == "gpt2" and len(tokens) == GPT2_EOT_ID + 1 and tokens[-1] == ENDOFTEXT:
        ranks = {unspell(t, source): i for i, t in enumerate(tokens[:GPT2_EOT_ID])}
        tokenizer = GPT2Tokenizer(ranks)
    else:
        tokenizer = _bpe_tokenizer(metadata, tokens, types[: len(tokens)], source)
    template = metadata.get("tokenizer.chat_template")
    tokenizer.chat_template = template if isinstance(template, str) else None
    return tokenizer


def _bpe_tokenizer(
    metadata: dict[str, Any], tokens: list[str], types: list[int], source: str
) -> HFTokenizer:
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as RustTokenizer

    merges = [tuple(m.split(" ", 1)) for m in metadata.get("tokenizer.ggml.merges") or []]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise CheckpointError(f"{source}: tokenizer.ggml.tokens repeats a token")
    try:
        rust = RustTokenizer(models.BPE(vocab, merges))
    except Exception as e:
        raise CheckpointError(f"{source}: not a byte-level BPE vocabulary ({e})") from None
    rust.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    rust.decoder = decoders.ByteLevel()
    kinds = list(zip(tokens, types, strict=True))
    rust.add_special_tokens([AddedToken(t, special=True) for t, k in kinds if k == CONTROL])
    rust.add_tokens([AddedToken(t) for t, k in kinds if k == USER_DEFINED])
    return HFTokenizer(rust)
