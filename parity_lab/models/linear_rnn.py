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

The recurrence never loops in Python over every time step: ``linear_scan`` is a chunked scan,
about ``2 sqrt(T)`` vectorised steps of ``O(T)`` total work, in training and evaluation. It only
multiplies and adds, so it stays exact for signed and zero transitions. The state carried
between chunks is each layer's last ``h``, shape ``(num_layers, batch, hidden_size)``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from parity_lab import EIGENVALUES

# Longest input scanned at once. Evaluation reads thousands of steps per chunk; tensors of that
# size fall out of the CPU caches, and 512 strings x 40,960 bits took 35 s in chunks of 4096
# steps against 8.4 s in pieces of 256 (one thread).
PIECE = 256
# Without gradients, pieces hold about this many values (steps x batch x hidden_size), at least
# MIN_PIECE steps: each of the scan's tensors stays in a core's L2 cache (512 KiB of float32), and
# a narrow model scans longer pieces. Evaluation chunks are one such piece for 512 strings.
INFERENCE_VALUES = 2**17
MIN_PIECE = 64
EVAL_STRINGS = 512
# log(decay) beyond which float32 transitions are exactly at an end, with a margin of 8x or more:
# a = exp(-decay) is 1 once decay <= 2^-28 (half an ulp below 1 is 2^-25); 2 a - 1 is -1 once
# decay >= 20 (a <= 2e-9 < 2^-26); a is 0 once decay >= 110 (exp underflows below -103.3).
SATURATED_LOG_DECAY = {
    "signed": (-28 * math.log(2), math.log(20.0)),
    "positive": (-28 * math.log(2), math.log(110.0)),
}


def linear_scan(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None) -> torch.Tensor:
    """All states of ``h_t = a_t * h_{t-1} + b_t`` (time on dim 1), from ``h0`` (zero if None).

    A chunked scan in two levels, ``O(T)`` work in about ``2 sqrt(T)`` vectorised steps: the
    ``T`` steps are cut into blocks of ``K ~ sqrt(T)``. (1) Every block is scanned from a zero
    state, all blocks at once, ``K`` steps, and ``A`` = the running product of its ``a`` (one
    ``cumprod``). (2) The state entering each block follows from the one before, one step per
    block: ``h_end = A_last h_start + B_last``. (3) Every state is ``B + A * h_start`` of its
    block. Only products and sums: no logarithm of ``a``, no division by a cumulative product,
    so it is exact for transitions of exactly -1, 0 and 1 and stable for signed ones.
    """
    batch, steps, size = b.shape
    block = math.isqrt(steps - 1) + 1  # ceil(sqrt(steps))
    blocks = -(-steps // block)
    pad = blocks * block - steps
    if pad:  # identity steps at the end: a = 1, b = 0
        a = F.pad(a, (0, 0, 0, pad), value=1.0)
        b = F.pad(b, (0, 0, 0, pad))
    a, b = a.view(batch, blocks, block, size), b.view(batch, blocks, block, size)
    running = torch.cumprod(a, dim=2)  # product of a from each block's start
    state, within = torch.zeros_like(b[:, :, 0]), []
    for k in range(block):  # (1) every block from a zero state, all blocks together
        state = torch.addcmul(b[:, :, k], a[:, :, k], state)
        within.append(state)
    within_states = torch.stack(within, dim=2)
    h = torch.zeros_like(b[:, 0, 0]) if h0 is None else h0
    starts = []
    for j in range(blocks):  # (2) the state entering each block
        starts.append(h)
        h = torch.addcmul(within_states[:, j, -1], running[:, j, -1], h)
    states = torch.addcmul(within_states, running, torch.stack(starts, dim=1).unsqueeze(2))  # (3)
    return states.view(batch, blocks * block, size)[:, :steps]


def linear_scan_inplace_(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None) -> torch.Tensor:
    """``linear_scan`` for inference with time on dim 0, ``(time, batch, size)``: overwrites ``a``
    and ``b`` and returns the states in ``b``'s memory. The same operations in the same order, so
    the same values; each time step is one contiguous slice and no intermediate is allocated."""
    steps, batch, size = b.shape
    block = math.isqrt(steps - 1) + 1
    blocks = -(-steps // block)
    pad = blocks * block - steps
    if pad:  # identity steps at the end: a = 1, b = 0
        a = F.pad(a, (0, 0, 0, 0, 0, pad), value=1.0)
        b = F.pad(b, (0, 0, 0, 0, 0, pad))
    a, b = a.view(blocks, block, batch * size), b.view(blocks, block, batch * size)
    for k in range(1, block):  # (1) every block from a zero state, all blocks together
        b[:, k].addcmul_(a[:, k], b[:, k - 1])
    running = a.cumprod_(dim=1)  # product of a from each block's start
    starts = torch.empty_like(b[:, 0])
    starts[0] = 0 if h0 is None else h0.reshape(-1)
    for j in range(blocks - 1):  # (2) the state entering each block
        torch.addcmul(b[j, -1], running[j, -1], starts[j], out=starts[j + 1])
    b.addcmul_(running, starts.unsqueeze(1))  # (3)
    return b.view(blocks * block, batch, size)[:steps]


class LinearRNNLayer(nn.Module):
    """One gated diagonal linear recurrence: ``input -> (outputs, all states)``."""

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        signed: bool,
        residual: bool,
        input_bias: bool = True,
    ) -> None:
        super().__init__()
        self.signed, self.residual, self.input_bias = signed, residual, input_bias
        self.in_proj = nn.Linear(input_size, 3 * hidden_size)  # dt, b, gate
        self.A_log = nn.Parameter(torch.log(torch.arange(1, hidden_size + 1, dtype=torch.float)))
        self.out_proj = nn.Linear(hidden_size, hidden_size)
        # Mamba's initial step sizes: dt = softplus(bias) log-uniform in [1e-3, 1e-1].
        dt = torch.exp(torch.empty(hidden_size).uniform_(math.log(1e-3), math.log(1e-1)))
        with torch.no_grad():
            self.in_proj.bias[:hidden_size] = dt + torch.log(-torch.expm1(-dt))  # softplus^-1
            if not input_bias:  # b = W_b x: b(0) is exactly 0 on a 0 bit (never read, kept 0)
                self.in_proj.bias[hidden_size : 2 * hidden_size] = 0.0

    def projections(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``dt``, ``b`` and the gate at every position, from the layer's input alone."""
        # one matmul per part: elementwise kernels on slices of one wide output are much slower
        dt_b, b_b, gate_b = self.in_proj.bias.chunk(3)
        biases = (dt_b, b_b if self.input_bias else None, gate_b)
        return tuple(  # type: ignore[return-value]
            F.linear(x, weight, bias)
            for weight, bias in zip(self.in_proj.weight.chunk(3), biases, strict=True)
        )

    def transition(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``a``, ``b`` and the gate at every position, from the layer's input alone."""
        dt, b, gate = self.projections(x)
        a = torch.exp(-F.softplus(dt) * self.A_log.exp())
        return (2 * a - 1 if self.signed else a), b, gate

    def log_decay(self, x: torch.Tensor) -> torch.Tensor:
        """``log(softplus(dt) exp(A_log))`` at every position: ``a = exp(-exp(log_decay))``."""
        dt = self.projections(x)[0].clamp(min=-80.0)  # softplus(-80) is still a normal float32
        return F.softplus(dt).log() + self.A_log

    def infer(self, x: torch.Tensor, h0: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward`` without gradients, time on dim 0: ``(outputs, last state)``. In place
        wherever the training path allocates, with the same operations, so the same values."""
        dt, b, gate = self.projections(x)
        a = F.softplus(dt).mul_(-self.A_log.exp()).exp_()
        if self.signed:
            a.mul_(2).sub_(1)
        h = linear_scan_inplace_(a, b, h0)
        y = self.out_proj(F.silu(gate, inplace=True).mul_(h))
        return (y.add_(x) if self.residual else y), h[-1]

    def forward(
        self, x: torch.Tensor, h0: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        a, b, gate = self.transition(x)
        h = linear_scan(a, b, h0)
        y = self.out_proj(h * F.silu(gate))
        return (y + x if self.residual else y), h


class TransitionStack(nn.Module):
    """Layers of a recurrence whose transitions are non-negative or signed (``model.eigenvalues``),
    built with torch's RNN signature (batch_first only); subclasses name the layer and run it."""

    layer_type: type[nn.Module]  # built as layer_type(input_size, hidden_size, signed, residual)

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        batch_first: bool = True,
        eigenvalues: str = "positive",
        **layer_options: Any,
    ) -> None:
        super().__init__()
        if not batch_first:
            raise ValueError(f"{type(self).__name__} is batch_first only")
        if eigenvalues not in EIGENVALUES:
            raise ValueError(
                f"model.eigenvalues={eigenvalues!r} is invalid: allowed values are {EIGENVALUES}"
            )
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.eigenvalues = eigenvalues
        self.layers = nn.ModuleList(
            self.layer_type(
                input_size if i == 0 else hidden_size,
                hidden_size,
                eigenvalues == "signed",
                i > 0,
                **layer_options,
            )
            for i in range(num_layers)
        )


class LinearRNN(TransitionStack):
    """Stacked ``LinearRNNLayer``s with torch's RNN signature (batch_first only).

    ``forward(x, state) -> (outputs, state)``: outputs ``(batch, time, hidden_size)``, state the
    last ``h`` of every layer, ``(num_layers, batch, hidden_size)``.
    """

    layer_type = LinearRNNLayer

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        batch_first: bool = True,
        eigenvalues: str = "positive",
        input_bias: bool = True,
    ) -> None:
        """``input_bias=False``: ``b = W_b x`` without a bias, so a 0 bit adds exactly nothing."""
        super().__init__(
            input_size, hidden_size, num_layers, batch_first, eigenvalues, input_bias=input_bias
        )

    def saturation(self, x: torch.Tensor) -> torch.Tensor:
        """How far each transition is from the float32 end it leans to, in [0, 1] at every
        position and unit, ``(batch, time, num_layers * hidden_size)``. A transition above its
        midpoint (``a = 1/2``, which is 0 when signed) leans to 1, a unit that holds; below it,
        to -1 (signed, a unit that flips) or 0 (positive, a unit that resets). It is 0 once the
        transition is exactly there, which is what lets a proof of exactness close
        (docs/certify.md). Measured on ``log(decay)``, ``a = exp(-decay)``, whose gradient does
        not vanish as ``a`` saturates, as that of ``1 - a^2`` would."""
        hold, end = SATURATED_LOG_DECAY[self.eigenvalues]
        middle = math.log(math.log(2.0))  # a = exp(-decay) = 1/2
        parts = []
        for layer in self.layers:
            log_decay = layer.log_decay(x)
            parts.append(
                torch.where(
                    log_decay <= middle,
                    (log_decay - hold).clamp(min=0) / (middle - hold),
                    (end - log_decay).clamp(min=0) / (end - middle),
                )
            )
            x, _ = layer(x, None)
        return torch.cat(parts, dim=-1)

    @property
    def eval_chunk_len(self) -> int:
        """Bits per evaluation chunk (``parity_lab.evaluate``): one inference piece of 512 strings,
        256 bits at hidden size 1, 64 from 4 on (docs/performance.md)."""
        return max(MIN_PIECE, INFERENCE_VALUES // (EVAL_STRINGS * self.hidden_size))

    def infer(
        self, x: torch.Tensor, state: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward`` without gradients: time-major pieces of about ``INFERENCE_VALUES``."""
        batch, steps, _ = x.shape
        piece = max(MIN_PIECE, INFERENCE_VALUES // (batch * self.hidden_size))
        outputs = x.new_empty(batch, steps, self.hidden_size)
        last = [None] * self.num_layers if state is None else list(state.unbind(0))
        for start in range(0, steps, piece):
            y = x[:, start : start + piece].transpose(0, 1).contiguous()  # one copy, not three
            for i, layer in enumerate(self.layers):
                y, last[i] = layer.infer(y, last[i])
            outputs[:, start : start + piece] = y.transpose(0, 1)
        return outputs, torch.stack(last)

    def forward(
        self, x: torch.Tensor, state: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not torch.is_grad_enabled():
            return self.infer(x, state)
        if x.shape[1] > PIECE:  # long inputs piece by piece, carrying the state
            outputs = []
            for piece in x.split(PIECE, dim=1):
                output, state = self(piece, state)
                outputs.append(output)
            return torch.cat(outputs, dim=1), state
        initial = [None] * self.num_layers if state is None else state.unbind(0)
        last = []
        for layer, h0 in zip(self.layers, initial, strict=True):
            x, h = layer(x, h0)
            last.append(h[:, -1])
        return x, torch.stack(last)
