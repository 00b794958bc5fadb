"""The rule for every command but `train` that writes a directory (`init DIR`, `lab --out`).

    DIR missing or empty          written
    DIR a file, or a training run refused: a run's files are written only by `train`
    DIR holds anything else       the command decides from the names there
                                  (`existing_names`): `init --overwrite` replaces a
                                  checkpoint of its own files only, `lab` resumes a
                                  report of its own; every other file is refused by name

Everything is checked before anything is written; nothing here writes.
"""

from pathlib import Path

from tformer.errors import RunDirectoryError
from tformer.recipes.run_dir import contents, is_run, listing


def existing_names(out: Path, flag: str) -> list[str]:
    """The names in `out` (sorted; none: missing or empty), for the command to judge;
    a file where the directory should be, or a training run's directory, is refused."""
    if not out.exists():
        return []
    if not out.is_dir():
        raise RunDirectoryError(f"{flag} {out} is a file, not a directory: pick another {flag}")
    names = contents(out)
    if is_run(out):
        raise RunDirectoryError(
            f"{out} holds a training run ({listing(names)}); tformer never writes over it "
            f"from here: pick another {flag}"
        )
    return names
