"""Every built-in task and data set trains with no flag but --task and --data: with the
task's defaults (README, "Defaults per task") the data is read, the tokenizer learned,
every example fits its windows (a QA question too long for the default context is an
error while the batches are made), and the model trains, evaluates and saves.

Each case is one run of `tformer.recipes.train`, the entry `tformer train` calls, for one
step: only the step count, the evaluation's size and the output are given, so the model's
size, tokenizer and context are the task's defaults on the real data set. The task's
`finish` (decoding the whole test set: minutes on a CPU for an untrained model that never
stops) is replaced by one that checks what it is given; tests/recipes/test_recipes.py runs
it on small data. The Bible data sets need Debian's SWORD modules (skipped without).
"""

import importlib.util
import math

import pytest

from tformer.cli.main import main
from tformer.data.bible import MODULES, sword_path
from tformer.recipes import TASK_MODULES, train
from tformer.recipes.spec import TrainSpec, train_options, with_task_defaults


def have_sword() -> bool:
    found = {p.stem.lower() for p in (sword_path() / "mods.d").glob("*.conf")}
    modules = all(m.lower() in found for m in MODULES)
    return modules and importlib.util.find_spec("pysword") is not None


needs_sword = pytest.mark.skipif(not have_sword(), reason="no SWORD modules (apt-get install "
                                 "sword-text-kjv sword-text-sparv)")  # fmt: skip
BUILTIN = [
    pytest.param("lm", "shakespeare", id="lm-shakespeare"),
    pytest.param("translation", "number-words", id="translation-number-words"),
    pytest.param("translation", "bible-en-es", id="translation-bible-en-es", marks=needs_sword),
    pytest.param("qa", "shakespeare-qa", id="qa-shakespeare-qa"),
    pytest.param("qa", "bible-qa", id="qa-bible-qa", marks=needs_sword),
]


@pytest.mark.parametrize("task, data", BUILTIN)
def test_builtin_data_trains_with_only_task_and_data(tmp_path, monkeypatch, task, data):
    out = tmp_path / "run"
    finished = []

    def finish(run, model, tokenizer, examples) -> dict:
        assert (run.out / "last").is_symlink()  # the trained model was saved before
        finished.append(run.spec.task)
        return {}

    monkeypatch.setattr(TASK_MODULES[task], "finish", finish)
    spec = TrainSpec(
        task=task,
        data=data,
        out=str(out),
        steps=1,
        eval_batches=1,
        final_eval="sample",
        sample_tokens=0,
        progress=False,
        messages=False,
    )
    result = train(spec)
    assert result["task"] == task and result["steps"] == 1
    assert math.isfinite(result["val_loss"]) and 0 < result["val_loss"] < 20
    assert math.isfinite(result["train_loss"])
    assert (out / "last").is_symlink() and (out / "last").resolve().is_dir()
    assert finished == [task]


def test_the_defaults_per_task():
    """The table in the README."""

    def defaults(task, data=None):
        spec = with_task_defaults(TrainSpec(task=task, data=data))
        return spec.tokenizer, spec.norm_position, spec.label_smoothing, spec.steps

    assert defaults("lm") == ("char", "pre", 0.0, None)
    assert defaults("translation") == ("char", "post", 0.1, None)  # it learns its own BPE
    for data in ("bible-qa", "shakespeare-qa", "squad", "squad-2.0"):
        assert defaults("qa", data) == ("bpe", "pre", 0.0, None)
    assert defaults("qa", "my-questions.jsonl")[0] == "char"
    assert "steps" not in train_options(TrainSpec())  # a new run takes TrainConfig's


def test_sft_has_no_builtin_data_and_says_what_it_needs(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--task", "sft", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and "--init" in err[0], err
    assert not (tmp_path / "run").exists()
