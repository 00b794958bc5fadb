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

One file is split by context (`split_by_context`), so validation reads text not seen in
training.
"""

import json
import os
from pathlib import Path

from tformer.files import sha256_of
from tformer.qa.windows import Answer, QAExample


def read_qa_file(path: str | os.PathLike) -> list[QAExample]:
    """Every question of a SQuAD JSON or a JSONL file; errors name the file and the place."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (SQuAD .json or .jsonl expected)")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        examples = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                record = _json(line, f"{path}, line {number}")
                examples.append(_from_record(record, f"{path}:{number}", f"{path.stem}-{number}"))
    else:
        examples = _from_squad(_json(text, str(path)), str(path))
    if not examples:
        raise ValueError(f"{path}: holds no questions")
    return examples


def _json(text: str, where: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg} at line {e.lineno})") from None


def _from_squad(document: dict, where: str) -> list[QAExample]:
    if not isinstance(document, dict) or not isinstance(document.get("data"), list):
        raise ValueError(f"{where}: not SQuAD JSON (no 'data' list); JSONL needs a .jsonl name")
    examples = []
    for article in document["data"]:
        for paragraph in article.get("paragraphs", []):
            context = paragraph["context"]
            for qa in paragraph.get("qas", []):
                answers = [] if qa.get("is_impossible") else qa.get("answers", [])
                record = {"id": qa["id"], "question": qa["question"], "answers": answers}
                examples.append(_from_record({**record, "context": context}, where, qa["id"]))
    return examples


def _from_record(record: dict, where: str, default_id: str) -> QAExample:
    missing = [key for key in ("context", "question") if not isinstance(record.get(key), str)]
    if missing:
        raise ValueError(f"{where}: no {' or '.join(missing)} text")
    answers = record.get("answers", [])
    if isinstance(answers, dict):  # the datasets layout: parallel lists
        answers = [
            {"text": t, "answer_start": s}
            for t, s in zip(answers.get("text", []), answers.get("answer_start", []), strict=True)
        ]
    try:
        parsed = [Answer(a["text"], int(a["answer_start"])) for a in answers]
        return QAExample(
            str(record.get("id", default_id)), record["question"], record["context"], parsed
        )
    except (KeyError, TypeError) as e:
        raise ValueError(f"{where}: an answer needs 'text' and 'answer_start' ({e})") from None
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def split_by_context(examples: list[QAExample]) -> tuple[list[QAExample], list[QAExample]]:
    """The questions of the first 90% of contexts (in file order) and of the last 10%: no
    context is in both, so validation measures reading new text."""
    contexts = list(dict.fromkeys(e.context for e in examples))
    if len(contexts) < 2:
        raise ValueError("one context cannot be split for validation: pass --train and --val")
    held_out = set(contexts[len(contexts) - max(1, len(contexts) // 10) :])
    train = [e for e in examples if e.context not in held_out]
    return train, [e for e in examples if e.context in held_out]


def fingerprint(examples: list[QAExample]) -> str:
    return sha256_of(
        json.dumps([e.id, e.question, e.context, [(a.text, a.start) for a in e.answers]])
        for e in examples
    )
