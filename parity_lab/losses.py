"""Hand-written binary cross-entropy on logits; the built-in is ``torch.nn.BCEWithLogitsLoss``."""

import torch
from torch import nn


class StableBCEWithLogitsLoss(nn.Module):
    """Mean binary cross-entropy of logits ``z`` against targets ``y`` in [0, 1].

    -[y log s(z) + (1-y) log(1-s(z))] = max(z, 0) - z y + log(1 + exp(-|z|)): the exponent is never
    positive, so nothing overflows, and log1p keeps precision when exp(-|z|) is tiny.
    """

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        losses = logits.clamp(min=0) - logits * targets + torch.log1p(torch.exp(-logits.abs()))
        return losses.mean()
