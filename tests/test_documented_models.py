"""The models are the documented ones: each docstring's initial values and projections, checked
from the parameters and the written equations, never through the model's own forward.

A wrong initialisation or a swapped projection still trains, and still passes every test that
builds its reference from the model's own pieces; it would then be misattributed in any
comparison with the papers these models come from.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from parity_lab.models import (
    MLSTM,
    SLSTM,
    CausalTransformer,
    DeltaNet,
    LinearRNN,
    Mamba,
    ManualGRU,
    ManualLSTM,
    ManualRNN,
)
from parity_lab.models.transformer import sinusoidal_codes


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return x @ weight.T + bias


def share_below(values: torch.Tensor, bound: float) -> float:
    return (values < bound).double().mean().item()


# --- the linear RNN (Mamba-style transitions) -------------------------------------------------


def test_linear_rnn_starts_with_mambas_a_and_dt() -> None:
    """``A_log = log(1..H)``, and dt's bias the inverse softplus of steps log-uniform in
    [1e-3, 1e-1]: half of them below 1e-2, the geometric middle (uniform steps: a twentieth)."""
    torch.manual_seed(0)
    core = LinearRNN(1, 512, num_layers=2)
    for layer in core.layers:
        expected = torch.arange(1, 513, dtype=torch.float).log()
        torch.testing.assert_close(layer.A_log.detach(), expected)
        dt = F.softplus(layer.in_proj.bias.detach()[:512])
        assert dt.min() >= 1e-3 * (1 - 1e-4) and dt.max() <= 1e-1 * (1 + 1e-4)
        assert 0.42 < share_below(dt, 1e-2) < 0.58
        assert share_below(dt, 10**-2.5) > 0.15 and share_below(dt, 10**-1.5) < 0.85


def linear_rnn_by_hand(core: LinearRNN, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The module doc, step by step: ``in_proj`` gives dt, b and the gate (in that order);
    ``a = exp(-softplus(dt) exp(A_log))``, ``2 a - 1`` when signed; ``h_t = a_t h_{t-1} + b_t``;
    the output ``out_proj(h * silu(gate))``, plus the input from the second layer on."""
    size, last = core.hidden_size, []
    for index, layer in enumerate(core.layers):
        weight, bias = layer.in_proj.weight, layer.in_proj.bias
        dt, b, gate = (
            linear(x, weight[k * size : (k + 1) * size], bias[k * size : (k + 1) * size])
            for k in range(3)
        )
        a = torch.exp(-F.softplus(dt) * torch.exp(layer.A_log))
        if core.eigenvalues == "signed":
            a = 2 * a - 1
        h, states = torch.zeros_like(b[:, 0]), []
        for t in range(x.shape[1]):
            h = a[:, t] * h + b[:, t]
            states.append(h)
        y = linear(
            torch.stack(states, 1) * F.silu(gate), layer.out_proj.weight, layer.out_proj.bias
        )
        x = y + x if index > 0 else y
        last.append(h)
    return x, torch.stack(last)


def randomise(module: torch.nn.Module, seed: int, scale: float = 0.5) -> None:
    """Every parameter moved off its initial value, so that no part of an equation vanishes."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            noise = torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype)
            parameter.add_(scale * noise)


@pytest.mark.parametrize("eigenvalues", ["positive", "signed"])
def test_linear_rnn_computes_its_documented_layers(eigenvalues: str) -> None:
    torch.manual_seed(0)
    core = LinearRNN(2, 3, num_layers=2, eigenvalues=eigenvalues).double()
    randomise(core, 1)
    x = torch.randn(4, 11, 2, dtype=torch.float64)
    expected, expected_state = linear_rnn_by_hand(core, x)
    outputs, state = core(x)
    torch.testing.assert_close(outputs, expected)
    torch.testing.assert_close(state, expected_state)


# --- DeltaNet ----------------------------------------------------------------------------------


def deltanet_by_hand(core: DeltaNet, x: torch.Tensor) -> torch.Tensor:
    """The module doc: ``in_proj`` gives q, k, v, the gate and beta (in that order); q and k
    divided by their length; ``beta = sigmoid`` (twice it when signed); ``S_t = S_{t-1} (I -
    beta k k^T) + beta v k^T``, ``o_t = S_t q_t``; the output ``out_proj(o * silu(gate))``, plus
    the input from the second layer on."""
    size = core.hidden_size
    eye = torch.eye(size, dtype=x.dtype)
    for index, layer in enumerate(core.layers):
        projected = linear(x, layer.in_proj.weight, layer.in_proj.bias)
        q, k, v, gate = (projected[..., j * size : (j + 1) * size] for j in range(4))
        q, k = q / q.norm(dim=-1, keepdim=True), k / k.norm(dim=-1, keepdim=True)
        beta = torch.sigmoid(projected[..., 4 * size])
        beta = 2 * beta if core.eigenvalues == "signed" else beta
        memory, outputs = x.new_zeros(x.shape[0], size, size), []
        for t in range(x.shape[1]):
            kt, vt, bt = k[:, t, :, None], v[:, t, :, None], beta[:, t, None, None]
            memory = memory @ (eye - bt * kt @ kt.mT) + bt * vt @ kt.mT
            outputs.append((memory @ q[:, t, :, None]).squeeze(-1))
        o = torch.stack(outputs, 1)
        y = linear(o * F.silu(gate), layer.out_proj.weight, layer.out_proj.bias)
        x = y + x if index > 0 else y
    return x


@pytest.mark.parametrize("eigenvalues", ["positive", "signed"])
def test_deltanet_computes_its_documented_layers(eigenvalues: str) -> None:
    torch.manual_seed(0)
    core = DeltaNet(2, 3, num_layers=2, eigenvalues=eigenvalues).double()
    randomise(core, 2, scale=1.0)
    x = torch.randn(4, 9, 2, dtype=torch.float64)
    torch.testing.assert_close(core(x)[0], deltanet_by_hand(core, x))


# --- the xLSTM cells ----------------------------------------------------------------------------


def test_slstm_forget_gates_start_open_from_3_to_6() -> None:
    """Gate order input, forget, cell, output: the forget block of ``bias_ih`` is linspace(3, 6)
    over the units in every layer, that of ``bias_hh`` zero; the rest torch's uniform init."""
    torch.manual_seed(0)
    size = 64
    core = SLSTM(1, size, num_layers=2)
    forget = slice(size, 2 * size)
    for layer in range(2):
        bias_ih = getattr(core, f"bias_ih_l{layer}").detach()
        bias_hh = getattr(core, f"bias_hh_l{layer}").detach()
        torch.testing.assert_close(bias_ih[forget], torch.linspace(3, 6, size))
        assert torch.equal(bias_hh[forget], torch.zeros(size))
        others = torch.cat([bias_ih[:size], bias_ih[2 * size :], bias_hh[:size]])
        assert others.abs().max() <= size**-0.5 and others.abs().max() > 0.9 * size**-0.5


def test_mlstm_forget_gate_starts_open() -> None:
    """``in_proj`` gives q, k, v, o, then the input and the forget gate's pre-activations: the
    forget gate's bias is 3 (sigmoid 0.95), the input gate's torch's default."""
    torch.manual_seed(0)
    size = 8
    for layer in MLSTM(1, size, num_layers=2).layers:
        bias = layer.in_proj.bias.detach()
        assert layer.in_proj.out_features == 4 * size + 2
        assert bias[-1] == 3.0 and abs(bias[-2]) <= 1.0  # the input gate: uniform, fan-in <= 8


# --- Mamba, the Transformer and the classic cells ------------------------------------------------


def test_mamba_steps_are_log_uniform_and_its_projections_mambapy_s() -> None:
    """dt = softplus(dt_proj.bias) log-uniform in [dt_min, dt_max] (half below their geometric
    middle) and clamped at dt_init_floor; dt_proj's weight uniform in +-dt_rank^-0.5; the
    embedding N(0, 1), as nn.Embedding's rows."""
    torch.manual_seed(0)
    core = Mamba(1, 256, 1, dt_rank=4, dt_min=1e-3, dt_max=1e-1)
    mixer = core.layers[0].mixer
    dt = F.softplus(mixer.dt_proj.bias.detach())
    assert len(dt) == 512 and 0.42 < share_below(dt, 1e-2) < 0.58
    assert dt.min() >= 1e-3 * (1 - 1e-4) and dt.max() <= 1e-1 * (1 + 1e-4)
    weight = mixer.dt_proj.weight.detach()
    assert weight.abs().max() <= 0.5 and weight.abs().max() > 0.45  # 4^-0.5
    assert abs(core.embedding.weight.std().item() - 1) < 0.15
    floored = Mamba(1, 16, 1, dt_min=1e-6, dt_max=1e-5, dt_init_floor=1e-4).layers[0].mixer
    torch.testing.assert_close(F.softplus(floored.dt_proj.bias.detach()), torch.full((32,), 1e-4))
    assert torch.equal(mixer.D.detach(), torch.ones(512))
    torch.testing.assert_close(mixer.A_log.detach()[7], torch.arange(1.0, 17.0).log())


def test_sinusoidal_codes_are_vaswanis() -> None:
    """Position p, dimension 2i: sin(p / 10000^(2i/d)); dimension 2i+1: the cosine."""
    size, length = 6, 50
    codes = sinusoidal_codes(length, size)
    for p in (0, 1, 7, 49):
        for i in range(size // 2):
            angle = p / 10000 ** (2 * i / size)
            assert codes[p, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-5)
            assert codes[p, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-5)
    learned = CausalTransformer(1, 16, positional="learned", max_len=512).position.detach()
    assert abs(learned.std().item() - 0.02) < 0.002


@pytest.mark.parametrize("cell", [ManualRNN, ManualLSTM, ManualGRU])
def test_manual_cells_start_as_torch_does(cell) -> None:
    """Every weight and bias uniform in +-1/sqrt(hidden_size), torch's own init."""
    torch.manual_seed(0)
    core = cell(2, 16, num_layers=2)
    for name, parameter in core.named_parameters():
        assert parameter.abs().max() <= 0.25, name
    values = torch.cat([parameter.detach().flatten() for parameter in core.parameters()])
    assert values.abs().max() > 0.249 and abs(values.mean().item()) < 0.01
    assert 0.2 < share_below(values, -0.125) < 0.3  # uniform: a quarter below -bound / 2
