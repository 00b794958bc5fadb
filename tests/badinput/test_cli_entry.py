"""The CLI's entry: argparse errors and unforeseen failures both end in one line."""

import pytest

from tformer.cli import info
from tformer.cli.main import main


@pytest.mark.parametrize(
    "argv, name",
    [
        (["no-such-command"], "invalid choice"),
        (["train", "--no-such-flag"], "--no-such-flag"),
        (["train", "--steps", "many"], "--steps"),
        (["generate"], "checkpoint"),
    ],
)
def test_argparse_errors_are_one_line(refused, argv, name):
    line = refused(argv, name)
    assert "--help" in line


def failing_with(error: Exception):
    def run(args):
        raise error

    return run


def test_the_catch_all_names_the_error_and_the_debug_switch(monkeypatch, capsys):
    monkeypatch.setattr(info, "run", failing_with(AssertionError("an invariant broke")))
    with pytest.raises(SystemExit) as exit_:
        main(["info", "gpt2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 1 and len(err) == 1
    assert "AssertionError: an invariant broke" in err[0] and "TFORMER_DEBUG=1" in err[0]
    monkeypatch.setenv("TFORMER_DEBUG", "1")
    with pytest.raises(AssertionError):
        main(["info", "gpt2"])


def test_a_users_error_is_one_line_with_exit_2(monkeypatch, capsys):
    monkeypatch.setattr(info, "run", failing_with(ValueError("--x must be\n  positive")))
    with pytest.raises(SystemExit) as exit_:
        main(["info", "gpt2"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == "tformer info: error: --x must be positive\n"
