"""--resume finds what survives (a `last` that cannot be read falls back to the newest
checkpoint that can, and says so), and --resume --steps N extends a finished run with the
losses of a run that had been given N steps with its decay where it was."""

import errno
import json
import shutil

import pytest

from tformer.errors import ConfigError, RunDirectoryError
from tformer.recipes import TrainSpec, skeleton, train
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


def run_with_two_checkpoints(text, tmp_path) -> tuple:
    """A finished 6-step run whose checkpoints at steps 4 and 6 are both on disk (as when
    `best` points at the older one); -> (its directory, its training losses)."""
    run = tmp_path / "run"
    spec = TrainSpec(data=str(text), steps=6, checkpoint_every=2, out=str(run), **TINY, **QUIET)
    with pytest.MonkeyPatch.context() as patch:  # only while it is made: the resume prunes
        patch.setattr(checkpoint_module, "prune", lambda run_dir: None)
        train(spec)
    return run, [r["loss"] for r in records(run)]


def snapshot(directory) -> dict:
    return {p.name: p.read_bytes() for p in directory.iterdir()}


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
    text, tmp_path, capsys, damage, reason
):
    run, whole = run_with_two_checkpoints(text, tmp_path)
    newest = (run / "last").resolve()
    damage(newest)
    damaged = snapshot(newest) if newest.exists() else None
    capsys.readouterr()
    resume(run)
    err = [line for line in capsys.readouterr().err.splitlines() if "cannot resume" in line]
    assert len(err) == 1 and reason in err[0], err
    assert "resuming from step-000004, the newest that can be read" in err[0]
    assert [r["loss"] for r in records(run)] == whole  # steps 5 and 6 again, the same
    assert (run / "last").resolve().name == "step-000006"
    if damaged is not None:  # moved aside, not deleted: nothing is lost
        kept = run / "checkpoints" / ".step-000006.unreadable"
        assert err[0].endswith(f"; kept as {kept.name}")
        assert snapshot(kept) == damaged


def test_resume_gives_up_no_checkpoint_for_an_error_that_is_not_damage(text, tmp_path, monkeypatch):
    """Too many open files (or an I/O error, or no memory) says nothing about the
    checkpoint: the resume stops, and `last` and every checkpoint stay as they were."""
    run, _ = run_with_two_checkpoints(text, tmp_path)
    before = sorted(p.name for p in (run / "checkpoints").iterdir())

    def too_many_open_files(checkpoint):
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(skeleton, "load_state", too_many_open_files)
    with pytest.raises(OSError, match="Too many open files"):
        resume(run)
    assert (run / "last").resolve().name == "step-000006"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before


def test_a_refused_steps_changes_nothing_even_when_last_is_damaged(text, tmp_path):
    run, _ = run_with_two_checkpoints(text, tmp_path)
    truncate((run / "last").resolve() / "trainer_state.pt")
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    with pytest.raises(ConfigError, match="--steps 1"):
        resume(run, steps=1)
    assert (run / "last").resolve().name == "step-000006"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before


def test_checkpoints_are_ordered_by_their_step_not_their_name(tmp_path):
    for step in (999_999, 1_000_000, 5):
        (tmp_path / "checkpoints" / f"step-{step:06d}").mkdir(parents=True)
    newest = [p.name for p in checkpoint_module.checkpoints_newest_first(tmp_path)]
    assert newest == ["step-1000000", "step-999999", "step-000005"]


def test_prune_keeps_a_checkpoint_set_aside_as_unreadable(tmp_path):
    damaged = tmp_path / "checkpoints" / "step-000006"
    damaged.mkdir(parents=True)
    kept = checkpoint_module.set_aside(damaged)
    checkpoint_module.prune(tmp_path)
    assert kept.name == ".step-000006.unreadable" and kept.is_dir()


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


def test_an_extended_run_compares_its_evaluations_with_the_periodic_ones(text, tmp_path):
    """The final full evaluation of the finished run sets no bar for the extended run's
    periodic (sample) evaluations: the best loss kept is the best of those."""
    run = tmp_path / "run"
    options = dict(data=str(text), eval_every=2, final_eval="full", **TINY, **QUIET)
    train(TrainSpec(steps=4, out=str(run), **options))
    resume(run, steps=8)
    evaluations = records(run, "eval")
    assert [r["full"] for r in evaluations] == [False, True, False, True]
    state = checkpoint_module.load_state(run / "last")
    assert state["best_val_loss"] == min(r["val_loss"] for r in evaluations if not r["full"])
