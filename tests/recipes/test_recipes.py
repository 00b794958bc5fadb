"""Each training task runs from Python, without the command line: train(TrainSpec) gives
the same run directory and result as `tformer train`, and a run resumes from its own
directory with nothing but the directory named."""

import json
import random

import pytest
import torch

from tformer.data.prompts import SFT_TEMPLATE
from tformer.generate.chat import load_chat_template, read_chat_template
from tformer.models.encoder_qa import EncoderForQuestionAnswering
from tformer.models.gpt2 import GPT2
from tformer.models.seq2seq import Seq2SeqTransformer
from tformer.recipes import TrainSpec, train

TINY = dict(n_layers=1, n_heads=2, d_model=16, dtype="float32", threads=1, seed=3)
QUIET = dict(progress=False, messages=False, batch_size=4, eval_batches=2)


@pytest.fixture
def data(tmp_path, monkeypatch, tiny_text):
    monkeypatch.setenv("TFORMER_CACHE", str(tmp_path / "cache"))
    rng = random.Random(0)
    text = tmp_path / "text.txt"
    text.write_text(tiny_text, encoding="utf-8")
    numbers = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text(
        "".join(
            f"{numbers[i % 10]} {numbers[i // 10 % 10]}\t{i % 10} {i // 10 % 10}\n"
            for i in range(100)
        ),
        encoding="utf-8",
    )
    qa = tmp_path / "qa.jsonl"
    with open(qa, "w", encoding="utf-8") as f:
        for i in range(30):
            name = rng.choice(["Ada", "Bo", "Cy", "Di"])
            context = f"{name} went to town {i}."
            answers = [{"text": name, "answer_start": 0}]
            f.write(json.dumps({"context": context, "question": "Who?", "answers": answers}))
            f.write("\n")
    sft = tmp_path / "sft.jsonl"
    with open(sft, "w", encoding="utf-8") as f:
        for _ in range(20):  # the characters of the base run's text
            subject = rng.choice(["the cat", "a dog", "the king"])
            f.write(json.dumps({"prompt": subject, "response": " sees the sea.\n"}) + "\n")
    return {"text": text, "pairs": pairs, "qa": qa, "sft": sft, "root": tmp_path}


def test_language_model_recipe_trains_and_resumes(data):
    out = data["root"] / "lm"
    spec = TrainSpec(data=str(data["text"]), context=16, steps=4, out=str(out), **TINY, **QUIET)
    result = train(spec)
    assert result["task"] == "lm" and result["steps"] == 4 and len(result["sample"]) > 0
    assert json.loads((out / "run.json").read_text())["task"] == "lm"
    trained = GPT2.from_pretrained(out)
    assert trained.config.d_model == 16
    again = train(TrainSpec(out=str(out), resume=True, progress=False, messages=False))
    assert again["task"] == "lm" and again["steps"] == 4
    # Nothing was left to do: the run directory's model is the one it had, rewritten from
    # the weights the resume loaded from `last`.
    resumed = GPT2.from_pretrained(out).state_dict()
    for name, tensor in trained.state_dict().items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=0)


def test_translation_recipe_trains_the_encoder_decoder(data):
    out = data["root"] / "translation"
    spec = TrainSpec(
        task="translation",
        data=str(data["pairs"]),
        d_ff=32,
        context=16,
        bpe_vocab_size=300,
        steps=2,
        out=str(out),
        **TINY,
        **QUIET,
    )
    result = train(spec)
    assert result["task"] == "translation" and set(result["test_greedy"]) == {"bleu", "chrf"}
    assert len(result["examples"]) == 3
    assert Seq2SeqTransformer.from_pretrained(out).config.norm_position == "post"


def test_question_answering_recipe_trains_an_encoder_reader(data):
    out = data["root"] / "qa"
    spec = TrainSpec(
        task="qa",
        data=str(data["qa"]),
        reader="encoder",
        d_ff=32,
        context=48,
        stride=8,
        steps=2,
        out=str(out),
        **TINY,
        **QUIET,
    )
    result = train(spec)
    assert result["task"] == "qa" and result["questions"] == 3
    assert json.loads((out / "qa_scores.json").read_text())["f1"] == result["f1"]
    assert isinstance(EncoderForQuestionAnswering.from_pretrained(out), EncoderForQuestionAnswering)


def test_sft_recipe_fine_tunes_a_run_with_lora(data):
    base = data["root"] / "base"
    train(TrainSpec(data=str(data["text"]), context=16, steps=2, out=str(base), **TINY, **QUIET))
    out = data["root"] / "sft"
    spec = TrainSpec(
        task="sft",
        data=str(data["sft"]),
        init=str(base),
        lora_rank=2,
        steps=2,
        sample_tokens=4,
        out=str(out),
        dtype="float32",
        threads=1,
        **QUIET,
    )
    result = train(spec)
    assert result["task"] == "sft" and result["trainable_parameters"] < result["parameters"]
    assert (out / "adapter_config.json").is_file() and len(result["examples"]) == 2


def test_sft_checkpoints_carry_the_template_they_were_trained_with(data):
    """The SFT task saves SFT_TEMPLATE with its tokenizer, in the run directory and in every
    checkpoint, a resumed run too; a language model's run has no chat template."""
    base = data["root"] / "base"
    train(TrainSpec(data=str(data["text"]), context=16, steps=2, out=str(base), **TINY, **QUIET))
    out = data["root"] / "sft"
    sft = dict(task="sft", data=str(data["sft"]), init=str(base), sample_tokens=0)
    train(TrainSpec(**sft, steps=2, out=str(out), dtype="float32", threads=1, **QUIET))
    train(TrainSpec(out=str(out), resume=True, steps=3, progress=False, messages=False))
    checkpoints = sorted((out / "checkpoints").glob("step-*"))
    assert [c.name for c in checkpoints][-1] == "step-000003"
    for directory in (out, out / "last", *checkpoints):
        assert read_chat_template(directory) == SFT_TEMPLATE
    assert load_chat_template(out).source == "checkpoint"
    for directory in (base, base / "last"):
        assert read_chat_template(directory) is None
        assert load_chat_template(directory).source == "default"


def test_a_spec_refuses_flags_that_do_not_go_together(data):
    with pytest.raises(ValueError, match="--reader picks the kind"):
        train(TrainSpec(data=str(data["text"]), reader="encoder", out=str(data["root"] / "x")))
    with pytest.raises(ValueError, match="unknown task 'chat'"):
        TrainSpec(task="chat")
