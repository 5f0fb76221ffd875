"""The state-tracking families: each recurrence against its plain per-step definition."""

from __future__ import annotations

import pytest
import torch

from parity_lab.config import ConfigError, validate
from parity_lab.models import LinearRNN
from parity_lab.models.linear_rnn import linear_scan
from tests.conftest import compose_config


def sequential_scan(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None) -> torch.Tensor:
    """The definition, one step at a time: h_t = a_t * h_{t-1} + b_t."""
    h = torch.zeros_like(b[:, 0]) if h0 is None else h0
    states = []
    for t in range(a.shape[1]):
        h = a[:, t] * h + b[:, t]
        states.append(h)
    return torch.stack(states, dim=1)


@pytest.mark.parametrize("steps", [1, 2, 7, 8, 33])
@pytest.mark.parametrize("with_h0", [False, True])
def test_scan_outputs_and_gradients_equal_the_sequential_loop(steps: int, with_h0: bool) -> None:
    generator = torch.Generator().manual_seed(steps)
    a = (2 * torch.rand(3, steps, 4, generator=generator, dtype=torch.float64) - 1).requires_grad_()
    b = torch.randn(3, steps, 4, generator=generator, dtype=torch.float64).requires_grad_()
    h0 = torch.randn(3, 4, generator=generator, dtype=torch.float64) if with_h0 else None
    if h0 is not None:
        h0.requires_grad_()
    weights = torch.randn(3, steps, 4, generator=generator, dtype=torch.float64)
    inputs = [t for t in (a, b, h0) if t is not None]
    results = []
    for scan in (linear_scan, sequential_scan):
        states = scan(a, b, h0)
        results.append(
            (states, torch.autograd.grad((states * weights).sum(), inputs, materialize_grads=True))
        )
    (fast, fast_grads), (slow, slow_grads) = results
    torch.testing.assert_close(fast, slow, atol=1e-12, rtol=1e-12)
    for fast_grad, slow_grad in zip(fast_grads, slow_grads, strict=True):
        torch.testing.assert_close(fast_grad, slow_grad, atol=1e-12, rtol=1e-12)


def test_scan_keeps_exact_signs_over_a_million_steps() -> None:
    """Transitions of exactly +-1 compose without rounding: the state after a million steps of
    ``h -> -h + 1`` or ``h -> h`` is exactly the parity of the flips so far."""
    flips = torch.randint(0, 2, (2, 1_000_000, 1), generator=torch.Generator().manual_seed(0))
    states = linear_scan(1 - 2 * flips.float(), flips.float())
    assert torch.equal(states, (flips.cumsum(1) % 2).float())


@pytest.mark.parametrize("eigenvalues", ["positive", "signed"])
def test_linear_rnn_transitions_lie_in_their_documented_range(eigenvalues: str) -> None:
    torch.manual_seed(0)
    core = LinearRNN(1, 64, eigenvalues=eigenvalues)
    layer = core.layers[0]
    with torch.no_grad():
        layer.in_proj.weight.normal_(std=10.0)  # spread dt over softplus' whole range
        a = layer.transition(torch.randn(1, 1000, 1))[0]
    low = 0.0 if eigenvalues == "positive" else -1.0
    assert low <= a.min() and a.max() <= 1.0
    assert (a.min() < 0) == (eigenvalues == "signed")


def test_linear_rnn_rejects_unknown_eigenvalues() -> None:
    with pytest.raises(ValueError, match="model.eigenvalues='complex' is invalid"):
        LinearRNN(1, 4, eigenvalues="complex")


def test_config_rejects_unknown_eigenvalues_before_training() -> None:
    cfg = compose_config("model=linear_rnn_signed", "model.eigenvalues=complex")
    with pytest.raises(ConfigError, match=r"^model.eigenvalues='complex' is invalid: allowed"):
        validate(cfg)
    validate(compose_config("model=linear_rnn_signed"))
