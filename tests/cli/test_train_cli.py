"""`tformer train`, `eval`, `plot` as a user runs them: in subprocesses, killed, under torchrun."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tformer import GPT2

SMALL = [
    "--n-layers",
    "2",
    "--n-heads",
    "2",
    "--d-model",
    "32",
    "--context",
    "16",
    "--batch-size",
    "8",
    "--lr",
    "3e-3",
    "--min-lr",
    "3e-4",
    "--warmup-steps",
    "5",
    "--eval-every",
    "20",
    "--eval-batches",
    "2",
    "--dropout",
    "0.1",
    "--dtype",
    "float32",
    "--threads",
    "1",
    "--sample-tokens",
    "20",
    "--no-progress",
]


@pytest.fixture
def env(tmp_path):
    return {**os.environ, "TFORMER_CACHE": str(tmp_path / "cache")}


@pytest.fixture
def corpus(corpus_file):
    return corpus_file


def tformer(*args, env, check=True):
    result = subprocess.run(
        [sys.executable, "-m", "tformer", *map(str, args)], capture_output=True, text=True, env=env
    )
    if check and result.returncode != 0:
        raise AssertionError(result.stderr)
    return result


def losses(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["type"], r["step"], r.get("loss"), r.get("val_loss")) for r in records]


def test_train_json_eval_and_plot(corpus, tmp_path, env):
    run = tmp_path / "run"
    out = tformer(
        "train", "--data", corpus, "--steps", "40", "--out", run, *SMALL, "--json", env=env
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])  # one JSON object, last line
    assert result["steps"] == 40 and result["val_loss"] < 3.0 and result["sample"]
    assert (run / "loss.png").stat().st_size > 1000
    assert GPT2.from_pretrained(run).config.max_len == 16
    scored = json.loads(tformer("eval", run, "--data", corpus, "--json", env=env).stdout)
    assert scored["loss"] == pytest.approx(result["val_loss"], abs=1e-3)  # the same full val set
    (run / "loss.png").unlink()
    assert tformer("plot", run, env=env).stdout.strip().endswith("loss.png")
    assert (run / "loss.png").is_file()


@pytest.mark.parametrize("delay", [0.0, 0.3])
def test_killed_run_resumes_with_exactly_the_same_losses(corpus, tmp_path, env, delay):
    # --dtype auto: bf16 autocast and the attention path it picks, where the CPU has bf16
    steps = ["--steps", "300", "--checkpoint-every", "20", "--dtype", "auto"]
    whole = tmp_path / "whole"
    tformer("train", "--data", corpus, *steps, "--out", whole, *SMALL, env=env)

    cut = tmp_path / "cut"
    cmd = [
        sys.executable,
        "-m",
        "tformer",
        "train",
        "--data",
        str(corpus),
        *steps,
        "--out",
        str(cut),
        *SMALL,
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (cut / "last").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    time.sleep(delay)  # right after a checkpoint, or somewhere in a later step or evaluation
    os.kill(proc.pid, signal.SIGKILL)  # no chance to clean up
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    killed_at = int((cut / "last").resolve().name.split("-")[1])
    assert killed_at < 300

    tformer("train", "--out", cut, "--resume", "--no-progress", env=env)
    assert losses(cut) == losses(whole)  # every step, before and after the crash
    assert (cut / "best").resolve() == cut / "checkpoints" / (whole / "best").resolve().name
    again = tformer("train", "--out", cut, "--resume", "--json", env=env)  # nothing left to do
    assert json.loads(again.stdout.strip().splitlines()[-1])["val_loss"] == round(
        losses(whole)[-1][3], 4
    )


@pytest.mark.parametrize(
    "options",
    [
        ["--parallel", "ddp"],
        # 3 evaluation batches on 2 processes: one process runs a spare forward pass
        ["--parallel", "fsdp", "--grad-accum", "2", "--activation-checkpointing"]
        + ["--eval-batches", "3"],
    ],
)
def test_two_processes_match_one_process(corpus, tmp_path, env, options):
    """DDP, and FSDP with gradient accumulation (its gradient sync switched off and on) and
    activation checkpointing (layers recomputed inside sharded units), on 2 gloo processes
    give one process's losses; the FSDP run saves whole checkpoints."""
    common = ["--data", corpus, "--steps", "15", "--eval-every", "5", *SMALL, *options]
    single = tmp_path / "single"
    tformer("train", *common, "--out", single, "--dropout", "0", env=env)
    ddp = tmp_path / options[1]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_port",
        "29517",
        "-m",
        "tformer",
        "train",
        *map(str, common),
        "--out",
        str(ddp),
        "--dropout",
        "0",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    a, b = losses(single), losses(ddp)
    assert [r[:2] for r in a] == [r[:2] for r in b]
    for ra, rb in zip(a, b, strict=True):
        for x, y in zip(ra[2:], rb[2:], strict=True):
            assert (x is None and y is None) or abs(x - y) <= 1e-5
    ours, theirs = GPT2.from_pretrained(single), GPT2.from_pretrained(ddp)
    theirs_state = theirs.state_dict()
    for name, x in ours.state_dict().items():
        torch.testing.assert_close(x, theirs_state[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize(
    "setup, args, message",
    [
        (lambda p: p.write_text(""), [], "holds no text"),
        (lambda p: p.write_bytes(b"ok \xff\xfe bad"), [], "not UTF-8 text (byte 3 is 0xff)"),
        (lambda p: p.write_text("short text"), [], "fewer than one context window"),
        (lambda p: None, ["--batch-size", "7", "--grad-accum", "2"], "divisible by grad_accum"),
    ],
)
def test_bad_input_is_a_one_line_error(tmp_path, env, tiny_text, setup, args, message):
    path = tmp_path / "data.txt"
    path.write_text(tiny_text)
    setup(path)
    result = tformer(
        "train", "--data", path, "--out", tmp_path / "run", *SMALL, *args, env=env, check=False
    )
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()  # nothing half-written


def test_tokenizer_that_does_not_match_the_checkpoint_is_refused(corpus, tmp_path, env):
    run = tmp_path / "run"
    tformer("train", "--data", corpus, "--steps", "2", "--out", run, *SMALL, env=env)
    chars = json.loads((run / "char_tokenizer.json").read_text())
    chars["chars"].append("\u00e9")  # one token more than the model has
    (run / "char_tokenizer.json").write_text(json.dumps(chars))
    result = tformer("eval", run, "--data", corpus, env=env, check=False)
    assert result.returncode == 2 and "do not belong together" in result.stderr


def test_resume_without_a_checkpoint_says_so(tmp_path, env):
    result = tformer("train", "--out", tmp_path / "nothing", "--resume", env=env, check=False)
    assert result.returncode == 2 and "nothing to resume" in result.stderr


def test_init_fine_tunes_a_trained_run_and_refuses_a_new_shape(corpus, tmp_path, env):
    base = tmp_path / "base"
    tformer("train", "--data", corpus, "--steps", "60", "--out", base, *SMALL, env=env)
    scratch_first = losses(base)[0][2]
    base_last = [r for r in losses(base) if r[0] == "train"][-1][2]
    tuned = tmp_path / "tuned"
    small_lr = ["--lr", "1e-5", "--min-lr", "1e-6", "--warmup-steps", "0", "--steps", "3"]
    options = ["--dtype", "float32", "--no-progress", "--sample-tokens", "0", "--json"]
    result = tformer(
        "train", "--data", corpus, "--init", base, "--out", tuned, *small_lr, *options, env=env
    )
    first = losses(tuned)[0][2]
    assert first < base_last + 0.3 < scratch_first  # it starts where the base run ended
    assert json.loads(result.stdout.strip().splitlines()[-1])["parameters"] == (
        GPT2.from_pretrained(base).num_parameters()
    )
    assert json.loads((tuned / "run.json").read_text())["init"] == str(base.resolve())
    refused = tformer(
        "train", "--init", base, "--n-layers", "3", "--out", tmp_path / "x", env=env, check=False
    )
    assert refused.returncode == 2 and "drop --n-layers" in refused.stderr
    longer = tformer(
        "train",
        "--data",
        corpus,
        "--init",
        base,
        "--context",
        "64",
        "--out",
        tmp_path / "y",
        env=env,
        check=False,
    )
    assert longer.returncode == 2 and "longer than the window" in longer.stderr


def capital_letter_questions(path, n, seed):
    """A toy reading task: the answer is the one capital letter of a lowercase context."""
    import random

    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            letters = [rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(8, 24))]
            where = rng.randrange(len(letters))
            letters[where] = letters[where].upper()
            context = "".join(letters)
            answers = [{"text": context[where], "answer_start": where}]
            record = {"id": f"q{i}", "context": context, "question": "capital?", "answers": answers}
            f.write(json.dumps(record) + "\n")
    return path


def test_qa_task_trains_a_reader_from_scratch_and_resumes(tmp_path, env):
    data = capital_letter_questions(tmp_path / "qa.jsonl", 400, seed=0)
    run = tmp_path / "qa"
    model = ["--n-layers", "2", "--n-heads", "2", "--d-model", "32", "--context", "20"]
    options = ["--task", "qa", "--data", data, "--steps", "250", "--batch-size", "16"]
    options += ["--lr", "3e-3", "--min-lr", "3e-4", "--warmup-steps", "10", "--stride", "4"]
    options += ["--max-answer-tokens", "1", "--dtype", "float32", "--no-progress", "--json"]
    result = tformer("train", *options, *model, "--out", run, env=env)
    scores = json.loads(result.stdout.strip().splitlines()[-1])
    assert scores["questions"] == 40  # the last 10% of the 400 contexts
    assert scores["exact_match"] > 60 and scores["f1"] >= scores["exact_match"]
    assert json.loads((run / "qa_scores.json").read_text())["f1"] == scores["f1"]
    again = tformer("train", "--out", run, "--resume", "--json", env=env)  # nothing left to do
    assert json.loads(again.stdout.strip().splitlines()[-1])["exact_match"] == scores["exact_match"]


def test_qa_task_fine_tunes_a_language_model_checkpoint(tmp_path, env, checkpoint):
    data = capital_letter_questions(tmp_path / "qa.jsonl", 40, seed=1)
    options = ["--task", "qa", "--data", data, "--init", checkpoint, "--steps", "3"]
    options += ["--batch-size", "4", "--context", "48", "--stride", "8", "--dtype", "float32"]
    options += ["--json"]
    result = tformer("train", *options, "--out", tmp_path / "tuned", env=env)
    scores = json.loads(result.stdout.strip().splitlines()[-1])
    assert scores["parameters"] == GPT2.from_pretrained(checkpoint).num_parameters() + 2 * 32 + 2
    refused = tformer(
        "train",
        "--task",
        "translation",
        "--init",
        checkpoint,
        "--out",
        tmp_path / "x",
        env=env,
        check=False,
    )
    assert refused.returncode == 2 and "--init starts GPT-2 models" in refused.stderr
