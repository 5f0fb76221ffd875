"""The published Mamba block (Gu & Dao, 2023) as Grazzi et al. (ICLR 2025) run it on parity.

Their single-layer parity model (``parity_mamba_single_layer.yaml`` in the authors' code, which
builds the pure-PyTorch Mamba of the ``mambapy`` package): a token embedding of width
``d_model``, then per layer ``x + mixer(rmsnorm(x))``, where the mixer is

- ``in_proj`` to two branches of width ``expand * d_model``: ``x`` and a gate ``z``;
- a causal depthwise convolution of ``x`` (kernel ``d_conv``: 1 in their parity runs), then SiLU;
- ``x_proj`` to an input-dependent step ``dt`` (rank ``dt_rank``), ``B`` and ``C`` (``d_state``
  each); ``dt = softplus(dt_proj(dt))`` per channel;
- per channel and state, ``h_t = a_t * h_{t-1} + dt_t B_t x_t`` with ``a_t = exp(dt_t A)``,
  ``A = -exp(A_log)``; ``eigenvalues: signed`` maps ``a_t`` to ``2 a_t - 1`` before the scan, in
  [-1, 1] (the authors' ``positive_and_negative``);
- ``y_t = C_t . h_t + D x_t``, times ``silu(z_t)``, then ``out_proj``.

Parameter names and shapes are mambapy's (``layers.<i>.mixer.in_proj.weight``, ...,
``layers.<i>.norm.weight``), so ``self.layers`` loads a ``mambapy.mamba.Mamba`` state dict; so
are its initial values: ``A_log = log(1..d_state)`` per channel, ``D = 1``, and ``dt``'s bias the
inverse softplus of steps log-uniform in ``[dt_min, dt_max]``. The embedding is a linear map of
the input (for ``bit`` encoding, bit 0 reads its bias and bit 1 bias + weight: a 2-row table).

The scan is ``linear_scan`` over the ``expand * d_model * d_state`` states: products and sums
only, so exact for signed transitions. The state carried between chunks is, per layer, the last
``h`` and the last ``d_conv - 1`` inputs of the convolution.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from parity_lab import EIGENVALUES
from parity_lab.models.linear_rnn import PIECE, linear_scan

# The state of one layer: (h (batch, d_inner, d_state), convolution inputs (batch, d_inner, k-1)).
LayerState = tuple[torch.Tensor, torch.Tensor]


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x^2) + eps) * weight`` over the last dimension (mambapy's)."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class MambaMixer(nn.Module):
    """One Mamba block: ``(input (batch, time, d_model), state) -> (output, state)``."""

    def __init__(
        self,
        d_model: int,
        d_state: int,
        expand: int,
        dt_rank: int,
        d_conv: int,
        signed: bool,
        dt_min: float,
        dt_max: float,
        dt_init_floor: float,
    ) -> None:
        super().__init__()
        inner = expand * d_model
        self.inner, self.d_state, self.dt_rank, self.d_conv = inner, d_state, dt_rank, d_conv
        self.signed = signed
        self.in_proj = nn.Linear(d_model, 2 * inner, bias=False)
        self.conv1d = nn.Conv1d(inner, inner, d_conv, groups=inner, padding=d_conv - 1)
        self.x_proj = nn.Linear(inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, inner)
        bound = dt_rank**-0.5
        nn.init.uniform_(self.dt_proj.weight, -bound, bound)
        log_dt = torch.empty(inner).uniform_(math.log(dt_min), math.log(dt_max))
        dt = log_dt.exp().clamp(min=dt_init_floor)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
        states = torch.arange(1, d_state + 1, dtype=torch.float).repeat(inner, 1)
        self.A_log = nn.Parameter(torch.log(states))
        self.D = nn.Parameter(torch.ones(inner))
        self.out_proj = nn.Linear(inner, d_model, bias=False)

    def initial_state(self, x: torch.Tensor) -> LayerState:
        batch = x.shape[0]
        return (
            x.new_zeros(batch, self.inner, self.d_state),
            x.new_zeros(batch, self.inner, self.d_conv - 1),
        )

    def forward(self, x: torch.Tensor, state: LayerState) -> tuple[torch.Tensor, LayerState]:
        h0, tail = state
        batch, steps, _ = x.shape
        u, z = self.in_proj(x).chunk(2, dim=-1)
        # causal depthwise convolution, continuing from the previous chunk's last inputs
        seq = torch.cat([tail, u.transpose(1, 2)], dim=2)
        new_tail = seq[:, :, seq.shape[2] - (self.d_conv - 1) :]
        u = F.silu(F.conv1d(seq, self.conv1d.weight, self.conv1d.bias, groups=self.inner))
        u = u.transpose(1, 2)  # (batch, time, inner)
        dt, B, C = self.x_proj(u).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.softplus(self.dt_proj(dt))  # (batch, time, inner)
        a = torch.exp(dt.unsqueeze(-1) * -torch.exp(self.A_log))  # (batch, time, inner, d_state)
        if self.signed:
            a = 2 * a - 1
        b = (dt * u).unsqueeze(-1) * B.unsqueeze(2)
        size = self.inner * self.d_state
        h = linear_scan(a.reshape(batch, steps, size), b.reshape(batch, steps, size), h0.flatten(1))
        h = h.view(batch, steps, self.inner, self.d_state)
        y = (h @ C.unsqueeze(-1)).squeeze(-1) + self.D * u
        return self.out_proj(y * F.silu(z)), (h[:, -1], new_tail)


class MambaLayer(nn.Module):
    """``x + mixer(norm(x))``: mambapy's ``ResidualBlock``."""

    def __init__(self, mixer: MambaMixer, d_model: int, eps: float) -> None:
        super().__init__()
        self.mixer = mixer
        self.norm = RMSNorm(d_model, eps)

    def forward(self, x: torch.Tensor, state: LayerState) -> tuple[torch.Tensor, LayerState]:
        y, state = self.mixer(self.norm(x), state)
        return x + y, state


class Mamba(nn.Module):
    """Embedding + ``num_layers`` Mamba layers, with torch's RNN signature (batch_first only).

    ``forward(x, state) -> (outputs (batch, time, hidden_size), state)``; ``hidden_size`` is
    ``d_model``; ``state`` is one ``(h, convolution inputs)`` pair per layer.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        batch_first: bool = True,
        eigenvalues: str = "positive",
        d_state: int = 16,
        expand: int = 2,
        dt_rank: int = 1,
        d_conv: int = 1,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        rms_norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        if not batch_first:
            raise ValueError("Mamba is batch_first only")
        if eigenvalues not in EIGENVALUES:
            raise ValueError(
                f"model.eigenvalues={eigenvalues!r} is invalid: allowed values are {EIGENVALUES}"
            )
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.eigenvalues = eigenvalues
        self.embedding = nn.Linear(input_size, hidden_size)
        nn.init.normal_(self.embedding.weight)  # nn.Embedding's N(0, 1) rows
        nn.init.normal_(self.embedding.bias)
        signed = eigenvalues == "signed"
        self.layers = nn.ModuleList(
            MambaLayer(
                MambaMixer(
                    hidden_size,
                    d_state,
                    expand,
                    dt_rank,
                    d_conv,
                    signed,
                    dt_min,
                    dt_max,
                    dt_init_floor,
                ),  # fmt: skip
                hidden_size,
                rms_norm_eps,
            )
            for _ in range(num_layers)
        )

    def forward(
        self, x: torch.Tensor, state: list[LayerState] | None = None
    ) -> tuple[torch.Tensor, list[LayerState]]:
        if x.shape[1] > PIECE:  # long inputs piece by piece, carrying the state
            outputs = []
            for piece in x.split(PIECE, dim=1):
                output, state = self(piece, state)
                outputs.append(output)
            return torch.cat(outputs, dim=1), state
        y = self.embedding(x)
        if state is None:
            state = [layer.mixer.initial_state(y) for layer in self.layers]
        last = []
        for layer, layer_state in zip(self.layers, state, strict=True):
            y, layer_state = layer(y, layer_state)
            last.append(layer_state)
        return y, last
