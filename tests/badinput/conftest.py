"""The bad-input suite's one assertion: a command given bad input is refused cleanly.

`refused(argv, names, keep)` runs `tformer ARGV` in this process and asserts
  - a non-zero exit,
  - one line on standard error that names every string in `names` (the flag, field or
    file to fix), no traceback, and not the catch-all's "unexpected error",
  - every file under the paths in `keep` byte-identical afterwards (nothing the user
    had is lost or changed), a run's `.lock` included: a refused command writes no
    process id there.
"""

import hashlib
from pathlib import Path

import pytest

from tformer.cli.main import main


def fingerprint(*roots: Path) -> dict[str, str]:
    """Every file and link under `roots` -> its sha256 (a link: where it points)."""
    found = {}
    for root in map(Path, roots):
        paths = [root] if not root.is_dir() or root.is_symlink() else sorted(root.rglob("*"))
        for path in paths:
            if path.is_symlink():
                found[str(path)] = "link:" + str(path.readlink())
            elif path.is_file():
                found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
            elif path.is_dir():
                found[str(path)] = "dir"
            else:
                found[str(path)] = "absent"
    return found


@pytest.fixture
def refused(capsys):
    def check(argv: list[str], names: str | list[str] = (), keep=()) -> str:
        names = [names] if isinstance(names, str) else list(names)
        before = fingerprint(*keep)
        with pytest.raises(SystemExit) as exit_:
            main([str(a) for a in argv])
        err = capsys.readouterr().err
        assert exit_.value.code not in (0, None), err
        lines = err.strip().splitlines()
        assert len(lines) == 1, f"expected one line, got:\n{err}"
        line = lines[0]
        assert "Traceback" not in err and "unexpected error" not in line, line
        for name in names:
            assert name in line, f"{name!r} not named in: {line}"
        assert fingerprint(*keep) == before, f"files changed by: {' '.join(map(str, argv))}"
        return line

    return check


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A randomly initialised 2-layer, 32-wide GPT-2 checkpoint with the GPT-2 tokenizer."""
    out = tmp_path_factory.mktemp("badinput") / "tiny"
    main(["init", str(out), "--n-layers", "2", "--d-model", "32", "--n-heads", "2",
          "--max-len", "64"])  # fmt: skip
    return out
