"""The published blocks against the official code: outputs and gradients with equal weights.

Compared in float64 (to 1e-5 and tighter), so that a difference is a formula, not rounding.

DeltaNet: the authors' model (Grazzi et al.'s flash-linear-attention fork: ``DeltaNetBlock``,
``DeltaNet`` layer with ``ShortConvolution``, ``DeltaNetMLP``, final ``RMSNorm``) rewritten here
in plain torch, its recurrence as their ``delta_rule_recurrence`` loop (``naive_compatible.py``),
with their parameter layout (separate q/k/v projections, ``nn.Conv1d`` weights). xLSTM: the
installed ``xlstm`` package itself (2.0.6: the ``vanilla`` sLSTM backend, the mLSTM's parallel
torch backend).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from parity_lab.models.deltanet_published import DeltaNetPublished, delta_rule_steps, mlp_size

torch.set_default_dtype(torch.float32)


# ---------------------------------------------------------------------------------------------
# DeltaNet: the authors' reference, in their layout


def reference_delta_rule(q, k, v, beta):  # their delta_rule_recurrence, initial state 0
    b, h, steps, d_k = q.shape
    state = torch.zeros(b, h, d_k, v.shape[-1], dtype=v.dtype)
    q = q * d_k**-0.5
    outputs = torch.zeros_like(v)
    for i in range(steps):
        k_i, v_i = k[:, :, i], v[:, :, i]
        v_i = (v_i - (state * k_i[..., None]).sum(-2)) * beta[:, :, i][..., None]
        state = state + k_i.unsqueeze(-1) * v_i.unsqueeze(-2)
        outputs = outputs.clone()
        outputs[:, :, i] = torch.einsum("bhd,bhdm->bhm", q[:, :, i], state)
    return outputs


class ReferenceDeltaNet(nn.Module):
    """Their DeltaNetModel minus the embedding: blocks and the final norm (attn_mode any:
    the Triton kernels compute the same recurrence as the naive loop)."""

    def __init__(self, size: int, layers: int, heads: int, scale: float) -> None:
        super().__init__()
        self.size, self.heads, self.scale = size, heads, scale
        inner = mlp_size(size)
        self.blocks = nn.ModuleList()
        for _ in range(layers):
            block = nn.Module()
            block.attn_norm = nn.RMSNorm(size, eps=1e-6)
            block.q_proj, block.k_proj, block.v_proj = (
                nn.Linear(size, size, bias=False) for _ in range(3)
            )
            block.b_proj = nn.Linear(size, heads, bias=False)
            block.q_conv1d, block.k_conv1d, block.v_conv1d = (
                nn.Conv1d(size, size, 4, groups=size, bias=False, padding=3) for _ in range(3)
            )
            block.o_norm = nn.RMSNorm(size // heads, eps=1e-6)
            block.o_proj = nn.Linear(size, size, bias=False)
            block.mlp_norm = nn.RMSNorm(size, eps=1e-6)
            block.gate_proj = nn.Linear(size, 2 * inner, bias=False)
            block.down_proj = nn.Linear(inner, size, bias=False)
            self.blocks.append(block)
        self.norm = nn.RMSNorm(size, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, steps, _ = x.shape
        for blk in self.blocks:
            h = blk.attn_norm(x)

            def conv(conv1d: nn.Conv1d, y: torch.Tensor) -> torch.Tensor:
                return F.silu(conv1d(y.transpose(1, 2))[..., :steps].transpose(1, 2))

            q = conv(blk.q_conv1d, blk.q_proj(h))
            k = conv(blk.k_conv1d, blk.k_proj(h))
            v = conv(blk.v_conv1d, blk.v_proj(h))
            q, k, v = (y.view(batch, steps, self.heads, -1).transpose(1, 2) for y in (q, k, v))
            q = q / torch.sqrt((q * q).sum(-1, keepdim=True) + 1e-6)  # fla's l2_norm_fn
            k = k / torch.sqrt((k * k).sum(-1, keepdim=True) + 1e-6)
            beta = self.scale * blk.b_proj(h).transpose(1, 2).sigmoid()
            o = reference_delta_rule(q, k, v, beta).transpose(1, 2)
            o = blk.o_proj(blk.o_norm(o).reshape(batch, steps, self.size))
            x = x + o
            gate, up = blk.gate_proj(blk.mlp_norm(x)).chunk(2, -1)
            x = x + blk.down_proj(F.silu(gate) * up)
        return self.norm(x)


def copy_into(ours: DeltaNetPublished, ref: ReferenceDeltaNet) -> None:
    """Our parameters from theirs: the fused qkv projection and conv are their three, stacked."""
    with torch.no_grad():
        for mine, blk in zip(ours.layers, ref.blocks, strict=True):
            mine.attn_norm.copy_(blk.attn_norm.weight)
            projections = (blk.q_proj, blk.k_proj, blk.v_proj)
            mine.qkv.weight.copy_(torch.cat([p.weight for p in projections]))
            convs = (blk.q_conv1d, blk.k_conv1d, blk.v_conv1d)
            mine.conv.copy_(torch.cat([c.weight[:, 0] for c in convs]))
            mine.b_proj.weight.copy_(blk.b_proj.weight)
            mine.o_norm.copy_(blk.o_norm.weight)
            mine.o_proj.weight.copy_(blk.o_proj.weight)
            mine.mlp_norm.copy_(blk.mlp_norm.weight)
            mine.gate_proj.weight.copy_(blk.gate_proj.weight)
            mine.down_proj.weight.copy_(blk.down_proj.weight)
        ours.norm.copy_(ref.norm.weight)


def randomise(module: nn.Module, seed: int) -> None:
    """Random weights everywhere (norm weights too), so no parameter is left untested."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            noise = torch.randn(p.shape, generator=generator, dtype=torch.float64)
            p.copy_(noise * 0.5 + (p.dim() == 1))


@pytest.mark.parametrize(("eigenvalues", "scale"), [("positive", 1.0), ("signed", 2.0)])
def test_deltanet_equals_the_authors_model_in_outputs_and_gradients(
    eigenvalues: str, scale: float
) -> None:
    size, layers = 16, 2
    ref = ReferenceDeltaNet(size, layers, 4, scale).double()
    randomise(ref, 0)
    ours = DeltaNetPublished(size, size, layers, eigenvalues=eigenvalues).double()
    copy_into(ours, ref)
    x, probe = torch.randn(2, 3, 23, size, generator=torch.Generator().manual_seed(1)).double()
    x_ref, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ref = ref(x_ref)
    out_ours, _ = ours(x_ours)
    torch.testing.assert_close(out_ours, out_ref, rtol=1e-5, atol=1e-5)
    (out_ref * probe).sum().backward()
    (out_ours * probe).sum().backward()
    torch.testing.assert_close(x_ours.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    grads = {name: p.grad for name, p in ours.named_parameters()}
    for i, blk in enumerate(ref.blocks):
        qkv = torch.cat([blk.q_proj.weight.grad, blk.k_proj.weight.grad, blk.v_proj.weight.grad])
        conv = torch.cat([c.weight.grad[:, 0] for c in (blk.q_conv1d, blk.k_conv1d, blk.v_conv1d)])
        pairs = {
            "qkv.weight": qkv,
            "conv": conv,
            "b_proj.weight": blk.b_proj.weight.grad,
            "o_proj.weight": blk.o_proj.weight.grad,
            "o_norm": blk.o_norm.weight.grad,
            "attn_norm": blk.attn_norm.weight.grad,
            "mlp_norm": blk.mlp_norm.weight.grad,
            "gate_proj.weight": blk.gate_proj.weight.grad,
            "down_proj.weight": blk.down_proj.weight.grad,
        }
        for name, theirs in pairs.items():
            torch.testing.assert_close(grads[f"layers.{i}.{name}"], theirs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads["norm"], ref.norm.weight.grad, rtol=1e-5, atol=1e-5)


def test_deltanet_streams_in_chunks_with_the_state_carried() -> None:
    model = DeltaNetPublished(1, 16, 2, eigenvalues="signed")
    x = torch.randint(0, 2, (4, 37, 1), generator=torch.Generator().manual_seed(0)).float()
    whole, _ = model(x)
    first, state = model(x[:, :10])
    second, state = model(x[:, 10:11], state)  # one step: the conv cache spans chunks
    third, _ = model(x[:, 11:], state)
    torch.testing.assert_close(torch.cat([first, second, third], 1), whole, rtol=1e-5, atol=1e-6)


def test_delta_rule_backward_equals_autograd_through_the_reference_loop() -> None:
    generator = torch.Generator().manual_seed(3)
    shape = (2, 3, 9, 4)
    q, v = (torch.randn(shape, generator=generator, dtype=torch.float64) for _ in range(2))
    k = F.normalize(torch.randn(shape, generator=generator, dtype=torch.float64), dim=-1)
    beta = 2 * torch.rand(shape[:3], generator=generator, dtype=torch.float64)
    inputs = [t.requires_grad_() for t in (q, k, v, beta)]
    state0 = torch.zeros(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    ours, last = delta_rule_steps(*inputs, state0)
    theirs = reference_delta_rule(*inputs)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    torch.autograd.gradcheck(
        lambda *a: delta_rule_steps(*a), (*inputs, state0.detach().requires_grad_()), atol=1e-8
    )


def test_deltanet_init_is_the_published_one() -> None:
    """Unit q/k, beta in (0,1) or (0,2), norms at 1, their init scales and MLP size."""
    torch.manual_seed(0)
    model = DeltaNetPublished(16, 16, 1, eigenvalues="signed")
    layer = model.layers[0]
    assert mlp_size(16) == 256 and mlp_size(128) == 512  # 2/3 * 4 * 128 = 341 -> 512
    assert layer.gate_proj.weight.shape == (512, 16) and layer.down_proj.weight.shape == (16, 256)
    xavier = 2**-2.5 * (6 / 32) ** 0.5  # gain * sqrt(6 / (fan_in + fan_out)), 16 x 16
    for part in layer.qkv.weight.chunk(3):
        assert part.abs().max() <= xavier and part.abs().max() > 0.9 * xavier
    assert layer.conv.abs().max() <= 0.5 and layer.conv.abs().max() > 0.45
    assert abs(layer.gate_proj.weight.std().item() - 0.02) < 0.002
    assert abs(layer.down_proj.weight.std().item() - 0.02 / 2**0.5) < 0.002
    for norm in (layer.attn_norm, layer.o_norm, layer.mlp_norm, model.norm):
        assert torch.equal(norm, torch.ones_like(norm))
    captured = {}
    original = delta_rule_steps.__globals__["delta_rule_steps"]

    def spy(q, k, v, beta, state):
        captured.update(q=q, k=k, beta=beta)
        return original(q, k, v, beta, state)

    delta_rule_steps.__globals__["delta_rule_steps"] = spy
    try:
        model(torch.randn(5, 7, 16))
    finally:
        delta_rule_steps.__globals__["delta_rule_steps"] = original
    for name in ("q", "k"):  # x / sqrt(|x|^2 + 1e-6): 1 unless |x| is near 1e-3
        norms = captured[name].norm(dim=-1)
        assert norms.max() <= 1 + 1e-6 and norms.median() > 0.999
    assert captured["beta"].min() > 0 and captured["beta"].max() < 2
    assert captured["beta"].max() > 1  # signed: beta = 2 sigmoid(.) reaches past 1
