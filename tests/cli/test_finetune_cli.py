"""`tformer train` fine-tuning a model: question answering, LoRA, SFT (as a user runs them)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from train_runs import SMALL, assert_killed_run_resumes_exactly, losses, tformer

from tformer import GPT2


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


def qa_training(data) -> list:
    """250 steps of the QA task on `data`, windows of 20 tokens, one-token answers."""
    options = ["--task", "qa", "--data", data, "--steps", "250", "--batch-size", "16"]
    options += ["--lr", "3e-3", "--min-lr", "3e-4", "--warmup-steps", "10", "--stride", "4"]
    return [*options, "--context", "20", "--max-answer-tokens", "1", "--no-progress", "--json"]


def test_qa_task_trains_a_reader_from_scratch_and_resumes(tmp_path, env):
    data = capital_letter_questions(tmp_path / "qa.jsonl", 400, seed=0)
    run = tmp_path / "qa"
    model = ["--n-layers", "2", "--n-heads", "2", "--d-model", "32"]
    options = [*qa_training(data), "--dtype", "float32"]
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


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, tiny_text):
    """A small run on the tiny text, trained 60 steps, for fine-tuning."""
    directory = tmp_path_factory.mktemp("base")
    (directory / "corpus.txt").write_text(tiny_text, encoding="utf-8")
    env = {**os.environ, "TFORMER_CACHE": str(directory / "cache")}
    base = directory / "run"
    tformer(
        "train", "--data", directory / "corpus.txt", "--steps", "60", "--out", base, *SMALL, env=env
    )
    return base


LORA = ["--lora-rank", "2", "--lora-targets", "c_attn,mlp.c_proj", "--warmup-steps", "0"]


def test_lora_fine_tuning_trains_adapters_alone_and_merges(corpus, base_run, tmp_path, env):
    tuned = tmp_path / "tuned"
    options = ["--steps", "30", "--lr", "1e-2", "--dtype", "float32", "--sample-tokens", "0"]
    result = tformer(
        "train",
        "--data",
        corpus,
        "--init",
        base_run,
        *LORA,
        *options,
        "--merge",
        "--json",
        "--out",
        tuned,
        env=env,
    )
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    base = GPT2.from_pretrained(base_run)
    # rank 2 on every block's c_attn (32 -> 96) and mlp.c_proj (128 -> 32)
    assert figures["trainable_parameters"] == 2 * (2 * (32 + 96) + 2 * (128 + 32))
    assert figures["parameters"] == base.num_parameters()
    train = [r[2] for r in losses(tuned) if r[0] == "train"]
    assert sum(train[-5:]) < sum(train[:5])  # the adapters learn

    adapted = GPT2.from_pretrained(tuned / "adapter")  # the base, and the adapters on it
    merged = GPT2.from_pretrained(tuned)  # a plain model
    assert (tuned / "last" / "adapter_config.json").is_file()  # checkpoints: adapters only
    assert not (tuned / "last" / "model.safetensors").exists()
    assert not (tuned / "adapter_config.json").exists()
    for name, weight in base.state_dict().items():  # the base never changed
        torch.testing.assert_close(adapted.state_dict()[name], weight, rtol=0, atol=0)
    ids = torch.randint(0, base.config.vocab_size, (2, 16))
    torch.testing.assert_close(merged(ids), adapted(ids), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(merged(ids), base(ids), atol=1e-3)


def test_killed_lora_run_resumes_exactly(corpus, base_run, tmp_path, env):
    options = ["--data", corpus, "--init", base_run, *LORA, "--lora-dropout", "0.1"]
    options += ["--steps", "150", "--checkpoint-every", "10", "--eval-every", "50"]
    options += ["--dtype", "float32", "--threads", "1", "--sample-tokens", "0", "--no-progress"]
    assert_killed_run_resumes_exactly(options, tmp_path, env)


def test_killed_qa_run_resumes_exactly(tmp_path, env):
    data = capital_letter_questions(tmp_path / "qa.jsonl", 200, seed=2)
    options = ["--task", "qa", "--data", data, "--steps", "150", "--checkpoint-every", "10"]
    options += ["--n-layers", "2", "--n-heads", "2", "--d-model", "32", "--context", "20"]
    options += ["--batch-size", "8", "--stride", "4", "--dropout", "0.1", "--eval-every", "50"]
    options += ["--dtype", "float32", "--threads", "1", "--no-progress"]
    assert_killed_run_resumes_exactly(options, tmp_path, env)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--merge"], "--merge go with --lora-rank"),
        (["--lora-rank", "2"], "give it with --init"),
        (["--lora-rank", "2", "--init", "{base}", "--lora-targets", "c_proj"], "say attn.c_proj"),
        (["--lora-rank", "0", "--init", "{base}"], "argument --lora-rank: must be an integer >= 1"),
    ],
)
def test_bad_lora_flags_are_one_line_errors(corpus, base_run, tmp_path, env, args, message):
    args = [a.replace("{base}", str(base_run)) for a in args]
    result = tformer(
        "train", "--data", corpus, *args, "--out", tmp_path / "x", env=env, check=False
    )
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert not (tmp_path / "x").exists()


def test_lora_cannot_stack_on_an_adapter_run_but_full_fine_tuning_can(
    corpus, base_run, tmp_path, env
):
    options = ["--steps", "3", "--dtype", "float32", "--sample-tokens", "0", "--no-progress"]
    adapters = tmp_path / "adapters"
    tformer(
        "train", "--data", corpus, "--init", base_run, *LORA, *options, "--out", adapters, env=env
    )
    again = tformer(
        "train",
        "--data",
        corpus,
        "--init",
        adapters,
        *LORA,
        "--out",
        tmp_path / "x",
        env=env,
        check=False,
    )
    assert again.returncode == 2 and "holds LoRA adapters" in again.stderr
    # the adapter directory samples and scores as a model: its base with the adapters
    scored = tformer("eval", adapters, "--data", corpus, "--json", env=env)
    val_loss = [r for r in losses(adapters) if r[0] == "eval"][-1][3]
    assert json.loads(scored.stdout.strip().splitlines()[-1])["loss"] == pytest.approx(
        val_loss, abs=1e-4
    )
    sampled = tformer("sample", adapters, "--prompt", "the", "--max-new-tokens", "5", env=env)
    assert sampled.stdout.startswith("the")
    full = tmp_path / "full"  # the adapters folded in, then every weight trains
    tformer("train", "--data", corpus, "--init", adapters, *options, "--out", full, env=env)
    assert (full / "model.safetensors").is_file()
    assert (
        GPT2.from_pretrained(full).num_parameters()
        == GPT2.from_pretrained(base_run).num_parameters()
    )


def swap_pairs(path, n, seed):
    """A toy instruction: 'the cat, the sea so' -> ' the sea, the cat' (words of the tiny
    text, so the base run's characters cover them)."""
    import random

    rng = random.Random(seed)
    things = ["the cat", "a dog", "my friend", "the king", "the moon", "a bird", "the sea"]
    with open(path, "w") as f:
        for _ in range(n):
            a, b = rng.sample(things, 2)
            f.write(json.dumps({"prompt": f"{a} {b} so", "response": f" {b} {a}.\n"}) + "\n")
    return path


@pytest.mark.parametrize("lora", [[], ["--lora-rank", "4", "--lora-targets", "c_attn,c_fc"]])
def test_sft_learns_the_responses(base_run, tmp_path, env, lora):
    data = swap_pairs(tmp_path / "pairs.jsonl", 300, seed=0)
    options = ["--task", "sft", "--data", data, "--init", base_run, "--context", "16"]
    options += ["--steps", "150", "--batch-size", "16", "--lr", "1e-2", "--min-lr", "1e-3"]
    options += ["--warmup-steps", "10", "--dtype", "float32", "--no-progress", "--json"]
    result = tformer("train", *options, *lora, "--out", tmp_path / "sft", env=env)
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    # Half of each response is the copy of a word seen in the prompt: a model that did not
    # learn the task scores well below this.
    assert figures["val_accuracy"] > 0.8, figures
    assert len(figures["examples"]) == 3
    assert (figures["trainable_parameters"] < figures["parameters"]) == bool(lora)
    run = json.loads((tmp_path / "sft" / "run.json").read_text())
    assert run["task"] == "sft" and run["lora"] == (
        {"rank": 4, "alpha": 8.0, "dropout": 0.0, "targets": ["w_qkv", "w1"]} if lora else None
    )


def test_sft_needs_a_model_and_pairs(base_run, tmp_path, env):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n')
    cases = [
        (["--data", tmp_path / "bad.jsonl"], "give it with --init"),
        (
            ["--data", tmp_path / "bad.jsonl", "--init", base_run],
            'bad.jsonl:1: expected an object with "prompt" and "response" non-empty',
        ),
    ]
    for args, message in cases:
        result = tformer(
            "train", "--task", "sft", *args, "--out", tmp_path / "x", env=env, check=False
        )
        assert result.returncode == 2 and message in result.stderr, result.stderr


def test_qa_task_trains_a_bidirectional_reader_and_answers_with_it(tmp_path, env):
    data = capital_letter_questions(tmp_path / "qa.jsonl", 400, seed=0)
    run = tmp_path / "encoder"
    model = ["--reader", "encoder", "--n-layers", "2", "--n-heads", "2", "--d-model", "32"]
    result = tformer("train", *qa_training(data), *model, "--out", run, env=env)
    scores = json.loads(result.stdout.strip().splitlines()[-1])
    assert scores["exact_match"] > 60, scores
    assert json.loads((run / "config.json").read_text())["model_type"] == "tformer-encoder-qa"
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("capital?qwertyuiopasdfghjkLzxcvbnm\n")
    found = tformer(
        "answer",
        run,
        "--corpus",
        tmp_path / "corpus",
        "--question",
        "capital?",
        "--json",
        "--max-answer-tokens",
        "1",
        "--stride",
        "4",
        env=env,
    )
    assert found.returncode == 0, found.stderr
    best = json.loads(found.stdout.strip().splitlines()[-1])["answers"][0]
    assert best["answer"] == "L"


def test_qa_task_reads_with_a_translation_model_s_encoder(tmp_path, env):
    from tformer.models.seq2seq import Seq2SeqConfig, Seq2SeqTransformer
    from tformer.tokenizers import CharTokenizer

    data = capital_letter_questions(tmp_path / "qa.jsonl", 40, seed=1)
    tokenizer = CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ?\n")
    config = Seq2SeqConfig(
        tokenizer.vocab_size,
        tokenizer.vocab_size,
        max_len=48,
        d_model=32,
        n_heads=2,
        n_encoder_layers=2,
        n_decoder_layers=1,
        d_ff=64,
        share_embeddings=True,
    )
    Seq2SeqTransformer(config, seed=0).save_pretrained(tmp_path / "translation")
    tokenizer.save(tmp_path / "translation")
    options = ["--task", "qa", "--data", data, "--init", tmp_path / "translation"]
    options += ["--steps", "3", "--batch-size", "4", "--stride", "8", "--json"]
    result = tformer("train", *options, "--out", tmp_path / "reader", env=env)
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["parameters"] < Seq2SeqTransformer(config).num_parameters()  # no decoder
    refused = tformer(
        "train", *options, "--reader", "gpt2", "--out", tmp_path / "x", env=env, check=False
    )
    assert refused.returncode == 2 and "drop --reader" in refused.stderr


def test_two_processes_match_one_process_when_rows_score_unequally(base_run, tmp_path, env):
    """Prompt/response pairs: each row scores as many targets as its response has tokens,
    so the two processes' halves of a batch score different numbers; the loss is still
    the mean over the whole batch's scored targets, as in one process."""
    import random

    rng = random.Random(3)
    words = ["cat", "dog", "king", "queen", "moon", "bird", "sea", "river", "friend"]
    with open(tmp_path / "pairs.jsonl", "w") as f:
        for _ in range(200):
            word = rng.choice(words)
            reply = " " + " ".join(rng.choice(words) for _ in range(rng.randint(0, 2))) + "."
            f.write(json.dumps({"prompt": word, "response": reply}) + "\n")
    common = ["--task", "sft", "--data", tmp_path / "pairs.jsonl", "--init", base_run]
    common += ["--steps", "10", "--batch-size", "8", "--eval-every", "5", "--dropout", "0"]
    common += ["--dtype", "float32", "--threads", "1", "--no-progress", "--sample-tokens", "0"]
    common += ["--device", "cpu"]  # gloo processes, as on a machine with one GPU or none
    tformer("train", *common, "--out", tmp_path / "single", env=env)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
    cmd += ["--master_port", "29519", "-m", "tformer", "train", *map(str, common)]
    result = subprocess.run(
        cmd + ["--out", str(tmp_path / "ddp")], capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, result.stderr
    a, b = losses(tmp_path / "single"), losses(tmp_path / "ddp")
    assert [r[:2] for r in a] == [r[:2] for r in b]
    for ra, rb in zip(a, b, strict=True):
        for x, y in zip(ra[2:], rb[2:], strict=True):
            assert (x is None and y is None) or abs(x - y) <= 1e-5, (ra, rb)
