"""A model that knows parity, wrong exactly where a test says: runs whose every accuracy is known
before they start (``solved``, the accuracy metric, the evaluation boundaries).

Built from the real config (``ORACLE`` overrides), so ``train`` runs it like any model; its only
weights are the head's and a unit scale, and a test trains it with a negligible learning rate.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from parity_lab.models import ParityRNN


class ParityOracle(nn.Module):
    """One feature per position: +1 after a prefix of odd parity, -1 after an even one, the sign
    flipped after exactly ``wrong_at`` bits holding ``wrong_ones`` ones (any number if None).
    ``max_len``, when given, is the longest string it claims to read (as a Transformer's)."""

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        batch_first: bool = True,
        wrong_at: int | None = None,
        wrong_ones: int | None = None,
        max_len: int | None = None,
    ) -> None:
        super().__init__()
        self.wrong_at, self.wrong_ones = wrong_at, wrong_ones
        if max_len is not None:
            self.max_len = max_len
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor, state: Any = None) -> tuple[torch.Tensor, Any]:
        bits = x[..., 0]  # both encodings hold the bit first
        ones_before, seen = (x.new_zeros(x.shape[0]), 0) if state is None else state
        ones = ones_before[:, None] + bits.cumsum(1)
        feature = 2 * (ones % 2) - 1
        if self.wrong_at is not None:
            position = seen + torch.arange(1, x.shape[1] + 1, device=x.device)
            flip = (position == self.wrong_at).expand_as(ones)
            if self.wrong_ones is not None:
                flip = flip & (ones == self.wrong_ones)
            feature = torch.where(flip, -feature, feature)
        return (feature * self.scale).unsqueeze(-1), (ones[:, -1], seen + x.shape[1])


def oracle_model(
    rnn: Any,
    input_size: int,
    hidden_size: int,
    num_layers: int = 1,
    readout: str = "last",
    compile: str | None = None,
    logit_scale: float = 1.0,
    logit_shift: float = 0.0,
    **core: Any,
) -> ParityRNN:
    """``ParityRNN`` around a ``ParityOracle``: logit ``logit_scale * feature + logit_shift``."""
    model = ParityRNN(rnn, input_size, hidden_size, num_layers, readout, compile, **core)
    with torch.no_grad():
        model.head.weight.fill_(logit_scale)
        model.head.bias.fill_(logit_shift)
    return model


ORACLE = [
    "model._target_=tests.oracle.oracle_model",
    "model.rnn._target_=tests.oracle.ParityOracle",
    "model.hidden_size=1",
    "optimizer.lr=1e-12",  # Adam's steps are about lr: the weights stay as set
    "trainer.max_steps=2",
    "trainer.val_check_interval=1",
    "eval.certify=false",  # not a classic cell: nothing to prove
]
