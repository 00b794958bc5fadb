import json
import warnings

import pytest

from tformer.errors import DataError, TformerWarning
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
            r"a.jsonl: holds no usable questions: 1 answer\(s\) .* is not at character 3",
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


def jsonl_of(tmp_path, *records):
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.mark.parametrize("start", [29, 29.0, "29", " 29 "])
def test_answer_start_as_integer_whole_float_or_digits(tmp_path, start):
    answers = [{"text": "Denver Broncos", "answer_start": start}]
    path = jsonl_of(tmp_path, {"context": CONTEXT, "question": "Who?", "answers": answers})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (example,) = read_qa_file(path)
    assert example.answers == [Answer("Denver Broncos", 29)]
    assert type(example.answers[0].start) is int


@pytest.mark.parametrize(
    "start, got",
    [(29.5, "29.5"), ("29.0", "'29.0'"), ("-1", "'-1'"), (-1, "-1"), (True, "true or false")],
)
def test_answer_start_that_is_no_offset_is_refused(tmp_path, start, got):
    answers = [{"text": "Denver Broncos", "answer_start": start}]
    path = jsonl_of(tmp_path, {"context": CONTEXT, "question": "Who?", "answers": answers})
    with pytest.raises(DataError) as error:
        read_qa_file(path)
    assert error.value.where == f"{path}:1"
    assert error.value.problem == (
        f"'answers'[0], 'answer_start': expected a character offset >= 0, got {got}"
    )


def test_misaligned_answers_are_left_out_with_one_warning(tmp_path):
    broncos, clara = CONTEXT.index("Denver Broncos"), CONTEXT.index("Santa Clara")
    path = jsonl_of(
        tmp_path,
        # one answer of two misaligned: the question keeps the other
        {"id": "a", "context": CONTEXT, "question": "Who?", "answers": [
            {"text": "Denver Broncos", "answer_start": broncos + 1},
            {"text": "Denver Broncos", "answer_start": broncos}]},
        # its only answer misaligned: the question is left out
        {"id": "b", "context": CONTEXT, "question": "Where?", "answers": [
            {"text": "Santa Clara", "answer_start": clara - 1}]},
        # no answer (SQuAD 2.0): kept
        {"id": "c", "context": CONTEXT, "question": "When?", "answers": []},
    )  # fmt: skip
    with pytest.warns(TformerWarning) as caught:
        examples = read_qa_file(path)
    assert [(e.id, e.answers) for e in examples] == [
        ("a", [Answer("Denver Broncos", broncos)]),
        ("c", []),
    ]
    (warning,) = caught
    message = str(warning.message)
    assert "\n" not in message
    assert message.startswith(f"{path}: 2 answer(s) not at their 'answer_start'")
    assert "and 1 question(s) left without an answer" in message
    assert f"{path}:1, 'answers'[0]: 'Denver Broncos' is not at character {broncos + 1}" in message


def test_misaligned_squad_answers_are_left_out(tmp_path):
    document = json.loads(json.dumps(SQUAD))
    document["data"][0]["paragraphs"][0]["qas"][0]["answers"][1]["answer_start"] = 0
    (tmp_path / "dev.json").write_text(json.dumps(document))
    with pytest.warns(TformerWarning, match="question 'q1', 'answers'\\[1\\]"):
        first, second = read_qa_file(tmp_path / "dev.json")
    assert first.answers == [Answer("Denver Broncos", 29)]
    assert second.answers == []


def test_aligned_files_give_no_warning(tmp_path):
    path = tmp_path / "dev.json"
    path.write_text(json.dumps(SQUAD))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(read_qa_file(path)) == 2
