"""DeltaNet as Grazzi et al. (ICLR 2025, "Unlocking State-Tracking in Linear RNNs Through Negative
Eigenvalues") ran it for parity: the block of their flash-linear-attention fork, in plain torch.

One block (pre-norm residuals around a delta-rule mixer and a SwiGLU MLP), per layer ``l``:

    h      = RMSNorm(x)
    q, k, v = SiLU(ShortConv_4(W_q h)), SiLU(ShortConv_4(W_k h)), SiLU(ShortConv_4(W_v h))
    q, k   <- q / ||q||, k / ||k||              (per head; 4 heads of hidden_size / 4)
    beta_t = s * sigmoid(W_beta h_t)            (one per head; s = 1: [0,1], s = 2: [-1,1])
    S_t    = S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T,   o_t = S_t q_t / sqrt(d_head)
    x      = x + W_o RMSNorm_head(o)            (one RMSNorm of d_head values, shared by heads)
    x      = x + W_down (SiLU(W_g RMSNorm(x)) * W_u RMSNorm(x))
    output = RMSNorm(x)                         (after the last block)

``ShortConv_4`` is a causal depthwise convolution of kernel 4 without bias. The transition
``I - beta k k^T`` has eigenvalues 1 and ``1 - beta``: in [0, 1] for ``eigenvalues: positive``
(their ``sigmoid_scale: 1``) and in [-1, 1] for ``signed`` (``sigmoid_scale: 2``). Every RMSNorm
has eps 1e-6 and a weight; the l2 norm of q and k divides by ``sqrt(sum q^2 + 1e-6)``. The MLP's
inner size is theirs: ``2/3 * 4 * hidden_size`` rounded up to a multiple of 256 (256 for a
width up to 96). Initialisation as their model gets it: the mixer's projections Xavier-uniform
with gain ``2**-2.5`` (the layer's own init, which transformers' ``post_init`` then leaves
alone), the convolutions torch's default (uniform within ``1/sqrt(4)``), the MLP normal with std
0.02 and its down projection divided by ``sqrt(2 num_layers)``, norms at 1.

The recurrence runs step by step with a hand-written backward (``DeltaRule``). The chunked
parallel form (WY/UT, Yang et al., NeurIPS 2024) was slower here: at 40 steps and heads of 4
values, its T x T matrices per head cost more than the loop (68 against 56 ms per training step
at batch 256, before either was tuned). The state carried between chunks of a long string is,
per layer, the last 3 (normed) inputs of the convolution and ``S``; the convolution is folded
into its projection (one matmul over a window of 4 inputs). Training under a loss read at the
answer runs packed (``parity_lab.models.packing``): the position-wise work on the tokens up to
each answer, the last block's output at the answers alone.

Differences kept from their runs: float32 throughout (they trained under bfloat16 autocast);
the token embedding and the head belong to the wrapper; an input of another width than
``hidden_size`` (the bit itself) goes through a linear embedding first.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from parity_lab import EIGENVALUES
from parity_lab.models import native
from parity_lab.models.classifier import in_chunks
from parity_lab.models.packing import Packed

NORM_EPS = 1e-6  # their DeltaNetConfig.norm_eps, used by every RMSNorm of the model
L2_EPS = 1e-6  # their l2 norm of q and k

State = tuple[torch.Tensor, torch.Tensor]  # conv caches (L, B, K-1, D), S (L, B, H, dk, dv)


def mlp_size(hidden_size: int) -> int:
    """Their DeltaNetMLP's inner size: ``int(hidden_size * 4 * 2/3)`` rounded up to 256s."""
    inner = int(hidden_size * 4 * 2 / 3)
    return 256 * ((inner + 255) // 256)


def conv_projection(
    h: torch.Tensor, weight: torch.Tensor, conv: torch.Tensor, cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``ShortConv(h W^T)``: the causal depthwise convolution (kernel K, no bias) of a bias-free
    projection, ``y_t = sum_j conv[:, j] * (W h_{t-K+1+j})``, computed as one matmul of the
    window ``[h_{t-K+1}, ..., h_t]`` with the folded weight ``conv[c, j] W[c, :]``. ``cache``
    holds the K-1 inputs before ``h`` (zeros at the start, the convolution's zero padding);
    returns y (batch, time, channels) and the new cache."""
    batch, steps, size = h.shape
    kernel = conv.shape[1]
    full = torch.cat([cache, h], dim=1)
    window = full.unfold(1, kernel, 1).reshape(batch, steps, size * kernel)  # (..., size, K)
    return window @ fold(weight, conv).t(), full[:, full.shape[1] - (kernel - 1) :]


def fold(weight: torch.Tensor, conv: torch.Tensor) -> torch.Tensor:
    """The projection ``weight`` (channels, size) and the convolution ``conv`` (channels, K) as
    one (channels, size K) matrix for a window of K inputs: ``conv[c, j] W[c, :]``."""
    return (weight.unsqueeze(2) * conv.unsqueeze(1)).flatten(1)


def delta_library(d_k: int) -> Any:
    """The delta-rule kernel (``kernels/delta_rule.c``), or None (with a warning) without one."""
    head = (native.SIZE,) * 4
    return native.kernel(
        "delta_rule",
        d_k,
        "the delta rule",
        (
            ("delta_forward", head + (native.ADDRESS,) * 7, None),
            ("delta_backward", head + (native.ADDRESS,) * 12, None),
        ),
    )


def kernel_applies(*tensors: torch.Tensor) -> bool:
    return native.runs_on_cpu_float32(*tensors) and delta_library(tensors[0].shape[1]) is not None


class DeltaRule(torch.autograd.Function):
    """The delta-rule recurrence, one step at a time, with a hand-written backward.

    Inputs time-major with the batch last, where small vectors vectorise best: ``q``, ``k``
    (time, d_k, n) (``q`` already scaled), ``v`` (time, d_v, n), ``beta`` (time, 1, n), ``S_0``
    (d_k, d_v, n), n = batch x heads. Forward, per step: ``e_t = v_t - S_{t-1}^T k_t``,
    ``S_t = S_{t-1} + k_t (beta_t e_t)^T``; then ``o_t = S_t^T q_t`` for all steps at once.
    Backward runs the adjoint recurrence on ``G_t = dL/dS_t``: ``G_t = G_{t+1} - k_{t+1}
    dv_{t+1}^T + q_t do_t^T``, ``dw_t = G_t^T k_t``, ``dv_t = beta_t dw_t``, ``dk_t = G_t w_t -
    S_{t-1} dv_t`` (``w_t = beta_t e_t``), ``dbeta_t = dw_t . e_t``, ``dq_t = S_t do_t``.

    On a CPU in float32 both directions run in ``kernels/delta_rule.c``, one call each; the
    PyTorch loops here are its reference (float64, a GPU, no C compiler). In PyTorch: four
    elementwise operations per step each way; autograd through the loop records about three
    times as many, and batched 4x4 matmuls cost 5-10 times an elementwise pass.
    """

    @staticmethod
    def forward(ctx, q, k, v, beta, state):  # type: ignore[override]
        if kernel_applies(q, k, v, beta, state):
            q, k, v, beta = (t.contiguous() for t in (q, k, v, beta))
            steps, size_k, n = k.shape
            all_states = state.new_empty(steps + 1, *state.shape)
            all_states[0] = state
            errors, outputs = v.new_empty(v.shape), v.new_empty(v.shape)
            delta_library(size_k).delta_forward(
                steps, size_k, v.shape[1], n,
                *map(native.pointer, (q, k, v, beta, all_states, errors, outputs)),
            )  # fmt: skip
            ctx.save_for_backward(q, k, beta, all_states, errors)
            return outputs, all_states[steps].clone()
        states, errors = [state], []
        for k_t, v_t, beta_t in zip(k, v, beta, strict=True):
            error = v_t - (state * k_t.unsqueeze(1)).sum(0)
            state = torch.addcmul(state, k_t.unsqueeze(1), (beta_t * error).unsqueeze(0))
            states.append(state)
            errors.append(error)
        all_states = torch.stack(states)  # (time + 1, d_k, d_v, n)
        ctx.save_for_backward(q, k, beta, all_states, torch.stack(errors))
        return (all_states[1:] * q.unsqueeze(2)).sum(1), state

    @staticmethod
    def backward(ctx, d_outputs, d_state):  # type: ignore[override]
        q, k, beta, all_states, error = ctx.saved_tensors
        if kernel_applies(q, k, beta, all_states, error):
            steps, size_k, n = k.shape
            size_v = error.shape[1]
            grad = torch.zeros_like(all_states[0]) if d_state is None else d_state.clone()
            grad = grad.contiguous()
            d_outputs = torch.zeros_like(error) if d_outputs is None else d_outputs.contiguous()
            d_q, d_k = torch.empty_like(q), torch.empty_like(k)
            d_v, d_beta = torch.empty_like(error), torch.empty_like(beta)
            scratch = error.new_empty(size_v, n)
            delta_library(size_k).delta_backward(
                steps, size_k, size_v, n,
                *map(native.pointer, (q, k, beta, all_states, error, d_outputs, grad, d_q, d_k,
                                      d_v, d_beta, scratch)),
            )  # fmt: skip
            return d_q, d_k, d_v, d_beta, grad
        d_q = (all_states[1:] * d_outputs.unsqueeze(1)).sum(2)
        from_outputs = q.unsqueeze(2) * d_outputs.unsqueeze(1)  # q_t do_t^T
        grad = torch.zeros_like(all_states[0]) if d_state is None else d_state
        grads, d_writes = [], []
        for t in range(q.shape[0] - 1, -1, -1):
            grad = grad + from_outputs[t]
            grads.append(grad)
            d_write = (grad * k[t].unsqueeze(1)).sum(0)  # G^T k
            d_writes.append(d_write)
            d_v_t = (beta[t] * d_write).unsqueeze(0)
            grad = torch.addcmul(grad, k[t].unsqueeze(1), d_v_t, value=-1)
        d_write = torch.stack(d_writes[::-1])
        d_v = beta * d_write
        d_k = (torch.stack(grads[::-1]) * (beta * error).unsqueeze(1)).sum(2) - (
            all_states[:-1] * d_v.unsqueeze(1)
        ).sum(2)
        return d_q, d_k, d_v, (d_write * error).sum(1, keepdim=True), grad


def delta_rule_steps(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, state: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs ``o_t = S_t^T q_t / sqrt(d_k)`` and the last ``S``, through ``DeltaRule``.

    ``q``, ``k``: (batch, heads, time, d_k), unit norm; ``v``: (batch, heads, time, d_v);
    ``beta``: (batch, heads, time); ``state``: ``S_0``, (batch, heads, d_k, d_v).
    """
    batch, heads, steps, d_k = q.shape

    def feature_major(x: torch.Tensor) -> torch.Tensor:  # (batch, heads, time, d) -> (time, d, n)
        return x.permute(2, 3, 0, 1).reshape(steps, x.shape[-1], batch * heads)

    outputs, state = DeltaRule.apply(
        feature_major(q * d_k**-0.5),
        feature_major(k),
        feature_major(v),
        feature_major(beta.unsqueeze(-1)),
        state.permute(2, 3, 0, 1).reshape(d_k, -1, batch * heads),
    )
    outputs = outputs.view(steps, -1, batch, heads).permute(2, 3, 0, 1)
    return outputs, state.view(d_k, -1, batch, heads).permute(2, 3, 0, 1)


class DeltaNetBlock(nn.Module):
    """One published DeltaNet block: ``x, (cache, S) -> x', (cache', S')`` (module doc)."""

    def __init__(
        self, size: int, num_heads: int, conv_size: int, scale: float, num_layers: int
    ) -> None:
        super().__init__()
        self.size, self.num_heads, self.scale = size, num_heads, scale
        self.head_dim = size // num_heads
        inner = mlp_size(size)
        self.attn_norm = nn.Parameter(torch.ones(size))
        self.qkv = nn.Linear(size, 3 * size, bias=False)  # their q_proj, k_proj, v_proj
        self.conv = nn.Parameter(torch.empty(3 * size, conv_size))  # q, k, v short convs
        self.b_proj = nn.Linear(size, num_heads, bias=False)
        self.o_norm = nn.Parameter(torch.ones(self.head_dim))
        self.o_proj = nn.Linear(size, size, bias=False)
        self.mlp_norm = nn.Parameter(torch.ones(size))
        self.gate_proj = nn.Linear(size, 2 * inner, bias=False)  # SiLU gate, then up
        self.down_proj = nn.Linear(inner, size, bias=False)
        with torch.no_grad():
            gain = 2**-2.5
            for part in self.qkv.weight.chunk(3):
                nn.init.xavier_uniform_(part, gain=gain)
            nn.init.xavier_uniform_(self.b_proj.weight, gain=gain)
            nn.init.xavier_uniform_(self.o_proj.weight, gain=gain)
            bound = 1 / math.sqrt(conv_size)
            nn.init.uniform_(self.conv, -bound, bound)
            nn.init.normal_(self.gate_proj.weight, std=0.02)
            nn.init.normal_(self.down_proj.weight, std=0.02 / math.sqrt(2 * num_layers))

    def mix(
        self, x: torch.Tensor, cache: torch.Tensor, memory: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The residual stream after the delta-rule mixer, the new conv cache and ``S``."""
        batch, steps, _ = x.shape
        h = F.rms_norm(x, (self.size,), self.attn_norm, NORM_EPS)
        qkv, cache = conv_projection(h, self.qkv.weight, self.conv, cache)
        heads = F.silu(qkv).view(batch, steps, 3, self.num_heads, self.head_dim)
        q, k, v = heads.permute(2, 0, 3, 1, 4).unbind(0)  # each (batch, heads, time, d)
        q = q * torch.rsqrt((q * q).sum(-1, keepdim=True) + L2_EPS)
        k = k * torch.rsqrt((k * k).sum(-1, keepdim=True) + L2_EPS)
        beta = self.scale * torch.sigmoid(self.b_proj(h)).transpose(1, 2)
        o, memory = delta_rule_steps(q, k, v, beta, memory)
        o = F.rms_norm(o.transpose(1, 2), (self.head_dim,), self.o_norm, NORM_EPS)
        return x + self.o_proj(o.reshape(batch, steps, self.size)), cache, memory

    def mix_packed(
        self, x: torch.Tensor, packed: Packed
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``mix`` of packed strings ``x`` (tokens, size) from the zero state: the same
        operations on the tokens alone. Only the delta rule runs on the padded (time, d, batch x
        heads) layout (the padding's k and beta are 0: it leaves ``S`` as it is). With
        ``last_only`` the output is each string's at its answer alone, (batch, size)."""
        batch, steps = len(packed.last), packed.longest
        h = F.rms_norm(x, (self.size,), self.attn_norm, NORM_EPS)
        # the convolution folded into the projection, as conv_projection does it
        qkv = (
            packed.windows(h, self.conv.shape[1]).flatten(1) @ fold(self.qkv.weight, self.conv).t()
        )
        q, k, v = F.silu(qkv).view(-1, 3, self.num_heads, self.head_dim).unbind(1)
        q = q * torch.rsqrt((q * q).sum(-1, keepdim=True) + L2_EPS) * self.head_dim**-0.5
        k = k * torch.rsqrt((k * k).sum(-1, keepdim=True) + L2_EPS)
        beta = self.scale * torch.sigmoid(self.b_proj(h)).unsqueeze(-1)  # (tokens, heads, 1)

        def padded(t: torch.Tensor) -> torch.Tensor:  # (tokens, heads, d) -> (time, d, n)
            out = t.new_zeros(steps, t.shape[-1], batch, self.num_heads)
            out[packed.position, :, packed.row] = t.transpose(1, 2)
            return out.view(steps, t.shape[-1], batch * self.num_heads)

        memory = x.new_zeros(self.head_dim, self.head_dim, batch * self.num_heads)
        o, memory = DeltaRule.apply(padded(q), padded(k), padded(v), padded(beta), memory)
        o = o.view(steps, self.head_dim, batch, self.num_heads)
        if packed.last_only:
            rows = torch.arange(batch, device=x.device)
            o, x = o[packed.position[packed.last], :, rows], x[packed.last]
        else:
            o = o[packed.position, :, packed.row]
        o = F.rms_norm(o.transpose(1, 2), (self.head_dim,), self.o_norm, NORM_EPS)
        memory = memory.view(self.head_dim, self.head_dim, batch, self.num_heads).permute(
            2, 3, 0, 1
        )
        cache = packed.tail(h, self.conv.shape[1] - 1)
        return x + self.o_proj(o.reshape(len(o), self.size)), cache, memory

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        """The residual stream after the SwiGLU MLP (position by position)."""
        gate, up = self.gate_proj(F.rms_norm(x, (self.size,), self.mlp_norm, NORM_EPS)).chunk(2, -1)
        return x + self.down_proj(F.silu(gate) * up)


class DeltaNetPublished(nn.Module):
    """Stacked published DeltaNet blocks and the final RMSNorm, with torch's RNN signature.

    ``forward(x, state) -> (outputs, state)``: outputs ``(batch, time, hidden_size)``; state the
    conv caches ``(num_layers, batch, conv_size - 1, 3 hidden_size)`` and the memories ``S``
    ``(num_layers, batch, num_heads, d_head, d_head)``.
    """

    reads_answers = True  # forward(x, answers=...): outputs at one position per string
    # Every position of a longer input runs in chunks of this many, the state carried between
    # (the same values, bit for bit: every operation is per position or a step of the delta
    # rule). It keeps the MLP's (strings, time, 512) activations small: the 8,192-string pool
    # of lengths 39..255 validates in 8.5 -> 4 s of CPU. ``parity_lab.evaluate`` uses it too.
    eval_chunk_len = 32

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        batch_first: bool = True,
        eigenvalues: str = "positive",
        num_heads: int = 4,
        conv_size: int = 4,
    ) -> None:
        super().__init__()
        if not batch_first:
            raise ValueError("DeltaNetPublished is batch_first only")
        if eigenvalues not in EIGENVALUES:
            raise ValueError(
                f"model.eigenvalues={eigenvalues!r} is invalid: allowed values are {EIGENVALUES}"
            )
        if num_heads < 1 or hidden_size % num_heads:
            raise ValueError(
                f"model.num_heads={num_heads} is invalid: expected a divisor of "
                f"model.hidden_size={hidden_size}"
            )
        if conv_size < 1:
            raise ValueError(f"model.conv_size={conv_size} is invalid: expected an integer >= 1")
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.eigenvalues, self.num_heads, self.conv_size = eigenvalues, num_heads, conv_size
        # a bit (or any input narrower than the model) enters through a linear embedding
        self.embed = nn.Linear(input_size, hidden_size) if input_size != hidden_size else None
        scale = 2.0 if eigenvalues == "signed" else 1.0
        self.layers = nn.ModuleList(
            DeltaNetBlock(hidden_size, num_heads, conv_size, scale, num_layers)
            for _ in range(num_layers)
        )
        self.norm = nn.Parameter(torch.ones(hidden_size))

    def initial_state(self, x: torch.Tensor) -> State:
        layers, batch, size = self.num_layers, x.shape[0], self.hidden_size
        d = size // self.num_heads
        return (
            x.new_zeros(layers, batch, self.conv_size - 1, size),
            x.new_zeros(layers, batch, self.num_heads, d, d),
        )

    def forward(
        self, x: torch.Tensor, state: State | None = None, answers: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, State]:
        """``answers`` (one position per string, for training under a loss read there): the
        outputs at those positions only, ``(batch, 1, hidden_size)``; the last block's MLP and
        the final norm, which work position by position, then run on those positions alone.
        From the zero state the strings run packed (``read_answers``)."""
        if answers is not None and state is None:
            return self.read_answers(x, answers)
        if answers is None and x.shape[1] > self.eval_chunk_len:
            return in_chunks(self, x, state, self.eval_chunk_len)
        if self.embed is not None:
            x = self.embed(x)
        caches, memories = self.initial_state(x) if state is None else state
        new_caches, new_memories = [], []
        for i, (layer, cache, memory) in enumerate(zip(self.layers, caches, memories, strict=True)):
            x, cache, memory = layer.mix(x, cache, memory)
            if answers is not None and i == self.num_layers - 1:
                x = x[torch.arange(len(x), device=x.device), answers].unsqueeze(1)
            x = layer.mlp(x)
            new_caches.append(cache)
            new_memories.append(memory)
        outputs = F.rms_norm(x, (self.hidden_size,), self.norm, NORM_EPS)
        return outputs, (torch.stack(new_caches), torch.stack(new_memories))

    def read_answers(self, x: torch.Tensor, answers: torch.Tensor) -> tuple[torch.Tensor, State]:
        """``forward(x, answers=...)`` from the zero state, packed (``Packed``): each string cut
        at its answer, the position-wise work on its tokens alone, the last block's output,
        MLP and norm at the answers alone. The state returned is each string's at its answer."""
        packed = Packed.cut(answers, *x.shape[:2])
        x = x[packed.mask]
        if self.embed is not None:
            x = self.embed(x)
        caches, memories = [], []
        for i, layer in enumerate(self.layers):
            x, cache, memory = layer.mix_packed(
                x, packed._replace(last_only=i == self.num_layers - 1)
            )
            x = layer.mlp(x)
            caches.append(cache)
            memories.append(memory)
        outputs = F.rms_norm(x, (self.hidden_size,), self.norm, NORM_EPS).unsqueeze(1)
        return outputs, (torch.stack(caches), torch.stack(memories))
