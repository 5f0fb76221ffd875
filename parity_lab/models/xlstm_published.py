"""The xLSTM blocks as published (Beck et al., NeurIPS 2024, "xLSTM: Extended Long Short-Term
Memory"; code: NX-AI/xlstm 2.0.6): xLSTM[0:1] (sLSTM blocks only, ``SLSTMPublished``) and
xLSTM[1:0] (mLSTM blocks only, ``MLSTMPublished``), in plain torch.

Every LayerNorm here is xLSTM's: no bias, a weight stored as ``1 + w`` with ``w = 0`` at the
start, eps 1e-5; the stack ends with one (``post_blocks_norm``).

**sLSTM block**, per block ``x <- x + sLSTM(LN(x))``, ``x <- x + FFN(LN(x))``. With ``conv_size``
K > 0, ``x_c = SiLU(CausalConv_K(x))`` (depthwise, with bias) feeds the input and forget gates,
``x`` itself the cell input and output gates (K = 0: ``x_c = x``). The cell, per head
(block-diagonal input and recurrent matrices, no mixing across heads), with gate pre-activations
``i~, f~ = W_{i,f} x_c,t + R_{i,f} y_{t-1} + b`` and ``z~, o~ = W_{z,o} x_t + R_{z,o} y_{t-1} + b``:

    m_t = max(log sigmoid(f~) + m_{t-1}, i~)       (m_t = i~ on a fresh state, every n = 0)
    i_t = min(exp(i~ - m_t), 1),   f_t = min(exp(log sigmoid(f~) + m_{t-1} - m_t), 1)
    c_t = f_t c_{t-1} + i_t tanh(z~),   n_t = f_t n_{t-1} + i_t,   y_t = sigmoid(o~) c_t / n_t

and the layer's output is a per-head LayerNorm of ``y``. ``W`` are bias-free. FFN: ``W_down
(GELU(W_gate x) * W_up x)``, inner size ``1.3 D`` rounded up to 64. Init as published: ``W`` and
the FFN's up projection normal with std ``sqrt(2 / (5 D))`` ("small init"), ``W_down`` std
``2 / (num_blocks sqrt(D))`` ("Wang"), ``R = 0``, biases 0 except the forget gate's,
``-(-5 + 12 (j / (d - 1))^(0.3 + 1.3 r))`` over a head's units j (5 down to -7; r = block index /
(num_blocks - 1), 0 for one block), the convolution torch's default.

**mLSTM block**, per block ``x <- x + mLSTM(LN(x))``, no FFN. The layer projects up to ``2 D``
(rounded up to 64) twice, ``x_m`` and ``z``; ``x_c = SiLU(CausalConv_4(x_m))`` (depthwise, with
bias); ``q, k = W_q x_c, W_k x_c`` and ``v = W_v x_m`` (block-diagonal, blocks of 4); the input
and forget gates of each head are linear (with bias) in ``[q, k, v]``. The memory of a head of
``d`` values, ``C_t = f_t C_{t-1} + i_t k_t v_t^T / sqrt(d)``, ``n_t = f_t n_{t-1} + i_t k_t /
sqrt(d)``, ``h~_t = C_t^T q_t / max(|n_t . q_t|, 1)``, with ``f_t = sigmoid(f~_t)`` and
``i_t = exp(i~_t)``, runs in the paper's parallel (stabilised) form:

    log D_ts = sum_{s<r<=t} log sigmoid(f~_r) + i~_s   (s <= t),   m_t = max_s log D_ts
    h~_t = sum_s (q_t . k_s / sqrt(d)) e^{log D_ts - m_t} v_s
           / (max(|sum_s (q_t . k_s / sqrt(d)) e^{log D_ts - m_t}|, e^{-m_t}) + 1e-6)

Then a per-head LayerNorm, the learnable skip ``+ s * x_c``, the output gate ``* SiLU(z)`` and
the down projection. Init as published: up projection and ``W_q, W_k, W_v`` small init (of
``D``), down projection Wang, skip 1, the gates' weights 0, the forget gate's bias
linspace(3, 6) over heads, the input gate's normal with std 0.1, the convolution torch's
default.

Streaming: the sLSTM carries ``(y, c, n, m)`` and the conv's last K-1 inputs per block. The
mLSTM carries ``(C, n, m)`` (stabilised: the true memory is ``e^m C``) and the conv's last 3
inputs; a chunk's parallel form takes the carried memory as one more term of weight
``e^{F_t + m_0}`` (``F_t`` the chunk's summed log forget gates), so chunks reproduce the whole
string's parallel form. A fresh state has ``m_0 = -inf`` (no term), the parallel form's own
stabiliser (the package's step function starts from ``m_0 = 0``). Any ``m`` gives the same
``h~`` but for the 1e-6 eps, and so does the sLSTM's: a stabiliser only keeps ``exp`` in range.

Training under a loss read at the answer computes the last block's output at the answers alone
(both stacks ``reads_answers``); the mLSTM also runs packed (``parity_lab.models.packing``: its
position-wise work on the tokens up to each answer), the sLSTM, whose kernel runs the batch in
lock step, does not.

Differences kept from the published runs: float32 (they trained under bfloat16 autocast); no
dropout (theirs is 0); the embedding and head belong to the wrapper, and an input narrower than
the model (a bit) enters through a linear embedding. The sLSTM checks ``n = 0`` (a fresh state)
once per chunk, not at every step as the package does: after one step ``n > 0``, since ``i_t``
or ``f_t`` is 1.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from parity_lab.models import native
from parity_lab.models.classifier import in_chunks
from parity_lab.models.packing import Packed

LN_EPS = 1e-5  # xLSTM's LayerNorm and MultiHeadLayerNorm
MLSTM_EPS = 1e-6  # added to the mLSTM's normaliser

SLSTMState = tuple[torch.Tensor, ...]  # y, c, n, m (L, B, D) and the conv cache (L, B, K-1, D)
MLSTMState = tuple[torch.Tensor, ...]  # C (L, B, H, d, d), n (L, B, H, d), m (L, B, H), cache


def up_size(factor: float, size: int, multiple: int = 64) -> int:
    """xLSTM's projection sizes: ``factor * size`` rounded up to a multiple of 64."""
    return multiple * math.ceil(factor * size / multiple)


def layer_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """xLSTM's LayerNorm: weight ``1 + w``, no bias."""
    return F.layer_norm(x, (x.shape[-1],), 1 + weight, None, LN_EPS)


def head_norm(x: torch.Tensor, weight: torch.Tensor, heads: int) -> torch.Tensor:
    """xLSTM's MultiHeadLayerNorm of ``x`` (..., heads * d): a LayerNorm per head, weight 1 + w."""
    shape = x.shape
    return F.group_norm(x.reshape(-1, shape[-1]), heads, 1 + weight, None, LN_EPS).view(shape)


def headwise(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """xLSTM's LinearHeadwiseExpand without bias: ``x`` (..., heads * d_in) by ``weight`` (heads,
    d_out, d_in), each head on its own."""
    # One dense matmul by the block-diagonal matrix: the zero blocks add exact zeros, and at
    # 16 heads of 4 x 4 it is faster than the per-head einsum (16 tiny batched matmuls and
    # their permuting copies; docs/performance.md).
    return x @ torch.block_diag(*weight).T


def causal_conv(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal depthwise convolution ``y_t = b + sum_j w[:, j] x_{t-K+1+j}`` of ``x`` (batch, time,
    channels), ``cache`` the K-1 inputs before it (zeros: the zero padding). Returns y and the new
    cache."""
    kernel, steps = weight.shape[1], x.shape[1]
    full = torch.cat([cache, x], dim=1)
    # K shifted multiply-adds: forward and backward of (batch, 40, 64) at K = 4 take 22 ms, 2.7x
    # less than a sum over ``full.unfold`` (58 ms, same machine and load) or 1.5x less than
    # grouped ``F.conv1d`` (32 ms).
    y = bias + full[:, :steps] * weight[:, 0]
    for j in range(1, kernel):
        y = y + full[:, j : j + steps] * weight[:, j]
    return y, full[:, full.shape[1] - (kernel - 1) :]


def small_init_(weight: torch.Tensor, size: int) -> None:
    nn.init.normal_(weight, std=math.sqrt(2 / (5 * size)))


def wang_init_(weight: torch.Tensor, size: int, num_blocks: int) -> None:
    nn.init.normal_(weight, std=2 / num_blocks / math.sqrt(size))


def conv_init_(weight: torch.Tensor, bias: torch.Tensor) -> None:
    """torch's default for a depthwise ``nn.Conv1d``: uniform within ``1 / sqrt(K)``."""
    bound = 1 / math.sqrt(weight.shape[1])
    nn.init.uniform_(weight, -bound, bound)
    nn.init.uniform_(bias, -bound, bound)


def forget_bias(head_dim: int, block: int, num_blocks: int) -> torch.Tensor:
    """The sLSTM's ``powerlaw_blockdependent`` forget-gate bias of one head: 5 down to -7."""
    ratio = block / (num_blocks - 1) if num_blocks > 1 else 0.0
    return -(-5.0 + 12.0 * (torch.arange(head_dim) / (head_dim - 1)) ** (0.3 + 1.3 * ratio))


def check(batch_first: bool, hidden_size: int, num_heads: int, conv_size: int, name: str) -> None:
    if not batch_first:
        raise ValueError(f"{name} is batch_first only")
    if num_heads < 1 or hidden_size % num_heads:
        raise ValueError(
            f"model.num_heads={num_heads} is invalid: expected a divisor of "
            f"model.hidden_size={hidden_size}"
        )
    if conv_size < 0:
        raise ValueError(f"model.conv_size={conv_size} is invalid: expected an integer >= 0")


class FeedForward(nn.Module):
    """xLSTM's gated feed-forward: ``W_down (GELU(W_gate x) * W_up x)``, bias-free."""

    def __init__(self, size: int, num_blocks: int) -> None:
        super().__init__()
        self.inner = up_size(1.3, size)
        self.proj_up = nn.Linear(size, 2 * self.inner, bias=False)
        self.proj_down = nn.Linear(self.inner, size, bias=False)
        with torch.no_grad():
            small_init_(self.proj_up.weight, size)
            wang_init_(self.proj_down.weight, size, num_blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.proj_up(x).split(self.inner, dim=-1)
        return self.proj_down(F.gelu(gate) * up)


def slstm_library(size: int) -> Any:
    """The sLSTM recurrence kernel (``kernels/slstm.c``) for blocks of ``size``, or None."""
    return native.kernel(
        "slstm",
        size,
        "the sLSTM's recurrence",
        (
            ("slstm_forward", (native.SIZE, native.SIZE, native.INT) + (native.ADDRESS,) * 7, None),
            (
                "slstm_backward",
                (native.SIZE, native.SIZE, native.INT) + (native.ADDRESS,) * 12,
                None,
            ),
        ),
    )


class FusedSLSTM(torch.autograd.Function):
    """``apply(gates_x, r_t, y, c, n, m, fresh) -> (outputs, y, c, n, m)``: every step of the
    sLSTM cell through ``kernels/slstm.c``, the same arithmetic as ``SLSTMBlock.recurrence``,
    gradients included. ``gates_x`` (T,B,4D), ``r_t`` (D,4D), the state (B,D) each; ``outputs``
    (T,B,D) and the final state."""

    @staticmethod
    def forward(ctx: Any, gates_x, r_t, y0, c0, n0, m0, fresh):  # type: ignore[override]
        steps, batch, gates = gates_x.shape
        size = gates // 4
        gates_x, r_t = gates_x.contiguous(), r_t.contiguous()
        y, c, n, m = (gates_x.new_empty(steps + 1, batch, size) for _ in range(4))
        y[0], c[0], n[0], m[0] = y0, c0, n0, m0
        raw = gates_x.new_empty(steps, batch, gates)
        slstm_library(size).slstm_forward(
            steps, batch, int(fresh), *map(native.pointer, (gates_x, r_t, y, c, n, m, raw))
        )
        ctx.save_for_backward(r_t, y, c, n, m, raw)
        ctx.fresh = fresh
        return y[1:], y[steps].clone(), c[steps].clone(), n[steps].clone(), m[steps].clone()

    @staticmethod
    def backward(ctx: Any, d_out, d_y, d_c, d_n, d_m):  # type: ignore[override]
        r_t, y, c, n, m, raw = ctx.saved_tensors
        steps, batch, gates = raw.shape
        d_out = torch.zeros_like(y[1:]) if d_out is None else d_out.contiguous()
        d_state = [
            torch.zeros_like(y[0]) if d is None else d.contiguous().clone()
            for d in (d_y, d_c, d_n, d_m)
        ]
        d_raw = torch.empty_like(raw)
        slstm_library(gates // 4).slstm_backward(
            steps, batch, int(ctx.fresh),
            *map(native.pointer, (r_t, c, n, m, y, raw, d_out, d_raw, *d_state)),
        )  # fmt: skip
        d_r_t = y[:-1].flatten(0, 1).t().mm(d_raw.flatten(0, 1))
        return d_raw, d_r_t, *d_state, None


class SLSTMBlock(nn.Module):
    """One published sLSTM block: ``x, (y, c, n, m, cache) -> x', state'`` (module doc)."""

    def __init__(
        self, size: int, num_heads: int, conv_size: int, block: int, num_blocks: int
    ) -> None:
        super().__init__()
        self.size, self.num_heads, self.conv_size = size, num_heads, conv_size
        head_dim = size // num_heads
        self.xlstm_norm = nn.Parameter(torch.zeros(size))
        if conv_size:
            self.conv_weight = nn.Parameter(torch.empty(size, conv_size))
            self.conv_bias = nn.Parameter(torch.empty(size))
        # gates i, f, z, o: head-wise input weights, head-wise recurrent weights, biases
        self.weight_x = nn.Parameter(torch.empty(4, num_heads, head_dim, head_dim))
        self.recurrent = nn.Parameter(torch.zeros(4, num_heads, head_dim, head_dim))
        self.bias = nn.Parameter(torch.zeros(4, num_heads, head_dim))
        self.group_norm = nn.Parameter(torch.zeros(size))
        self.ffn_norm = nn.Parameter(torch.zeros(size))
        self.ffn = FeedForward(size, num_blocks)
        with torch.no_grad():
            small_init_(self.weight_x, size)
            self.bias[1] = forget_bias(head_dim, block, num_blocks)
            if conv_size:
                conv_init_(self.conv_weight, self.conv_bias)

    def gate_inputs(
        self, x: torch.Tensor, cache: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``W_g x_t + b_g`` of all steps, time-major ``(time, batch, 4 size)``, gates outer; and
        the new conv cache."""
        if self.conv_size:
            x_conv, cache = causal_conv(x, self.conv_weight, self.conv_bias, cache)
            x_conv = F.silu(x_conv)
        else:
            x_conv = x

        # the head-wise weights as block-diagonal matrices: one dense matmul each, the bias
        # added in it (the zero blocks add exact zeros), where head-wise einsums, their
        # permuting copies and a concatenation cost 20% of a training step
        weight, bias, half = self.block_diagonal(self.weight_x), self.bias.flatten(), 2 * self.size
        x, x_conv = x.transpose(0, 1), x_conv.transpose(0, 1)
        if not self.conv_size:
            return F.linear(x, weight, bias), cache
        # i and f read the convolution, z and o the input
        if_gates = F.linear(x_conv, weight[:half], bias[:half])
        return torch.cat([if_gates, F.linear(x, weight[half:], bias[half:])], -1), cache

    def block_diagonal(self, weight: torch.Tensor) -> torch.Tensor:
        """Head-wise gate weights ``(4, heads, d, d)`` as one block-diagonal ``(4 size, size)``
        matrix, rows in the order gate, head, output."""
        eye = torch.eye(self.num_heads, dtype=weight.dtype, device=weight.device)
        return torch.einsum("ghoi,hk->ghoki", weight, eye).reshape(4 * self.size, self.size)

    def recurrent_matrix(self) -> torch.Tensor:
        """``R`` as one block-diagonal ``(4 size, size)`` matrix: one matmul per step."""
        return self.block_diagonal(self.recurrent)

    def forward(
        self, x: torch.Tensor, state: SLSTMState, answers: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, SLSTMState]:
        """With ``answers`` (one position per string): the output at those positions only,
        (batch, 1, size); the recurrence still runs every step (its final state is returned),
        the norm, residual and feed-forward after it only at the answers."""
        y, c, n, m, cache = state
        gates_x, cache = self.gate_inputs(layer_norm(x, self.xlstm_norm), cache)
        recurrent = self.recurrent_matrix().t()
        fresh = bool(torch.all(n == 0))
        if native.runs_on_cpu_float32(gates_x, recurrent) and slstm_library(self.size):
            outputs, y, c, n, m = FusedSLSTM.apply(gates_x, recurrent, y, c, n, m, fresh)
        else:
            outputs, (y, c, n, m) = self.recurrence(gates_x, recurrent, (y, c, n, m), fresh)
        if answers is not None:
            rows = torch.arange(len(answers), device=x.device)
            x, outputs = x[rows, answers].unsqueeze(1), outputs[answers, rows].unsqueeze(0)
        x = x + head_norm(outputs.transpose(0, 1), self.group_norm, self.num_heads)
        return x + self.ffn(layer_norm(x, self.ffn_norm)), (y, c, n, m, cache)

    @staticmethod
    def recurrence(
        gates_x: torch.Tensor,
        recurrent: torch.Tensor,
        state: tuple[torch.Tensor, ...],
        fresh: bool,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """The cell's steps in PyTorch (the reference of ``kernels/slstm.c``): ``gates_x``
        (T,B,4D), ``recurrent`` ``R^T`` (D,4D), ``state`` ``(y, c, n, m)``; returns the outputs
        (T,B,D) and the final state."""
        y, c, n, m = state
        outputs = []
        for gates_t in gates_x:
            raw = torch.addmm(gates_t, y, recurrent)
            i_raw, f_raw, z_raw, o_raw = raw.chunk(4, dim=1)
            log_f_plus_m = m + F.logsigmoid(f_raw)
            m_new = i_raw if fresh else torch.maximum(i_raw, log_f_plus_m)
            fresh = False
            ones = torch.ones_like(i_raw)
            i = torch.minimum(torch.exp(i_raw - m_new), ones)
            f = torch.minimum(torch.exp(log_f_plus_m - m_new), ones)
            c = f * c + i * torch.tanh(z_raw)
            n = f * n + i
            y = torch.sigmoid(o_raw) * c / n
            m = m_new
            outputs.append(y)
        return torch.stack(outputs), (y, c, n, m)


def mlstm_parallel(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    i_raw: torch.Tensor,
    f_raw: torch.Tensor,
    state: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    answers: torch.Tensor | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The mLSTM's stabilised parallel form over one chunk, from a carried memory (module doc).

    ``q, k, v``: (batch, heads, time, d); ``i_raw, f_raw``: (batch, heads, time); ``state``:
    ``C`` (batch, heads, d, d) (keys by values), ``n`` (batch, heads, d), ``m`` (batch, heads).
    Returns ``h~`` (batch, heads, time, d) and the memory after the chunk. With ``answers`` (one
    position per string, training under a loss read there) only the row ``t = answers`` of the
    (time x time) matrices is computed: ``h~`` there, (batch, heads, 1, d), and ``state`` as given.
    """
    memory, normaliser, m_0 = state
    steps = q.shape[2]
    forget = torch.cumsum(F.logsigmoid(f_raw), dim=-1)  # F_t, (B, H, T)
    if answers is None:
        causal = torch.ones(steps, steps, dtype=torch.bool, device=q.device).tril()
        forget_t = forget.unsqueeze(-1)  # (B, H, t, 1)
    else:  # one row t per string
        causal = torch.arange(steps, device=q.device) <= answers.view(-1, 1, 1, 1)
        at = answers.view(-1, 1, 1, 1)
        q = q.gather(2, at.expand(-1, q.shape[1], 1, q.shape[-1]))  # (B, H, 1, d)
        forget_t = forget.gather(-1, at[..., 0].expand(-1, forget.shape[1], 1)).unsqueeze(-1)
    log_d = forget_t - forget.unsqueeze(-2) + i_raw.unsqueeze(-2)  # (B, H, t, s)
    log_d = torch.where(causal, log_d, -math.inf)
    log_carried = forget_t.squeeze(-1) + m_0.unsqueeze(-1)  # the carried memory's weight
    m = torch.maximum(log_d.amax(-1), log_carried)
    decay = torch.exp(log_d - m.unsqueeze(-1))
    carried = torch.exp(log_carried - m).unsqueeze(-1)  # (B, H, t, 1)
    if answers is None:
        k = k / math.sqrt(k.shape[-1])
        weights = (q @ k.transpose(-2, -1)) * decay
    else:  # the same product, scaled on the one row of q rather than on every row of k
        weights = ((q / math.sqrt(k.shape[-1])) @ k.transpose(-2, -1)) * decay
    total = weights.sum(-1, keepdim=True) + carried * (q @ normaliser.unsqueeze(-1))
    scale = torch.maximum(total.abs(), torch.exp(-m).unsqueeze(-1)) + MLSTM_EPS
    h = (weights @ v + carried * (q @ memory)) / scale
    if answers is not None:
        return h, state
    last, last_carried = decay[:, :, -1].unsqueeze(-1), carried[:, :, -1]  # (B, H, s, 1)
    memory = last_carried.unsqueeze(-1) * memory + (k * last).transpose(-2, -1) @ v
    normaliser = last_carried * normaliser + (k * last).sum(-2)
    return h, (memory, normaliser, m[:, :, -1])


class MLSTMBlock(nn.Module):
    """One published mLSTM block: ``x, (C, n, m, cache) -> x', state'`` (module doc)."""

    def __init__(
        self, size: int, num_heads: int, conv_size: int, num_blocks: int, qkv_block: int = 4
    ) -> None:
        super().__init__()
        self.size, self.num_heads = size, num_heads
        self.inner = inner = up_size(2.0, size)
        if inner % num_heads:
            raise ValueError(
                f"model.num_heads={num_heads} is invalid: expected a divisor of the mLSTM's "
                f"inner size {inner} (2 hidden_size rounded up to 64)"
            )
        self.xlstm_norm = nn.Parameter(torch.zeros(size))
        self.proj_up = nn.Linear(size, 2 * inner, bias=False)
        self.conv_weight = nn.Parameter(torch.empty(inner, conv_size))
        self.conv_bias = nn.Parameter(torch.empty(inner))
        self.qkv_weight = nn.Parameter(torch.empty(3, inner // qkv_block, qkv_block, qkv_block))
        self.gates = nn.Linear(3 * inner, 2 * num_heads)  # input gate, then forget gate
        self.outnorm = nn.Parameter(torch.zeros(inner))
        self.skip = nn.Parameter(torch.ones(inner))
        self.proj_down = nn.Linear(inner, size, bias=False)
        with torch.no_grad():
            small_init_(self.proj_up.weight, size)
            small_init_(self.qkv_weight, size)
            wang_init_(self.proj_down.weight, size, num_blocks)
            conv_init_(self.conv_weight, self.conv_bias)
            self.gates.weight.zero_()
            nn.init.normal_(self.gates.bias[:num_heads], std=0.1)
            self.gates.bias[num_heads:] = torch.linspace(3.0, 6.0, num_heads)

    def forward(
        self, x: torch.Tensor, state: MLSTMState, answers: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, MLSTMState]:
        """With ``answers`` (one position per string): the output at those positions only,
        (batch, 1, size), and the state passed in unchanged (``XLSTMStack.forward``)."""
        memory, normaliser, m, cache = state
        batch, steps, _ = x.shape
        x_m, z = self.proj_up(layer_norm(x, self.xlstm_norm)).split(self.inner, dim=-1)
        x_conv, cache = causal_conv(x_m, self.conv_weight, self.conv_bias, cache)
        x_conv = F.silu(x_conv)
        q, k, v, gates = self.heads_and_gates(x_conv, x_m)
        i_raw, f_raw = gates.transpose(1, 2).chunk(2, dim=1)

        def heads(y: torch.Tensor) -> torch.Tensor:  # (B, T, H d) -> (B, H, T, d)
            return y.view(batch, steps, self.num_heads, -1).transpose(1, 2)

        if answers is not None:
            rows = torch.arange(batch, device=x.device)

            def at(y: torch.Tensor) -> torch.Tensor:  # (B, T, ...) -> (B, 1, ...)
                return y[rows, answers].unsqueeze(1)

            h, _ = mlstm_parallel(heads(q), heads(k), heads(v), i_raw, f_raw,
                                  (memory, normaliser, m), answers)  # fmt: skip
            return self.output(
                h.transpose(1, 2).reshape(batch, 1, -1), at(x), at(x_conv), at(z)
            ), state

        h, (memory, normaliser, m) = mlstm_parallel(
            heads(q), heads(k), heads(v), i_raw, f_raw, (memory, normaliser, m)
        )
        h = h.transpose(1, 2).reshape(batch, steps, -1)
        return self.output(h, x, x_conv, z), (memory, normaliser, m, cache)

    def heads_and_gates(
        self, x_conv: torch.Tensor, x_m: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """q and k (head-wise from the convolution), v (head-wise from the input), and the
        gates' pre-activations from the three."""
        q, k = headwise(x_conv, self.qkv_weight[0]), headwise(x_conv, self.qkv_weight[1])
        v = headwise(x_m, self.qkv_weight[2])
        return q, k, v, self.gates(torch.cat([q, k, v], -1))

    def output(
        self, h: torch.Tensor, x: torch.Tensor, x_conv: torch.Tensor, z: torch.Tensor
    ) -> torch.Tensor:
        """The residual stream after the block, from the cell's ``h~`` (..., inner)."""
        h = head_norm(h, self.outnorm, self.num_heads)
        return x + self.proj_down((h + self.skip * x_conv) * F.silu(z))

    def forward_packed(
        self, x: torch.Tensor, state: MLSTMState, packed: Packed
    ) -> tuple[torch.Tensor, MLSTMState]:
        """``forward`` of packed strings ``x`` (tokens, size) from the zero state: the position-wise
        work on the tokens alone, the parallel form on the padded (batch, heads, time, d) layout
        (the padding comes after each string's tokens: nothing causal reads it). With
        ``last_only``, the output at each string's answer alone, (batch, size), and ``state`` as
        given; otherwise every token's and the memory after the padded strings."""
        batch, steps = len(packed.last), packed.longest
        x_m, z = self.proj_up(layer_norm(x, self.xlstm_norm)).split(self.inner, dim=-1)
        x_conv = F.silu(packed.convolve(x_m, self.conv_weight, self.conv_bias))
        q, k, v, gates = self.heads_and_gates(x_conv, x_m)

        def padded(y: torch.Tensor) -> torch.Tensor:  # (tokens, C) -> (batch, time, C)
            out = y.new_zeros(batch, steps, y.shape[-1])
            out[packed.mask[:, :steps]] = y
            return out

        def heads(y: torch.Tensor) -> torch.Tensor:  # (tokens, H d) -> (B, H, T, d)
            return padded(y).view(batch, steps, self.num_heads, -1).transpose(1, 2)

        i_raw, f_raw = padded(gates).transpose(1, 2).chunk(2, dim=1)
        memory, normaliser, m, cache = state
        if packed.last_only:
            answers = packed.position[packed.last]
            h, _ = mlstm_parallel(heads(q), heads(k), heads(v), i_raw, f_raw,
                                  (memory, normaliser, m), answers)  # fmt: skip
            last = packed.last
            return self.output(
                h.transpose(1, 2).reshape(batch, -1), x[last], x_conv[last], z[last]
            ), state
        h, (memory, normaliser, m) = mlstm_parallel(
            heads(q), heads(k), heads(v), i_raw, f_raw, (memory, normaliser, m)
        )
        h = h.transpose(1, 2).reshape(batch, steps, -1)[packed.mask[:, :steps]]
        cache = packed.tail(x_m, cache.shape[1])
        return self.output(h, x, x_conv, z), (memory, normaliser, m, cache)


class XLSTMStack(nn.Module):
    """Stacked published xLSTM blocks and the final LayerNorm, with torch's RNN signature:
    ``forward(x, state) -> (outputs (batch, time, hidden_size), state)``, the state one tensor
    per kind stacked over blocks (``initial_state``)."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int) -> None:
        super().__init__()
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.embed = nn.Linear(input_size, hidden_size) if input_size != hidden_size else None
        self.post_blocks_norm = nn.Parameter(torch.zeros(hidden_size))
        self.layers = nn.ModuleList()

    def initial_state(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def forward(
        self,
        x: torch.Tensor,
        state: tuple[torch.Tensor, ...] | None = None,
        answers: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """``answers`` (where the stack ``reads_answers``): the outputs at one position per
        string, (batch, 1, hidden_size), the last block computing only those; the state
        returned is then not for carrying on (training reads none): the mLSTM's last block
        returns its input state and, packed, its blocks before the last their memory after the
        padded strings; the sLSTM's blocks their state after every step of the batch."""
        if self.embed is not None:
            x = self.embed(x)
        if state is None:
            state = self.initial_state(x)
        last = []
        for i, (layer, *layer_state) in enumerate(zip(self.layers, *state, strict=True)):
            if answers is not None and i == self.num_layers - 1:
                x, new_state = layer(x, tuple(layer_state), answers=answers)
            else:
                x, new_state = layer(x, tuple(layer_state))
            last.append(new_state)
        outputs = layer_norm(x, self.post_blocks_norm)
        return outputs, tuple(torch.stack(s) for s in zip(*last, strict=True))


class SLSTMPublished(XLSTMStack):
    """xLSTM[0:1]: published sLSTM blocks. State ``(y, c, n, m)``, each ``(num_layers, batch,
    hidden_size)``, and the conv caches ``(num_layers, batch, conv_size - 1, hidden_size)``."""

    reads_answers = True  # forward(x, answers=...): see XLSTMStack.forward

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        batch_first: bool = True,
        num_heads: int = 4,
        conv_size: int = 0,
    ) -> None:
        check(batch_first, hidden_size, num_heads, conv_size, type(self).__name__)
        super().__init__(input_size, hidden_size, num_layers)
        self.num_heads, self.conv_size = num_heads, conv_size
        self.layers.extend(
            SLSTMBlock(hidden_size, num_heads, conv_size, block, num_layers)
            for block in range(num_layers)
        )

    def initial_state(self, x: torch.Tensor) -> SLSTMState:
        zeros = x.new_zeros(self.num_layers, x.shape[0], self.hidden_size)
        layers, batch, conv = self.num_layers, x.shape[0], max(self.conv_size - 1, 0)
        cache = x.new_zeros(layers, batch, conv, zeros.shape[-1])
        return zeros, zeros, zeros, zeros, cache


class MLSTMPublished(XLSTMStack):
    """xLSTM[1:0]: published mLSTM blocks. State ``C (num_layers, batch, heads, d, d)``, ``n
    (num_layers, batch, heads, d)``, ``m (num_layers, batch, heads)`` and the conv caches
    ``(num_layers, batch, conv_size - 1, inner)``; d = inner / heads, inner = 2 hidden_size
    rounded up to 64."""

    reads_answers = True  # forward(x, answers=...): see XLSTMStack.forward
    # The parallel form's (time x time) matrices grow as the square of a chunk: longer inputs
    # run in chunks of this many positions, the memory carried between (module doc), which
    # changes nothing but rounding. Validating 256 strings of 255 bits: 4.5 s whole, 0.7 s in
    # chunks of 32, 1.1 s in chunks of 64 (one thread). ``parity_lab.evaluate`` uses it too.
    eval_chunk_len = 32

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        batch_first: bool = True,
        num_heads: int = 4,
        conv_size: int = 4,
    ) -> None:
        check(batch_first, hidden_size, num_heads, conv_size, type(self).__name__)
        if conv_size < 1:
            raise ValueError(f"model.conv_size={conv_size} is invalid: the mLSTM needs >= 1")
        super().__init__(input_size, hidden_size, num_layers)
        self.num_heads, self.conv_size = num_heads, conv_size
        self.layers.extend(
            MLSTMBlock(hidden_size, num_heads, conv_size, num_layers) for _ in range(num_layers)
        )

    def forward(
        self,
        x: torch.Tensor,
        state: tuple[torch.Tensor, ...] | None = None,
        answers: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """``XLSTMStack.forward``; every position of an input longer than ``eval_chunk_len`` is
        computed chunk by chunk (the answer-only path reads one row and needs no chunks)."""
        if answers is not None and state is None:
            return self.read_answers(x, answers)
        if answers is not None or x.shape[1] <= self.eval_chunk_len:
            return super().forward(x, state, answers)
        return in_chunks(super().forward, x, state, self.eval_chunk_len)

    def read_answers(
        self, x: torch.Tensor, answers: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """``forward(x, answers=...)`` from the zero state, packed (``Packed``): each string cut
        at its answer, the position-wise work on its tokens alone, the last block's output at
        the answers alone."""
        packed = Packed.cut(answers, *x.shape[:2])
        state = self.initial_state(x)
        x = x[packed.mask]
        if self.embed is not None:
            x = self.embed(x)
        last = []
        for i, (layer, *layer_state) in enumerate(zip(self.layers, *state, strict=True)):
            only = packed._replace(last_only=i == self.num_layers - 1)
            x, new_state = layer.forward_packed(x, tuple(layer_state), only)
            last.append(new_state)
        outputs = layer_norm(x, self.post_blocks_norm).unsqueeze(1)
        return outputs, tuple(torch.stack(s) for s in zip(*last, strict=True))

    def initial_state(self, x: torch.Tensor) -> MLSTMState:
        layers, batch, heads = self.num_layers, x.shape[0], self.num_heads
        inner = self.layers[0].inner
        d = inner // heads
        return (
            x.new_zeros(layers, batch, heads, d, d),
            x.new_zeros(layers, batch, heads, d),
            x.new_full((layers, batch, heads), -math.inf),
            x.new_zeros(layers, batch, self.conv_size - 1, inner),
        )
