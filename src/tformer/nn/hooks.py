"""Named points in the residual stream.

A `HookPoint` is an identity module. It costs nothing, but because it is a module with a
stable name (`blocks.3.hook_resid_mid`), an experiment can read or change the activation
that flows through it with PyTorch's own `register_forward_hook`, with no model surgery.
"""

import torch
from torch import nn


class HookPoint(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x
