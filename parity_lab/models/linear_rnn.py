"""A diagonal, input-dependent (selective) linear RNN in the style of Mamba, with a parallel scan.

Each layer keeps ``hidden_size`` independent units, ``h_t = a_t * h_{t-1} + b_t``, where
``a_t`` and ``b_t`` depend on the layer's input at ``t`` only. As in Mamba (Gu & Dao, 2023), the
transition is ``a_t = exp(-softplus(dt_t) * exp(A_log))`` in (0, 1], ``dt_t`` a linear function
of the input. ``eigenvalues: signed`` maps it to ``2 a_t - 1`` in (-1, 1], the change that lets a
linear RNN track parity (Grazzi et al., ICLR 2025, "Unlocking State-Tracking in Linear RNNs
Through Negative Eigenvalues"): with ``a(1) = -1`` one unit flips sign on every 1.

Around the recurrence, a gated block as in Mamba: one input projection gives ``dt``, ``b`` and a
gate ``g``; the layer's output is ``out_proj(h * silu(g))``, plus the input itself (a residual)
from the second layer on. The gate is the nonlinear state-to-output mixing between layers.

The recurrence never loops in Python over time steps: ``linear_scan`` composes the affine maps
``h -> a h + b`` by recursive doubling (Hillis & Steele, 1986), ``ceil(log2 T)`` vectorised steps
in training and evaluation. It only multiplies and adds (no logarithm of ``a``, no division by a
cumulative product), so it stays exact for signed and zero transitions. The state carried
between chunks is each layer's last ``h``, shape ``(num_layers, batch, hidden_size)``.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from parity_lab import EIGENVALUES


def linear_scan(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None) -> torch.Tensor:
    """All states of ``h_t = a_t * h_{t-1} + b_t`` (time on dim 1), from ``h0`` (zero if None).

    After doubling step ``k``, position ``t`` holds the composition ``(A, B)`` of the maps of
    steps ``t - 2^k + 1 .. t`` (fewer at the start): ``h_t = A h_{t - 2^k} + B``. Composing with
    the block before it gives ``(A A', A B' + B)``. At the end ``A_t`` is the product of every
    ``a`` up to ``t`` and ``h_t = A_t h0 + B_t``.
    """
    a, b = a.transpose(0, 1), b.transpose(0, 1)  # time-major: each shifted slice is contiguous
    steps, offset = a.shape[0], 1
    while offset < steps:
        b = torch.cat([b[:offset], torch.addcmul(b[offset:], a[offset:], b[:-offset])])
        if offset * 2 < steps or h0 is not None:  # the last products are needed only for h0
            a = torch.cat([a[:offset], a[offset:] * a[:-offset]])
        offset *= 2
    if h0 is not None:
        b = torch.addcmul(b, a, h0)
    return b.transpose(0, 1)


class LinearRNNLayer(nn.Module):
    """One gated diagonal linear recurrence: ``input -> (outputs, all states)``."""

    def __init__(self, input_size: int, hidden_size: int, signed: bool, residual: bool) -> None:
        super().__init__()
        self.signed, self.residual = signed, residual
        self.in_proj = nn.Linear(input_size, 3 * hidden_size)  # dt, b, gate
        self.A_log = nn.Parameter(torch.log(torch.arange(1, hidden_size + 1, dtype=torch.float)))
        self.out_proj = nn.Linear(hidden_size, hidden_size)
        # Mamba's initial step sizes: dt = softplus(bias) log-uniform in [1e-3, 1e-1].
        dt = torch.exp(torch.empty(hidden_size).uniform_(math.log(1e-3), math.log(1e-1)))
        with torch.no_grad():
            self.in_proj.bias[:hidden_size] = dt + torch.log(-torch.expm1(-dt))  # softplus^-1

    def transition(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``a``, ``b`` and the gate at every position, from the layer's input alone."""
        dt, b, gate = self.in_proj(x).chunk(3, dim=-1)
        a = torch.exp(-F.softplus(dt) * self.A_log.exp())
        return (2 * a - 1 if self.signed else a), b, gate

    def forward(
        self, x: torch.Tensor, h0: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        a, b, gate = self.transition(x)
        h = linear_scan(a, b, h0)
        y = self.out_proj(h * F.silu(gate))
        return (y + x if self.residual else y), h


class LinearRNN(nn.Module):
    """Stacked ``LinearRNNLayer``s with torch's RNN signature (batch_first only).

    ``forward(x, state) -> (outputs, state)``: outputs ``(batch, time, hidden_size)``, state the
    last ``h`` of every layer, ``(num_layers, batch, hidden_size)``.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        batch_first: bool = True,
        eigenvalues: str = "positive",
    ) -> None:
        super().__init__()
        if not batch_first:
            raise ValueError("LinearRNN is batch_first only")
        if eigenvalues not in EIGENVALUES:
            raise ValueError(
                f"model.eigenvalues={eigenvalues!r} is invalid: allowed values are {EIGENVALUES}"
            )
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.eigenvalues = eigenvalues
        self.layers = nn.ModuleList(
            LinearRNNLayer(
                input_size if i == 0 else hidden_size, hidden_size, eigenvalues == "signed", i > 0
            )
            for i in range(num_layers)
        )

    def forward(
        self, x: torch.Tensor, state: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        initial = [None] * self.num_layers if state is None else state.unbind(0)
        last = []
        for layer, h0 in zip(self.layers, initial, strict=True):
            x, h = layer(x, h0)
            last.append(h[:, -1])
        return x, torch.stack(last)
