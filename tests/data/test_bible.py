import pytest

from tformer.data import bible


def test_osis_markup_becomes_plain_text():
    raw = (
        '<title type="psalm">A <w lemma="strong:H4210">Psalm</w> of David.</title> '
        "<divineName>LORD</divineName>, how<note>Or, why</note>are they &amp; "
        "¶ <transChange>are</transChange>  increased!"
    )
    assert bible.clean_osis(raw) == "A Psalm of David. LORD, how are they & are increased!"


def test_alignment_filters_and_the_split_by_book():
    verses = [
        ("Genesis", 1, 1, "In the beginning.", "En el principio."),
        ("Numbers", 13, 1, "Shifted.", "Desplazado."),  # a misaligned chapter
        ("Job", 1, 1, "A verse.", ""),  # empty in Spanish
        ("Genesis", 1, 2, "Short.", "Una traducción mucho más larga que el original."),
        ("Zechariah", 1, 1, "Val.", "Val."),
        ("Malachi", 1, 1, "Test.", "Prueba."),
        ("Revelation of John", 1, 1, "Test too.", "También."),
    ]
    splits, dropped = bible.aligned_pairs(verses)
    assert splits == {
        "train": [("In the beginning.", "En el principio.")],
        "val": [("Val.", "Val.")],
        "test": [("Test.", "Prueba."), ("Test too.", "También.")],
    }
    assert dropped == {"misaligned chapters": 1, "empty": 1, "length ratio > 2": 1}


def test_missing_modules_say_how_to_install_them(tmp_path, monkeypatch):
    monkeypatch.setenv("SWORD_PATH", str(tmp_path))
    pytest.importorskip("pysword")
    with pytest.raises(FileNotFoundError, match="apt-get install sword-text-kjv sword-text-sparv"):
        bible.read_verses()


def test_the_real_corpus_when_installed(tmp_path, monkeypatch):
    """Needs the Debian packages (see tformer.data.bible); the facts are from the modules."""
    if not (bible.sword_path() / "mods.d" / "engKJV2006eb.conf").is_file():
        pytest.skip("sword-text-kjv and sword-text-sparv are not installed")
    pytest.importorskip("pysword")
    monkeypatch.setenv("TFORMER_CACHE", str(tmp_path))
    splits, dropped = bible.bible_en_es()
    assert {k: len(v) for k, v in splits.items()} == {"train": 30087, "val": 236, "test": 459}
    assert sum(len(v) for v in splits.values()) + sum(dropped.values()) == 31102  # KJV verses
    assert splits["train"][0] == (
        "In the beginning God created the heaven and the earth.",
        "EN el principio crió Dios los cielos y la tierra.",
    )
    assert (tmp_path / "corpora" / "bible-en-es.jsonl").is_file()  # cached
    assert bible.bible_en_es() == (splits, dropped)
