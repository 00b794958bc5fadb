"""metrics.jsonl: a run's history, one JSON object per line, appended as training goes.

    {"type": "train", "step": 12, "loss": 2.31, "lr": 0.001, "tokens_per_second": 5120.0}
    {"type": "eval", "step": 250, "full": false, "val_loss": 2.05, ...}

Every record has a "type" and an integer "step". A record is appended with one write; if
that write fails (a full disk) the file is cut back to its previous length, so no torn line
stays behind. A process killed in the middle of a write may still leave a torn last line (no
newline at its end): readers drop it, with a note where the caller has a place to say it.
Any other line that is not such a record is an error naming the file and the line.
"""

import errno
import json
import os
from pathlib import Path

from tformer.errors import DataError
from tformer.files import atomic_write_text, write_failure

METRICS_FILE = "metrics.jsonl"


def parse_metrics(path: Path) -> tuple[list[dict], str | None]:
    """The records of `path`, and a note when a torn last line was dropped (else None)."""
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.split("\n")  # a complete file ends with "\n": its last piece is empty
    records, note = [], None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        torn = number == len(lines)  # the last piece, without its newline
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if torn:
                note = f"{path}:{number}: dropped a torn last line (cut off by a crash)"
                continue
            raise DataError(f"{path}:{number}", "not a JSON record") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise DataError(f"{path}:{number}", "a record without an integer 'step'")
        if not isinstance(record.get("type"), str):
            raise DataError(f"{path}:{number}", "a record without a 'type'")
        records.append(record)
    return records, note


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of RUN_DIR/metrics.jsonl (a torn last line left out: the run may be
    writing it right now)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; is {run_dir} a training run directory?")
    return parse_metrics(path)[0]


class MetricsLog:
    """Appends records to metrics.jsonl (path None: keeps nothing, as on the processes
    other than the main one). The file is opened at the first record and kept open for the
    rest (a training step's own write is then one system call, where opening, checking
    and closing the file each time took ~170 us of a ~17 ms step of nanoGPT's model:
    docs/LOG.md); `close` when done."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.file = None  # opened for appending by the first write
        self.size = 0  # the file's length after the last complete record

    def truncate_after(self, step: int) -> str | None:
        """Drop what a crashed run logged after the checkpoint it resumes from; -> a note if
        a torn last line was dropped too."""
        if self.path is None or not self.path.is_file():
            return None
        self.close()  # the file is replaced: later records go to the new one
        records, note = parse_metrics(self.path)
        kept = [json.dumps(r) + "\n" for r in records if r["step"] <= step]
        atomic_write_text(self.path, "".join(kept))
        return note

    def write(self, record: dict, intact: str = "") -> None:
        """Append `record`; on a failed write, a WriteError that says what is `intact`."""
        if self.path is None:
            return
        line = (json.dumps(record) + "\n").encode("utf-8")
        try:
            if self.file is None:
                self.size = self.path.stat().st_size if self.path.exists() else 0
                self.file = open(self.path, "ab", buffering=0)  # noqa: SIM115 (kept open)
            if self.file.write(line) != len(line):  # a short write: the disk is full
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except BaseException as e:
            if self.path.exists():
                os.truncate(self.path, self.size)  # needs no room: the file is as it was
            if isinstance(e, OSError):
                raise write_failure(self.path, e, intact) from None
            raise
        self.size += len(line)  # (after the try: an interrupt here keeps the whole record)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
