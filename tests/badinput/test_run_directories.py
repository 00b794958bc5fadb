"""Nothing a user owns is ever lost: every command that writes a directory refuses one that
holds something it may not write over, in one line naming what is there, and changes no
file (docs/run_directories.md)."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tformer.cli.main import main
from tformer.files import lock_directory

TINY = ["--tokenizer", "char", "--n-layers", "1", "--n-heads", "2", "--d-model", "16",
        "--context", "16", "--batch-size", "4", "--eval-batches", "2", "--threads", "1",
        "--no-progress", "--sample-tokens", "0"]  # fmt: skip


SHARED_CACHE = os.environ.get("TFORMER_CACHE")  # where GPT-2's tokenizer files are kept


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TFORMER_CACHE", str(tmp_path / "cache"))


def use_shared_cache(monkeypatch):
    """`init` writes GPT-2's tokenizer: from the cache tiny_checkpoint filled, not fetched."""
    if SHARED_CACHE is None:
        monkeypatch.delenv("TFORMER_CACHE")
    else:
        monkeypatch.setenv("TFORMER_CACHE", SHARED_CACHE)


@pytest.fixture(scope="module")
def places(tmp_path_factory, tiny_text, tiny_checkpoint) -> dict[str, Path]:
    """What a user may have where a command is told to write: each kind of directory."""
    root = tmp_path_factory.mktemp("places")
    text = root / "text.txt"
    text.write_text(tiny_text, encoding="utf-8")
    run = root / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TFORMER_CACHE", str(root / "cache"))
        main(["train", "--data", str(text), *TINY, "--steps", "2", "--out", str(run), "--json"])
    foreign = root / "notes"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work\n")
    (foreign / "checkpoints").mkdir()
    (foreign / "checkpoints" / "step-000001.txt").write_text("not a checkpoint\n")
    a_file = root / "a_file.txt"
    a_file.write_text("precious\n")
    return {"text": text, "run": run, "hf": tiny_checkpoint, "foreign": foreign, "file": a_file}


def paths(places, argv):
    return [str(places[a[1:-1]]) if a.startswith("{") else a for a in argv]


# (argv with {place} names, the strings the one line must name, the places to keep)
TRAIN_CASES = [
    (["--out", "{hf}"], ["holds files tformer did not write", "config.json", "--out"], ["hf"]),
    (["--out", "{hf}", "--overwrite"], ["config.json", "even with --overwrite"], ["hf"]),
    (["--out", "{foreign}"], ["thesis.tex", "checkpoints", "pick an empty"], ["foreign"]),
    (["--out", "{foreign}", "--overwrite"], ["thesis.tex"], ["foreign"]),
    (["--out", "{run}"], ["already holds a training run", "--resume", "--overwrite"], ["run"]),
    (["--out", "{file}"], ["is a file", "--out"], ["file"]),
    (["--out", ""], ["--out"], []),
    (["--out", " "], ["--out"], []),
]

RESUME_CASES = [
    (["--out", "{hf}"], ["nothing to resume", "not a tformer run", "config.json"], ["hf"]),
    (["--out", "{foreign}"], ["nothing to resume", "thesis.tex"], ["foreign"]),
    (["--out", "{text}"], ["nothing to resume"], ["text"]),
    (["--out", "{run}", "--steps", "2"], ["--steps 2", "already trained 2 steps"], ["run"]),
    (["--out", "{run}", "--steps", "1"], ["--steps 1", "larger --steps"], ["run"]),
]


@pytest.mark.parametrize("argv, names, keep", TRAIN_CASES)
def test_train_refuses_an_out_it_may_not_write(refused, places, argv, names, keep):
    argv = ["train", "--data", str(places["text"]), *TINY, "--steps", "2", *argv]
    refused(paths(places, argv), names, keep=[places[k] for k in keep])


@pytest.mark.parametrize("argv, names, keep", RESUME_CASES)
def test_train_resume_refuses_what_is_not_a_resumable_run(refused, places, argv, names, keep):
    refused(["train", "--resume", *paths(places, argv)], names, keep=[places[k] for k in keep])


def test_resume_of_a_missing_directory_says_nothing_to_resume(refused, tmp_path):
    refused(["train", "--resume", "--out", tmp_path / "nowhere"], ["nothing to resume"])
    assert not (tmp_path / "nowhere").exists()


# Every other command that writes a directory, over each kind of existing content.
OTHER_CASES = [
    (["init", "{hf}"], ["not empty", "config.json", "--overwrite"], ["hf"]),
    (["init", "{foreign}"], ["not empty", "thesis.tex"], ["foreign"]),
    (["init", "{run}"], ["holds a training run"], ["run"]),
    (["init", "{run}", "--overwrite"], ["holds a training run"], ["run"]),
    (["init", "{file}"], ["is a file"], ["file"]),
    (["init", ""], ["DIR"], []),
    (["lab", "--out", "{hf}"], ["not empty", "config.json", "--out"], ["hf"]),
    (["lab", "--out", "{foreign}"], ["thesis.tex"], ["foreign"]),
    (["lab", "--out", "{run}"], ["holds a training run"], ["run"]),
    (["lab", "--out", "{file}"], ["is a file"], ["file"]),
    (["lab", "--out", ""], ["--out"], []),
    (["plot", ""], ["RUN_DIR"], []),
    (["plot", "{foreign}"], ["metrics.jsonl", "missing"], ["foreign"]),
]


@pytest.mark.parametrize("argv, names, keep", OTHER_CASES)
def test_commands_that_write_a_directory_refuse_one_they_may_not(
    refused, places, argv, names, keep
):
    argv = (
        [*argv, "--n-layers", "1", "--n-heads", "2", "--d-model", "16"]
        if argv[0] == "init"
        else argv
    )
    refused(paths(places, argv), names, keep=[places[k] for k in keep])


def test_init_overwrite_writes_into_a_foreign_directory_but_keeps_other_files(
    tmp_path, monkeypatch, tiny_checkpoint
):
    use_shared_cache(monkeypatch)
    (tmp_path / "notes.txt").write_text("mine\n")
    main(["init", str(tmp_path), "--overwrite", "--n-layers", "1", "--n-heads", "2",
          "--d-model", "16", "--max-len", "16"])  # fmt: skip
    assert (tmp_path / "notes.txt").read_text() == "mine\n"
    assert (tmp_path / "model.safetensors").is_file()


def copy_run(places, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(places["run"], run, symlinks=True)
    return run


@pytest.mark.parametrize(
    "line, where",
    [
        ('{"type": "train", "loss": 1.0}\n', "line 2"),  # no step
        ("not json at all\n", "line 2"),
        ('["a list"]\n', "line 2"),
    ],
)
def test_a_bad_metrics_line_is_named_by_resume_and_plot(refused, places, tmp_path, line, where):
    run = copy_run(places, tmp_path)
    lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    (run / "metrics.jsonl").write_text(lines[0] + line + "".join(lines[1:]))
    metrics = str(run / "metrics.jsonl")
    refused(["plot", run], [metrics, where], keep=[run])
    refused(["train", "--resume", "--out", run, "--steps", "3"], [metrics, where], keep=[run])


def test_a_torn_last_metrics_line_is_dropped_by_plot(places, tmp_path, capsys):
    run = copy_run(places, tmp_path)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"type": "train", "st')  # a crash in the middle of a write
    main(["plot", str(run)])
    assert capsys.readouterr().out.strip() == str(run / "loss.png")


def test_a_run_another_process_writes_is_refused_naming_it(refused, places, tmp_path):
    run = copy_run(places, tmp_path)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom tformer.files import lock_directory\n"
         f"lock_directory({str(run)!r}); print('locked', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        started = time.perf_counter()
        refused(["train", "--resume", "--out", run], [f"process {holder.pid}", ".lock"], [run])
        refused(["train", "--data", places["text"], *TINY, "--out", run, "--overwrite"],
                [f"process {holder.pid}"], [run])  # fmt: skip
        assert time.perf_counter() - started < 5  # at once, not after loading the data
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock_directory(run).release()  # the kernel dropped the dead process's lock


def test_overwrite_replaces_a_run_but_keeps_files_tformer_did_not_write(places, tmp_path):
    run = copy_run(places, tmp_path)
    (run / "notes.txt").write_text("mine\n")
    (run / "checkpoints" / "my-best").mkdir()
    old = (run / "last").resolve().name
    main(["train", "--data", str(places["text"]), *TINY, "--steps", "3", "--out", str(run),
          "--overwrite", "--checkpoint-every", "1", "--json"])  # fmt: skip
    assert (run / "notes.txt").read_text() == "mine\n" and (
        run / "checkpoints" / "my-best"
    ).is_dir()
    assert (run / "last").resolve().name == "step-000003" != old
    assert sorted(os.listdir(run / "checkpoints"))[-1] == "step-000003"
