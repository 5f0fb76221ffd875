"""Hand-written RNN, LSTM and GRU: drop-in twins of ``torch.nn.RNN/LSTM/GRU`` (batch_first).

Each class names and shapes its parameters exactly as torch does (``weight_ih_l0``, ...), follows
torch's gate order and equations, and returns ``(outputs, state)`` in torch's format, so equal
weights give equal logits. A cell is one ``step`` (its equations) and one ``step_backward`` (their
derivative, written by hand); ``ManualRecurrent.forward`` unrolls any cell over time and layers.

Speed: the input projection of a whole sequence is one matmul, hoisted out of the time loop; when
gradients are needed the loop runs inside ``BackpropThroughTime``, an autograd Function whose
backward is the hand-written loop over ``step_backward``. Tiny recurrent models are dominated by
per-operation overhead, and this replaces ~40 autograd nodes per time step by none.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from parity_lab.models import native

# Derivatives through an activation, from its output, each one fused kernel:
# sigmoid_grad(grad, s) = grad * s * (1 - s), tanh_grad(grad, t) = grad * (1 - t * t).
sigmoid_grad = torch.ops.aten.sigmoid_backward
tanh_grad = torch.ops.aten.tanh_backward

State = tuple[torch.Tensor, ...]  # one layer's recurrent state: (h,) or, for the LSTM, (h, c)
Saved = tuple[torch.Tensor, ...]  # what one step records for its backward


class ManualRecurrent(nn.Module):
    """Unrolls ``step`` over time and layers; subclasses define the cell."""

    num_gates: int  # rows of weight_ih / weight_hh, in units of hidden_size
    state_size: int = 1  # tensors in one layer's state: 1 (h) or 2 (h, c)

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

    def step(
        self,
        x_proj: torch.Tensor,
        state: State,
        weight_hh: torch.Tensor,
        bias_hh: torch.Tensor,
        saved: list[Saved] | None = None,
    ) -> tuple[torch.Tensor, State]:
        """One time step: projected input ``W_ih x + b_ih`` and state -> (output h, new state).

        Appends to ``saved`` (when given) what ``step_backward`` needs.
        """
        raise NotImplementedError

    def step_backward(
        self,
        grad_h: torch.Tensor,
        grad_state: State,
        saved: Saved,
        weight_hh: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, State]:
        """Gradient of one ``step``, given the gradient of its output h and of its new state's
        other tensors (the LSTM's c): (d x_proj, d (W_hh h + b_hh), d previous state)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, state: Any = None) -> tuple[torch.Tensor, Any]:
        batch = x.shape[0]
        if state is None:
            zeros = x.new_zeros(self.num_layers, batch, self.hidden_size)
            state = (zeros,) * self.state_size
        elif self.state_size == 1:
            state = (state,)
        layer_states = list(zip(*(s.unbind(0) for s in state), strict=True))
        # Under torch.compile the loop is traced as plain ops and the compiler derives the backward;
        # a new cell that defines only ``step`` also gets autograd's backward.
        hand_written_backward = (
            type(self).step_backward is not ManualRecurrent.step_backward
            and torch.is_grad_enabled()
            and not torch.compiler.is_compiling()
            and any(p.requires_grad for p in self.parameters())
        )
        x = x.transpose(0, 1)  # time-major inside: each step reads and writes contiguous rows
        for layer in range(self.num_layers):
            weight_ih, weight_hh, bias_ih, bias_hh = self.layer_weights(layer)
            x_proj = torch.nn.functional.linear(x, weight_ih, bias_ih)  # all steps at once
            native = self.native_layer(x_proj, weight_hh, bias_hh, tuple(layer_states[layer]))
            if native is not None:
                x, layer_state = native
            elif hand_written_backward:
                x, *layer_state = BackpropThroughTime.apply(
                    self, x_proj, weight_hh, bias_hh, *layer_states[layer]
                )
            else:
                x, layer_state = self.unroll(x_proj, tuple(layer_states[layer]), weight_hh, bias_hh)
            layer_states[layer] = tuple(layer_state)
        stacked = tuple(torch.stack(s) for s in zip(*layer_states, strict=True))
        return x.transpose(0, 1), stacked[0] if self.state_size == 1 else stacked

    def native_layer(
        self, x_proj: torch.Tensor, weight_hh: torch.Tensor, bias_hh: torch.Tensor, state: State
    ) -> tuple[torch.Tensor, State] | None:
        """One layer through a compiled whole-sequence kernel (``native.py``), or None where this
        cell has none or it cannot run; then ``step`` runs, as always."""
        return None

    def unroll(
        self,
        x_proj: torch.Tensor,
        state: State,
        weight_hh: torch.Tensor,
        bias_hh: torch.Tensor,
        saved: list[Saved] | None = None,
    ) -> tuple[torch.Tensor, State]:
        """Run ``step`` over every time step of one layer (time-major): outputs, final state."""
        outputs = []
        for x_t in x_proj.unbind(0):
            h, state = self.step(x_t, state, weight_hh, bias_hh, saved)
            outputs.append(h)
        return torch.stack(outputs), state


class BackpropThroughTime(torch.autograd.Function):
    """One layer unrolled over time, with the hand-written backward of its cell.

    ``apply(cell, x_proj, weight_hh, bias_hh, *state) -> (outputs, *final_state)``, time-major.
    The forward loop records each step's intermediates; the backward walks the steps in reverse
    through ``cell.step_backward`` and forms the weight gradients with one matmul over all steps.
    """

    @staticmethod
    def forward(
        ctx: Any,
        cell: ManualRecurrent,
        x_proj: torch.Tensor,
        weight_hh: torch.Tensor,
        bias_hh: torch.Tensor,
        *state: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        saved: list[Saved] = []
        outputs, final_state = cell.unroll(x_proj, state, weight_hh, bias_hh, saved)
        # Per-step intermediates live on ctx: neither inputs nor outputs, and one SavedVariable
        # each would cost more than the step's own arithmetic.
        ctx.cell, ctx.steps = cell, saved
        ctx.save_for_backward(weight_hh, outputs, state[0])
        return (outputs, *final_state)

    @staticmethod
    def backward(ctx: Any, grad_outputs: torch.Tensor | None, *grad_final: torch.Tensor | None):
        cell: ManualRecurrent = ctx.cell
        weight_hh, outputs, h0 = ctx.saved_tensors
        # gradient reaching the state after the last step
        grad_state = tuple(torch.zeros_like(h0) if g is None else g for g in grad_final)
        grad_x_proj, grad_hh = [], []
        for t in reversed(range(outputs.shape[0])):
            grad_h = grad_state[0] if grad_outputs is None else grad_state[0] + grad_outputs[t]
            grad_x, grad_pre_hh, grad_state = cell.step_backward(
                grad_h, grad_state[1:], ctx.steps[t], weight_hh
            )
            grad_x_proj.append(grad_x)
            grad_hh.append(grad_pre_hh)
        grad_x_all = torch.stack(grad_x_proj[::-1])
        # (W_hh h + b_hh) is the input projection itself for the RNN and LSTM, not for the GRU
        grad_hh_all = grad_x_all if grad_hh[0] is grad_x_proj[0] else torch.stack(grad_hh[::-1])
        grad_hh_all = grad_hh_all.flatten(0, 1)  # (time * batch, gates)
        h_prev = torch.cat([h0.unsqueeze(0), outputs[:-1]]).flatten(0, 1)
        grad_weight_hh = grad_hh_all.t().mm(h_prev)
        grad_bias_hh = grad_hh_all.sum(0)
        return (None, grad_x_all, grad_weight_hh, grad_bias_hh, *grad_state)


class ManualRNN(ManualRecurrent):
    """Elman RNN: h = tanh(W_ih x + b_ih + W_hh h + b_hh)."""

    num_gates = 1

    def step(self, x_proj, state, weight_hh, bias_hh, saved=None):
        (h,) = state
        h = torch.tanh(x_proj + torch.addmm(bias_hh, h, weight_hh.t()))
        if saved is not None:
            saved.append((h,))
        return h, (h,)

    def step_backward(self, grad_h, grad_state, saved, weight_hh):
        (h,) = saved
        grad_pre = tanh_grad(grad_h, h)
        return grad_pre, grad_pre, (grad_pre.mm(weight_hh),)


class ManualLSTM(ManualRecurrent):
    """LSTM with torch's gate order (input, forget, cell, output)."""

    num_gates = 4
    state_size = 2

    def step(self, x_proj, state, weight_hh, bias_hh, saved=None):
        h, c_prev = state
        gates = x_proj + torch.addmm(bias_hh, h, weight_hh.t())
        sig = torch.sigmoid(gates)  # one kernel for the input, forget and output gates ...
        i, f, _, o = sig.chunk(4, dim=1)
        g = torch.tanh(gates[:, 2 * self.hidden_size : 3 * self.hidden_size])  # ... tanh for g
        c = f * c_prev + i * g
        tanh_c = torch.tanh(c)
        h = o * tanh_c
        if saved is not None:  # what each gate multiplies: i*g, f*c_prev, g*i, o*tanh(c)
            saved.append((sig, g, torch.cat([g, c_prev, i, tanh_c], dim=1), f, o, tanh_c))
        return h, (h, c)

    def step_backward(self, grad_h, grad_state, saved, weight_hh):
        sig, g, multiplies, f, o, tanh_c = saved
        (grad_c,) = grad_state
        grad_c = grad_c + tanh_grad(grad_h * o, tanh_c)
        grad_gates = torch.cat([grad_c, grad_c, grad_c, grad_h], dim=1) * multiplies
        grad_pre = sigmoid_grad(grad_gates, sig)
        cell = slice(2 * self.hidden_size, 3 * self.hidden_size)
        grad_pre[:, cell] = tanh_grad(grad_gates[:, cell], g)
        return grad_pre, grad_pre, (grad_pre.mm(weight_hh), grad_c * f)

    def native_layer(self, x_proj, weight_hh, bias_hh, state):
        # The kernel implements exactly these equations: a subclass that changes them runs them.
        own = (
            type(self).step is ManualLSTM.step
            and type(self).step_backward is ManualLSTM.step_backward
        )
        if not own or not native.lstm_applies(x_proj, weight_hh, bias_hh, *state):
            return None
        tensors = (x_proj, weight_hh, bias_hh, *state)
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            outputs, h, c = native.FusedLSTM.apply(*tensors)
        else:
            outputs, h, c = native.lstm_inference(*tensors)
        return outputs, (h, c)


class ManualGRU(ManualRecurrent):
    """GRU with torch's gate order (reset, update, new); the reset gate scales W_hn h + b_hn."""

    num_gates = 3

    def step(self, x_proj, state, weight_hh, bias_hh, saved=None):
        (h_prev,) = state
        hidden = torch.addmm(bias_hh, h_prev, weight_hh.t())
        rz = 2 * self.hidden_size  # reset and update gates, side by side
        r, z = torch.sigmoid(x_proj[:, :rz] + hidden[:, :rz]).chunk(2, dim=1)
        h_n = hidden[:, rz:]
        n = torch.tanh(x_proj[:, rz:] + r * h_n)
        h = (1 - z) * n + z * h_prev
        if saved is not None:
            saved.append((r, z, n, h_n, h_prev))
        return h, (h,)

    def step_backward(self, grad_h, grad_state, saved, weight_hh):
        r, z, n, h_n, h_prev = saved
        grad_pre_n = tanh_grad(grad_h * (1 - z), n)
        grad_pre_r = sigmoid_grad(grad_pre_n * h_n, r)
        grad_pre_z = sigmoid_grad(grad_h * (h_prev - n), z)
        grad_x = torch.cat([grad_pre_r, grad_pre_z, grad_pre_n], dim=1)
        grad_hh = torch.cat([grad_pre_r, grad_pre_z, grad_pre_n * r], dim=1)
        return grad_x, grad_hh, (torch.addmm(grad_h * z, grad_hh, weight_hh),)
