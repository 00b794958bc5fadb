"""`tformer train --task translation` and `tformer translate`, as a user runs them."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tformer.data.parallel import number_words

TINY = [
    "--task",
    "translation",
    "--n-layers",
    "1",
    "--n-heads",
    "2",
    "--d-model",
    "32",
    "--d-ff",
    "64",
    "--bpe-vocab-size",
    "300",
    "--batch-size",
    "16",
    "--lr",
    "3e-3",
    "--warmup-steps",
    "5",
    "--eval-every",
    "20",
    "--eval-batches",
    "2",
    "--checkpoint-every",
    "10",
    "--dropout",
    "0.1",
    "--label-smoothing",
    "0.1",
    "--threads",
    "1",
    "--no-progress",
]


@pytest.fixture
def pairs_file(tmp_path):
    path = tmp_path / "pairs.tsv"
    path.write_text("".join(f"{s}\t{t}\n" for s, t in number_words(600, seed=1)), "utf-8")
    return path


def tformer(*args, stdin=None):
    result = subprocess.run(
        [sys.executable, "-m", "tformer", *map(str, args)],
        capture_output=True,
        text=True,
        input=stdin,
    )
    if result.returncode != 0:
        raise AssertionError(result.stderr)
    return result.stdout


def losses(run):
    with open(run / "metrics.jsonl") as f:
        return [json.loads(line)["loss"] for line in f if '"train"' in line]


def test_train_translate_and_resume_after_a_kill(pairs_file, tmp_path):
    steps = ["--data", pairs_file, "--steps", "60", *TINY]
    whole = tmp_path / "whole"
    result = json.loads(tformer("train", *steps, "--out", whole, "--json").splitlines()[-1])
    assert result["test_pairs"] == 30  # 5% of 600 held out for test, as much for validation
    assert set(result["test_beam4"]) == {"bleu", "chrf"}
    assert losses(whole)[-1] < losses(whole)[0]

    translated = tformer("translate", whole, stdin="five\n\nsixty-one\n").split("\n")
    assert len(translated) == 4 and translated[1] == ""  # an empty line stays empty
    greedy = json.loads(tformer("translate", whole, "--greedy", "--json", stdin="five\n"))
    assert len(greedy["translations"]) == 1

    cut = tmp_path / "cut"
    command = [sys.executable, "-m", "tformer", "train", *map(str, steps), "--out", str(cut)]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (cut / "last").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    tformer("train", "--out", cut, "--resume", "--no-progress")
    assert losses(cut) == losses(whole)


def test_translation_presets_and_data_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("one\tun\ntwo deux\n", "utf-8")
    for args, message in (
        (["--data", bad], "bad.tsv:2: expected source<TAB>target"),
        (["--preset", "gpt2"], "translation presets: base, small"),
    ):
        result = subprocess.run(
            [sys.executable, "-m", "tformer", "train", "--task", "translation", *map(str, args)],
            capture_output=True,
            text=True,
        )
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert "Traceback" not in result.stderr


def test_eval_scores_a_translation_checkpoint_with_bleu(tmp_path, pairs_file):
    run = tmp_path / "run"
    tformer("train", "--data", pairs_file, "--steps", "20", *TINY, "--out", run)
    result = json.loads(tformer("eval", run, "--data", pairs_file, "--json"))
    assert result["split"] == "test" and result["pairs"] == 30
    assert 0 <= result["bleu"] <= 100 and 0 <= result["accuracy"] <= 1

    # the same run as a Marian directory: tformer and transformers translate as the run does
    out = json.loads(tformer("export", "marian", run, "--out", tmp_path / "marian", "--json"))
    assert out["directory"] == str(tmp_path / "marian")
    sources = "five\nsixty-one\nnine hundred\n"
    expected = tformer("translate", run, "--greedy", stdin=sources)
    assert tformer("translate", tmp_path / "marian", "--greedy", stdin=sources) == expected
    # transformers on the same directory: tests/models/test_seq2seq_marian.py


def test_translation_defaults_are_the_papers(pairs_file, tmp_path):
    """Without the flags: label smoothing 0.1, dropout 0.1, post-LN, as in the paper."""
    flags = [a for a in TINY if a not in ("--dropout", "--label-smoothing", "0.1")]
    run = tmp_path / "defaults"
    tformer("train", "--data", pairs_file, "--steps", "2", *flags, "--out", run)
    train_config = json.loads((run / "train_config.json").read_text())
    model_config = json.loads((run / "config.json").read_text())
    assert train_config["label_smoothing"] == 0.1
    assert model_config["dropout"] == 0.1 and model_config["norm_position"] == "post"


def test_a_source_cut_to_fit_is_one_warning_line_and_reported(tmp_path, capsys):
    from tformer.cli.main import main
    from tformer.models.seq2seq import Seq2SeqConfig, Seq2SeqTransformer
    from tformer.tokenizers import train_bpe

    tokenizer = train_bpe(["one two three four"] * 4, 280, special_tokens=("<pad>", "<s>", "</s>"))
    v = tokenizer.vocab_size + 30  # a target vocabulary larger than the tokenizer's
    config = Seq2SeqConfig(v, v, max_len=12, d_model=16, n_heads=2, n_encoder_layers=1,
                           n_decoder_layers=1, d_ff=32, dropout=0.0)  # fmt: skip
    run = tmp_path / "untrained"
    Seq2SeqTransformer(config, seed=0).save_pretrained(run)
    tokenizer.save(run)
    sentences = tmp_path / "in.txt"
    sentences.write_text("one two\n" + "one two three four " * 5 + "\n")
    main(["translate", str(run), "--input", str(sentences), "--json", "--max-new-tokens", "6"])
    captured = capsys.readouterr()
    assert json.loads(captured.out)["source_truncated"] == [False, True]
    assert captured.err.startswith("tformer translate: warning: 1 of 2 source sentences")
    assert len(captured.err.strip().splitlines()) == 1
