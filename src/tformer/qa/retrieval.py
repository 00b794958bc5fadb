"""Finding the passages worth reading in a large text: a BM25 index (the `bm25s` library).

A reader reads a few hundred tokens at a time, so a question over a whole corpus first
retrieves candidate passages. BM25 (Robertson and Zaragoza, 2009) scores a passage d for a
question q by the words they share, rare words counting more:

    score(q, d) = sum over t in q of  IDF(t) f(t, d) (k1 + 1) / (f(t, d) + k1 N(d))
    N(d) = 1 - b + b |d| / avg |d|

with f(t, d) the count of t in d, |d| its length in words, k1 = 1.5 and b = 0.75 (bm25s's
defaults), and English stop words left out.

The corpus is cut into passages that keep their place in it: a directory of .txt files (or
one file) into runs of paragraphs of about PASSAGE_WORDS words (a longer paragraph alone),
located by file and line; the built-in `bible` into runs of BIBLE_VERSES verses ("Genesis
1:1-5"), `shakespeare` into runs of SHAKESPEARE_LINES spoken lines ("HAMLET, PRINCE OF
DENMARK, lines 41-50"). The index and the passages are saved once under the cache directory,
keyed by the corpus (a built-in's name; each file's path, size and time), and loaded from
there the next time.
"""

import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from tformer.data.sources import read_text_file
from tformer.files import cache_dir

PASSAGE_WORDS = 120
BIBLE_VERSES = 5
SHAKESPEARE_LINES = 10
BUILTIN_CORPORA = ("bible", "shakespeare")
PASSAGES_FILE = "passages.jsonl"


@dataclass(frozen=True)
class Passage:
    text: str
    location: str  # where it is: "Genesis 1:1-5", "notes.txt, lines 3-9"


def file_passages(path: Path, name: str) -> list[Passage]:
    """Runs of paragraphs (split at blank lines) of about PASSAGE_WORDS words."""
    lines = read_text_file(path).splitlines()
    passages, words, first, paragraph = [], 0, None, []
    for number, line in enumerate([*lines, ""], 1):
        if line.strip():
            paragraph.append(line.strip())
            first = first or number
            words += len(line.split())
            continue
        if paragraph and words >= PASSAGE_WORDS or number == len(lines) + 1 and paragraph:
            passages.append(Passage(" ".join(paragraph), f"{name}, lines {first}-{number - 1}"))
            paragraph, words, first = [], 0, None
    return passages


def corpus_passages(corpus: str) -> list[Passage]:
    """The passages of a built-in corpus, a directory of .txt files, or one text file."""
    if corpus == "bible":
        from tformer.data.bible import read_verses

        chapters: dict[tuple[str, int], list[tuple[int, str]]] = {}
        for book, chapter, verse, text, _ in read_verses():
            if text:
                chapters.setdefault((book, chapter), []).append((verse, text))
        passages = []
        for (book, chapter), verses in chapters.items():  # runs never cross a chapter
            for i in range(0, len(verses), BIBLE_VERSES):
                run = verses[i : i + BIBLE_VERSES]
                location = f"{book} {chapter}:{run[0][0]}-{run[-1][0]}"
                passages.append(Passage(" ".join(text for _, text in run), location))
        return passages
    if corpus == "shakespeare":
        from tformer.data.sources import shakespeare_text
        from tformer.qa.cloze import shakespeare_units

        passages = []
        for title, lines in shakespeare_units(shakespeare_text()).items():
            for i in range(0, len(lines), SHAKESPEARE_LINES):
                run = lines[i : i + SHAKESPEARE_LINES]
                passages.append(Passage(" ".join(run), f"{title}, lines {i + 1}-{i + len(run)}"))
        return passages
    path = Path(corpus)
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise ValueError(f"{path}: no .txt files to search")
        passages = [p for f in files for p in file_passages(f, str(f.relative_to(path)))]
    elif path.is_file():
        passages = file_passages(path, path.name)
    else:
        raise FileNotFoundError(
            f"{corpus}: no such file or directory (built-in corpora: {', '.join(BUILTIN_CORPORA)})"
        )
    if not passages:
        raise ValueError(f"{corpus}: holds no text to search")
    return passages


def corpus_key(corpus: str) -> str:
    """Names a corpus's index: a built-in's name and version, or every file's path, size and
    modification time (so an edited file builds a new index)."""
    digest = hashlib.sha256(
        f"passages-v2:{PASSAGE_WORDS}:{BIBLE_VERSES}:{SHAKESPEARE_LINES}".encode()
    )
    if corpus in BUILTIN_CORPORA:
        digest.update(corpus.encode())
    else:
        path = Path(corpus).resolve()
        files = sorted(path.rglob("*.txt")) if path.is_dir() else [path]
        for f in files:
            if f.is_file():
                stat = f.stat()
                digest.update(f"{f}:{stat.st_size}:{stat.st_mtime_ns}".encode())
        if not any(f.is_file() for f in files):
            corpus_passages(corpus)  # raises the right error
    return digest.hexdigest()[:24]


class PassageIndex:
    """BM25 over passages: search(question, k) -> [(passage, score)], best first."""

    def __init__(self, passages: list[Passage], retriever) -> None:
        self.passages = passages
        self.retriever = retriever

    @classmethod
    def for_corpus(cls, corpus: str) -> tuple["PassageIndex", float]:
        """The corpus's index from the cache, or built and saved there; and the seconds it
        took to build (0 when it was loaded)."""
        import bm25s

        directory = cache_dir() / "indexes" / corpus_key(corpus)
        if (directory / PASSAGES_FILE).is_file():
            lines = (directory / PASSAGES_FILE).read_text(encoding="utf-8").splitlines()
            passages = [Passage(**json.loads(line)) for line in lines]
            return cls(passages, bm25s.BM25.load(str(directory), show_progress=False)), 0.0
        started = time.perf_counter()
        passages = corpus_passages(corpus)
        retriever = bm25s.BM25()
        tokens = bm25s.tokenize([p.text for p in passages], stopwords="en", show_progress=False)
        retriever.index(tokens, show_progress=False)
        seconds = time.perf_counter() - started
        tmp = directory.with_name(f".{directory.name}.{uuid.uuid4().hex[:8]}.tmp")
        retriever.save(str(tmp), show_progress=False)
        (tmp / PASSAGES_FILE).write_text(
            "".join(json.dumps(asdict(p)) + "\n" for p in passages), encoding="utf-8"
        )
        try:
            os.replace(tmp, directory)  # whole or not at all
        except OSError:  # another process saved it first
            shutil.rmtree(tmp, ignore_errors=True)
        return cls(passages, retriever), seconds

    def search(self, question: str, k: int = 5) -> list[tuple[Passage, float]]:
        import bm25s

        tokens = bm25s.tokenize([question], stopwords="en", show_progress=False)
        if not tokens.vocab:
            raise ValueError(f"the question {question!r} has no word to search for")
        k = min(k, len(self.passages))
        ids, scores = self.retriever.retrieve(tokens, k=k, show_progress=False)
        found = zip(ids[0], scores[0], strict=True)
        return [(self.passages[int(i)], float(s)) for i, s in found if s > 0]  # a shared word
