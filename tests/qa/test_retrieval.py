"""The BM25 passage index: passages with their place, the cache, and the search."""

import pytest

import tformer.qa.retrieval as retrieval
from tformer.qa.retrieval import PassageIndex, corpus_passages


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    monkeypatch.setenv("TFORMER_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "texts"
    (root / "sub").mkdir(parents=True)
    (root / "animals.txt").write_text(
        "The cat sat on the mat.\n\nDogs bark at night in the village.\n"
    )
    (root / "sub" / "exodus.txt").write_text(
        "Moses went up the mountain of Sinai.\nHe came down with the tables of stone.\n"
    )
    (root / "notes.md").write_text("not a .txt file: not searched")
    return root


def test_passages_keep_their_file_and_lines(corpus, monkeypatch):
    passages = corpus_passages(str(corpus))
    assert [p.location for p in passages] == ["animals.txt, lines 1-3", "sub/exodus.txt, lines 1-2"]
    assert (
        passages[1].text
        == "Moses went up the mountain of Sinai. He came down with the tables of stone."
    )
    monkeypatch.setattr(retrieval, "PASSAGE_WORDS", 5)  # now each paragraph is a passage
    assert [p.location for p in corpus_passages(str(corpus))][:2] == [
        "animals.txt, lines 1-1",
        "animals.txt, lines 3-3",
    ]


def test_search_ranks_the_passage_that_shares_the_rare_words(corpus):
    index, seconds = PassageIndex.for_corpus(str(corpus))
    assert seconds > 0  # built
    (best, score), *rest = index.search("Who went up the mountain?", k=2)
    assert best.location == "sub/exodus.txt, lines 1-2" and score > 0
    assert rest == []  # the other passage shares no word with the question: left out
    with pytest.raises(ValueError, match="no word to search for"):
        index.search("the and of")


def test_the_index_is_built_once_and_rebuilt_when_a_file_changes(corpus, monkeypatch):
    PassageIndex.for_corpus(str(corpus))
    again, seconds = PassageIndex.for_corpus(str(corpus))
    assert seconds == 0.0 and len(again.passages) == 2  # loaded from the cache
    assert again.search("mountain")[0][0].location == "sub/exodus.txt, lines 1-2"
    (corpus / "animals.txt").write_text("Horses run on the plain.\n")
    rebuilt, seconds = PassageIndex.for_corpus(str(corpus))
    assert seconds > 0 and rebuilt.search("horses")[0][0].text == "Horses run on the plain."


def test_an_empty_or_missing_corpus_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .txt files"):
        corpus_passages(str(tmp_path / "empty"))
    (tmp_path / "blank.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="holds no text"):
        corpus_passages(str(tmp_path / "blank.txt"))
    with pytest.raises(FileNotFoundError, match="built-in corpora: bible, shakespeare"):
        corpus_passages(str(tmp_path / "missing"))
