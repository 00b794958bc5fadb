"""The built-in parallel corpus `bible-en-es`: the King James Version (English) and the
Reina-Valera 1909 (Spanish), verse by verse.

Both come from Debian's SWORD modules (`apt-get install sword-text-kjv sword-text-sparv`,
modules engKJV2006eb and spaRV1909eb under /usr/share/sword, or $SWORD_PATH), read with the
pure-Python reader `pysword`. Both use the KJV versification, so verse (book, chapter, n) of
one is the same verse of the other, with these exceptions, all handled here:

- markup: the text is OSIS (Strong's numbers in <w>, notes, titles, milestones). A note
  becomes a space (it can sit between two words), every other tag is dropped but its text
  kept (so the Psalm titles stay, as RV1909 has them inline), entities are unescaped, the
  pilcrow is dropped and whitespace collapsed;
- chapters where RV1909 keeps its own verse division (its text is shifted by a verse):
  MISALIGNED, left out whole;
- 18 verses empty in RV1909, and pairs whose lengths differ more than twice (a sign of a
  shifted verse): left out.

The split is by book, so no chapter is in two splits: Zechariah and Jude for validation,
Malachi and Revelation (the last book of each testament) for test, the other 62 books for
training. The pairs are cached as JSONL under $TFORMER_CACHE/corpora/.
"""

import functools
import html
import json
import os
import re
from pathlib import Path

from tformer.data.cache import read_cache
from tformer.files import atomic_write_text, cache_dir

MODULES = ("engKJV2006eb", "spaRV1909eb")  # English, Spanish
VALIDATION_BOOKS = ("Zechariah", "Jude")
TEST_BOOKS = ("Malachi", "Revelation of John")
# (book, chapter) where RV1909's verse division differs from the KJV's.
MISALIGNED = {
    ("Numbers", 13),
    ("Numbers", 30),
    ("I Samuel", 24),
    ("I Chronicles", 21),
    ("II Chronicles", 33),
    ("Job", 38),
    ("Job", 39),
    ("Job", 40),
    ("Job", 41),
    ("Hosea", 12),
    ("Jonah", 2),
    ("II Corinthians", 13),
}
MAX_LENGTH_RATIO = 2.0
INSTALL_HINT = (
    "the bible-en-es corpus needs Debian's SWORD modules and pysword: "
    "apt-get install sword-text-kjv sword-text-sparv; pip install pysword"
)

_NOTE = re.compile(r"<note\b[^>]*>.*?</note>", re.DOTALL)
_TAG = re.compile(r"<[^>]*>")
_SPACE = re.compile(r"\s+")


def clean_osis(text: str) -> str:
    """OSIS markup -> plain text (see the module docstring for the rules)."""
    text = _NOTE.sub(" ", text)
    text = _TAG.sub("", text)
    text = html.unescape(text).replace("¶", "")
    return _SPACE.sub(" ", text).strip()


def sword_path() -> Path:
    return Path(os.environ.get("SWORD_PATH", "/usr/share/sword"))


def read_verses() -> list[tuple[str, int, int, str, str]]:
    """Every verse of both Bibles: (book, chapter, verse, English, Spanish), cleaned."""
    try:
        from pysword.modules import SwordModules
    except ImportError:
        raise FileNotFoundError(INSTALL_HINT) from None
    path = sword_path()
    modules = SwordModules(str(path))
    found = modules.parse_modules() if (path / "mods.d").is_dir() else {}
    missing = [m for m in MODULES if m not in found]
    if missing:
        raise FileNotFoundError(f"{path}: no SWORD module {', '.join(missing)}; {INSTALL_HINT}")
    bibles = []
    for key in MODULES:
        bible = modules.get_bible_from_module(key)
        # pysword decompresses a whole block of verses for every verse it returns; each
        # block once is far faster (docs/LOG.md; a private method, wrapped, not changed).
        bible._decompressed_text = functools.lru_cache(maxsize=None)(bible._decompressed_text)
        bibles.append(bible)
    english, spanish = bibles
    verses = []
    structure = english.get_structure().get_books()
    for book in structure["ot"] + structure["nt"]:
        for chapter, length in enumerate(book.chapter_lengths, start=1):
            for verse in range(1, length + 1):
                texts = [
                    clean_osis(b.get(books=book.name, chapters=chapter, verses=verse, clean=False))
                    for b in (english, spanish)
                ]
                verses.append((book.name, chapter, verse, *texts))
    return verses


def aligned_pairs(verses) -> tuple[dict[str, list[tuple[str, str]]], dict[str, int]]:
    """The verse pairs by split, and how many verses each filter left out."""
    splits: dict[str, list[tuple[str, str]]] = {"train": [], "val": [], "test": []}
    dropped = {"misaligned chapters": 0, "empty": 0, "length ratio > 2": 0}
    for book, chapter, _, en, es in verses:
        if (book, chapter) in MISALIGNED:
            dropped["misaligned chapters"] += 1
        elif not en or not es:
            dropped["empty"] += 1
        elif max(len(en), len(es)) > MAX_LENGTH_RATIO * min(len(en), len(es)):
            dropped["length ratio > 2"] += 1
        else:
            split = "val" if book in VALIDATION_BOOKS else "test" if book in TEST_BOOKS else "train"
            splits[split].append((en, es))
    return splits, dropped


def bible_en_es() -> tuple[dict[str, list[tuple[str, str]]], dict[str, int]]:
    """The corpus by split (train, val, test) and the filter counts, built once and cached."""
    path = cache_dir() / "corpora" / "bible-en-es.jsonl"
    if not path.is_file():
        splits, dropped = aligned_pairs(read_verses())
        lines = [json.dumps({"dropped": dropped})]
        for split, pairs in splits.items():
            lines += [json.dumps({"split": split, "src": s, "tgt": t}) for s, t in pairs]
        atomic_write_text(path, "\n".join(lines) + "\n")
    return read_cache(path, "bible-en-es", read_cached_pairs)


def read_cached_pairs(path: Path) -> tuple[dict[str, list[tuple[str, str]]], dict[str, int]]:
    """The pairs by split and the filter counts, as bible_en_es wrote them."""
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    splits = {"train": [], "val": [], "test": []}
    for record in records[1:]:
        splits[record["split"]].append((record["src"], record["tgt"]))
    return splits, records[0]["dropped"]
