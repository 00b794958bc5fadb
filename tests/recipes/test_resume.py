"""--resume finds what survives (a `last` that cannot be read falls back to the newest
checkpoint that can, and says so), and --resume --steps N extends a finished run with the
losses of a run that had been given N steps with its decay where it was."""

import json
import shutil

import pytest

from tformer.errors import ConfigError, RunDirectoryError
from tformer.recipes import TrainSpec, train
from tformer.train import checkpoint as checkpoint_module

TINY = dict(n_layers=1, n_heads=2, d_model=16, context=16, batch_size=4, eval_batches=2)
QUIET = dict(dtype="float32", threads=1, seed=3, progress=False, messages=False, sample_tokens=0)


@pytest.fixture
def text(tmp_path, monkeypatch, tiny_text):
    monkeypatch.setenv("TFORMER_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "text.txt"
    path.write_text(tiny_text, encoding="utf-8")
    return path


def records(run, kind="train") -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == kind]


def resume(run, **options):
    return train(TrainSpec(out=str(run), resume=True, **QUIET, **options))


def truncate(path):
    path.write_bytes(path.read_bytes()[:100])


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda last: truncate(last / "trainer_state.pt"), "cannot read the training state"),
        (lambda last: truncate(last / "model.safetensors"), "step-000006"),
        (lambda last: (last / "trainer_state.pt").unlink(), "trainer_state.pt: missing"),
        (lambda last: shutil.rmtree(last), "points at nothing"),
    ],
)
def test_resume_falls_back_to_the_newest_checkpoint_it_can_read(
    text, tmp_path, monkeypatch, capsys, damage, reason
):
    monkeypatch.setattr(checkpoint_module, "prune", lambda run_dir: None)  # keep them all
    run = tmp_path / "run"
    spec = TrainSpec(data=str(text), steps=6, checkpoint_every=2, out=str(run), **TINY, **QUIET)
    train(spec)
    whole = [r["loss"] for r in records(run)]
    damage((run / "last").resolve())
    capsys.readouterr()
    resume(run)
    err = [line for line in capsys.readouterr().err.splitlines() if "cannot resume" in line]
    assert len(err) == 1 and reason in err[0], err
    print(err[0])
    assert err[0].endswith("resuming from step-000004, the newest that can be read")
    assert [r["loss"] for r in records(run)] == whole  # steps 5 and 6 again, the same
    assert (run / "last").resolve().name == "step-000006"


def test_resume_with_no_readable_checkpoint_says_so(text, tmp_path):
    run = tmp_path / "run"
    train(TrainSpec(data=str(text), steps=2, out=str(run), **TINY, **QUIET))
    truncate((run / "last").resolve() / "trainer_state.pt")
    with pytest.raises(RunDirectoryError, match="no checkpoint can be read .*--overwrite"):
        resume(run)


def test_a_finished_run_extends_with_the_losses_of_a_longer_run(text, tmp_path):
    options = dict(data=str(text), warmup_steps=1, min_lr=1e-4, lr=1e-3, **TINY, **QUIET)
    short, longer = tmp_path / "short", tmp_path / "longer"
    train(TrainSpec(steps=4, out=str(short), **options))
    result = resume(short, steps=8)
    assert result["steps"] == 8
    stored = json.loads((short / "train_config.json").read_text())
    assert (stored["steps"], stored["decay_steps"]) == (8, 4)
    # the same as a run given 8 steps from the start, its cosine decay ending at step 4
    train(TrainSpec(steps=8, decay_steps=4, out=str(longer), **options))

    def steps(run):
        return [(r["step"], r["loss"], r["lr"]) for r in records(run)]

    assert steps(short) == steps(longer)
    assert [r["lr"] for r in records(short)][4:] == [1e-4] * 4  # after the decay: min_lr
    with pytest.raises(ConfigError, match="--steps 8: .* already trained 8 steps"):
        resume(short, steps=8)
    assert resume(short)["steps"] == 8  # without --steps: the run's own, nothing to do
