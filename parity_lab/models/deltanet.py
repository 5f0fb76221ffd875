"""DeltaNet: a matrix memory written by the delta rule (Schlag et al., 2021; Yang et al., 2024).

Each layer keeps a ``hidden_size x hidden_size`` matrix ``S`` and, at every step,

    S_t = S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T,    o_t = S_t q_t,

with ``q_t``, ``k_t`` L2-normalised and ``beta_t = sigmoid(.)`` in (0, 1): the write replaces
what ``S`` stored along ``k_t`` by ``v_t``, by a share ``beta_t``. The transition
``I - beta k k^T`` has eigenvalues 1 and ``1 - beta_t``, so in [0, 1]. ``eigenvalues: signed``
takes ``beta_t = 2 sigmoid(.)`` in (0, 2), which reaches ``-1`` (a Householder reflection at
``beta = 2``): the extension of Grazzi et al. (ICLR 2025) that lets DeltaNet track parity.

``q``, ``k``, ``v``, ``beta`` and an output gate ``g`` come from one projection of the layer's
input at ``t``; the layer's output is ``out_proj(o * silu(g))``, plus its input from the second
layer on, as in ``LinearRNN``. The recurrence runs step by step (a Python loop over time, written
as ``S += beta (v - S k) k^T``, a rank-one update), which is fast enough for small state sizes.
The state carried between chunks is every layer's ``S``: ``(num_layers, batch, hidden, hidden)``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from parity_lab.models.linear_rnn import TransitionStack


def delta_rule(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, state: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs ``o_t = S_t q_t`` (batch, time, dim) and the last ``S``, from ``S_0 = state``.

    ``q``, ``k``, ``v``: (batch, time, dim); ``beta``: (batch, time, 1); ``state``: (batch,
    dim, dim), rows indexed like ``v``, columns like ``k``.
    """
    outputs = []
    for t in range(q.shape[1]):
        k_t = k[:, t].unsqueeze(2)  # (batch, dim, 1)
        error = v[:, t].unsqueeze(2) - torch.bmm(state, k_t)  # v_t - S k_t
        state = torch.baddbmm(state, beta[:, t].unsqueeze(2) * error, k_t.transpose(1, 2))
        outputs.append(torch.bmm(state, q[:, t].unsqueeze(2)).squeeze(2))
    return torch.stack(outputs, dim=1), state


class DeltaNetLayer(nn.Module):
    """One delta-rule memory with its gated output: ``input -> (outputs, last S)``."""

    def __init__(self, input_size: int, hidden_size: int, signed: bool, residual: bool) -> None:
        super().__init__()
        self.signed, self.residual = signed, residual
        self.in_proj = nn.Linear(input_size, 4 * hidden_size + 1)  # q, k, v, gate, beta
        self.out_proj = nn.Linear(hidden_size, hidden_size)

    def projections(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``q``, ``k`` (unit norm), ``v``, ``beta`` and the gate, from the layer's input alone."""
        q, k, v, gate, beta = self.in_proj(x).split([self.out_proj.in_features] * 4 + [1], -1)
        beta = torch.sigmoid(beta)
        return (
            F.normalize(q, dim=-1),
            F.normalize(k, dim=-1),
            v,
            2 * beta if self.signed else beta,
            gate,
        )

    def forward(self, x: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q, k, v, beta, gate = self.projections(x)
        o, state = delta_rule(q, k, v, beta, state)
        y = self.out_proj(o * F.silu(gate))
        return (y + x if self.residual else y), state


class DeltaNet(TransitionStack):
    """Stacked ``DeltaNetLayer``s with torch's RNN signature (batch_first only).

    ``forward(x, state) -> (outputs, state)``: outputs ``(batch, time, hidden_size)``, state
    ``(num_layers, batch, hidden_size, hidden_size)``.
    """

    layer_type = DeltaNetLayer

    def forward(
        self, x: torch.Tensor, state: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if state is None:
            size = self.hidden_size
            state = x.new_zeros(self.num_layers, x.shape[0], size, size)
        last = []
        for layer, s in zip(self.layers, state.unbind(0), strict=True):
            x, s = layer(x, s)
            last.append(s)
        return x, torch.stack(last)
