"""Hand-written binary cross-entropy on logits; the built-in is ``torch.nn.BCEWithLogitsLoss``."""

import torch
from torch import nn


class StableBCEWithLogitsLoss(nn.Module):
    """Mean binary cross-entropy of logits ``z`` against targets ``y`` in [0, 1].

    loss = (1 - y) z + log(1 + e^-z) for z >= 0, and -y z + log(1 + e^z) for z < 0: the exponent
    is never positive, so nothing overflows, and log1p keeps precision when e^-|z| is tiny. Each
    branch sees only its own z (the other gets 0), so autograd's gradient is exactly
    sigmoid(z) - y everywhere, z = 0 included (the max(z, 0) - zy + log1p(e^-|z|) form gets 1 - y
    there, since torch takes d|z|/dz = 0 at 0).
    """

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        positive = logits >= 0
        zero = torch.zeros_like(logits)
        z_pos = torch.where(positive, logits, zero)
        z_neg = torch.where(positive, zero, logits)
        losses = torch.where(
            positive,
            z_pos * (1 - targets) + torch.log1p(torch.exp(-z_pos)),
            -z_neg * targets + torch.log1p(torch.exp(z_neg)),
        )
        return losses.mean()
