"""Run directories and checkpoints written before the architecture issue (#20) still load,
and an interrupted run resumes with the losses it would have had.

tests/fixtures/previous holds them, made by tests/fixtures/previous/make.py with the code of
commit ba00abf; expected.json holds what that code computed from them.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch

from tformer.cli.main import main
from tformer.models.encoder_qa import EncoderForQuestionAnswering
from tformer.models.gpt2 import GPT2
from tformer.models.gpt2_qa import GPT2ForQuestionAnswering
from tformer.models.seq2seq import Seq2SeqTransformer

PREVIOUS = Path(__file__).parent / "fixtures" / "previous"
EXPECTED = json.loads((PREVIOUS / "expected.json").read_text(encoding="utf-8"))
LM_INPUT = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
QA_INPUT = torch.tensor([[3, 4, 5, 6, 7, 8, 9, 10]])


@pytest.fixture
def previous(tmp_path, monkeypatch) -> Path:
    """A copy of the fixtures whose absolute paths (run.json's data, an adapter's base) point
    into the copy, as after moving a folder of runs."""
    monkeypatch.setenv("TFORMER_CACHE", str(tmp_path / "cache"))
    copy = tmp_path / "previous"
    shutil.copytree(PREVIOUS, copy, symlinks=True)
    for name in ("run.json", "adapter_config.json"):
        for path in copy.rglob(name):
            text = path.read_text(encoding="utf-8")
            path.write_text(text.replace(EXPECTED["root"], str(copy)), encoding="utf-8")
    return copy


def outputs(model, *inputs) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(*inputs)


def expected(name: str) -> torch.Tensor:
    return torch.tensor(EXPECTED[name])


def test_interrupted_language_model_run_resumes_with_the_same_losses(previous, capsys):
    run = previous / "lm-interrupted"
    main(["train", "--out", str(run), "--resume", "--no-progress", "--json"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["steps"] == 4
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = {str(r["step"]): r["loss"] for r in records if r["type"] == "train"}
    for step, loss in EXPECTED["lm_resumed_losses"].items():
        assert losses[step] == pytest.approx(loss, rel=1e-5, abs=1e-6)
    model = GPT2.from_pretrained(previous / "lm-interrupted" / "checkpoints" / "step-000004")
    assert model.config.vocab_size == len(expected("lm_last")[0, 0])


def test_language_model_checkpoint_gives_the_same_logits(previous):
    model = GPT2.from_pretrained(previous / "lm-interrupted" / "last")
    torch.testing.assert_close(outputs(model, LM_INPUT), expected("lm_last"), rtol=1e-5, atol=1e-6)


def test_lora_adapter_run_loads_its_base_and_adapters(previous):
    model = GPT2.from_pretrained(previous / "lm-lora")
    torch.testing.assert_close(outputs(model, LM_INPUT), expected("lm_lora"), rtol=1e-5, atol=1e-6)


def test_finished_translation_run_resumes_with_its_optimizer_state_renamed(previous, capsys):
    """Its optimizer state is keyed by the parameter names of the time (`ff`, now `mlp`)."""
    run = previous / "translation"
    main(
        ["train", "--out", str(run), "--resume", "--no-progress", "--json", "--sample-tokens", "0"]
    )
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["task"] == "translation" and result["steps"] == 2


def test_translation_run_gives_the_same_logits(previous):
    src, tgt = torch.tensor([[5, 6, 7, 2]]), torch.tensor([[1, 8, 9]])
    for directory in (previous / "translation", previous / "translation" / "last"):
        model = Seq2SeqTransformer.from_pretrained(directory)
        got = outputs(model, src, tgt)
        torch.testing.assert_close(got, expected("translation"), rtol=1e-5, atol=1e-6)


def test_question_answering_runs_give_the_same_span_logits(previous):
    gpt2 = GPT2ForQuestionAnswering.from_pretrained(previous / "qa-gpt2", head_required=True)
    got = outputs(gpt2, QA_INPUT)
    torch.testing.assert_close(got, expected("qa_gpt2"), rtol=1e-5, atol=1e-6)
    encoder = EncoderForQuestionAnswering.from_pretrained(
        previous / "qa-encoder", head_required=True
    )
    got = outputs(encoder, QA_INPUT)
    torch.testing.assert_close(got, expected("qa_encoder"), rtol=1e-5, atol=1e-6)
