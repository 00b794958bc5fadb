import json
import math

import numpy as np
import pytest
import torch

from tformer.cli.main import main
from tformer.lab import experiment
from tformer.lab.experiment import VARIANTS, LabConfig, status_of, unigram_loss
from tformer.lab.report import LAB_FORMAT, PLOTS, at_initialisation, color_of, is_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_unigram_loss_is_the_cross_entropy_of_training_frequencies():
    train = np.array([0, 0, 0, 1], dtype=np.uint16)  # add-one counts 4, 2, 1 of 7
    val = np.array([0, 1, 2], dtype=np.uint16)
    expected = -(math.log(4 / 7) + math.log(2 / 7) + math.log(1 / 7)) / 3
    assert unigram_loss(train, val, 3) == pytest.approx(expected)


def test_status_separates_diverged_failed_and_trained():
    assert status_of(None, 3.3) == "diverged"
    assert status_of(math.inf, 3.3) == "diverged"
    assert status_of(3.4, 3.3) == "failed"
    assert status_of(2.1, 3.3) == "trained"


def test_lab_config_rejects_what_it_cannot_run():
    with pytest.raises(ValueError, match="unknown variant"):
        LabConfig(variants=("pre", "sandwich"))
    with pytest.raises(ValueError, match="depths"):
        LabConfig(depths=(0, 2))
    with pytest.raises(ValueError, match="min_lr"):
        LabConfig(lr=1e-5)  # below min_lr: the trainer's own check


def test_variants_set_the_switches_they_name():
    config = LabConfig.quick()
    post = config.model_config(2, VARIANTS["post"], 10)
    no_residual = config.model_config(2, VARIANTS["noresidual"], 10)
    assert (post.norm_position, post.residual) == ("post", True)
    assert (no_residual.norm_position, no_residual.residual) == ("pre", False)
    assert config.model_config(2, VARIANTS["nonorm"], 10).norm_position == "none"
    assert config.train_config(VARIANTS["post-nowarmup"]).warmup_steps == 0
    assert config.train_config(VARIANTS["post"]).warmup_steps == config.warmup_steps


def test_a_run_whose_loss_becomes_nan_is_reported_diverged(monkeypatch, tmp_path):
    def fit_that_blows_up(model, train, val, config, progress, on_record, print_evaluations):
        on_record({"type": "train", "step": 1, "loss": 4.0, "lr": 1e-3})
        raise FloatingPointError("the training loss became nan at step 2")

    monkeypatch.setattr(experiment, "fit", fit_that_blows_up)
    config = LabConfig.quick()
    data = experiment.load_lab_data(config.context)
    result = experiment.run_one(config, 2, "post-nowarmup", data, torch.device("cpu"))
    assert result.status == "diverged"
    assert result.final_val_loss is None and result.final_residual_norms is None
    assert result.train_loss == [4.0] and result.steps_done == 1
    assert len(result.init_param_grads) == 2  # measured before training all the same


def test_quick_lab_writes_its_report_and_resumes_from_saved_runs(tmp_path, capsys):
    out = tmp_path / "lab"
    main(["lab", "--quick", "--out", str(out), "--json"])
    summary = json.loads(capsys.readouterr().out)
    runs = summary["runs"]
    config = LabConfig.quick()
    assert len(runs) == len(config.depths) * len(VARIANTS)
    assert {(r["depth"], r["variant"]) for r in runs} == {
        (d, v) for d in config.depths for v in VARIANTS
    }
    status = {(r["depth"], r["variant"]): r["status"] for r in runs}
    assert status[(2, "pre")] == status[(2, "post")] == "trained"  # they learn in 200 steps
    for name in PLOTS:
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    assert json.loads((out / "lab.json").read_text()) == {"format": LAB_FORMAT}
    report = (out / "report.md").read_text(encoding="utf-8")
    for variant in VARIANTS.values():
        assert variant.label in report
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    first = results["runs"][0]
    assert len(first["init_param_grads"]) == first["depth"]
    assert len(first["init_residual_norms"]) == first["depth"] + 1
    assert len(first["train_loss"]) == config.steps
    # With every run saved, the same command only rebuilds the report from them.
    (out / "report.md").unlink()
    results_before = {p.name: p.read_text() for p in (out / "runs").iterdir()}
    main(["lab", "--quick", "--out", str(out), "--json"])
    again = json.loads(capsys.readouterr().out)
    assert again["runs"] == runs
    assert {p.name: p.read_text() for p in (out / "runs").iterdir()} == results_before
    assert (out / "report.md").is_file()


def test_a_variant_can_be_chosen_from_the_cli(tmp_path, capsys):
    out = tmp_path / "lab"
    main(
        [
            "lab",
            "--quick",
            "--depths",
            "1",
            "--variants",
            "pre,noresidual",
            "--steps",
            "5",
            "--out",
            str(out),
            "--json",
        ]
    )
    runs = json.loads(capsys.readouterr().out)["runs"]
    assert [(r["depth"], r["variant"]) for r in runs] == [(1, "pre"), (1, "noresidual")]


def test_bad_lab_options_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["lab", "--quick", "--variants", "pre,sideways", "--out", str(tmp_path)])
    assert "unknown variant(s) sideways" in capsys.readouterr().err


@pytest.mark.parametrize(
    "files, ours",
    [
        ({"lab.json": '{"format": "tformer-lab/1"}', "runs/1-pre.json": "{}"}, True),
        ({"report.md": "# lab", "runs/1-pre.json": "{}"}, True),  # before lab.json existed
        ({"runs/experiment.json": "{}"}, False),  # a user's runs/: the name alone is not enough
        ({"lab.json": '{"format": "my-lab"}'}, False),
        ({"report.md": "# mine", "notes.txt": "mine"}, False),
    ],
)
def test_a_lab_report_is_recognised_by_its_mark(tmp_path, files, ours):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert is_report(tmp_path, sorted(p.name for p in tmp_path.iterdir())) == ours


def test_plots_draw_twins_that_share_their_start_once_in_fixed_colours():
    def run(variant):
        return experiment.RunResult(
            2,
            variant,
            "trained",
            2.5,
            10,
            1.0,
            1.0,
            [1.0, 1.0],
            [{}, {}],
            [1.0, 1.0],
            [1.0, 1.0, 1.0],
            None,
        )

    runs = [run("pre"), run("pre-nowarmup"), run("post-nowarmup"), run("nonorm")]
    drawn = [(r.variant, label) for r, label in at_initialisation(runs)]
    assert drawn == [
        ("pre", "pre-LN (± warm-up)"),
        ("post-nowarmup", "post-LN, no warm-up"),  # its twin is not in the grid
        ("nonorm", "no LayerNorm"),
    ]
    assert color_of("nonorm") == "C4" and color_of("pre") == "C0"
