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
the input: with ``pair`` encoding, bias-free, it is the authors' ``nn.Embedding`` rows of the two
bit tokens, N(0, 1) each (their pad token never precedes an answer); with ``bit`` encoding bit 0
reads its bias and bit 1 bias + weight, a 2-row table whose second row starts at N(0, 2).

The selective scan runs in ``kernels/selective_scan.c`` (CPU float32; one call per chunk forward
and one backward, every state kept in registers: PyTorch spends ~250 ms a training step moving
tensors of (batch, time, channels, states) through memory), with the step's softplus and the
output gate ``silu(z)``. Training under a loss read at the answer runs packed
(``parity_lab.models.packing``): the position-wise work skips the padding, and the last layer
computes its output at the answers alone. Elsewhere (float64, GPU, no C
compiler, ``PARITY_LAB_NATIVE=0``) it is ``linear_scan`` over the ``expand * d_model * d_state``
states, the reference the tests hold the kernel to. Both multiply and add only: exact for signed
transitions. The state carried between chunks is, per layer, the last
``h`` and the last ``d_conv - 1`` inputs of the convolution.
"""

from __future__ import annotations

import ctypes
import math

import torch
from torch import nn
from torch.nn import functional as F

from parity_lab import EIGENVALUES
from parity_lab.models import native
from parity_lab.models.linear_rnn import PIECE, linear_scan
from parity_lab.models.packing import Packed, check_answers

# One layer's state: h (batch, d_inner, d_state), last convolution inputs (batch, k-1, d_inner).
LayerState = tuple[torch.Tensor, torch.Tensor]


def scan_library(d_state: int) -> ctypes.CDLL | None:
    """The selective-scan kernel for ``d_state`` states, or None (with a warning) without one."""
    head = (native.SIZE,) * 3 + (native.INT,)
    return native.kernel(
        "selective_scan",
        d_state,
        "Mamba's scan",
        (
            (
                "scan_forward",
                head + (native.ADDRESS,) * 10 + (native.INT,) + (native.ADDRESS,) * 4,
                native.INT,
            ),
            (
                "scan_backward",
                head + (native.ADDRESS,) * 12 + (native.INT,) + (native.ADDRESS,) * 10,
                native.INT,
            ),
        ),
    )


def kernel_applies(*tensors: torch.Tensor) -> bool:
    """Whether the scan kernel can run these tensors (CPU float32, not being traced); the last
    is h0, (batch, inner, d_state)."""
    return native.runs_on_cpu_float32(*tensors) and scan_library(tensors[-1].shape[-1]) is not None


class SelectiveScan(torch.autograd.Function):
    """``apply(raw, u, B, C, A, D, h0, z, signed, live, packed) -> (y, h_last)`` through the C
    kernel, channels last: the scan with ``dt = softplus(raw)``, then the gate, ``y = (C . h + D
    u) silu(z)`` (batch, time, inner); ``A`` is (d_state, inner), ``h0`` and ``h_last`` (batch,
    d_state, inner). ``live`` (None: every step) is each row's last step wanted: the steps after
    it are not computed (``y`` 0 there, ``h_last`` the state after it), as a loss read at the
    answer needs nothing later. ``packed`` (a ``Packed``) instead: ``raw``, ``u``, ``B``, ``C``,
    ``z`` are (tokens, ...), the rows one after another without padding; with its
    ``last_only``, ``z`` and ``y`` are (batch, inner), the gate and the output at each row's
    last step alone."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        raw: torch.Tensor,
        u: torch.Tensor,
        B: torch.Tensor,
        C: torch.Tensor,
        A: torch.Tensor,
        D: torch.Tensor,
        h0: torch.Tensor,
        z: torch.Tensor,
        signed: bool,
        live: torch.Tensor | None = None,
        packed: Packed | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        raw, u, B, C, A, D, h0, z = (t.contiguous() for t in (raw, u, B, C, A, D, h0, z))
        if packed is None:
            rows, steps, inner = u.shape
            offsets, last_only = None, False
        else:
            rows, steps, inner = len(h0), packed.longest, u.shape[-1]
            offsets, last_only = packed.offsets, packed.last_only
        dt = torch.empty_like(u)
        y_inner, y = (u.new_empty(rows, inner) if last_only else torch.empty_like(u) for _ in "yy")
        h_last = torch.empty_like(h0)
        if live is not None:
            live = live.to(torch.long).contiguous()
        status = scan_library(A.shape[0]).scan_forward(
            rows,
            steps,
            inner,
            int(signed),
            *map(native.pointer, (raw, u, B, C, A, D, h0, z, live, offsets)),
            int(last_only),
            *map(native.pointer, (dt, y_inner, y, h_last)),
        )
        if status:
            raise MemoryError("selective_scan.c: no memory for the forward's buffer")
        ctx.save_for_backward(raw, dt, u, B, C, A, D, h0, z, y_inner)
        ctx.signed, ctx.live, ctx.packed = signed, live, packed
        ctx.shape = rows, steps, inner
        return y, h_last

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, g_y: torch.Tensor, g_h_last: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, ...]:
        raw, dt, u, B, C, A, D, h0, z, y_inner = ctx.saved_tensors
        rows, steps, inner = ctx.shape
        packed = ctx.packed
        offsets, last_only = (None, False) if packed is None else (packed.offsets, packed.last_only)
        g_y = g_y.contiguous()
        g_h_last = None if g_h_last is None else g_h_last.contiguous()
        # every step's g_B and g_C are written (0 past a row's last live step); g_A, g_D summed into
        g_raw, g_u, g_z, g_h0, g_B, g_C = map(torch.empty_like, (raw, u, z, h0, B, C))
        g_A, g_D = torch.zeros_like(A), torch.zeros_like(D)
        status = scan_library(A.shape[0]).scan_backward(
            rows, steps, inner, int(ctx.signed),
            *map(native.pointer, (raw, dt, u, B, C, A, D, h0, z, y_inner, ctx.live, offsets)),
            int(last_only),
            *map(native.pointer, (g_y, g_h_last, g_raw, g_u, g_B, g_C, g_A, g_D, g_h0, g_z)),
        )  # fmt: skip
        if status:
            raise MemoryError("selective_scan.c: no memory for the backward's buffer")
        return g_raw, g_u, g_B, g_C, g_A, g_D, g_h0, g_z, None, None, None


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
        selective: bool = True,
        skip: bool = True,
    ) -> None:
        super().__init__()
        inner = expand * d_model
        self.inner, self.d_state, self.dt_rank, self.d_conv = inner, d_state, dt_rank, d_conv
        self.signed, self.selective = signed, selective
        self.in_proj = nn.Linear(d_model, 2 * inner, bias=False)
        self.conv1d = nn.Conv1d(inner, inner, d_conv, groups=inner, padding=d_conv - 1)
        self.x_proj = nn.Linear(inner, dt_rank + (2 * d_state if selective else 0), bias=False)
        if not selective:  # the ablation: B and C the same at every step, N(0, 1) each
            self.B = nn.Parameter(torch.randn(d_state))
            self.C = nn.Parameter(torch.randn(d_state))
        self.dt_proj = nn.Linear(dt_rank, inner)
        bound = dt_rank**-0.5
        nn.init.uniform_(self.dt_proj.weight, -bound, bound)
        log_dt = torch.empty(inner).uniform_(math.log(dt_min), math.log(dt_max))
        dt = log_dt.exp().clamp(min=dt_init_floor)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
        states = torch.arange(1, d_state + 1, dtype=torch.float).repeat(inner, 1)
        self.A_log = nn.Parameter(torch.log(states))
        # the ablation without the skip keeps D as a constant 0 (a buffer, never trained)
        D = torch.ones(inner)
        if skip:
            self.D = nn.Parameter(D)
        else:
            self.register_buffer("D", torch.zeros_like(D), persistent=False)
        self.out_proj = nn.Linear(inner, d_model, bias=False)

    def initial_state(self, x: torch.Tensor) -> LayerState:
        batch = x.shape[0]
        return (
            x.new_zeros(batch, self.inner, self.d_state),
            x.new_zeros(batch, self.d_conv - 1, self.inner),
        )

    def forward(
        self,
        x: torch.Tensor,
        state: LayerState,
        live: torch.Tensor | None = None,
        packed: Packed | None = None,
    ) -> tuple[torch.Tensor, LayerState]:
        """``live``: see ``SelectiveScan`` (the kernel stops each row there; without the kernel
        every step is computed). ``packed``: ``x`` is (tokens, d_model), a ``Packed`` batch
        starting from the zero state (the kernel only)."""
        h0, tail = state
        if packed is not None and packed.last_only:  # the gate z only where the output is read
            w_u, w_z = self.in_proj.weight.chunk(2)
            u, z = F.linear(x, w_u), F.linear(x[packed.last], w_z)
        else:
            u, z = self.in_proj(x).chunk(2, dim=-1)
        if packed is None:
            conv, new_tail = self.convolve(u, tail)
        else:
            conv = packed.convolve(u, self.conv1d.weight[:, 0], self.conv1d.bias)
            new_tail = packed.tail(u, self.d_conv - 1)
        u = F.silu(conv)
        if self.selective:
            dt, B, C = self.x_proj(u).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        else:
            dt, shape = self.x_proj(u), (*u.shape[:-1], self.d_state)
            B, C = self.B.expand(shape), self.C.expand(shape)
        raw = self.dt_proj(dt)  # (batch, time, inner); the step is softplus(raw)
        A = -torch.exp(self.A_log)
        if packed is not None or kernel_applies(raw, u, B, C, z, A, self.D, h0):
            # softplus and gate in the kernel too
            y, h_last = SelectiveScan.apply(
                raw, u, B, C, A.t(), self.D, h0.transpose(1, 2), z, self.signed, live, packed
            )
            return self.out_proj(y), (h_last.transpose(1, 2), new_tail)
        y, h_last = self.scan(F.softplus(raw), u, B, C, A, h0)
        return self.out_proj(y * F.silu(z)), (h_last, new_tail)

    def convolve(self, u: torch.Tensor, tail: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The causal depthwise convolution (cross-correlation, as nn.Conv1d) of ``u`` (batch,
        time, inner), continuing from the previous chunk's last inputs ``tail``; in (batch, time,
        inner), so no transposed copies. Returns it and the next chunk's tail."""
        seq = torch.cat([tail, u], dim=1) if self.d_conv > 1 else u
        weight, steps = self.conv1d.weight[:, 0], u.shape[1]  # (inner, d_conv)
        conv = self.conv1d.bias + seq[:, :steps] * weight[:, 0]
        for k in range(1, self.d_conv):
            conv = conv + seq[:, k : k + steps] * weight[:, k]
        return conv, seq[:, seq.shape[1] - (self.d_conv - 1) :]

    def scan(
        self,
        dt: torch.Tensor,
        u: torch.Tensor,
        B: torch.Tensor,
        C: torch.Tensor,
        A: torch.Tensor,
        h0: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The selective scan in PyTorch: ``(y with the D skip, last h)``."""
        batch, steps, _ = u.shape
        a = torch.exp(dt.unsqueeze(-1) * A)  # (batch, time, inner, d_state)
        if self.signed:
            a = 2 * a - 1
        b = (dt * u).unsqueeze(-1) * B.unsqueeze(2)
        size = self.inner * self.d_state
        h = linear_scan(a.reshape(batch, steps, size), b.reshape(batch, steps, size), h0.flatten(1))
        h = h.view(batch, steps, self.inner, self.d_state)
        return (h @ C.unsqueeze(-1)).squeeze(-1) + self.D * u, h[:, -1]


class MambaLayer(nn.Module):
    """``x + mixer(norm(x))``: mambapy's ``ResidualBlock``; ``mixer(x)`` alone without
    ``residual`` (the ablation)."""

    def __init__(self, mixer: MambaMixer, d_model: int, eps: float, residual: bool = True) -> None:
        super().__init__()
        self.mixer = mixer
        self.residual = residual
        if residual:
            self.norm = RMSNorm(d_model, eps)

    def forward(
        self,
        x: torch.Tensor,
        state: LayerState,
        live: torch.Tensor | None = None,
        packed: Packed | None = None,
    ) -> tuple[torch.Tensor, LayerState]:
        if not self.residual:
            return self.mixer(x, state, live, packed)
        y, state = self.mixer(self.norm(x), state, live, packed)
        if packed is not None and packed.last_only:
            x = x[packed.last]
        return x + y, state


class Mamba(nn.Module):
    """Embedding + ``num_layers`` Mamba layers, with torch's RNN signature (batch_first only).

    ``forward(x, state) -> (outputs (batch, time, hidden_size), state)``; ``hidden_size`` is
    ``d_model``; ``state`` is one ``(h, convolution inputs)`` pair per layer.

    Three switches, all on in the published block, take it apart toward the minimal diagonal
    recurrence of ``linear_rnn`` (``experiment=mamba_ablation``): ``selective: false`` makes
    ``B`` and ``C`` parameters, the same at every step (``dt`` stays input-dependent);
    ``skip: false`` drops the ``D`` skip; ``residual: false`` drops each layer's RMSNorm and
    residual, so a layer is its mixer alone.
    """

    def analysis_state(self, state: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple:
        """What ``analyze`` clusters: every layer's scan state ``h``, as ``(1, batch, features)``
        (the convolution's inputs are the last bits read, not memory)."""
        return tuple(h.flatten(1).unsqueeze(0) for h, _ in state)

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
        selective: bool = True,
        skip: bool = True,
        residual: bool = True,
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
        # a table of one row per token, N(0, 1) as nn.Embedding: with pair encoding (one-hot
        # (bit, 1 - bit)) a bias-free map is exactly that; a single bit reads bias + weight x bit
        self.embedding = nn.Linear(input_size, hidden_size, bias=input_size == 1)
        nn.init.normal_(self.embedding.weight)
        if self.embedding.bias is not None:
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
                    selective,
                    skip,
                ),  # fmt: skip
                hidden_size,
                rms_norm_eps,
                residual,
            )
            for _ in range(num_layers)
        )

    reads_answers = True  # forward(x, answers=...): outputs at one position per string

    def forward(
        self,
        x: torch.Tensor,
        state: list[LayerState] | None = None,
        answers: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[LayerState]]:
        """``answers`` (one position per string, for training under a loss read there): the
        outputs at those positions, ``(batch, 1, hidden_size)``, with the same values (to float32
        rounding); nothing after an answer is computed (nothing later reaches it: every step is
        causal). From the zero state with the scan kernel, the strings run packed
        (``read_answers``); otherwise the kernel stops each string at its answer. The state
        returned is then not for carrying on: the kernel's ``h`` is each string's at its answer,
        the convolution's inputs each string's last (packed) or the chunk's. Inputs are not split
        into pieces of ``PIECE`` steps then (training strings are short)."""
        if answers is not None:
            check_answers(answers, x.shape[0], x.shape[1])
        if answers is None and x.shape[1] > PIECE:  # long inputs piece by piece, carrying state
            outputs = []
            for piece in x.split(PIECE, dim=1):
                output, state = self(piece, state)
                outputs.append(output)
            return torch.cat(outputs, dim=1), state
        if answers is not None and state is None and self.packs(x):
            return self.read_answers(x, answers)
        y = self.embedding(x)
        if state is None:
            state = [layer.mixer.initial_state(y) for layer in self.layers]
        last = []
        for layer, layer_state in zip(self.layers, state, strict=True):
            y, layer_state = layer(y, layer_state, answers)
            last.append(layer_state)
        if answers is not None:
            y = y[torch.arange(len(y), device=y.device), answers].unsqueeze(1)
        return y, last

    def packs(self, x: torch.Tensor) -> bool:
        """Whether strings read to their answers run packed: through the scan kernel."""
        d_state = self.layers[0].mixer.d_state
        return native.runs_on_cpu_float32(x) and scan_library(d_state) is not None

    def read_answers(
        self, x: torch.Tensor, answers: torch.Tensor
    ) -> tuple[torch.Tensor, list[LayerState]]:
        """``forward(x, answers=...)`` from the zero state, packed (``Packed``): every
        position-wise operation reads only the tokens up to each answer, and the last layer's
        only the answers."""
        packed = Packed.cut(answers, *x.shape[:2])
        y = self.embedding(x[packed.mask])
        last = []
        for i, layer in enumerate(self.layers):
            state = layer.mixer.initial_state(x)
            y, state = layer(y, state, packed=packed._replace(last_only=i == self.num_layers - 1))
            last.append(state)
        return y.unsqueeze(1), last
