"""The built-in cloze questions, built from small texts whose answers are worked by hand."""

from tformer.qa.cloze import BLANK, cloze, cloze_examples, is_spoken, shakespeare_units

PLAYS = """THE TEMPEST

by William Shakespeare


PERSONS REPRESENTED.

ALONSO, King of Naples.

ACT I.

SCENE 1. On a ship at sea.

[Enter a Master and a Boatswain.]

MASTER.
Boatswain, the storm is upon the ship tonight.

BOATSWAIN.
Here, master: the storm shall sink the ship anon.
[Exeunt.]
MACBETH

by William Shakespeare

FIRST WITCH.
When shall we three meet again in thunder?
"""


def test_the_blank_is_a_content_word_of_the_context_and_the_answer_its_last_place():
    context = "Moses went up the mountain. The people waited for Moses below the mountain."
    example = cloze("x", [context], "And Moses came down from the mountain with the tables.")
    assert example is not None
    answer = example.answers[0]
    assert answer.text in ("Moses", "mountain")  # "came", "down", "with", "the": function words
    assert answer.start == context.rindex(answer.text)  # the last occurrence
    assert example.question.count(BLANK) == 1
    assert answer.text not in example.question.replace(BLANK, " ").split()  # not given away
    again = cloze("x", [context], "And Moses came down from the mountain with the tables.")
    assert again.answers == example.answers and again.question == example.question  # seeded


def test_a_question_with_no_word_from_the_context_gives_no_example():
    assert cloze("y", ["The sea was calm."], "And then they went home at night.") is None
    # "Moses" qualifies but is repeated in the question: blanking one would show the other
    assert cloze("z", ["Moses spoke."], "Moses, Moses, here am I.") is None


def test_spoken_lines_leave_out_names_directions_and_headings():
    assert is_spoken("Boatswain, the storm is upon the ship tonight.")
    for line in (
        "MASTER.",
        "Prince.",
        "[Enter a Master and a Boatswain.]",
        "ACT I.",
        "SCENE 1. On a ship at sea.",
        "THE TEMPEST",
        "I",
    ):
        assert not is_spoken(line), line


def test_works_split_at_their_titles_and_examples_split_by_work():
    works = shakespeare_units(PLAYS)
    assert list(works) == ["THE TEMPEST", "MACBETH"]
    assert works["THE TEMPEST"] == [
        "Boatswain, the storm is upon the ship tonight.",
        "Here, master: the storm shall sink the ship anon.",
    ]
    units = {
        "BOOK A": ["the lion ate the lamb", "the lamb ran", "a lion roared at the lamb"],
        "Jude": ["the sea rose high", "the sea fell"],
    }
    splits = cloze_examples("bible-qa", {k: v * 3 for k, v in units.items()})
    assert splits["train"] and splits["val"] and not splits["test"]
    assert all(":BOOK A:" in e.id for e in splits["train"])
    assert all(":Jude:" in e.id for e in splits["val"])
