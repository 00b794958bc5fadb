import json

import pytest

from tformer.cli.main import main
from tformer.lab import warmup
from tformer.lab.warmup import VARIANTS, WarmupConfig, WarmupRun, finding, warmup_effect

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def scored(variant: str, bleu: float | None) -> WarmupRun:
    status = "diverged" if bleu is None else "trained"
    return WarmupRun(variant, status, None if bleu is None else 2.0, bleu, bleu, 1.0, [1.0])


@pytest.mark.parametrize(
    "bleus, words",
    [
        ((30.0, 8.0, 30.0, 29.0), "reproduces: post-LN without warm-up keeps 0.27"),
        ((30.0, 20.0, 30.0, 29.0), "reproduces weakly"),
        ((30.0, 29.0, 30.0, 30.0), "does not reproduce: post-LN without warm-up keeps 0.97"),
        (
            (30.0, 8.0, 30.0, 10.0),
            "does not reproduce cleanly: post-LN without warm-up keeps 0.27 of its BLEU, "
            "but pre-LN also loses (keeps 0.33)",
        ),
        ((30.0, None, 30.0, 29.0), "reproduces: post-LN without warm-up keeps 0.00"),
        ((None, 8.0, 30.0, 29.0), "cannot be judged"),
    ],
)
def test_the_finding_is_the_stated_bleu_ratios(bleus, words):
    results = [scored(v, b) for v, b in zip(VARIANTS, bleus, strict=True)]
    assert finding(results).startswith(words)
    if bleus[0] is not None:
        assert warmup_effect(results, "post") == pytest.approx((bleus[1] or 0.0) / bleus[0])


def test_quick_warmup_track_writes_its_report_and_resumes(tmp_path, capsys, monkeypatch):
    out = tmp_path / "warmup"
    main(["lab", "--reproduce", "warmup", "--quick", "--out", str(out), "--json"])
    printed = json.loads(capsys.readouterr().out)
    runs = {r["variant"]: r for r in printed["runs"]}
    assert list(runs) == list(VARIANTS)
    config = WarmupConfig.quick()
    for run in runs.values():
        assert run["status"] == "trained" and run["final_val_loss"] < 6.0
        assert 0.0 <= run["bleu"] <= 100.0 and run["example"]["translation"]
        assert len(run["init_w2_grads"]) == 2 * config.n_layers
    # a variant and its twin without warm-up start from the same weights
    assert runs["post"]["init_w2_grads"] == runs["post-nowarmup"]["init_w2_grads"]
    assert runs["pre"]["init_w2_grads"] != runs["post"]["init_w2_grads"]
    saved = json.loads((out / "warmup.json").read_text(encoding="utf-8"))
    assert [len(r["train_loss"]) for r in saved["runs"]] == [config.steps] * 4
    report = (out / "warmup.md").read_text(encoding="utf-8")
    assert printed["finding"] in report and "number-words" in report
    assert (out / "warmup.png").read_bytes()[:8] == PNG_MAGIC
    # killed after three runs: the next call trains the fourth only
    (out / "runs" / "warmup-number-words-pre-nowarmup.json").unlink()
    trained = []
    run_variant = warmup.run_variant
    monkeypatch.setattr(
        warmup, "run_variant", lambda c, v, *a: trained.append(v) or run_variant(c, v, *a)
    )
    main(["lab", "--reproduce", "warmup", "--quick", "--out", str(out), "--json"])
    again = json.loads(capsys.readouterr().out)
    assert trained == ["pre-nowarmup"]
    assert [r["bleu"] for r in again["runs"]] == [r["bleu"] for r in printed["runs"]]


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--reproduce", "warmup", "--depths", "2"],
            "--depths does not apply to --reproduce warmup",
        ),
        (["--data", "number-words"], "--data does not apply to the trained grid"),
        (["--reproduce", "warmup", "--warmup-steps", "0"], "warmup_steps must be between 1"),
        (["--reproduce", "warmup", "--data", "klingon"], "invalid choice"),
    ],
)
def test_bad_warmup_options_are_one_line_errors(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit):
        main(["lab", "--quick", *argv, "--out", str(tmp_path / "w")])
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
