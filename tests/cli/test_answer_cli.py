"""`tformer answer`: retrieval, reading and the errors, with a small reader checkpoint."""

import json
import subprocess
import sys

import pytest

from tformer.cli.main import main
from tformer.models.gpt2_qa import GPT2ForQuestionAnswering
from tformer.tokenizers import load_tokenizer


@pytest.fixture
def reader(checkpoint, tmp_path):
    """A question-answering checkpoint: the tiny GPT-2 with a (new) span head."""
    out = tmp_path / "reader"
    GPT2ForQuestionAnswering.from_pretrained(checkpoint, seed=0).save_pretrained(out)
    load_tokenizer(checkpoint).save(out)
    return out


@pytest.fixture
def texts(tmp_path, monkeypatch):
    monkeypatch.setenv("TFORMER_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "texts"
    root.mkdir()
    (root / "animals.txt").write_text("The cat sat on the mat.\n\nDogs bark at night.\n")
    (root / "exodus.txt").write_text("Moses went up the mountain of Sinai with Aaron.\n")
    return root


def answer(capsys, *argv):
    main(["answer", *map(str, argv), "--json"])
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_answers_come_from_the_retrieved_passage_with_its_place(reader, texts, capsys):
    result = answer(capsys, reader, "--corpus", texts, "--question", "Who went up the mountain?")
    assert result["index_built"] and result["passages_indexed"] == 2
    (best,) = result["answers"]  # only one passage shares a word with the question
    assert best["location"] == "exodus.txt, lines 1-1"
    assert best["answer"] and best["answer"] in best["passage"]  # cut from the passage's text
    again = answer(capsys, reader, "--corpus", texts, "--question", "Where did Moses go?")
    assert not again["index_built"]  # the cached index


@pytest.mark.parametrize(
    "argv, message",
    [
        (["{lm}", "--corpus", "{texts}", "--question", "Who?"], "no question-answering head"),
        (["{reader}", "--corpus", "{texts}/none", "--question", "Who?"], "no such file"),
        (
            ["{reader}", "--corpus", "{texts}", "--question", "mountain " * 80],
            "shorten the question",
        ),
        (["{reader}", "--corpus", "{texts}", "--question", "zebra?"], "no passage shares a word"),
    ],
)
def test_bad_input_is_a_one_line_error(checkpoint, reader, texts, argv, message):
    argv = [a.format(lm=checkpoint, reader=reader, texts=texts) for a in argv]
    result = subprocess.run(
        [sys.executable, "-m", "tformer", "answer", *argv], capture_output=True, text=True
    )
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
