"""The built-in reading tasks `bible-qa` and `shakespeare-qa`: cloze questions from real text.

No reading-comprehension data set can be fetched offline, so these are built from the text
the other tasks already use, as the Children's Book Test (Hill et al., 2016) and the
CNN/Daily Mail questions (Hermann et al., 2015) were built from books and news:

- the text is cut into units: the verses of the King James Bible (book by book), or the
  spoken lines of Shakespeare's plays and poems (work by work, a play from its Act I, so
  without its list of persons; speaker names, stage directions, act and scene headings left
  out);
- every unit that has CONTEXT_UNITS units before it in the same book or work is a question,
  and those units are its context (Bible 4 verses, Shakespeare 8 lines), so neighbouring
  examples share context but never a question;
- in the question one word is blanked out (replaced by XXXXX): a word of 3 or more letters
  that is not a function word (STOPWORDS: articles, pronouns, auxiliaries, prepositions,
  conjunctions, and the archaic ones of the KJV and Shakespeare) and that also occurs, in
  the same spelling, as a whole word in the context. Among such words one is drawn with a
  generator seeded by the example's position, so the task is the same on every machine;
- the answer is the word's last occurrence in the context (its character span).

The split is by book: as in `bible-en-es`, Zechariah and Jude are validation and Malachi
and the Revelation test; for Shakespeare, The Tempest and the Sonnets are validation and
Macbeth and Twelfth Night test; everything else is training. docs/qa.md gives the sizes
and the limits: there is no part-of-speech tagger offline, so "names and nouns" are
approximated by "content words", and some blanks (verbs, adjectives) are guessable from
grammar alone.
"""

import json
import random
import re

from tformer.data.cache import read_cache
from tformer.files import atomic_write_text, cache_dir
from tformer.qa.windows import Answer, QAExample

BUILTIN_QA = ("bible-qa", "shakespeare-qa")
BLANK = "XXXXX"
CONTEXT_UNITS = {"bible-qa": 4, "shakespeare-qa": 8}
SPLITS = {
    "bible-qa": {"val": ("Zechariah", "Jude"), "test": ("Malachi", "Revelation of John")},
    "shakespeare-qa": {
        "val": ("THE TEMPEST", "THE SONNETS"),
        "test": ("MACBETH", "TWELFTH NIGHT; OR, WHAT YOU WILL"),
    },
}
FUNCTION_WORDS = """
    a about above after again against all also am an and any are as at be because been before
    being below between both but by can could did do does doing done down during each either
    else ever every few for from further had has have having he her here hers herself him
    himself his how however if in into is it its itself just let like may me might mine more
    most much must my myself neither no nor not now of off on once one only or other ought our
    ours ourselves out over own same shall she should so some such than that the their theirs
    them themselves then there these they this those through thus to too under until up upon
    us very was we were what when where whether which while who whom whose why will with
    within without would yet you your yours yourself yourselves
    thee thou thy thine ye hath doth art hast dost shalt wilt unto saith said say says came
    come went go goes let make made upon thereof therein whereof wherefore hither thither
    whither whence wherein whereby hence thence lo behold yea nay o oh ah sir tis twas ere oft
    nigh
"""
STOPWORDS = frozenset(FUNCTION_WORDS.split())
WORD = re.compile(r"[A-Za-z]+(?:'[a-z]+)?")


def shakespeare_units(text: str) -> dict[str, list[str]]:
    """The spoken lines of each work, by title (the line before 'by William Shakespeare')."""
    lines = text.split("\n")
    bylines = [i for i, line in enumerate(lines) if line.strip() == "by William Shakespeare"]
    titles = []
    for i in bylines:
        title = i - 1
        while not lines[title].strip() or lines[title].strip().startswith("["):
            title -= 1  # blank lines, or a stage direction glued before the title
        titles.append(title)
    works = {}
    for n, byline in enumerate(bylines):
        end = titles[n + 1] if n + 1 < len(titles) else len(lines)  # the next work's title
        begin = byline + 1
        acts = [i for i in range(begin, end) if re.match(r"ACT (I|1)\b", lines[i].strip())]
        if acts:  # a play: its text starts at Act I, after the list of persons
            begin = acts[0]
        spoken = [line.strip() for line in lines[begin:end] if is_spoken(line)]
        works[lines[titles[n]].strip()] = spoken
    return works


def is_spoken(line: str) -> bool:
    """A line of verse or prose, not a heading, speaker name, stage direction or numeral."""
    line = line.strip()
    if len(WORD.findall(line)) < 3 or line.startswith("["):
        return False
    if line.isupper() or re.match(r"(ACT|SCENE)\b", line):
        return False
    return not (line.endswith(".") and len(line.split()) <= 3 and line[0].isupper())


def bible_units() -> dict[str, list[str]]:
    """The KJV's verses, book by book."""
    from tformer.data.bible import read_verses

    books: dict[str, list[str]] = {}
    for book, _, _, english, _ in read_verses():
        if english:
            books.setdefault(book, []).append(english)
    return books


def cloze_examples(name: str, units: dict[str, list[str]]) -> dict[str, list[QAExample]]:
    """The examples of each split, built as the module's docstring says."""
    k = CONTEXT_UNITS[name]
    splits: dict[str, list[QAExample]] = {"train": [], "val": [], "test": []}
    for source, texts in units.items():
        split = next((s for s, books in SPLITS[name].items() if source in books), "train")
        for first in range(len(texts) - k):
            example = cloze(f"{name}:{source}:{first}", texts[first : first + k], texts[first + k])
            if example is not None:
                splits[split].append(example)
    return splits


def cloze(example_id: str, context_units: list[str], question_unit: str) -> QAExample | None:
    """One example, or None when no word of the question qualifies."""
    context = " ".join(context_units)
    candidates = []
    words = [m.group() for m in WORD.finditer(question_unit)]
    for match in WORD.finditer(question_unit):
        word = match.group()
        if len(word) < 3 or word.lower() in STOPWORDS or words.count(word) > 1:
            continue  # a word the question repeats would give its own answer away
        found = list(re.finditer(rf"\b{re.escape(word)}\b", context))
        if found:
            candidates.append((match, found[-1].start()))
    if not candidates:
        return None
    match, answer_start = random.Random(example_id).choice(candidates)
    question = question_unit[: match.start()] + BLANK + question_unit[match.end() :]
    return QAExample(example_id, question, context, [Answer(match.group(), answer_start)])


def builtin_qa(name: str) -> dict[str, list[QAExample]]:
    """The examples of a built-in task by split (train, val, test), built once and cached."""
    if name not in BUILTIN_QA:
        raise ValueError(f"no built-in question set {name!r}; built in: {', '.join(BUILTIN_QA)}")
    path = cache_dir() / "corpora" / f"{name}.jsonl"
    if not path.is_file():
        if name == "bible-qa":
            units = bible_units()
        else:
            from tformer.data.sources import shakespeare_text

            units = shakespeare_units(shakespeare_text())
        splits = cloze_examples(name, units)
        lines = [
            json.dumps(
                {
                    "split": split,
                    "id": e.id,
                    "question": e.question,
                    "context": e.context,
                    "answer": e.answers[0].text,
                    "start": e.answers[0].start,
                }
            )
            for split, examples in splits.items()
            for e in examples
        ]
        atomic_write_text(path, "\n".join(lines) + "\n")
    return read_cache(path, name, read_cached_examples)


def read_cached_examples(path) -> dict[str, list[QAExample]]:
    """The examples by split, as builtin_qa wrote them."""
    splits = {"train": [], "val": [], "test": []}
    for line in path.read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        answers = [Answer(r["answer"], r["start"])]
        splits[r["split"]].append(QAExample(r["id"], r["question"], r["context"], answers))
    return splits
