"""The errors tformer raises on purpose: each says, in one line, what is wrong and names
the flag, field or file to fix.

    TformerError            every one of them; the CLI prints its message and exits 2
      ConfigError           a value out of its range or of the wrong type (a flag, a config
                            field, an API argument): names it and its valid range
      DataError             a data file with a wrong record: names the file, the line or
                            entry, and the field

They subclass the built-in error a caller would otherwise catch (ValueError), so code that
catches that keeps working.
"""


class TformerError(Exception):
    """Any error tformer raises on purpose; its message is meant for the user as it is."""


class ConfigError(TformerError, ValueError):
    """A value out of its range or of the wrong type, named with its valid range."""


class DataError(TformerError, ValueError):
    """A record of a data file that cannot be used: `where` is the file and the line or
    entry (e.g. "train.jsonl, line 3"), `problem` what is wrong with which field."""

    def __init__(self, where: str, problem: str) -> None:
        super().__init__(f"{where}: {problem}")
        self.where, self.problem = where, problem
