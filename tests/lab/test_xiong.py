import json
import math
import sys
from pathlib import Path

import pytest
import torch

from tformer.cli.main import main
from tformer.data.tokens import Batch
from tformer.lab import xiong
from tformer.lab.xiong import (
    Measurement,
    XiongConfig,
    depth_slope,
    growth,
    mean_and_spread,
    select,
    verdicts,
)
from tformer.models.gpt2 import GPT2

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
from xiong_reference import PaperLM, reference_w2_grads  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def copy_into_reference(model: GPT2, reference: PaperLM) -> None:
    """tformer's weights into the independent model (W^Q, W^K, W^V are stacked in both)."""
    with torch.no_grad():
        reference.embedding.weight.copy_(model.token_embedding.weight)
        for ours, theirs in zip(model.blocks, reference.blocks, strict=True):
            theirs.attention.in_proj_weight.copy_(ours.attn.w_qkv.weight)
            theirs.attention.in_proj_bias.copy_(ours.attn.w_qkv.bias)
            theirs.attention.out_proj.weight.copy_(ours.attn.w_o.weight)
            theirs.attention.out_proj.bias.copy_(ours.attn.w_o.bias)
            for name, linear in (("fc1", ours.mlp.w1), ("fc2", ours.mlp.w2)):
                getattr(theirs, name).weight.copy_(linear.weight)
                getattr(theirs, name).bias.copy_(linear.bias)
            if ours.attn_sublayer.norm is not None:
                for mine, other in ((ours.attn_sublayer, theirs.norm1),
                                    (ours.mlp_sublayer, theirs.norm2)):  # fmt: skip
                    other.weight.copy_(mine.norm.weight)
                    other.bias.copy_(mine.norm.bias)
        if model.final_norm is not None and not isinstance(reference.final, torch.nn.Identity):
            reference.final.weight.copy_(model.final_norm.weight)
            reference.final.bias.copy_(model.final_norm.bias)


@pytest.mark.parametrize("placement", ["post", "pre", "none"])
def test_the_measured_model_is_the_papers_architecture(placement):
    """With the same weights, tformer's original-Transformer GPT and the independent model
    written from the papers (benchmarks/xiong_reference.py) give the same logits and the
    same W2 gradients: what the reproduction measures is the paper's model."""
    config = XiongConfig(d_model=48, n_heads=4, context=20)
    model = GPT2(config.model_config(3, placement, "vaswani", 31), seed=5)
    reference = PaperLM(31, 48, 4, 3, placement)
    copy_into_reference(model, reference)
    ids = torch.randint(0, 31, (3, 20), generator=torch.Generator().manual_seed(0))
    targets = torch.randint(0, 31, (3, 20), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(model(ids), reference(ids), rtol=1e-4, atol=1e-4)
    ours = xiong.measure(config, placement, "vaswani", 3, 5, Batch((ids,), targets), 31)
    theirs = reference_w2_grads(reference, ids, targets)
    assert ours.w2_grads == pytest.approx(theirs, rel=1e-4)


def fake(placement: str, depth: int, grads: list[float], seed: int = 0) -> Measurement:
    return Measurement(placement, "vaswani", depth, seed, grads, 4.0, 0.1)


def test_slope_growth_and_verdicts_are_the_stated_formulas():
    # last layer c / sqrt(L) at every depth: slope -0.5, whatever c and the depths
    by_depth = {d: [fake("pre", d, [1.0] * (d - 1) + [3.0 / math.sqrt(d)])] for d in (2, 6, 24)}
    assert depth_slope(by_depth) == pytest.approx(-0.5)
    assert depth_slope({6: by_depth[6]}) is None
    assert growth([1.0, 1.0, 2.0, 3.0, 5.0, 7.0, 9.0, 11.0]) == pytest.approx(10.0)
    assert growth([2.0, 4.0]) == 2.0  # a quarter of two layers is one
    assert verdicts("pre", -0.5, 1.0) == ("holds", "holds")
    assert verdicts("pre", 0.0, 2.0) == ("does not hold", "does not hold")
    assert verdicts("post", -0.1, 1.5) == ("holds", "holds")
    assert verdicts("post", -0.6, 1.0) == ("does not hold", "does not hold")
    assert verdicts("none", -0.6, 1.0) == ("", "")
    assert verdicts("post", None, 1.5) == ("", "holds")
    assert mean_and_spread([1.0, 3.0]) == (2.0, pytest.approx(math.sqrt(2)))
    assert mean_and_spread([4.0]) == (4.0, 0.0)
    runs = [fake("pre", 6, [1.0], seed=1), fake("post", 2, [1.0]), fake("pre", 2, [1.0])]
    assert list(select(runs, "pre", "vaswani")) == [2, 6]


def test_quick_reproduction_writes_its_report_and_resumes(tmp_path, capsys, monkeypatch):
    out = tmp_path / "xiong"
    main(["lab", "--reproduce", "xiong", "--quick", "--out", str(out), "--json"])
    summary = json.loads(capsys.readouterr().out)["summary"]
    config = XiongConfig.quick()
    assert [(r["placement"], r["init"]) for r in summary] == [
        (p, i) for p in config.placements for i in config.inits
    ]
    report = (out / "xiong.md").read_text(encoding="utf-8")
    for row in summary:  # every slope the table prints is the summary's
        if row["depth_slope"] is not None:
            assert f"{row['depth_slope']:+.2f}" in report
    assert (out / "xiong.png").read_bytes()[:8] == PNG_MAGIC
    saved = json.loads((out / "xiong.json").read_text(encoding="utf-8"))
    total = len(config.placements) * len(config.inits) * len(config.depths) * config.seeds
    assert len(saved["measurements"]) == total
    deepest = [m for m in saved["measurements"] if m["depth"] == max(config.depths)]
    assert all(len(m["w2_grads"]) == max(config.depths) for m in deepest)
    # killed after all but one measurement: the next run measures that one only
    runs = sorted((out / "runs").glob("xiong-*.json"))
    runs[3].unlink()
    calls = []
    measure = xiong.measure
    monkeypatch.setattr(xiong, "measure", lambda *a, **k: calls.append(a) or measure(*a, **k))
    main(["lab", "--reproduce", "xiong", "--quick", "--out", str(out), "--json"])
    again = json.loads(capsys.readouterr().out)["summary"]
    assert len(calls) == 1 and again == summary  # the same seed measures the same gradients


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--reproduce", "xiong", "--steps", "5"], "--steps does not apply to --reproduce xiong"),
        (["--reproduce", "xiong", "--init", "gpt2"], "--init does not apply to --reproduce xiong"),
        (["--seeds", "3"], "--seeds does not apply to the trained grid"),
        (["--reproduce", "xiong", "--depths", "0"], "depths must be positive"),
    ],
)
def test_bad_reproduction_options_are_one_line_errors(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit):
        main(["lab", "--quick", *argv, "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
