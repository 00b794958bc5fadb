"""Nothing a user owns is ever lost: every command that writes a directory refuses one that
holds something it may not write over, in one line naming what is there, and changes no
file (docs/run_directories.md)."""

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tformer.cli.main import main
from tformer.files import check_unlocked, lock_directory
from tformer.recipes import run_dir

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
    # as another process left it: a refused command that wrote its own id would show
    (run / ".lock").write_text("1 another-host\n")
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


INIT_TINY = ["--n-layers", "1", "--n-heads", "2", "--d-model", "16", "--max-len", "16"]


@pytest.mark.parametrize(
    "foreign",
    [
        {"notes.txt": "mine\n"},  # a user's file beside a checkpoint's
        {"tokenizer.json": '{"mine": true}\n'},  # another tokenizer, which init would remove
    ],
)
def test_init_overwrite_refuses_a_directory_with_files_it_did_not_write(
    refused, tmp_path, monkeypatch, tiny_checkpoint, foreign
):
    use_shared_cache(monkeypatch)
    out = tmp_path / "checkpoint"
    shutil.copytree(tiny_checkpoint, out)
    for name, text in foreign.items():
        (out / name).write_text(text)
    refused(["init", out, "--overwrite", *INIT_TINY], [*foreign, "even --overwrite"], keep=[out])


def test_init_overwrite_replaces_a_checkpoint_init_wrote(tmp_path, monkeypatch, tiny_checkpoint):
    use_shared_cache(monkeypatch)
    out = tmp_path / "checkpoint"
    shutil.copytree(tiny_checkpoint, out)
    before = (out / "model.safetensors").read_bytes()
    main(["init", str(out), "--overwrite", *INIT_TINY])
    assert (out / "model.safetensors").read_bytes() != before
    assert sorted(os.listdir(out)) == sorted(os.listdir(tiny_checkpoint))


def test_init_refuses_a_seed_out_of_range(refused, tmp_path):
    refused(["init", tmp_path / "new", "--seed", "-1", *INIT_TINY], ["--seed", "-1"])
    assert not (tmp_path / "new").exists()


def test_lab_takes_a_directory_for_its_report_only_by_its_mark(refused, tmp_path):
    out = tmp_path / "mine"
    (out / "runs").mkdir(parents=True)
    (out / "runs" / "experiment-1.json").write_text("{}\n")  # a user's runs/, not the lab's
    refused(["lab", "--out", out, "--quick"], ["not a lab report", "runs", "--out"], keep=[out])


def copy_run(places, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(places["run"], run, symlinks=True)
    return run


@pytest.mark.parametrize(
    "line, where",
    [
        ('{"type": "train", "loss": 1.0}\n', ":2: "),  # no step
        ("not json at all\n", ":2: "),
        ('["a list"]\n', ":2: "),
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
         f"lock_directory({str(run)!r}).announce(); print('locked', flush=True); time.sleep(60)"],
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


def test_overwrite_leaves_a_linked_checkpoint_where_it_points(places, tmp_path):
    run = copy_run(places, tmp_path)
    elsewhere = tmp_path / "my-checkpoint"
    elsewhere.mkdir()
    (elsewhere / "notes.txt").write_text("mine\n")
    (run / "checkpoints" / "step-000009").symlink_to(elsewhere)
    main(["train", "--data", str(places["text"]), *TINY, "--steps", "3", "--out", str(run),
          "--overwrite", "--json"])  # fmt: skip
    assert (elsewhere / "notes.txt").read_text() == "mine\n"
    assert (run / "checkpoints" / "step-000009").is_symlink()
    assert (run / "last").resolve().name == "step-000003"


def test_an_overwrite_cut_short_leaves_a_run_that_overwrite_takes_up_again(
    places, tmp_path, monkeypatch
):
    run = copy_run(places, tmp_path)
    real_rmtree = shutil.rmtree

    def fails_partway(path, *args, **kwargs):
        if Path(path).name == "checkpoints" or Path(path).parent.name == "checkpoints":
            raise OSError(5, "Input/output error", str(path))
        return real_rmtree(path, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(run_dir.shutil, "rmtree", fails_partway)
        with pytest.raises(OSError):
            run_dir.clear_run(run)
    assert run_dir.is_run(run)  # run.json goes last: still a run, so --overwrite works
    main(["train", "--data", str(places["text"]), *TINY, "--steps", "3", "--out", str(run),
          "--overwrite", "--json"])  # fmt: skip
    assert (run / "last").resolve().name == "step-000003"


def probing(directory: Path, seconds: float) -> None:
    """Hold the shared lock a check_unlocked probe takes, for `seconds`, then let it go."""
    fd = os.open(directory / ".lock", os.O_RDONLY | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    threading.Timer(seconds, os.close, [fd]).start()


def test_a_probe_neither_refuses_a_writer_nor_another_probe(tmp_path):
    probing(tmp_path, 0.05)
    check_unlocked(tmp_path)  # a second probe meanwhile: not taken for a writer
    lock_directory(tmp_path).release()  # waits the probe out instead of naming a stale pid


@pytest.mark.parametrize(
    "name, key, value, names",
    [
        ("train_config.json", "beta1", 1.5, ["beta1", "1.5"]),
        ("train_config.json", "seed", 2**63, ["seed"]),
        ("run.json", "task", "poetry", ["unknown task", "poetry"]),
    ],
)
def test_a_bad_setting_in_a_run_file_is_named_with_the_file(
    refused, places, tmp_path, name, key, value, names
):
    run = copy_run(places, tmp_path)
    stored = json.loads((run / name).read_text())
    (run / name).write_text(json.dumps({**stored, key: value}))
    refused(["train", "--resume", "--out", run], [str(run / name), *names], keep=[run])


def test_a_second_lab_on_the_same_report_is_refused_while_one_writes(refused, tmp_path):
    from tformer.files import lock_directory
    from tformer.lab.report import mark_report

    out = tmp_path / "report"
    mark_report(out)
    lock = lock_directory(out)  # another lab, writing this report
    try:
        lock.announce()
        refused(["lab", "--out", out, "--quick"], ["being written by process", str(out)])
    finally:
        lock.release()
