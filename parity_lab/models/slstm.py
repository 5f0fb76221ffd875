"""sLSTM, the scalar-memory cell of xLSTM (Beck et al., NeurIPS 2024), as a ``ManualRecurrent``.

Pre-activations come, as in the LSTM, from the input and the previous output (recurrent
connections, one full matrix: a single head), in the gate order input, forget, cell, output:

    c_t = f_t c_{t-1} + i_t z_t,    n_t = f_t n_{t-1} + i_t,    h_t = o_t c_t / n_t,

with ``z = tanh``, ``o = sigmoid``, a sigmoid forget gate and the exponential input gate
``i = exp(i~)``. The normaliser ``n`` keeps ``h`` in (-1, 1) whatever the gates' scale. The
stabiliser ``m_t = max(log f_t + m_{t-1}, i~_t)`` rescales ``c`` and ``n`` by ``exp(-m_t)``:
the gates actually applied are ``exp(i~ - m_t)`` and ``exp(log f + m_{t-1} - m_t)``, both at most
1, and ``h`` is unchanged. At the start (``n = 0``) the stabiliser is ``i~`` itself, so the first
input gate is exactly 1 and ``n`` never reaches 0.

The state is ``(h, c, n, m)``, each ``(num_layers, batch, hidden_size)``, carried across chunks.
Only ``step`` is written: ``ManualRecurrent`` unrolls it and traces its backward from it.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from parity_lab.models.manual import ManualRecurrent


class SLSTM(ManualRecurrent):
    """sLSTM with exponential input gate, normaliser and stabiliser (equations in module doc)."""

    num_gates = 4
    state_size = 4  # h, c, n, m

    def reset_parameters(self) -> None:
        """torch's uniform initialisation, then forget-gate biases from 3 to 6 as in xLSTM's
        sLSTM, so that memory is kept at the start."""
        super().reset_parameters()
        forget = slice(self.hidden_size, 2 * self.hidden_size)
        with torch.no_grad():
            for layer in range(self.num_layers):
                getattr(self, f"bias_ih_l{layer}")[forget] = torch.linspace(3, 6, self.hidden_size)
                getattr(self, f"bias_hh_l{layer}")[forget] = 0.0

    def step(self, x_proj, state, weight_hh, bias_hh, saved=None):
        h, c, n, m = state
        gates = x_proj + torch.addmm(bias_hh, h, weight_hh.t())
        i_raw, f_raw, z_raw, o_raw = gates.chunk(4, dim=1)
        log_f = F.logsigmoid(f_raw)
        m_new = torch.where(n == 0, i_raw, torch.maximum(log_f + m, i_raw))
        i = torch.exp(i_raw - m_new)
        # <= 1 by the max above; clamped only at the start, where c = n = 0 make it irrelevant
        f = torch.exp((log_f + m - m_new).clamp(max=0.0))
        c = f * c + i * torch.tanh(z_raw)
        n = f * n + i
        h = torch.sigmoid(o_raw) * c / n
        return h, (h, c, n, m_new)

    def analysis_state(self, state: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """The part of the state that ``parity_lab.analyze`` clusters: ``h`` and the normalised
        memory ``c / n``, all that the output reads. ``c`` and ``n`` enter it only through their
        ratio; their common scale (``n``, with ``m``) only weighs the next input against the
        past, and it grows with the string where the forget gate is near 1, so clustered whole
        the states of one automaton state spread into bands of length."""
        h, c, n, _ = state
        return h, c / n
