"""Hand-written RNN, LSTM and GRU: drop-in twins of ``torch.nn.RNN/LSTM/GRU`` (batch_first).

Each class names and shapes its parameters exactly as torch does (``weight_ih_l0``, ...), follows
torch's gate order and equations, and returns ``(outputs, state)`` in torch's format, so equal
weights give equal logits. A cell is one ``step``; ``ManualRecurrent.forward`` unrolls any cell
over time and layers. The input projection of a whole sequence is one matmul, hoisted out of the
time loop; only the recurrent matmul runs per step.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

Weights = tuple[torch.Tensor, torch.Tensor]  # (weight_hh, bias_hh) of one layer


class ManualRecurrent(nn.Module):
    """Unrolls ``step`` over time and layers; subclasses define the cell."""

    num_gates: int  # rows of weight_ih / weight_hh, in units of hidden_size

    def __init__(
        self, input_size: int, hidden_size: int, num_layers: int = 1, batch_first: bool = True
    ) -> None:
        super().__init__()
        if not batch_first:
            raise ValueError("hand-written recurrent layers are batch_first only")
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        rows = self.num_gates * hidden_size
        for layer in range(num_layers):
            columns = input_size if layer == 0 else hidden_size
            self.register_parameter(f"weight_ih_l{layer}", nn.Parameter(torch.empty(rows, columns)))
            self.register_parameter(
                f"weight_hh_l{layer}", nn.Parameter(torch.empty(rows, hidden_size))
            )
            self.register_parameter(f"bias_ih_l{layer}", nn.Parameter(torch.empty(rows)))
            self.register_parameter(f"bias_hh_l{layer}", nn.Parameter(torch.empty(rows)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """torch's initialisation: every weight uniform in +-1/sqrt(hidden_size)."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for weight in self.parameters():
            nn.init.uniform_(weight, -bound, bound)

    def layer_weights(self, layer: int) -> tuple[torch.Tensor, ...]:
        return tuple(
            getattr(self, f"{name}_l{layer}")
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
        )

    def zero_state(self, batch: int, like: torch.Tensor) -> Any:
        return like.new_zeros(batch, self.hidden_size)

    def step(self, x_proj: torch.Tensor, state: Any, weights: Weights) -> tuple[torch.Tensor, Any]:
        """One time step: projected input ``W_ih x + b_ih`` and state -> (output h, new state)."""
        raise NotImplementedError

    def split_state(self, state: Any) -> list[Any]:
        """torch's stacked state (num_layers, batch, hidden) -> one state per layer."""
        return list(state.unbind(0))

    def stack_state(self, states: list[Any]) -> Any:
        return torch.stack(states)

    def forward(self, x: torch.Tensor, state: Any = None) -> tuple[torch.Tensor, Any]:
        batch, time, _ = x.shape
        if state is None:
            layer_states = [self.zero_state(batch, x) for _ in range(self.num_layers)]
        else:
            layer_states = self.split_state(state)
        for layer in range(self.num_layers):
            weight_ih, weight_hh, bias_ih, bias_hh = self.layer_weights(layer)
            x_proj = torch.nn.functional.linear(x, weight_ih, bias_ih)  # all steps at once
            layer_state, outputs = layer_states[layer], []
            for t in range(time):
                h, layer_state = self.step(x_proj[:, t], layer_state, (weight_hh, bias_hh))
                outputs.append(h)
            x = torch.stack(outputs, dim=1)
            layer_states[layer] = layer_state
        return x, self.stack_state(layer_states)


class ManualRNN(ManualRecurrent):
    """Elman RNN: h = tanh(W_ih x + b_ih + W_hh h + b_hh)."""

    num_gates = 1

    def step(self, x_proj, state, weights):
        weight_hh, bias_hh = weights
        h = torch.tanh(x_proj + torch.addmm(bias_hh, state, weight_hh.t()))
        return h, h


class ManualLSTM(ManualRecurrent):
    """LSTM with torch's gate order (input, forget, cell, output)."""

    num_gates = 4

    def zero_state(self, batch, like):
        zeros = like.new_zeros(batch, self.hidden_size)
        return zeros, zeros

    def step(self, x_proj, state, weights):
        weight_hh, bias_hh = weights
        h, c = state
        gates = x_proj + torch.addmm(bias_hh, h, weight_hh.t())
        i, f, g, o = gates.chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return h, (h, c)

    def split_state(self, state):
        h, c = state
        return list(zip(h.unbind(0), c.unbind(0), strict=True))

    def stack_state(self, states):
        h, c = zip(*states, strict=True)
        return torch.stack(h), torch.stack(c)


class ManualGRU(ManualRecurrent):
    """GRU with torch's gate order (reset, update, new); the reset gate scales W_hn h + b_hn."""

    num_gates = 3

    def step(self, x_proj, state, weights):
        weight_hh, bias_hh = weights
        x_r, x_z, x_n = x_proj.chunk(3, dim=1)
        h_r, h_z, h_n = torch.addmm(bias_hh, state, weight_hh.t()).chunk(3, dim=1)
        r = torch.sigmoid(x_r + h_r)
        z = torch.sigmoid(x_z + h_z)
        n = torch.tanh(x_n + r * h_n)
        h = (1 - z) * n + z * state
        return h, h
