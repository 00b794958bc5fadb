import json

import pytest

from tformer.errors import DataError
from tformer.qa.squad import read_qa_file
from tformer.qa.windows import Answer

CONTEXT = "Super Bowl 50 was won by the Denver Broncos in Santa Clara."
SQUAD = {
    "version": "v2.0",
    "data": [
        {
            "title": "Super_Bowl_50",
            "paragraphs": [
                {
                    "context": CONTEXT,
                    "qas": [
                        {
                            "id": "q1",
                            "question": "Who won Super Bowl 50?",
                            "answers": [
                                {"text": "Denver Broncos", "answer_start": 29},
                                {"text": "the Denver Broncos", "answer_start": 25},
                            ],
                        },
                        {
                            "id": "q2",
                            "question": "Who lost Super Bowl 51?",
                            "answers": [],
                            "is_impossible": True,
                        },
                    ],
                }
            ],
        }
    ],
}


def test_squad_json_with_an_unanswerable_question(tmp_path):
    path = tmp_path / "dev.json"
    path.write_text(json.dumps(SQUAD))
    first, second = read_qa_file(path)
    assert (first.id, first.question, first.context) == ("q1", "Who won Super Bowl 50?", CONTEXT)
    assert first.answers == [Answer("Denver Broncos", 29), Answer("the Denver Broncos", 25)]
    assert second.answers == []


def test_jsonl_in_both_answer_layouts(tmp_path):
    path = tmp_path / "qa.jsonl"
    lines = [
        {
            "context": CONTEXT,
            "question": "Where?",
            "answers": [{"text": "Santa Clara", "answer_start": 47}],
        },
        {
            "id": "x",
            "context": CONTEXT,
            "question": "Who?",
            "answers": {"text": ["Denver Broncos"], "answer_start": [29]},
        },
    ]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    first, second = read_qa_file(path)
    assert first.id == "qa-1" and first.answers == [Answer("Santa Clara", 47)]
    assert second.id == "x" and second.answers == [Answer("Denver Broncos", 29)]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("a.json", '{"nope": 1}', "not SQuAD JSON"),
        ("a.json", "{", "not valid JSON"),
        ("a.jsonl", '{"question": "Who?"}\n', "a.jsonl:1: 'context' is missing"),
        (
            "a.jsonl",
            json.dumps(
                {
                    "context": CONTEXT,
                    "question": "Q",
                    "answers": [{"text": "Broncos", "answer_start": 3}],
                }
            ),
            "is not at character 3",
        ),
        ("a.jsonl", "\n", "holds no questions"),
    ],
)
def test_bad_files_get_a_clear_error(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        read_qa_file(path)
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_qa_file(tmp_path / "missing.json")


def test_a_squad_error_names_the_question_by_its_id(tmp_path):
    document = {"data": [{"paragraphs": [{"context": CONTEXT, "qas": [
        {"id": "56be4db0", "question": "Who?", "answers": [{"text": "Broncos"}]}]}]}]}  # fmt: skip
    (tmp_path / "s.json").write_text(json.dumps(document))
    with pytest.raises(DataError) as error:
        read_qa_file(tmp_path / "s.json")
    assert error.value.where.endswith("s.json, question '56be4db0'")
    assert error.value.problem == "'answers'[0], 'answer_start' is missing"
