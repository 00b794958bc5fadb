"""Question-answering data: SQuAD 1.1 / 2.0 JSON files and JSONL, read into QAExamples.

SQuAD's JSON (Rajpurkar et al., 2016; 2018) nests questions under paragraphs under
articles:

    {"data": [{"title": ..., "paragraphs": [{"context": ...,
        "qas": [{"id": ..., "question": ..., "answers": [{"text": ..., "answer_start": 42}],
                 "is_impossible": false}]}]}]}

JSONL has one question per line: {"context": ..., "question": ..., "answers": [...]} with
the answers as SQuAD's list of {"text", "answer_start"} objects or as the Hugging Face
datasets' {"text": [...], "answer_start": [...]}; "id" is optional. An empty answer list
(or "is_impossible": true) is a question without an answer in its context (SQuAD 2.0).

An answer_start is a character offset: an integer, or a whole float (12.0) or a string of
digits ("12"), as some exports write it. An answer whose text is not at its offset in the
context (a few of real SQuAD's have whitespace or offset quirks) is left out, and so is a
question left with no answer by that; one TformerWarning per file gives the count, as
BERT's SQuAD reader did. Any other wrong record is a DataError naming its place.

One file is split by context (`split_by_context`), so validation reads text not seen in
training.
"""

import json
import math
import os
import warnings
from pathlib import Path

from tformer.data.sources import json_kind, parse_json, read_text_file
from tformer.errors import DataError, TformerWarning
from tformer.files import sha256_of
from tformer.qa.windows import Answer, QAExample


def read_qa_file(path: str | os.PathLike) -> list[QAExample]:
    """Every question of a SQuAD JSON or a JSONL file; a record that cannot be used is a
    DataError naming the file, the line or the question's id (else its place in the JSON),
    and the field. Answers not at their offset are left out with one TformerWarning."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (SQuAD .json or .jsonl expected)")
    text = read_text_file(path)
    misaligned: list[str] = []  # where each left-out answer was, and what stood there
    if path.suffix == ".jsonl":
        examples = []
        # Only "\n" ends a line: JSON strings may hold U+2028, which splitlines() splits at.
        for number, line in enumerate(text.split("\n"), 1):
            if line.strip():
                where = f"{path}:{number}"
                record = expect(parse_json(line, where), dict, where, "the line")
                examples.append(from_record(record, where, f"{path.stem}-{number}", misaligned))
    else:
        examples = from_squad(parse_json(text, str(path)), str(path), misaligned)
    kept = [e for e in examples if e is not None]
    if misaligned:
        dropped = len(examples) - len(kept)
        note = (
            f"{len(misaligned)} answer(s) not at their 'answer_start' in the context left out"
            f"{f', and {dropped} question(s) left without an answer' if dropped else ''}; "
            f"the first: {misaligned[0]}"
        )
        if not kept:
            raise DataError(str(path), f"holds no usable questions: {note}")
        warnings.warn(f"{path}: {note}", TformerWarning, stacklevel=2)
    if not kept:
        raise DataError(str(path), "holds no questions")
    return kept


def expect(value, kind: type, where: str, what: str):
    """`value` if it is of JSON type `kind` (dict, list, str), else a DataError saying
    what `what` is instead."""
    if not isinstance(value, kind):
        raise DataError(where, f"{what}: expected {json_kind(kind())}, got {json_kind(value)}")
    return value


def field(record: dict, key: str, kind: type, where: str, place: str = ""):
    """record[key], which must be there and of JSON type `kind`."""
    name = f"{place}, '{key}'" if place else f"'{key}'"
    if key not in record:
        raise DataError(where, f"{name} is missing")
    return expect(record[key], kind, where, name)


def from_squad(document, where: str, misaligned: list[str]) -> list[QAExample | None]:
    """SQuAD's nesting data -> paragraphs -> qas, each level checked (None for a question
    whose every answer is misaligned)."""
    if not isinstance(document, dict) or not isinstance(document.get("data"), list):
        raise DataError(where, "not SQuAD JSON (no 'data' list); JSONL needs a .jsonl name")
    examples = []
    for i, article in enumerate(document["data"]):
        expect(article, dict, where, f"data[{i}]")
        for j, paragraph in enumerate(field(article, "paragraphs", list, where, f"data[{i}]")):
            place = f"data[{i}].paragraphs[{j}]"
            expect(paragraph, dict, where, place)
            context = field(paragraph, "context", str, where, place)
            for k, qa in enumerate(field(paragraph, "qas", list, where, place)):
                place_k = f"{place}.qas[{k}]"
                examples.append(from_squad_question(qa, context, where, place_k, misaligned))
    return examples


def from_squad_question(
    qa, context: str, where: str, place: str, misaligned: list[str]
) -> QAExample | None:
    """One entry of a paragraph's "qas", named by its id once that is known to be one."""
    expect(qa, dict, where, place)
    if "id" not in qa:
        raise DataError(where, f"{place}, 'id' is missing")
    qa_id = qa["id"]
    if isinstance(qa_id, bool) or not isinstance(qa_id, str | int):
        raise DataError(where, f"{place}, 'id': expected a string, got {json_kind(qa_id)}")
    where = f"{where}, question {str(qa_id)!r}"
    impossible = qa.get("is_impossible", False)
    if not isinstance(impossible, bool):
        raise DataError(
            where, f"'is_impossible': expected true or false, got {json_kind(impossible)}"
        )
    record = {
        "id": qa_id,
        "context": context,
        "answers": [] if impossible else qa.get("answers", []),
    }
    if "question" in qa:
        record["question"] = qa["question"]
    return from_record(record, where, "", misaligned)


def from_record(
    record: dict, where: str, default_id: str, misaligned: list[str]
) -> QAExample | None:
    """One question: its context, question and answers (SQuAD's list of objects, or the
    Hugging Face datasets' parallel lists). An answer not at its offset is left out and
    described in `misaligned`; None if that leaves a question that had answers with none."""
    context = field(record, "context", str, where)
    question = field(record, "question", str, where)
    answers = record.get("answers", [])
    if isinstance(answers, dict):
        answers = parallel_answers(answers, where)
    expect(answers, list, where, "'answers'")
    example_id = record.get("id", default_id)
    if isinstance(example_id, bool) or not isinstance(example_id, str | int):
        raise DataError(where, f"'id': expected a string, got {json_kind(example_id)}")
    parsed = []
    for i, answer in enumerate(answers):
        text, start = parse_answer(answer, where, f"'answers'[{i}]")
        found = context[start : start + len(text)]
        if found == text:
            parsed.append(Answer(text, start))
        else:
            misaligned.append(
                f"{where}, 'answers'[{i}]: {text!r} is not at character {start} of the "
                f"context (found {found!r} there)"
            )
    if answers and not parsed:
        return None
    return QAExample(str(example_id), question, context, parsed)


def parallel_answers(answers: dict, where: str) -> list[dict]:
    """{"text": [...], "answer_start": [...]} -> SQuAD's list of answer objects."""
    texts = field(answers, "text", list, where, "'answers'")
    starts = field(answers, "answer_start", list, where, "'answers'")
    if len(texts) != len(starts):
        raise DataError(
            where,
            f"'answers': {len(texts)} 'text' but {len(starts)} 'answer_start' entries; "
            "each answer needs both",
        )
    return [{"text": t, "answer_start": s} for t, s in zip(texts, starts, strict=True)]


def parse_answer(answer, where: str, place: str) -> tuple[str, int]:
    """One answer object's text and `answer_start`: a character offset >= 0, written as an
    integer, a whole float (12.0) or a string of digits ("12")."""
    expect(answer, dict, where, place)
    text = field(answer, "text", str, where, place)
    if "answer_start" not in answer:
        raise DataError(where, f"{place}, 'answer_start' is missing")
    start = offset(answer["answer_start"])
    if start is None:
        value = answer["answer_start"]
        number = isinstance(value, int | float | str) and not isinstance(value, bool)
        got = repr(value) if number else json_kind(value)
        raise DataError(
            where, f"{place}, 'answer_start': expected a character offset >= 0, got {got}"
        )
    return text, start


def offset(value) -> int | None:
    """`value` as a character offset >= 0, if it is one: 12, 12.0 or "12" (None else)."""
    whole = isinstance(value, float) and math.isfinite(value) and value.is_integer()
    digits = isinstance(value, str) and value.strip().isascii() and value.strip().isdigit()
    if whole or digits:
        value = int(value)
    return value if type(value) is int and value >= 0 else None  # True is no offset


def split_by_context(
    examples: list[QAExample], source: str = "the questions"
) -> tuple[list[QAExample], list[QAExample]]:
    """The questions of the first 90% of contexts (in file order) and of the last 10%: no
    context is in both, so validation measures reading new text."""
    contexts = list(dict.fromkeys(e.context for e in examples))
    if len(contexts) < 2:
        raise DataError(
            source, "one context cannot be split for validation: pass --train and --val"
        )
    held_out = set(contexts[len(contexts) - max(1, len(contexts) // 10) :])
    train = [e for e in examples if e.context not in held_out]
    return train, [e for e in examples if e.context in held_out]


def fingerprint(examples: list[QAExample]) -> str:
    return sha256_of(
        json.dumps([e.id, e.question, e.context, [(a.text, a.start) for a in e.answers]])
        for e in examples
    )
