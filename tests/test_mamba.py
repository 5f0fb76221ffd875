"""The published Mamba block against its reference, mambapy 1.2.0, with the same weights."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from mambapy.mamba import Mamba as ReferenceMamba
from mambapy.mamba import MambaBlock, MambaConfig

from parity_lab.models import mamba
from parity_lab.models.mamba import Mamba


def signed_reference_scan(
    self: MambaBlock,
    x: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
) -> torch.Tensor:
    """mambapy's sequential selective scan with the authors' sign change, ``2 exp(dt A) - 1``,
    applied to the transition before the scan (their ``positive_and_negative`` block)."""
    a = 2 * torch.exp(delta.unsqueeze(-1) * A) - 1
    b = (delta.unsqueeze(-1) * B.unsqueeze(2)) * x.unsqueeze(-1)
    h, states = torch.zeros_like(b[:, 0]), []
    for t in range(x.shape[1]):
        h = a[:, t] * h + b[:, t]
        states.append(h)
    return (torch.stack(states, dim=1) @ C.unsqueeze(-1)).squeeze(3) + D * x


def pair(signed: bool, d_conv: int = 1, num_layers: int = 1) -> tuple[Mamba, ReferenceMamba]:
    """Ours (random weights, perturbed off their initial values) and mambapy with those weights,
    in float64: gradients reach ~100 here, where float32 rounding alone differs by ~5e-5."""
    torch.manual_seed(0)
    ours = Mamba(1, 16, num_layers, eigenvalues="signed" if signed else "positive", d_conv=d_conv)
    with torch.no_grad():
        for parameter in ours.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    config = MambaConfig(d_model=16, n_layers=num_layers, dt_rank=1, d_conv=d_conv, pscan=True)
    reference = ReferenceMamba(config)
    reference.layers.load_state_dict(ours.layers.state_dict())
    ours.double(), reference.double()
    if signed:
        for layer in reference.layers:
            layer.mixer.selective_scan = signed_reference_scan.__get__(layer.mixer)
    return ours, reference


@pytest.mark.parametrize(
    ("signed", "d_conv", "num_layers"), [(False, 1, 1), (True, 1, 1), (True, 4, 2)]
)
def test_outputs_and_gradients_equal_mambapy(signed: bool, d_conv: int, num_layers: int) -> None:
    ours, reference = pair(signed, d_conv, num_layers)
    x = torch.randint(0, 2, (5, 40, 1)).double()
    y, _ = ours(x)
    y_ref = reference(ours.embedding(x))
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=0)
    weights = torch.randn_like(y)
    (y * weights).sum().backward()
    grads = {name: p.grad.clone() for name, p in ours.layers.named_parameters()}
    ours.zero_grad()
    (reference(ours.embedding(x)) * weights).sum().backward()
    for name, p in reference.layers.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, atol=1e-5, rtol=0, msg=name)


def test_initial_values_are_mambapy_s() -> None:
    torch.manual_seed(1)
    mixer = Mamba(1, 16, 1, dt_min=0.001, dt_max=0.1).layers[0].mixer
    expected = torch.arange(1, 17, dtype=torch.float).log().expand(32, 16)
    torch.testing.assert_close(mixer.A_log, expected)
    torch.testing.assert_close(mixer.D, torch.ones(32))
    dt = torch.nn.functional.softplus(mixer.dt_proj.bias.detach())
    assert dt.min() >= 0.001 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)
    # log-uniform: log dt spread over the range, not clustered at one end
    logs = dt.log()
    span = math.log(0.1) - math.log(0.001)
    assert logs.max() - logs.min() > 0.5 * span
    assert abs(mixer.dt_proj.weight).max() <= 1.0  # uniform in +-dt_rank^-0.5
    assert mixer.in_proj.weight.shape == (64, 16) and mixer.x_proj.weight.shape == (33, 32)


@pytest.mark.parametrize(("signed", "d_conv"), [(True, 1), (False, 4)])
def test_streaming_in_chunks_equals_one_pass(signed: bool, d_conv: int) -> None:
    ours, _ = pair(signed, d_conv, num_layers=2)
    x = torch.randint(0, 2, (3, 50, 1)).double()
    whole, _ = ours(x)
    state, pieces = None, []
    for piece in x.split([7, 1, 30, 12], dim=1):
        out, state = ours(piece, state)
        pieces.append(out)
    torch.testing.assert_close(torch.cat(pieces, dim=1), whole, atol=1e-5, rtol=1e-5)


def kernel_and_reference(signed: bool) -> tuple[Mamba, Mamba]:
    """The same perturbed weights twice: float32 through the C scan, float64 through
    ``MambaMixer.scan`` (the PyTorch reference the kernel is held to)."""
    ours, _ = pair(signed, d_conv=4)
    reference = copy.deepcopy(ours)  # float64: the kernel does not apply
    return ours.float(), reference


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("read", ["every_position", "answer_only", "final_state"])
def test_the_c_scan_equals_the_pytorch_scan(signed: bool, read: str) -> None:
    """Outputs, final states and gradients of every parameter and of the input. ``answer_only``
    reads one position per string (the published loss; one string reads none), which is where
    the kernel's backward skips the steps after it; ``final_state`` also differentiates the
    state handed to the next chunk."""
    if mamba.scan_library(16) is None:
        pytest.skip("no C compiler")
    kernel, reference = kernel_and_reference(signed)
    bits = torch.randint(0, 2, (4, 23, 1), generator=torch.Generator().manual_seed(2))
    answers = torch.tensor([22, 0, 9, -1])  # -1: a string whose loss reads no position
    results = []
    for model in (kernel, reference):
        x = bits.to(next(model.parameters()).dtype).requires_grad_()
        y, state = model(x)
        weights = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(y.dtype)
        if read == "answer_only":
            mask = torch.zeros_like(y[..., 0])
            rows = answers >= 0
            mask[rows.nonzero()[:, 0], answers[rows]] = 1
            weights = weights * mask.unsqueeze(-1)
        loss = (y * weights).sum()
        if read == "final_state":
            loss = loss + state[0][0].square().sum()
        model.zero_grad()
        loss.backward()
        grads = {name: p.grad.double() for name, p in model.named_parameters()}
        results.append((y.double(), state[0][0].double(), x.grad.double(), grads))
    (y, h, g_x, grads), (y_ref, h_ref, g_x_ref, grads_ref) = results
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(h, h_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(g_x, g_x_ref, atol=1e-3, rtol=1e-3)
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], atol=1e-3, rtol=1e-3, msg=name)


@pytest.mark.parametrize(
    ("signed", "switches"),
    [(True, {}), (False, {}), (True, {"selective": False, "skip": False, "residual": False})],
)
def test_reading_the_answers_alone_gives_the_same_values_and_gradients(
    signed: bool, switches: dict
) -> None:
    """``forward(x, answers=...)`` (training under the published loss) packs the strings cut at
    their answers, and the last layer reads only the answers: the outputs there and every
    gradient equal the full forward read at the answers, to float32 rounding (matrix products
    over fewer rows sum in another order; measured 1e-7 relative). Two layers and conv 4, so a
    later layer's steps past the answer, and the convolution across the strings' seams, are
    shown to reach nothing; also with the ablation's switches off (B and C fixed, no skip, no
    norm or residual)."""
    if mamba.scan_library(16) is None:
        pytest.skip("no C compiler")
    torch.manual_seed(0)
    ours = Mamba(1, 16, 2, eigenvalues="signed" if signed else "positive", d_conv=4, **switches)
    with torch.no_grad():
        for parameter in ours.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    assert ours.reads_answers
    bits = torch.randint(0, 2, (5, 23, 1), generator=torch.Generator().manual_seed(4)).float()
    answers = torch.tensor([22, 0, 9, 3, 15])
    rows = torch.arange(5)
    results = []
    for read_answers in (False, True):
        x = bits.clone().requires_grad_()
        y = ours(x, answers=answers)[0][:, 0] if read_answers else ours(x)[0][rows, answers]
        ours.zero_grad()
        (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
        results.append((y.detach(), x.grad, [p.grad.clone() for p in ours.parameters()]))
    (y, g_x, grads), (y_answers, g_x_answers, grads_answers) = results
    torch.testing.assert_close(y_answers, y, atol=1e-6, rtol=1e-6)
    for ours_grad, full_grad in zip([g_x, *grads], [g_x_answers, *grads_answers], strict=True):
        scale = float(full_grad.abs().max())
        torch.testing.assert_close(ours_grad, full_grad, atol=2e-6 * scale, rtol=0)


def test_with_answers_the_state_is_each_strings_at_its_answer_and_differentiable() -> None:
    """Reading the answers, the scan's ``h`` is each string's at its answer, and a loss on it
    (a gradient arriving from the state, as a next chunk would send) back-propagates from the
    answer, not from steps the forward never computed: the same as each string cut at its
    answer and run alone."""
    if mamba.scan_library(16) is None:
        pytest.skip("no C compiler")
    ours, _ = pair(True)
    ours.float()
    bits = torch.randint(0, 2, (4, 12, 1), generator=torch.Generator().manual_seed(5)).float()
    answers = torch.tensor([11, 0, 6, 3])
    weights = torch.linspace(-1, 1, 16)

    def loss_and_grads(y: torch.Tensor, h: torch.Tensor, x: torch.Tensor) -> tuple:
        loss = (y * weights).sum() + h.square().sum()
        ours.zero_grad()
        loss.backward()
        return x.grad, [p.grad.clone() for p in ours.parameters()]

    x = bits.clone().requires_grad_()
    y, state = ours(x, answers=answers)
    h = state[0][0]
    g_x, grads = loss_and_grads(y[:, 0], h, x)
    alone_h, alone_g_x, alone_grads = [], torch.zeros_like(bits), None
    for row, answer in enumerate(answers.tolist()):
        piece = bits[row : row + 1, : answer + 1].clone().requires_grad_()
        y_row, state_row = ours(piece)
        alone_h.append(state_row[0][0])
        g_piece, grads_row = loss_and_grads(y_row[:, -1], state_row[0][0], piece)
        alone_g_x[row, : answer + 1] = g_piece[0]
        alone_grads = (
            grads_row if alone_grads is None else list(map(torch.add, alone_grads, grads_row))
        )
    torch.testing.assert_close(h, torch.cat(alone_h).detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g_x, alone_g_x, atol=1e-4, rtol=1e-4)
    for grad, alone in zip(grads, alone_grads, strict=True):
        torch.testing.assert_close(grad, alone, atol=1e-4, rtol=1e-4)


def test_the_c_scan_matches_the_reference_at_saturated_steps_and_gates() -> None:
    """Pre-softplus steps far above torch's threshold (20) and far below (where exp overflows),
    and gates |z| ~ 100: the kernel's outputs and gradients stay finite and equal the PyTorch
    reference's."""
    if mamba.scan_library(16) is None:
        pytest.skip("no C compiler")
    kernel, reference = kernel_and_reference(True)
    for model in (kernel, reference):
        mixer = model.layers[0].mixer
        with torch.no_grad():
            mixer.dt_proj.bias[:8] = 25.0
            mixer.dt_proj.bias[8:16] = -100.0
            mixer.in_proj.weight[mixer.inner :] *= 60.0  # the gate branch z
    bits = torch.randint(0, 2, (3, 9, 1), generator=torch.Generator().manual_seed(6))
    results = []
    for model in (kernel, reference):
        x = bits.to(next(model.parameters()).dtype).requires_grad_()
        y, _ = model(x)
        model.zero_grad()
        (y * torch.linspace(-1, 1, 16).to(y.dtype)).sum().backward()
        grads = [p.grad.double() for p in model.parameters()]
        results.append((y.double(), x.grad.double(), grads))
    (y, g_x, grads), (y_ref, g_x_ref, grads_ref) = results
    assert torch.isfinite(y).all() and all(torch.isfinite(g).all() for g in grads)
    torch.testing.assert_close(y, y_ref, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(g_x, g_x_ref, atol=1e-2, rtol=1e-3)
    for grad, grad_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(grad, grad_ref, atol=1e-2, rtol=1e-3)
