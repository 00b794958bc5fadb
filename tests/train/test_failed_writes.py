"""A write that fails (a full disk) is one line naming the file, the cause and the step that
is intact, and leaves nothing half-written; pruning removes only tformer's checkpoints."""

import errno
import json
import subprocess

import pytest
from safetensors import SafetensorError
from test_trainer import data_and_model, quick

from tformer import GPT2
from tformer.errors import DataError, WriteError
from tformer.train import checkpoint as checkpoint_module
from tformer.train import fit, metrics
from tformer.train.metrics import MetricsLog, read_metrics

CONFIG = quick(steps=20, eval_every=0, final_eval="sample")  # checkpoints at steps 10 and 20


def full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def leftovers(run) -> list[str]:
    return sorted(p.name for p in run.rglob("*.tmp"))


def test_a_full_disk_at_a_checkpoint_says_which_step_is_intact(corpus_file, tmp_path, monkeypatch):
    tok, train, val, model = data_and_model(corpus_file)
    run = tmp_path / "run"
    real_save = checkpoint_module.torch.save

    def full_at_step_20(state, path, *args, **kwargs):
        if state["step"] == 20:
            with open(path, "wb") as f:
                f.write(b"half")  # torn, in the checkpoint's temporary
            full_disk()
        return real_save(state, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module.torch, "save", full_at_step_20)
    with pytest.raises(WriteError) as failure:
        fit(model, train, val, CONFIG, run, tok, progress=False)
    assert str(failure.value) == (
        f"no space left on device while writing {run}/checkpoints/step-000020; "
        f"step 10 ({run}/last) is intact"
    )
    assert failure.value.errno == errno.ENOSPC
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000010"]
    assert leftovers(run) == []
    GPT2.from_pretrained(run / "last")


def test_safetensors_own_error_on_a_full_disk_is_named_as_one(corpus_file, tmp_path, monkeypatch):
    tok, train, val, model = data_and_model(corpus_file)

    def serializing_fails(directory):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28 })")

    monkeypatch.setattr(model, "save_pretrained", serializing_fails)
    monkeypatch.setattr("tformer.files.disk_is_full", lambda path: True)
    with pytest.raises(WriteError) as failure:
        fit(model, train, val, CONFIG, tmp_path / "run", tok, progress=False)
    assert str(failure.value) == (
        f"no space left on device while writing {tmp_path}/run/checkpoints/step-000010; "
        "no checkpoint was saved before it"
    )
    assert leftovers(tmp_path / "run") == []


@pytest.mark.parametrize(
    "error, reported",
    [
        (RuntimeError("[enforce fail at inline_container.cc:1] . unexpected pos 64 vs 0"), True),
        (RuntimeError("expected a Tensor, got NoneType"), False),  # a bug, not a full disk
    ],
)
def test_only_a_torch_error_that_says_a_write_failed_is_reported_as_one(
    corpus_file, tmp_path, monkeypatch, error, reported
):
    tok, train, val, model = data_and_model(corpus_file)

    def fails(*args, **kwargs):
        raise error

    monkeypatch.setattr(checkpoint_module.torch, "save", fails)
    run = tmp_path / "run"
    with pytest.raises((RuntimeError, WriteError)) as failure:
        fit(model, train, val, CONFIG, run, tok, progress=False)
    assert isinstance(failure.value, WriteError) == reported
    if not reported:
        assert failure.value is error  # as it was raised, for its traceback
    assert leftovers(run) == []


def test_a_full_disk_while_logging_leaves_no_torn_line(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"

    class FillsUp:
        """The log's file: its first record is written whole, the next one in part before
        the disk is full."""

        def __init__(self, file):
            self.file, self.records = file, 0

        def close(self):
            self.file.close()

        def write(self, data):
            self.records += 1
            if self.records == 1:
                return self.file.write(data)
            self.file.write(data[:7])
            full_disk()

    def fills_up(*args, **kwargs):
        return FillsUp(open(*args, **kwargs))  # noqa: SIM115 (closed by the log)

    monkeypatch.setattr(metrics, "open", fills_up, raising=False)
    log = MetricsLog(path)
    log.write({"type": "train", "step": 1, "loss": 2.0})
    before = path.read_bytes()
    with pytest.raises(WriteError, match=f"while writing {path}; step 1 .* is intact"):
        log.write({"type": "train", "step": 2, "loss": 1.9}, "step 1 (RUN/last) is intact")
    assert path.read_bytes() == before
    log.close()


def test_the_log_keeps_its_file_open_and_follows_a_rewrite(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path)
    for step in (1, 2, 3):
        log.write({"type": "train", "step": step, "loss": 1.0})
    assert log.file is not None  # opened once, kept
    assert log.truncate_after(2) is None  # replaces the file: the log writes to the new one
    log.write({"type": "train", "step": 3, "loss": 0.5})
    log.close()
    assert [r["loss"] for r in read_metrics(tmp_path)] == [1.0, 1.0, 0.5]
    assert log.size == path.stat().st_size


@pytest.fixture
def small_disk(tmp_path):
    """A 600 KiB file system: room for one tiny checkpoint, not for the next beside it."""
    mount = tmp_path / "small"
    mount.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(mount)], capture_output=True
    )
    if made.returncode != 0:
        pytest.skip(
            "needs root: the really full disk is a 600 KiB tmpfs, which only root may mount "
            f"({made.stderr.strip()}); the simulated full disks above run everywhere"
        )
    yield mount
    subprocess.run(["umount", "--lazy", str(mount)], check=True)


def test_a_really_full_disk_leaves_the_last_checkpoint_and_no_temporaries(corpus_file, small_disk):
    tok, train, val, model = data_and_model(corpus_file)
    run = small_disk / "run"
    with pytest.raises(WriteError) as failure:
        fit(model, train, val, quick(steps=200, eval_every=0), run, tok, progress=False)
    assert str(failure.value) == (
        f"no space left on device while writing {run}/checkpoints/step-000020; "
        f"step 10 ({run}/last) is intact"
    )
    assert leftovers(run) == []
    GPT2.from_pretrained(run / "last")  # what the line calls intact loads
    assert checkpoint_module.load_state(run / "last")["step"] == 10


def test_pruning_removes_only_the_checkpoints_tformer_wrote(corpus_file, tmp_path):
    tok, train, val, model = data_and_model(corpus_file)
    run = tmp_path / "run"
    mine = [run / "checkpoints" / name for name in ("my-best", "step-12", "step-000003.bak")]
    for path in mine:
        path.mkdir(parents=True)
        (path / "notes.txt").write_text("mine\n")
    (run / ".my.notes.tmp").write_text("mine\n")
    config = quick(steps=30, checkpoint_every=10, eval_every=0, final_eval="sample")
    fit(model, train, val, config, run, tok, progress=False)
    assert all((path / "notes.txt").read_text() == "mine\n" for path in mine)
    tformer_s = sorted(p.name for p in (run / "checkpoints").iterdir() if p not in mine)
    assert tformer_s == ["step-000030"]
    checkpoint_module.forget_after(run, 30)
    assert (run / ".my.notes.tmp").is_file() and all(path.is_dir() for path in mine)


@pytest.mark.parametrize(
    "line, problem",
    [
        ('{"type": "train", "loss": 1.0}', "2: a record without an integer 'step'"),
        ("{not json", "2: not a JSON record"),
    ],
)
def test_a_bad_metrics_line_names_the_file_and_the_line(tmp_path, line, problem):
    path = tmp_path / "metrics.jsonl"
    path.write_text(f'{{"type": "train", "step": 1}}\n{line}\n{{"type": "eval", "step": 2}}\n')
    with pytest.raises(DataError, match=f"^{path}:{problem}$"):
        MetricsLog(path).truncate_after(1)


def test_a_torn_last_metrics_line_is_dropped_with_a_note(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"type": "train", "step": 1}\n{"type": "train", "step": 2}\n{"type": "tr')
    note = MetricsLog(path).truncate_after(5)
    assert note == f"{path}:3: dropped a torn last line (cut off by a crash)"
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]
