"""A data file with a wrong record is refused while it is read, before anything is trained
or written: one line naming the file, the line (or the question's id, or its place in
SQuAD's nesting) and the field, and the user's files untouched.

Each table row is (id, file name, content, what the error must name); the content is text,
bytes, or a JSON value (written as JSON)."""

import copy
import json

import pytest

LATIN1 = "caf\xe9 cr\xe8me\n".encode("latin-1")  # byte 3 is 0xe9: not UTF-8


def write(path, content) -> None:
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    else:
        path.write_text(json.dumps(content), encoding="utf-8")


def lines(*records) -> str:
    """JSONL: each record as JSON, or as it is when it is already a string."""
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)


def check_refused(refused, tmp_path, argv_start, name, content, names, extra=()):
    path = tmp_path / name
    write(path, content)
    out = tmp_path / "run"
    argv = [*argv_start, "--data", path, *extra, "--steps", "1", "--out", out]
    line = refused(argv, [name, *names], keep=[tmp_path])
    assert not out.exists(), line


# --- language modelling: text, a directory of text, JSONL with "text" --------------------

TEXT = "some training text. " * 20
LM = [
    ("latin1", "text.txt", LATIN1, ["not UTF-8", "byte 3 is 0xe9"]),
    ("empty", "text.txt", "", ["holds no text"]),
    ("blank", "text.txt", " \n\n\t\n", ["holds no text"]),
    ("jsonl-latin1", "d.jsonl", LATIN1, ["not UTF-8"]),
    ("jsonl-invalid", "d.jsonl", lines({"text": TEXT}, "{not json"), [":2", "not valid JSON"]),
    ("jsonl-truncated", "d.jsonl", '{"text": "abc', [":1", "not valid JSON"]),
    ("jsonl-array", "d.jsonl", lines([TEXT]), [":1", '"text"', "got an array"]),
    ("jsonl-number", "d.jsonl", lines(3), [":1", "got a number"]),
    ("jsonl-string", "d.jsonl", lines('"text"'), [":1", "got a string"]),
    ("jsonl-null", "d.jsonl", lines("null"), [":1", "got null"]),
    ("jsonl-bool", "d.jsonl", lines("true"), [":1", "got true or false"]),
    ("jsonl-missing", "d.jsonl", lines({"body": TEXT}), [":1", '"text" is missing']),
    ("jsonl-number-field", "d.jsonl", lines({"text": 5}), [":1", '"text" is a number']),
    ("jsonl-list-field", "d.jsonl", lines({"text": ["a"]}), [":1", '"text" is an array']),
    ("jsonl-null-field", "d.jsonl", lines({"text": None}), [":1", '"text" is null']),
    ("jsonl-object-field", "d.jsonl", lines({"text": {}}), [":1", '"text" is an object']),
    ("jsonl-nan", "d.jsonl", lines('{"text": NaN}'), [":1", "NaN"]),
    ("jsonl-third", "d.jsonl", lines({"text": TEXT}, {"text": TEXT}, {}), [":3", '"text"']),
    ("jsonl-deep", "d.jsonl", "[" * 100_000 + "]" * 100_000 + "\n", [":1"]),
]


@pytest.mark.parametrize("_, name, content, names", LM, ids=[row[0] for row in LM])
def test_lm_data(refused, tmp_path, _, name, content, names):
    check_refused(refused, tmp_path, ["train"], name, content, names)


def test_lm_directory_names_the_bad_file(refused, tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text(TEXT)
    (docs / "b.txt").write_bytes(LATIN1)
    out = tmp_path / "run"
    refused(["train", "--data", docs, "--out", out], ["b.txt", "not UTF-8"], keep=[tmp_path])


@pytest.mark.parametrize("which", ["--train", "--val"])
def test_lm_train_and_val_files_name_the_bad_one(refused, tmp_path, which):
    good, bad = tmp_path / "good.txt", tmp_path / "bad.txt"
    good.write_text(TEXT)
    bad.write_bytes(LATIN1)
    files = {"--train": good, "--val": good, which: bad}
    argv = ["train", "--train", files["--train"], "--val", files["--val"], "--out", tmp_path / "r"]
    refused(argv, ["bad.txt", "not UTF-8"], keep=[tmp_path])


# --- translation: TSV sentence pairs and JSONL {src, tgt} ---------------------------------

PAIRS = "".join(f"source {i}\tcible {i}\n" for i in range(40))
TRANSLATION = [
    ("tsv-three-fields", "p.tsv", PAIRS + "a\tb\tc\n", [":41", "found 3 field(s)"]),
    ("tsv-one-field", "p.tsv", "only a source\n" + PAIRS, [":1", "found 1 field(s)"]),
    ("tsv-empty-source", "p.tsv", PAIRS + "\tcible\n", [":41", "source is empty"]),
    ("tsv-empty-target", "p.tsv", PAIRS + "source\t \n", [":41", "target is empty"]),
    ("tsv-latin1", "p.tsv", LATIN1, ["not UTF-8"]),
    ("tsv-empty", "p.tsv", "\n\n", ["no sentence pairs"]),
    ("tsv-too-few", "p.tsv", "a\tb\n" * 5, ["too few"]),
    ("jsonl-missing", "p.jsonl", lines({"src": "a"}), [":1", '"tgt" is missing']),
    ("jsonl-number", "p.jsonl", lines({"src": 1, "tgt": "b"}), [":1", '"src" is a number']),
    ("jsonl-empty-src", "p.jsonl", lines({"src": "", "tgt": "b"}), [":1", '"src" is empty']),
    ("jsonl-array", "p.jsonl", lines(["a", "b"]), [":1", "got an array"]),
    ("jsonl-scalar", "p.jsonl", lines(7), [":1", "got a number"]),
    ("jsonl-invalid", "p.jsonl", lines({"src": "a", "tgt": "b"}, "{"), [":2", "not valid JSON"]),
    ("jsonl-latin1", "p.jsonl", LATIN1, ["not UTF-8"]),
]


@pytest.mark.parametrize(
    "_, name, content, names", TRANSLATION, ids=[row[0] for row in TRANSLATION]
)
def test_translation_data(refused, tmp_path, _, name, content, names):
    check_refused(refused, tmp_path, ["train", "--task", "translation"], name, content, names)


# --- question answering: SQuAD JSON -----------------------------------------------------


def squad() -> dict:
    """Two paragraphs (so the file can be split), one question each."""
    return {
        "version": "1.1",
        "data": [
            {
                "title": "T",
                "paragraphs": [
                    {
                        "context": "Denver Broncos won the game.",
                        "qas": [
                            {
                                "id": "q1",
                                "question": "Who won?",
                                "answers": [{"text": "Denver Broncos", "answer_start": 0}],
                            }
                        ],
                    },
                    {
                        "context": "Paris is in France.",
                        "qas": [
                            {
                                "id": "q2",
                                "question": "Where is Paris?",
                                "answers": [{"text": "France", "answer_start": 12}],
                            }
                        ],
                    },
                ],
            }
        ],
    }


def changed(change) -> dict:
    """SQuAD with `change(document, article, paragraph, question, answer)` applied."""
    document = copy.deepcopy(squad())
    article = document["data"][0]
    paragraph = article["paragraphs"][0]
    qa = paragraph["qas"][0]
    change(document, article, paragraph, qa, qa["answers"][0])
    return document


P0 = "data[0].paragraphs[0]"
Q1 = "question 'q1'"
SQUAD = [
    ("not-json", "{\"data\": [", ["not valid JSON"]),
    ("nan", '{"data": NaN}', ["NaN"]),
    ("a-list", [1, 2], ["not SQuAD JSON"]),
    ("no-data", {"version": "1.1"}, ["not SQuAD JSON", "'data'"]),
    ("data-object", {"data": {}}, ["not SQuAD JSON"]),
    ("no-questions", {"data": []}, ["holds no questions"]),
    ("latin1", LATIN1, ["not UTF-8"]),
    ("article-string", changed(lambda d, a, p, q, x: d["data"].append("text")), ["data[1]",
     "expected an object, got a string"]),
    ("no-paragraphs", changed(lambda d, a, p, q, x: a.pop("paragraphs")), ["data[0]",
     "'paragraphs' is missing"]),
    ("paragraphs-string", changed(lambda d, a, p, q, x: a.update(paragraphs="p")),
     ["'paragraphs': expected an array, got a string"]),
    ("paragraph-list", changed(lambda d, a, p, q, x: a["paragraphs"].append([])),
     ["data[0].paragraphs[2]", "expected an object, got an array"]),
    ("no-context", changed(lambda d, a, p, q, x: p.pop("context")), [P0, "'context' is missing"]),
    ("context-number", changed(lambda d, a, p, q, x: p.update(context=3)),
     [P0, "'context': expected a string, got a number"]),
    ("no-qas", changed(lambda d, a, p, q, x: p.pop("qas")), [P0, "'qas' is missing"]),
    ("qas-object", changed(lambda d, a, p, q, x: p.update(qas={})), [P0, "'qas'", "an object"]),
    ("qa-string", changed(lambda d, a, p, q, x: p["qas"].append("why?")),
     [f"{P0}.qas[1]", "expected an object, got a string"]),
    ("no-id", changed(lambda d, a, p, q, x: q.pop("id")), [f"{P0}.qas[0]", "'id' is missing"]),
    ("id-null", changed(lambda d, a, p, q, x: q.update(id=None)), [f"{P0}.qas[0]", "'id'", "null"]),
    ("id-list", changed(lambda d, a, p, q, x: q.update(id=["q"])), ["'id'", "an array"]),
    ("no-question", changed(lambda d, a, p, q, x: q.pop("question")),
     [Q1, "'question' is missing"]),
    ("question-number", changed(lambda d, a, p, q, x: q.update(question=1.5)),
     [Q1, "'question': expected a string, got a number"]),
    ("answers-string", changed(lambda d, a, p, q, x: q.update(answers="Denver")),
     [Q1, "'answers': expected an array, got a string"]),
    ("answer-string", changed(lambda d, a, p, q, x: q.update(answers=["Denver"])),
     [Q1, "'answers'[0]: expected an object, got a string"]),
    ("answer-no-text", changed(lambda d, a, p, q, x: x.pop("text")),
     [Q1, "'answers'[0], 'text' is missing"]),
    ("answer-text-number", changed(lambda d, a, p, q, x: x.update(text=7)),
     [Q1, "'answers'[0], 'text': expected a string"]),
    ("no-answer-start", changed(lambda d, a, p, q, x: x.pop("answer_start")),
     [Q1, "'answer_start' is missing"]),
    ("answer-start-word", changed(lambda d, a, p, q, x: x.update(answer_start="zero")),
     [Q1, "'answer_start'", "got 'zero'"]),
    ("answer-start-signed", changed(lambda d, a, p, q, x: x.update(answer_start="-1")),
     [Q1, "'answer_start'", "got '-1'"]),
    ("answer-start-negative", changed(lambda d, a, p, q, x: x.update(answer_start=-1)),
     [Q1, "'answer_start'", "got -1"]),
    ("answer-start-float", changed(lambda d, a, p, q, x: x.update(answer_start=0.5)),
     [Q1, "'answer_start'", "got 0.5"]),
    ("answer-start-bool", changed(lambda d, a, p, q, x: x.update(answer_start=False)),
     [Q1, "'answer_start'", "true or false"]),
    ("every-answer-elsewhere", changed(lambda d, a, p, q, x: [
        qa["answers"][0].update(answer_start=5) for par in a["paragraphs"] for qa in par["qas"]]),
     ["holds no usable questions", "2 answer(s) not at their 'answer_start'", Q1,
      "'answers'[0]", "not at character 5"]),
    ("answer-past-the-end", changed(lambda d, a, p, q, x: [
        qa["answers"][0].update(answer_start=10**6) for par in a["paragraphs"]
        for qa in par["qas"]]), ["holds no usable questions", Q1, "not at character 1000000"]),
    ("impossible-string", changed(lambda d, a, p, q, x: q.update(is_impossible="yes")),
     [Q1, "'is_impossible'", "true or false"]),
    ("one-context", {"data": [squad()["data"][0] | {"paragraphs": squad()["data"][0][
        "paragraphs"][:1]}]}, ["one context cannot be split"]),
]  # fmt: skip


@pytest.mark.parametrize("_, content, names", SQUAD, ids=[row[0] for row in SQUAD])
def test_squad_json(refused, tmp_path, _, content, names):
    check_refused(refused, tmp_path, ["train", "--task", "qa"], "s.json", content, names)


# --- question answering: JSONL, one question a line -------------------------------------

GOOD = {"context": "Paris is in France.", "question": "Where?", "answers": []}
OTHER = {"context": "Rome is in Italy.", "question": "Where?", "answers": []}


def qa_lines(bad) -> str:
    return lines(GOOD, OTHER, bad)


QA_JSONL = [
    ("array", qa_lines([1]), [":3", "expected an object, got an array"]),
    ("scalar", qa_lines(1), [":3", "expected an object, got a number"]),
    ("invalid", qa_lines("{'single': 'quotes'}"), [":3", "not valid JSON"]),
    ("no-context", qa_lines({"question": "q"}), [":3", "'context' is missing"]),
    ("context-list", qa_lines({**GOOD, "context": ["a"]}), [":3", "'context'", "an array"]),
    ("no-question", qa_lines({"context": "c"}), [":3", "'question' is missing"]),
    ("question-null", qa_lines({**GOOD, "question": None}), [":3", "'question'", "null"]),
    ("answers-number", qa_lines({**GOOD, "answers": 3}), [":3", "'answers'", "a number"]),
    ("answers-lengths", qa_lines({**GOOD, "answers": {"text": ["a", "b"], "answer_start": [0]}}),
     [":3", "2 'text' but 1 'answer_start'"]),
    ("answers-no-start", qa_lines({**GOOD, "answers": {"text": ["Paris"]}}),
     [":3", "'answer_start' is missing"]),
    ("answers-text-string", qa_lines({**GOOD, "answers": {"text": "Paris", "answer_start": [0]}}),
     [":3", "'text': expected an array"]),
    ("answers-start-word",
     qa_lines({**GOOD, "answers": {"text": ["Paris"], "answer_start": ["first"]}}),
     [":3", "'answer_start'", "got 'first'"]),
    ("every-answer-elsewhere", lines(*[{**GOOD, "answers": [{"text": "France", "answer_start": 0}]}
     ] * 3), ["holds no usable questions", "3 answer(s)", ":1", "not at character 0"]),
    ("answer-start-inf", qa_lines('{"context": "c", "question": "q", "answers": [{"text": "c", '
     '"answer_start": 1e400}]}'), [":3", "'answer_start'", "inf"]),
    ("id-object", qa_lines({**GOOD, "id": {}}), [":3", "'id'", "an object"]),
    ("latin1", LATIN1, ["not UTF-8"]),
    ("empty", "\n \n", ["holds no questions"]),
]  # fmt: skip


@pytest.mark.parametrize("_, content, names", QA_JSONL, ids=[row[0] for row in QA_JSONL])
def test_qa_jsonl(refused, tmp_path, _, content, names):
    check_refused(refused, tmp_path, ["train", "--task", "qa"], "q.jsonl", content, names)


def test_qa_train_and_val_files_name_the_bad_one(refused, tmp_path):
    (tmp_path / "train.json").write_text(json.dumps(squad()))
    (tmp_path / "val.jsonl").write_text(lines(GOOD, [1]))
    argv = ["train", "--task", "qa", "--train", tmp_path / "train.json"]
    argv += ["--val", tmp_path / "val.jsonl", "--out", tmp_path / "r"]
    refused(argv, ["val.jsonl:2", "got an array"], keep=[tmp_path])


# --- supervised fine-tuning: JSONL {prompt, response} -----------------------------------

PAIR = {"prompt": "Say hi.", "response": "Hi."}
SFT = [
    ("no-response", lines(PAIR, {"prompt": "p"}), [":2", '"response" is missing']),
    ("empty-prompt", lines(PAIR, {"prompt": "", "response": "r"}), [":2", '"prompt" is empty']),
    ("blank-response", lines({"prompt": "p", "response": "  "}, PAIR), [":1", '"response"',
     "empty"]),
    ("number", lines(PAIR, {"prompt": 1, "response": "r"}), [":2", '"prompt" is a number']),
    ("array", lines(PAIR, ["p", "r"]), [":2", "got an array"]),
    ("invalid", lines(PAIR, "{prompt: 1}"), [":2", "not valid JSON"]),
    ("latin1", LATIN1, ["not UTF-8"]),
    ("one-pair", lines(PAIR), ["at least 2 pairs"]),
    ("none", "\n", ["no prompt/response pairs"]),
]  # fmt: skip


@pytest.mark.parametrize("_, content, names", SFT, ids=[row[0] for row in SFT])
def test_sft_data(refused, tmp_path, tiny_checkpoint, _, content, names):
    start = ["train", "--task", "sft", "--init", tiny_checkpoint]
    check_refused(refused, tmp_path, start, "pairs.jsonl", content, names)


# --- prompt files for generation, and text to score -------------------------------------

PROMPTS = [
    ("jsonl-missing", "p.jsonl", lines({"prompt": "a"}, {"text": "b"}), [":2", '"prompt"']),
    ("jsonl-number", "p.jsonl", lines({"prompt": 3}), [":1", '"prompt" is a number']),
    ("jsonl-array", "p.jsonl", lines(["a"]), [":1", "got an array"]),
    ("jsonl-invalid", "p.jsonl", lines("{"), [":1", "not valid JSON"]),
    ("txt-latin1", "p.txt", LATIN1, ["not UTF-8"]),
    ("txt-blank", "p.txt", "\n  \n", ["no prompts"]),
    ("jsonl-empty", "p.jsonl", "", ["no prompts"]),
]


@pytest.mark.parametrize("_, name, content, names", PROMPTS, ids=[row[0] for row in PROMPTS])
def test_prompt_files(refused, tmp_path, tiny_checkpoint, _, name, content, names):
    path = tmp_path / name
    write(path, content)
    argv = ["generate", tiny_checkpoint, "--prompts-file", path, "--max-new-tokens", "2"]
    refused(argv, [name, *names], keep=[tmp_path, tiny_checkpoint])


def test_eval_names_a_text_file_that_is_not_utf8(refused, tmp_path, tiny_checkpoint):
    (tmp_path / "t.txt").write_bytes(LATIN1)
    argv = ["eval", tiny_checkpoint, "--data", tmp_path / "t.txt", "--split", "all"]
    refused(argv, ["t.txt", "not UTF-8"], keep=[tmp_path, tiny_checkpoint])


def test_a_corpus_to_search_names_a_file_that_is_not_utf8(tmp_path):
    from tformer.errors import DataError
    from tformer.qa.retrieval import PassageIndex

    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "notes.txt").write_bytes(LATIN1)
    with pytest.raises(DataError, match=r"notes.txt: not UTF-8 text \(byte 3"):
        PassageIndex.for_corpus(str(tmp_path / "corpus"))


@pytest.mark.parametrize("name, task", [("shakespeare-qa", "qa"), ("bible-en-es", "translation")])
def test_a_damaged_cache_of_a_builtin_data_set_says_to_delete_it(
    refused, tmp_path, monkeypatch, name, task
):
    monkeypatch.setenv("TFORMER_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache" / "corpora").mkdir(parents=True)
    (tmp_path / "cache" / "corpora" / f"{name}.jsonl").write_text('{"split": "train"}\n{')
    argv = ["train", "--task", task, "--data", name, "--out", tmp_path / "run"]
    refused(argv, [f"{name}.jsonl", "damaged", "delete it"], keep=[tmp_path])
