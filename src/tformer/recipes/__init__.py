"""The resumable training tasks, callable from Python and behind `tformer train`.

    from tformer.recipes import TrainSpec, train
    result = train(TrainSpec(task="translation", steps=500, out="runs/numbers"))

Each task (lm, translation, qa, sft) is a module that fills in the steps of one skeleton
(tformer.recipes.skeleton): the run directory and its run.json, resume, the data's
fingerprint, --init and LoRA (tformer.recipes.start), training, the final evaluation.
"""

from dataclasses import replace
from pathlib import Path

from tformer.errors import ConfigError
from tformer.recipes import lm, qa, sft, translation
from tformer.recipes.run_dir import RUN_FILE, task_of
from tformer.recipes.skeleton import run_task
from tformer.recipes.spec import DEFAULT_OUT, TASKS, TrainSpec, with_task_defaults

TASK_MODULES = {"lm": lm, "translation": translation, "qa": qa, "sft": sft}


def train(spec: TrainSpec) -> dict | None:
    """Run the training task `spec` asks for, or resume the run in spec.out (which is then
    the task it was); -> the result, in the main process (None in the others)."""
    if spec.out is None:
        spec = replace(spec, out=DEFAULT_OUT[spec.task])
    if spec.resume:
        task = task_of(Path(spec.out))
        if task is not None:  # a resumed run is what it was
            if not isinstance(task, str) or task not in TASK_MODULES:
                raise ConfigError(
                    f"{Path(spec.out) / RUN_FILE}: unknown task {task!r}, expected one of "
                    f"{', '.join(TASK_MODULES)}"
                )
            spec = replace(spec, task=task)
    spec = with_task_defaults(spec)
    return run_task(TASK_MODULES[spec.task], spec)


__all__ = ["TASKS", "TrainSpec", "train"]
