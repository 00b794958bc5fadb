"""The errors tformer raises on purpose: each says, in one line, what is wrong and names
the flag, field or file to fix.

    TformerError            every one of them; the CLI prints its message and exits 2
      ConfigError           a value out of its range or of the wrong type (a flag, a config
                            field, an API argument): names it and its valid range
      DataError             a data file with a wrong record: names the file, the line or
                            entry, and the field
      RunDirectoryError     an output directory that holds what a command may not write
                            over: names what is there and what to do
      RunLockedError        a run directory another process is writing: names that process
      WriteError            a write that failed (a full disk): names the file, the cause
                            and what is still intact

    TrainingInterrupted     not an error: training stopped at a signal (Ctrl-C, SIGTERM)
                            after saving a checkpoint; says how to continue
    TformerWarning          not an error: what was done differently from what was asked
                            (a prompt cut to the window); the CLI prints it as one line

They subclass the built-in error a caller would otherwise catch (ValueError, OSError), so
code that catches that keeps working.
"""


class TformerError(Exception):
    """Any error tformer raises on purpose; its message is meant for the user as it is."""


class ConfigError(TformerError, ValueError):
    """A value out of its range or of the wrong type, named with its valid range."""


class DataError(TformerError, ValueError):
    """A record of a data file that cannot be used: `where` is the file and the line or
    entry (e.g. "train.jsonl:3" for a line, "dev.json, question '56be4db0'" for an entry
    of SQuAD JSON), `problem` what is wrong with which field."""

    def __init__(self, where: str, problem: str) -> None:
        super().__init__(f"{where}: {problem}")
        self.where, self.problem = where, problem


class RunDirectoryError(TformerError, FileExistsError):
    """An output directory that holds what the command may not write over (another tool's
    files, a run without --resume); the message lists what is there and the way out."""


class RunLockedError(TformerError, BlockingIOError):
    """A run directory another live process is writing (it holds the directory's lock)."""


class WriteError(TformerError, OSError):
    """A file that could not be written (a full disk, no permission): the message names the
    file, the cause and what is still intact; no half-written file is left behind."""


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped at a signal after finishing its step and saving a checkpoint.

    A KeyboardInterrupt, so that code which lets Ctrl-C through lets this through too (and
    `except Exception` does not swallow it). `exit_code` is the shell's for the signal:
    130 for SIGINT, 143 for SIGTERM; the message says where the run stopped and how to
    continue it."""

    def __init__(self, message: str, step: int, checkpoint: str | None, exit_code: int) -> None:
        super().__init__(message)
        self.message, self.step, self.checkpoint, self.exit_code = (
            message,
            step,
            checkpoint,
            exit_code,
        )

    def __str__(self) -> str:
        return self.message


class TformerWarning(UserWarning):
    """Something done other than asked, that the user should know of (e.g. a cut prompt)."""
