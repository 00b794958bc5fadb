"""Ctrl-C and SIGTERM during training finish the step, save a checkpoint and stop with a
line that says how to continue; the continued run has exactly the losses of one that was
never interrupted."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from test_trainer import data_and_model, quick

from tformer.errors import TrainingInterrupted
from tformer.files import lock_directory
from tformer.recipes import TrainSpec, train
from tformer.train import checkpoint as checkpoint_module
from tformer.train import fit

TINY = dict(n_layers=1, n_heads=2, d_model=16, context=16, batch_size=4, eval_batches=2)
CONFIG = quick(steps=20, final_eval="sample")  # checkpoints at steps 10 and 20
QUIET = dict(dtype="float32", threads=1, seed=3, progress=False, messages=False)


@pytest.fixture(autouse=True)
def ctrl_c_raises():
    """Ctrl-C as an interactive shell delivers it, however the test runner was started: a
    runner started in the background of a script inherits SIGINT ignored, which the
    trainer leaves alone on purpose."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def train_losses(run_dir) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    return {r["step"]: r["loss"] for r in records if r["type"] == "train"}


def signal_at(step: int, *signals: int):
    """An on_record that sends this process `signals` once the run has done `step`."""

    def on_record(record: dict) -> None:
        if record["type"] == "train" and record["step"] == step:
            for signum in signals:
                os.kill(os.getpid(), signum)

    return on_record


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_saves_the_step_and_the_resumed_run_has_the_same_losses(
    corpus_file, tmp_path, signum, code
):
    tok, train_data, val, model = data_and_model(corpus_file, dropout=0.1)
    fit(
        model,
        train_data,
        val,
        CONFIG,
        tmp_path / "whole",
        tok,
        progress=False,
    )
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    _, _, _, model = data_and_model(corpus_file, dropout=0.1)
    cut = tmp_path / "cut"
    with pytest.raises(TrainingInterrupted) as stop:
        fit(
            model,
            train_data,
            val,
            CONFIG,
            cut,
            tok,
            False,
            False,
            signal_at(13, signum),
        )
    assert stop.value.exit_code == code and stop.value.step == 13
    assert str(stop.value) == f"interrupted at step 13 of 20; saved {cut}/checkpoints/step-000013"
    assert (cut / "last").resolve().name == "step-000013"  # between the checkpoints at 10, 20
    assert {s: signal.getsignal(s) for s in handlers} == handlers  # put back
    _, _, _, fresh = data_and_model(corpus_file, dropout=0.1)
    fit(
        fresh,
        train_data,
        val,
        CONFIG,
        cut,
        tok,
        resume=True,
        progress=False,
    )
    assert train_losses(cut) == train_losses(tmp_path / "whole")


def test_a_second_signal_stops_at_once_leaving_the_last_checkpoint_whole(
    corpus_file, tmp_path, monkeypatch
):
    tok, train_data, val, model = data_and_model(corpus_file)
    real_save = checkpoint_module.torch.save

    def save_then_ctrl_c_again(obj, path, *args, **kwargs):
        if obj["step"] == 13:  # the interrupt's own checkpoint: Ctrl-C again, half written
            with open(path, "wb") as f:
                f.write(b"half")
            os.kill(os.getpid(), signal.SIGINT)
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module.torch, "save", save_then_ctrl_c_again)
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt) as stop:
        fit(
            model,
            train_data,
            val,
            CONFIG,
            run,
            tok,
            False,
            False,
            signal_at(13, signal.SIGINT),
        )
    assert type(stop.value) is KeyboardInterrupt  # not a saved TrainingInterrupted
    assert (run / "last").resolve().name == "step-000010"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000010"]
    assert sorted(p.name for p in run.rglob("*.tmp")) == []  # the half-written one is gone


def test_a_recipe_run_says_how_to_continue(tmp_path, monkeypatch, tiny_text):
    monkeypatch.setenv("TFORMER_CACHE", str(tmp_path / "cache"))
    text = tmp_path / "text.txt"
    text.write_text(tiny_text)
    out = tmp_path / "my run"  # quoted in the line, to be pasted into a shell
    spec = TrainSpec(data=str(text), steps=50, out=str(out), **TINY, **QUIET)
    monkeypatch.setattr("tformer.recipes.skeleton.fit", interrupting_fit(4))
    with pytest.raises(TrainingInterrupted) as stop:
        train(spec)
    assert str(stop.value).endswith(f"; continue with: tformer train --out '{out}' --resume")
    assert (out / "last").resolve().name == "step-000004"
    lock_directory(out).release()  # released on the way out


def test_a_signal_in_the_last_step_lets_the_run_finish(corpus_file, tmp_path):
    tok, train_data, val, model = data_and_model(corpus_file)
    run = tmp_path / "run"
    fit(model, train_data, val, CONFIG, run, tok, False, False, signal_at(20, signal.SIGINT))
    assert (run / "last").resolve().name == "step-000020"
    assert (run / "model.safetensors").is_file() and (run / "loss.png").is_file()


def test_an_ignored_signal_stays_ignored(corpus_file, tmp_path):
    """Under nohup SIGINT is ignored (SIG_IGN): training neither stops at it nor replaces
    the choice; SIGTERM is still handled."""
    tok, train_data, val, model = data_and_model(corpus_file)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        run = tmp_path / "run"
        fit(model, train_data, val, CONFIG, run, tok, False, False, signal_at(13, signal.SIGINT))
        assert (run / "last").resolve().name == "step-000020"  # not stopped at step 13
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        _, _, _, model = data_and_model(corpus_file)
        with pytest.raises(TrainingInterrupted) as stop:
            fit(
                model,
                train_data,
                val,
                CONFIG,
                tmp_path / "again",
                tok,
                False,
                False,
                signal_at(13, signal.SIGTERM),
            )
        assert stop.value.step == 13 and stop.value.exit_code == 143
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def interrupting_fit(step: int):
    def fit_with_a_ctrl_c(*args, **kwargs):
        return fit(*args, **kwargs, on_record=signal_at(step, signal.SIGINT))

    return fit_with_a_ctrl_c


SCRIPT = """
import sys
from tformer.errors import TrainingInterrupted
from tformer.files import lock_directory
from tformer.recipes import TrainSpec, train
spec = TrainSpec(**{spec!r})
try:
    train(spec)
except TrainingInterrupted as e:
    print(e, file=sys.stderr)
    sys.exit(e.exit_code)
"""


def test_sigterm_to_a_training_process_saves_and_resumes_exactly(tmp_path, tiny_text, monkeypatch):
    text = tmp_path / "text.txt"
    text.write_text(tiny_text)
    env = {**os.environ, "TFORMER_CACHE": str(tmp_path / "cache")}
    options = dict(data=str(text), steps=400, eval_every=0, checkpoint_every=0, **TINY, **QUIET)
    cut = tmp_path / "cut"
    script = SCRIPT.format(spec={**options, "out": str(cut)})
    proc = subprocess.Popen(
        [sys.executable, "-c", script], env=env, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 60
    metrics = cut / "metrics.jsonl"
    while (not metrics.exists() or metrics.stat().st_size < 300) and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    line = err.strip().splitlines()[-1]
    step = int((cut / "last").resolve().name.removeprefix("step-"))
    assert 0 < step < 400
    assert line.startswith(f"interrupted at step {step} of 400; saved {cut}/checkpoints/")
    assert line.endswith(f"continue with: tformer train --out {cut} --resume")
    # continued here and run whole here: the same losses at every step
    subprocess.run(
        [sys.executable, "-c", SCRIPT.format(spec={"out": str(cut), "resume": True, **QUIET})],
        env=env,
        check=True,
    )
    whole = tmp_path / "whole"
    monkeypatch.setenv("TFORMER_CACHE", env["TFORMER_CACHE"])
    train(TrainSpec(**options, out=str(whole)))  # here: the same arithmetic, one thread
    assert train_losses(cut) == train_losses(whole)


RANKS_SCRIPT = """
import json, os, signal, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
import torch
from test_trainer import data_and_model, quick
from tformer.errors import TrainingInterrupted
from tformer.train import distributed, fit

dist = distributed.init_from_env(torch.device("cpu"))
tok, train, val, model = data_and_model(Path({corpus!r}))

def on_record(record):  # only the second process is signalled, after step 3's all-reduce
    if dist.rank == 1 and record["type"] == "train" and record["step"] == 3:
        os.kill(os.getpid(), signal.SIGTERM)

config = quick(steps=20, eval_every=0, final_eval="sample")
try:
    fit(model, train, val, config, {run!r}, tok, progress=False, on_record=on_record)
    stopped = None
except TrainingInterrupted as e:
    stopped = [e.step, e.exit_code]
Path({run!r}, f"rank{{dist.rank}}.json").write_text(json.dumps(stopped))
"""


def test_every_process_stops_after_the_same_step(corpus_file, tmp_path):
    run = tmp_path / "run"
    script = tmp_path / "ranks.py"
    tests = str(Path(__file__).parent)
    script.write_text(RANKS_SCRIPT.format(tests=tests, corpus=str(corpus_file), run=str(run)))
    env = {**os.environ, "TFORMER_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    result = subprocess.run([*cmd, str(script)], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    # the signal reached one process after step 3's vote: both stop after step 4's
    stops = [json.loads((run / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert stops == [[4, 143], [4, 143]]
    assert (run / "last").resolve().name == "step-000004"


def test_training_in_another_thread_leaves_the_signals_alone(corpus_file):
    """Python delivers signals to the main thread only: another thread installs nothing
    (signal.signal would raise there) and trains as usual."""
    tok, train_data, val, model = data_and_model(corpus_file)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    failures = []

    def train_here():
        try:
            fit(model, train_data, None, quick(steps=3), progress=False)
        except BaseException as e:  # reported below, in the test's own thread
            failures.append(e)

    worker = threading.Thread(target=train_here)
    worker.start()
    worker.join()
    assert failures == []
    assert {s: signal.getsignal(s) for s in handlers} == handlers
