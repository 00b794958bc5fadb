"""Every built-in task and data set trains with no flag but --task and --data: with the
task's defaults (README, "Defaults per task") the data is read, the tokenizer learned,
every example fits its windows, and the model takes a training step on a batch.

The whole run (thousands of steps, then decoding the test set) is what the other tests
exercise on small data; here the point is the defaults themselves, on the real data sets,
so each case goes through the task's own steps up to the first training step, with every
setting at its default. The Bible data sets need Debian's SWORD modules (skipped without).
"""

import importlib.util

import pytest
import torch

from tformer.cli.main import main
from tformer.data.bible import MODULES, sword_path
from tformer.recipes import TASK_MODULES
from tformer.recipes.skeleton import Run, new_train_config
from tformer.recipes.spec import TrainSpec, train_options, with_task_defaults
from tformer.recipes.start import attention_for
from tformer.train.distributed import Distributed
from tformer.train.trainer import cross_entropy


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


def first_step(task: str, data: str, out) -> float:
    """The task's own steps (tformer.recipes.skeleton) for a new run of the spec with only
    task and data given, up to one training step; -> its loss."""
    spec = with_task_defaults(TrainSpec(task=task, data=data, out=str(out)))
    module = TASK_MODULES[task]
    device = torch.device("cpu")
    config = new_train_config(spec, device)
    attention = attention_for(spec.attention, device, config.dtype)
    run = Run(spec, {"task": module.NAME}, config, device, Distributed(), out, attention, print)
    run.saved.update(module.new_record(run))
    examples = module.load_data(run.saved)
    model, tokenizer = module.new_model(run, examples)
    train, _, _ = module.batches(run, model, tokenizer, examples)
    batch = train.sample(config.batch_size, torch.Generator().manual_seed(config.seed))
    loss = cross_entropy(model(*batch.inputs), batch.targets)
    loss.backward()
    return float(loss.detach())


@pytest.mark.parametrize("task, data", BUILTIN)
def test_builtin_data_trains_with_only_task_and_data(tmp_path, task, data):
    loss = first_step(task, data, tmp_path / "run")
    assert 0 < loss < 20
    assert not (tmp_path / "run").exists()  # nothing was written on the way


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
