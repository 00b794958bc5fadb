"""SQuAD exact match and F1 against examples worked by hand the official scripts' way."""

import pytest

from tformer.qa import exact_match, f1, normalize_answer, squad_scores


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The Quick, brown fox!", "quick brown fox"),
        ("the U.S. Army", "us army"),  # punctuation goes before the articles
        ("an apple a day", "apple day"),
        ("banana theatre", "banana theatre"),  # articles only as whole words
        ("  Denver\tBroncos \n", "denver broncos"),
        ("A", ""),
    ],
)
def test_normalisation(text, expected):
    assert normalize_answer(text) == expected


def test_exact_match_takes_the_best_gold_answer():
    assert exact_match("the Eiffel Tower", ["Eiffel tower."]) == 1.0
    assert exact_match("Eiffel Tower in Paris", ["the Eiffel Tower", "Paris"]) == 0.0
    assert exact_match("Paris", ["the Eiffel Tower", "paris"]) == 1.0


def test_f1_counts_the_multiset_overlap():
    # prediction eiffel tower in paris (4), gold eiffel tower (2): common 2, P 1/2, R 1
    assert f1("Eiffel Tower in Paris", ["the Eiffel Tower"]) == pytest.approx(2 / 3)
    # cat cat dog vs cat dog dog: common {cat: 1, dog: 1} = 2, P = R = 2/3
    assert f1("cat cat dog", ["cat dog dog"]) == pytest.approx(2 / 3)
    assert f1("Broncos", ["Denver Broncos", "the Broncos"]) == pytest.approx(1.0)  # the best
    assert f1("Carolina", ["Denver Broncos"]) == 0.0


def test_questions_without_an_answer_follow_squad_2():
    assert exact_match("", []) == 1.0 and f1("", []) == 1.0
    assert exact_match("Denver", []) == 0.0 and f1("Denver", []) == 0.0
    assert f1("", ["Denver"]) == 0.0
    assert f1("the", ["a"]) == 1.0  # golds that normalise to nothing: a no-answer
    assert exact_match("", ["the", "cat"]) == 0.0  # "the" is dropped, "cat" remains
    assert exact_match("cat", ["the", "cat"]) == 1.0


def test_scores_are_percent_means_over_questions():
    scores = squad_scores(
        [("Denver Broncos", ["Denver Broncos"]), ("Broncos", ["Denver Broncos"]), ("", [])]
    )
    assert scores["exact_match"] == pytest.approx(100 * 2 / 3)
    assert scores["f1"] == pytest.approx(100 * (1 + 2 / 3 + 1) / 3)
    assert scores["count"] == 3
    with pytest.raises(ValueError, match="no questions"):
        squad_scores([])
