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

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from parity_lab.models.deltanet_published import (
    DeltaNetPublished,
    delta_library,
    delta_rule_steps,
    mlp_size,
)
from parity_lab.models.mamba import Mamba
from parity_lab.models.xlstm_published import (
    FusedSLSTM,
    MLSTMPublished,
    SLSTMBlock,
    SLSTMPublished,
    mlstm_parallel,
    slstm_library,
)

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
    steps = DeltaNetPublished.eval_chunk_len + 9  # past one chunk: held to the whole string
    x, probe = torch.randn(2, 3, steps, size, generator=torch.Generator().manual_seed(1)).double()
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


@pytest.mark.parametrize("carried", [False, True])
def test_the_delta_rule_kernel_equals_the_pytorch_loops(carried: bool) -> None:
    """``kernels/delta_rule.c`` (float32) against DeltaRule's PyTorch loops (float64): outputs,
    last state and the gradients of q, k, v, beta and the initial state (zero, or carried from
    an earlier chunk), with a gradient flowing in through the last state too."""
    if delta_library(4) is None:
        pytest.skip("no C compiler")
    generator = torch.Generator().manual_seed(7)
    shape = (3, 2, 17, 4)
    q, v = (torch.randn(shape, generator=generator, dtype=torch.float64) for _ in range(2))
    k = F.normalize(torch.randn(shape, generator=generator, dtype=torch.float64), dim=-1)
    beta = 2 * torch.rand(shape[:3], generator=generator, dtype=torch.float64)
    state = torch.randn(3, 2, 4, 4, generator=generator, dtype=torch.float64) * carried
    probe_out = torch.randn(shape, generator=generator, dtype=torch.float64)
    probe_state = torch.randn(3, 2, 4, 4, generator=generator, dtype=torch.float64)
    results = []
    for dtype in (torch.float32, torch.float64):  # the kernel runs float32 only
        leaves = [t.to(dtype).requires_grad_() for t in (q, k, v, beta, state)]
        outputs, last = delta_rule_steps(*leaves)
        loss = (outputs * probe_out.to(dtype)).sum() + (last * probe_state.to(dtype)).sum()
        loss.backward()
        results.append([t.detach().double() for t in (outputs, last)] + [t.grad for t in leaves])
    for ours, ref in zip(*results, strict=True):
        torch.testing.assert_close(ours.double(), ref, rtol=1e-4, atol=1e-4)


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


# ---------------------------------------------------------------------------------------------
# xLSTM: the installed package itself (sLSTM ``vanilla`` backend, mLSTM's torch parallel form)

import xlstm  # noqa: E402  (a dev dependency: pip install -e .[dev])


def slstm_as_ours(tensors: dict[str, torch.Tensor], blocks: int) -> dict[str, torch.Tensor]:
    """Their sLSTM stack's tensors (parameters or gradients) under our names and layouts."""
    out = {"post_blocks_norm": tensors["post_blocks_norm.weight"]}
    for b in range(blocks):
        prefix = f"blocks.{b}."
        t = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        heads, gates_hd, hd = t["xlstm.slstm_cell._recurrent_kernel_"].shape
        ours = {
            "xlstm_norm": t["xlstm_norm.weight"],
            # their i gate reads the fgate projection and f the igate one: order i, f, z, o
            "weight_x": torch.stack([t[f"xlstm.{g}gate.weight"] for g in "fizo"]),
            "recurrent": t["xlstm.slstm_cell._recurrent_kernel_"]
            .view(heads, 4, hd, hd)
            .permute(1, 0, 2, 3),
            "bias": t["xlstm.slstm_cell._bias_"].view(4, heads, hd),
            "group_norm": t["xlstm.group_norm.weight"],
            "ffn_norm": t["ffn_norm.weight"],
            "ffn.proj_up.weight": t["ffn.proj_up.weight"],
            "ffn.proj_down.weight": t["ffn.proj_down.weight"],
        }
        if "xlstm.conv1d.conv.weight" in t:
            ours["conv_weight"] = t["xlstm.conv1d.conv.weight"][:, 0]
            ours["conv_bias"] = t["xlstm.conv1d.conv.bias"]
        out.update({f"layers.{b}.{k}": v for k, v in ours.items()})
    return out


def mlstm_as_ours(tensors: dict[str, torch.Tensor], blocks: int) -> dict[str, torch.Tensor]:
    """Their mLSTM stack's tensors under our names and layouts."""
    out = {"post_blocks_norm": tensors["post_blocks_norm.weight"]}
    for b in range(blocks):
        prefix = f"blocks.{b}."
        t = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        cell = "xlstm.mlstm_cell."
        ours = {
            "xlstm_norm": t["xlstm_norm.weight"],
            "proj_up.weight": t["xlstm.proj_up.weight"],
            "conv_weight": t["xlstm.conv1d.conv.weight"][:, 0],
            "conv_bias": t["xlstm.conv1d.conv.bias"],
            "qkv_weight": torch.stack([t[f"xlstm.{n}_proj.weight"] for n in "qkv"]),
            "gates.weight": torch.cat([t[cell + "igate.weight"], t[cell + "fgate.weight"]]),
            "gates.bias": torch.cat([t[cell + "igate.bias"], t[cell + "fgate.bias"]]),
            "outnorm": t[cell + "outnorm.weight"],
            "skip": t["xlstm.learnable_skip"],
            "proj_down.weight": t["xlstm.proj_down.weight"],
        }
        out.update({f"layers.{b}.{k}": v for k, v in ours.items()})
    return out


def their_stack(kind: str, size: int, blocks: int, heads: int, conv: int, steps: int) -> nn.Module:
    from xlstm import (
        mLSTMBlockConfig,
        mLSTMLayerConfig,
        sLSTMBlockConfig,
        sLSTMLayerConfig,
        xLSTMBlockStackConfig,
    )

    if kind == "slstm":
        layer = sLSTMLayerConfig(backend="vanilla", num_heads=heads, conv1d_kernel_size=conv)
        config = xLSTMBlockStackConfig(
            slstm_block=sLSTMBlockConfig(slstm=layer), slstm_at="all", num_blocks=blocks
        )
    else:
        layer = mLSTMLayerConfig(num_heads=heads, conv1d_kernel_size=conv)
        config = xLSTMBlockStackConfig(mlstm_block=mLSTMBlockConfig(mlstm=layer), num_blocks=blocks)
    config.embedding_dim, config.context_length = size, steps
    config.__post_init__()
    return xlstm.xLSTMBlockStack(config)


XLSTM_CASES = [  # kind, conv size: the single-layer runs' sLSTM has none, the paper's has 4
    ("slstm", 0),
    ("slstm", 4),
    ("mlstm", 4),
]


@pytest.mark.parametrize(("kind", "conv"), XLSTM_CASES)
def test_xlstm_blocks_equal_the_package_in_outputs_and_gradients(kind: str, conv: int) -> None:
    size, blocks, heads = 16, 2, 4
    steps = MLSTMPublished.eval_chunk_len + 9  # the mLSTM runs in chunks: held to the whole form
    torch.manual_seed(0)
    ref = their_stack(kind, size, blocks, heads, conv, steps).double()
    randomise(ref, 0)
    model = SLSTMPublished if kind == "slstm" else MLSTMPublished
    ours = model(size, size, blocks, num_heads=heads, conv_size=conv).double()
    as_ours = slstm_as_ours if kind == "slstm" else mlstm_as_ours
    mapped = as_ours(dict(ref.named_parameters()), blocks)
    assert set(mapped) == {name for name, _ in ours.named_parameters()}
    with torch.no_grad():
        for name, p in ours.named_parameters():
            p.copy_(mapped[name])
    x, probe = torch.randn(2, 3, steps, size, generator=torch.Generator().manual_seed(1)).double()
    x_ref, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ref = ref(x_ref)
    out_ours, _ = ours(x_ours)
    torch.testing.assert_close(out_ours, out_ref, rtol=1e-5, atol=1e-5)
    (out_ref * probe).sum().backward()
    (out_ours * probe).sum().backward()
    torch.testing.assert_close(x_ours.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    theirs = as_ours({n: p.grad for n, p in ref.named_parameters()}, blocks)
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, theirs[name], rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("fresh", [True, False])
def test_the_slstm_kernel_equals_the_pytorch_recurrence(fresh: bool) -> None:
    """``kernels/slstm.c`` against ``SLSTMBlock.recurrence`` in float64 (autograd's gradients,
    torch.maximum's and torch.minimum's half shares on ties included: on a fresh state's first
    step, and wherever the input gate sets the stabiliser, i = exp(0) = 1 ties with 1). Outputs,
    final state and the gradients of the gate inputs, R and the initial state."""
    if slstm_library(16) is None:
        pytest.skip("no C compiler")
    generator = torch.Generator().manual_seed(5)
    steps, batch, size = 23, 5, 16
    inputs = [
        2 * torch.randn(steps, batch, 4 * size, generator=generator),
        0.3 * torch.randn(size, 4 * size, generator=generator),
    ]
    if fresh:
        inputs += [torch.zeros(batch, size) for _ in range(4)]
    else:  # a carried state: y, c, n > 0, m
        y, c, n, m = torch.randn(4, batch, size, generator=generator)
        inputs += [y, c, n.abs() + 0.5, m]
    shapes = [(steps, batch, size)] + [(batch, size)] * 4  # the outputs and the final state
    probes = [torch.randn(shape, generator=generator, dtype=torch.float64) for shape in shapes]
    results = []
    for dtype in (torch.float32, torch.float64):  # the kernel runs float32 only
        leaves = [t.detach().to(dtype).requires_grad_() for t in inputs]
        if dtype == torch.float32:
            out = FusedSLSTM.apply(*leaves, fresh)
        else:
            outputs, state = SLSTMBlock.recurrence(leaves[0], leaves[1], tuple(leaves[2:]), fresh)
            out = (outputs, *state)
        sum((o * p.to(dtype)).sum() for o, p in zip(out, probes, strict=True)).backward()
        results.append(([o.double() for o in out], [t.grad.double() for t in leaves]))
    (out, grads), (out_ref, grads_ref) = results
    for ours, ref in zip(out + grads, out_ref + grads_ref, strict=True):
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_the_slstm_stack_runs_the_kernel_in_float32_and_streams_with_it() -> None:
    """The published sLSTM in float32 (the kernel) against float64 (the PyTorch loop), a whole
    string and in two chunks with the state carried: outputs and every parameter's gradient."""
    if slstm_library(16) is None:
        pytest.skip("no C compiler")
    torch.manual_seed(0)
    model = SLSTMPublished(2, 16, 2, num_heads=4, conv_size=4)
    randomise(model, 0)
    reference = copy.deepcopy(model).double()
    x = torch.randn(3, 29, 2, generator=torch.Generator().manual_seed(6))
    results = []
    for net in (model, reference):
        inputs = x.to(next(net.parameters()).dtype)
        whole, _ = net(inputs)
        first, state = net(inputs[:, :11])
        second, _ = net(inputs[:, 11:], state)
        torch.testing.assert_close(torch.cat([first, second], 1), whole, rtol=1e-5, atol=1e-5)
        net.zero_grad()
        (
            whole * torch.linspace(-1, 1, whole.numel()).view_as(whole).to(whole.dtype)
        ).sum().backward()
        results.append((whole.double(), {n: p.grad.double() for n, p in net.named_parameters()}))
    (out, grads), (out_ref, grads_ref) = results
    torch.testing.assert_close(out, out_ref, rtol=1e-4, atol=1e-4)
    for name, grad in grads_ref.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-3, atol=1e-4, msg=name)


@pytest.mark.parametrize(("kind", "conv"), XLSTM_CASES)
def test_xlstm_init_equals_the_package(kind: str, conv: int) -> None:
    """Every deterministic init value as the package sets it (norms, skip, R, gate biases) and
    every random one of its distribution (std or bound), with 2 blocks so that Wang's std and
    the block-dependent forget bias are both tested."""
    size, blocks, heads = 64, 2, 4
    torch.manual_seed(0)
    ref = their_stack(kind, size, blocks, heads, conv, 8)
    torch.manual_seed(0)
    model = SLSTMPublished if kind == "slstm" else MLSTMPublished
    ours = model(size, size, blocks, num_heads=heads, conv_size=conv)
    mapped = (slstm_as_ours if kind == "slstm" else mlstm_as_ours)(
        dict(ref.named_parameters()), blocks
    )
    random_normal = {"weight_x", "ffn.proj_up.weight", "ffn.proj_down.weight", "proj_up.weight"}
    random_normal |= {"qkv_weight", "proj_down.weight"}
    for name, p in ours.named_parameters():
        theirs, short = mapped[name].detach(), name.split(".", 2)[-1]
        assert p.shape == theirs.shape, name
        if short in random_normal:
            assert abs(p.std().item() / theirs.std().item() - 1) < 0.15, name
            assert abs(p.mean().item()) < 0.2 * theirs.std().item(), name
        elif short in ("conv_weight", "conv_bias"):
            assert abs(p.abs().max().item() / theirs.abs().max().item() - 1) < 0.1, name
        elif short == "gates.bias":  # the input gate's half is normal(0, 0.1)
            torch.testing.assert_close(p[heads:], theirs[heads:])
            assert p[:heads].abs().max() < 0.5 and theirs[:heads].abs().max() < 0.5
        else:
            torch.testing.assert_close(p, theirs, msg=name)


@pytest.mark.parametrize(("kind", "conv"), XLSTM_CASES)
def test_xlstm_streams_in_chunks_with_the_state_carried(kind: str, conv: int) -> None:
    torch.manual_seed(0)
    model = SLSTMPublished if kind == "slstm" else MLSTMPublished
    core = model(1, 16, 2, num_heads=4, conv_size=conv).double()  # chunks round differently
    randomise(core, 2)  # gates and recurrence away from their init, so the memory matters
    x = torch.randint(0, 2, (4, 37, 1), generator=torch.Generator().manual_seed(0)).double()
    whole, _ = core(x)
    first, state = core(x[:, :10])
    second, state = core(x[:, 10:11], state)  # one step: the conv cache spans chunks
    third, _ = core(x[:, 11:], state)
    torch.testing.assert_close(torch.cat([first, second, third], 1), whole, rtol=1e-4, atol=1e-5)


def test_the_single_block_slstm_yaml_cannot_be_built() -> None:
    """Their parity_xlstm01_single_layer.yaml: ``slstm_at: [0, 1]`` with one block (and an
    ``mlstm_block`` section, without which xlstm would put sLSTM blocks everywhere)."""
    from xlstm import (
        mLSTMBlockConfig,
        mLSTMLayerConfig,
        sLSTMBlockConfig,
        sLSTMLayerConfig,
        xLSTMBlockStackConfig,
    )

    layer = sLSTMLayerConfig(backend="vanilla", num_heads=4, conv1d_kernel_size=0)
    with pytest.raises(AssertionError, match="Invalid slstm position 1"):
        xLSTMBlockStackConfig(
            mlstm_block=mLSTMBlockConfig(mlstm=mLSTMLayerConfig(num_heads=4)),
            slstm_block=sLSTMBlockConfig(slstm=layer),
            num_blocks=1,
            embedding_dim=16,
            slstm_at=[0, 1],
        )


@pytest.mark.parametrize("model", ["deltanet_published", "xlstm_mlstm"])
def test_a_bad_conv_size_is_one_config_error(model: str) -> None:
    from parity_lab.config import ConfigError, validate
    from tests.conftest import compose_config

    message = r"model.conv_size=0 is invalid: expected an integer >= 1"
    with pytest.raises(ConfigError, match=message):
        validate(compose_config(f"model={model}", "model.conv_size=0"))


def test_the_slstm_takes_the_nx_ai_shape_its_yaml_names() -> None:
    """``conf/model/xlstm_slstm.yaml`` names NX-AI's parity shape as overrides; they compose,
    validate and build (conv 0, the single-layer runs', is allowed; a negative size is not)."""
    from hydra.utils import instantiate

    from parity_lab.config import ConfigError, validate
    from tests.conftest import compose_config

    shape = ["model.hidden_size=64", "model.num_layers=2", "model.num_heads=1"]
    cfg = compose_config("model=xlstm_slstm", *shape, "model.conv_size=4")
    validate(cfg)
    core = instantiate(cfg.model).rnn
    assert (core.hidden_size, core.num_layers, core.num_heads, core.conv_size) == (64, 2, 1, 4)
    validate(compose_config("model=xlstm_slstm"))  # conv_size 0
    with pytest.raises(
        ConfigError, match=r"model.conv_size=-1 is invalid: expected an integer >= 0"
    ):
        validate(compose_config("model=xlstm_slstm", "model.conv_size=-1"))


def test_the_mlstm_read_at_the_answer_is_that_row_of_the_parallel_form() -> None:
    """``mlstm_parallel`` with ``answers`` (training under the published loss) gives the full
    parallel form's ``h~`` at each string's answer, also from a carried memory, a stabiliser
    ``m_0`` and the first step, and leaves the state as it was."""
    g = torch.Generator().manual_seed(0)
    batch, heads, steps, d = 5, 2, 9, 4
    q, k, v = (torch.randn(batch, heads, steps, d, generator=g, dtype=torch.float64)
               for _ in range(3))  # fmt: skip
    i_raw, f_raw = (torch.randn(batch, heads, steps, generator=g, dtype=torch.float64)
                    for _ in range(2))  # fmt: skip
    for carried in (False, True):
        if carried:
            state = (torch.randn(batch, heads, d, d, generator=g, dtype=torch.float64),
                     torch.randn(batch, heads, d, generator=g, dtype=torch.float64),
                     torch.randn(batch, heads, generator=g, dtype=torch.float64))  # fmt: skip
        else:
            state = (torch.zeros(batch, heads, d, d, dtype=torch.float64),
                     torch.zeros(batch, heads, d, dtype=torch.float64),
                     torch.full((batch, heads), -float("inf"), dtype=torch.float64))  # fmt: skip
        h, _ = mlstm_parallel(q, k, v, i_raw, f_raw, state)
        answers = torch.tensor([0, 8, 3, 5, 3])
        rows = torch.arange(batch)
        expected = h[rows, :, answers].unsqueeze(2)  # (batch, heads, 1, d)
        actual, kept = mlstm_parallel(q, k, v, i_raw, f_raw, state, answers)
        assert kept is state
        torch.testing.assert_close(actual, expected, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # C kernel, PyTorch loops
def test_deltanet_read_at_the_answers_equals_the_full_forward(dtype: torch.dtype) -> None:
    """Training under the published loss packs the strings cut at their answers: the outputs
    there, every gradient and the state (the conv cache and ``S``, each string's at its answer)
    equal the full forward's, to float32 rounding. Two blocks, signed: the first block's output
    at every token of a string feeds the second, and the convolution runs across the strings'
    seams (a string of one step among them)."""
    model = DeltaNetPublished(1, 16, 2, eigenvalues="signed").to(dtype)
    randomise(model, 4)
    bits = torch.randint(0, 2, (5, 23, 1), generator=torch.Generator().manual_seed(4)).to(dtype)
    answers = torch.tensor([22, 0, 9, 3, 15])
    probe = torch.randn(5, 16, generator=torch.Generator().manual_seed(5)).to(dtype)
    results = []
    for packed in (False, True):
        x = bits.clone().requires_grad_()
        if packed:
            y, (cache, memory) = model(x, answers=answers)
            y = y[:, 0]
        else:
            y = model(x)[0][torch.arange(5), answers]
            pieces = [model(bits[r : r + 1, : a + 1])[1] for r, a in enumerate(answers.tolist())]
            cache, memory = (torch.cat(parts, dim=1) for parts in zip(*pieces, strict=True))
        model.zero_grad()
        (y * probe).sum().backward()
        results.append((y, cache, memory, x.grad, [p.grad.clone() for p in model.parameters()]))
    (*full, full_grads), (*packed, packed_grads) = results
    for ours, theirs in zip(packed + packed_grads, full + full_grads, strict=True):
        # float32: packed and full differ by rounding, measured up to 4e-5 of the largest
        # gradient (these random weights' gradients are ill-conditioned)
        scale = float(theirs.abs().max()) * (1e-4 if dtype == torch.float32 else 1e-10)
        torch.testing.assert_close(ours, theirs.detach(), atol=scale, rtol=0)


@pytest.mark.parametrize("core", [Mamba, DeltaNetPublished, MLSTMPublished])
@pytest.mark.parametrize("answers", [[3, -1], [3, 9], [3]])
def test_answers_out_of_range_are_one_line_errors(core: type, answers: list[int]) -> None:
    """An answer outside the string (or a count other than one per string) would pack a string
    to nothing or read another's; it is refused before any work."""
    model = core(1, 16, 1)
    x = torch.zeros(2, 9, 1)
    with pytest.raises(ValueError, match=r"^answers must be one position in 0\.\.8 per string"):
        model(x, answers=torch.tensor(answers))
