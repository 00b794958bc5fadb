"""`tformer train`, `eval`, `plot` as a user runs them: in subprocesses, killed, under torchrun."""

import json
import subprocess
import sys

import pytest
import torch
from train_runs import SMALL, assert_killed_run_resumes_exactly, losses, tformer

from tformer import GPT2


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


def test_a_training_run_does_not_import_the_compiler_stack(corpus, tmp_path, env):
    """torch._dynamo takes 1.1-1.5 s to import (a quarter of a short run's fixed cost): a
    run that does not ask for --compile trains, evaluates, checkpoints and resumes without
    it (torch.optim's optimizers import it; tformer's AdamW does not)."""
    run = tmp_path / "run"
    script = (
        "import sys\n"
        "from tformer.cli.main import main\n"
        "sys.argv = ['tformer', *sys.argv[1:]]\n"
        "try:\n"
        "    main()\n"
        "finally:\n"
        "    print('dynamo imported:', 'torch._dynamo' in sys.modules)\n"
    )
    first = ["train", "--data", corpus, "--steps", "30", "--out", run, *SMALL]
    for args in (first, ["train", "--out", run, "--resume", "--no-progress"]):  # loads the state
        result = subprocess.run(
            [sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True, env=env
        )
        assert result.returncode == 0, result.stderr
        assert "dynamo imported: False" in result.stdout
    assert (run / "checkpoints").is_dir() and losses(run)[-1][1] == 30


@pytest.mark.parametrize("delay", [0.0, 0.3])
def test_killed_run_resumes_with_exactly_the_same_losses(corpus, tmp_path, env, delay):
    # --dtype auto: bf16 autocast and the attention path it picks, where the CPU has bf16
    steps = ["--steps", "300", "--checkpoint-every", "20", "--dtype", "auto"]
    options = ["--data", corpus, *SMALL, *steps]
    whole, cut = assert_killed_run_resumes_exactly(options, tmp_path, env, delay)
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
    common += ["--device", "cpu"]  # gloo processes, as on a machine with one GPU or none
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
