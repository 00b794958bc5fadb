"""nn/modes.evaluating: evaluation mode inside, each module's own mode back after."""

import pytest
import torch
from torch import nn

from tformer.nn.modes import evaluating


def model_with_mixed_modes() -> nn.Sequential:
    model = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5), nn.Sequential(nn.Dropout(0.5)))
    model.train()
    model[2].eval()  # a frozen part kept in evaluation mode by its owner
    return model


def test_evaluating_turns_dropout_off_and_restores_mixed_modes():
    model = model_with_mixed_modes()
    before = [m.training for m in model.modules()]
    assert before == [True, True, True, False, False]
    x = torch.ones(4, 3)
    with evaluating(model):
        assert not any(m.training for m in model.modules())
        assert torch.equal(model(x), model[0](x))  # dropout is the identity
    assert [m.training for m in model.modules()] == before


def test_evaluating_restores_modes_after_an_error():
    model = model_with_mixed_modes()
    before = [m.training for m in model.modules()]
    with pytest.raises(RuntimeError, match="inside"), evaluating(model):
        raise RuntimeError("inside")
    assert [m.training for m in model.modules()] == before


def test_evaluating_leaves_a_model_in_evaluation_mode_as_it_is():
    model = model_with_mixed_modes().eval()
    with evaluating(model):
        assert not any(m.training for m in model.modules())
    assert not any(m.training for m in model.modules())
