"""mLSTM, the matrix-memory cell of xLSTM (Beck et al., NeurIPS 2024).

Each layer keeps a ``hidden_size x hidden_size`` memory ``C`` and a normaliser vector ``n``.
Query, key, value and the gates depend on the layer's input at ``t`` only (no hidden-to-gate
recurrence, so the memory is a linear recurrence, like a gated linear attention):

    C_t = f_t C_{t-1} + i_t v_t k_t^T,    n_t = f_t n_{t-1} + i_t k_t,
    h_t = o_t * (C_t q_t) / max(|n_t^T q_t|, 1),

with ``k`` scaled by ``1 / sqrt(hidden_size)``, scalar gates (one head): a sigmoid forget gate
``f`` and the exponential input gate ``i = exp(i~)``, and a sigmoid output gate ``o``. The
stabiliser ``m_t = max(log f_t + m_{t-1}, i~_t)`` stores ``C`` and ``n`` scaled by
``exp(-m_t)``, so the gates applied are at most 1; in those units the lower bound 1 of the
denominator becomes ``exp(-m_t)`` and ``h`` is unchanged. The forget gate keeps the transition
in (0, 1): the mLSTM cannot flip a sign, which is why it fails parity.

The layer's output is ``out_proj(h)``, plus its input from the second layer on. The recurrence
runs step by step. The state carried between chunks is ``(C, n, m)`` of every layer, shapes
``(num_layers, batch, hidden, hidden)``, ``(num_layers, batch, hidden)``, ``(num_layers, batch)``.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

State = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # C, n, m


class MLSTMLayer(nn.Module):
    """One mLSTM memory with its output projection: ``input, (C, n, m) -> outputs, (C, n, m)``."""

    def __init__(self, input_size: int, hidden_size: int, residual: bool) -> None:
        super().__init__()
        self.hidden_size, self.residual = hidden_size, residual
        self.in_proj = nn.Linear(input_size, 4 * hidden_size + 2)  # q, k, v, o, i~, f~
        self.out_proj = nn.Linear(hidden_size, hidden_size)
        with torch.no_grad():  # forget gate open at the start (xLSTM uses 3..6)
            self.in_proj.bias[-1] = 3.0

    def forward(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        size = self.hidden_size
        q, k, v, o, i_raw, f_raw = self.in_proj(x).split([size] * 4 + [1, 1], dim=-1)
        k = k / math.sqrt(size)
        log_f = F.logsigmoid(f_raw)
        memory, normaliser, m = state
        outputs = []
        for t in range(x.shape[1]):
            m_new = torch.maximum(log_f[:, t, 0] + m, i_raw[:, t, 0])
            i = torch.exp(i_raw[:, t, 0] - m_new)[:, None]
            f = torch.exp(log_f[:, t, 0] + m - m_new)[:, None]
            k_t, q_t = k[:, t], q[:, t]
            memory = f[:, :, None] * memory + (i * v[:, t]).unsqueeze(2) * k_t.unsqueeze(1)
            normaliser = f * normaliser + i * k_t
            # exp(-m) overflows float32 once m < -88 (an input gate below exp(-88)): the forward
            # still divides by inf, but its backward gives 0 * inf = nan. The floor stays below
            # the overflow; past it h is at most |C q| exp(-80), zero either way.
            floor = torch.exp((-m_new).clamp(max=80.0))
            denominator = torch.maximum((normaliser * q_t).sum(-1).abs(), floor)
            outputs.append(torch.bmm(memory, q_t.unsqueeze(2)).squeeze(2) / denominator[:, None])
            m = m_new
        h = torch.sigmoid(o) * torch.stack(outputs, dim=1)
        y = self.out_proj(h)
        return (y + x if self.residual else y), (memory, normaliser, m)


class MLSTM(nn.Module):
    """Stacked ``MLSTMLayer``s with torch's RNN signature (batch_first only)."""

    def __init__(
        self, input_size: int, hidden_size: int, num_layers: int = 1, batch_first: bool = True
    ) -> None:
        super().__init__()
        if not batch_first:
            raise ValueError("MLSTM is batch_first only")
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.layers = nn.ModuleList(
            MLSTMLayer(input_size if i == 0 else hidden_size, hidden_size, i > 0)
            for i in range(num_layers)
        )

    def forward(self, x: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        if state is None:
            layers, batch, size = self.num_layers, x.shape[0], self.hidden_size
            state = (
                x.new_zeros(layers, batch, size, size),
                x.new_zeros(layers, batch, size),
                x.new_zeros(layers, batch),
            )
        last = []
        for layer, *layer_state in zip(self.layers, *state, strict=True):
            x, new_state = layer(x, tuple(layer_state))
            last.append(new_state)
        return x, tuple(torch.stack(s) for s in zip(*last, strict=True))
