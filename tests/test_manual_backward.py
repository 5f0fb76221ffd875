"""The hand-written backward through time gives torch's gradients, for every manual cell."""

from __future__ import annotations

import pytest
import torch

from parity_lab.models import ManualGRU, ManualLSTM, ManualRNN
from parity_lab.models.manual import BackpropThroughTime

TWINS = [(ManualRNN, torch.nn.RNN), (ManualLSTM, torch.nn.LSTM), (ManualGRU, torch.nn.GRU)]


def initial_state(cell: torch.nn.Module, num_layers: int, batch: int) -> torch.Tensor | tuple:
    shape = (num_layers, batch, cell.hidden_size)
    states = [torch.randn(shape, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    return tuple(states) if isinstance(cell, ManualLSTM | torch.nn.LSTM) else states[0]


def gradients(core: torch.nn.Module, x: torch.Tensor, state: torch.Tensor | tuple) -> dict:
    """Gradients of a loss reading every output and the final state, by parameter/input name."""
    outputs, final = core(x, state)
    finals = final if isinstance(final, tuple) else (final,)
    weights = torch.linspace(-1, 1, outputs.numel(), dtype=outputs.dtype).view_as(outputs)
    loss = (outputs * weights).sum() + sum((f**2).sum() for f in finals)
    states = state if isinstance(state, tuple) else (state,)
    names = [name for name, _ in core.named_parameters()] + ["x"] + ["state"] * len(states)
    tensors = [*core.parameters(), x, *states]
    grads = torch.autograd.grad(loss, tensors)
    return {f"{n}{i}": g for i, (n, g) in enumerate(zip(names, grads, strict=True))}


@pytest.mark.parametrize(("manual", "builtin"), TWINS)
@pytest.mark.parametrize("num_layers", [1, 2])
def test_manual_gradients_equal_builtin_gradients(manual, builtin, num_layers: int) -> None:
    torch.manual_seed(0)
    reference = builtin(2, 5, num_layers, batch_first=True).double()
    twin = manual(2, 5, num_layers, batch_first=True).double()
    twin.load_state_dict(reference.state_dict())
    x = torch.randn(7, 11, 2, dtype=torch.float64, requires_grad=True)
    state = initial_state(twin, num_layers, 7)
    expected, actual = gradients(reference, x, state), gradients(twin, x, state)
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], msg=name)


@pytest.mark.parametrize("manual", [m for m, _ in TWINS])
def test_hand_written_backward_passes_gradcheck(manual) -> None:
    """Checked against finite differences, independently of torch's built-in cells."""
    torch.manual_seed(0)
    cell = manual(2, 3).double()
    x_proj = torch.randn(4, 3, cell.num_gates * 3, dtype=torch.float64, requires_grad=True)
    state = [
        torch.randn(3, 3, dtype=torch.float64, requires_grad=True) for _ in range(cell.state_size)
    ]
    assert torch.autograd.gradcheck(
        lambda x_proj, weight_hh, bias_hh, *state: BackpropThroughTime.apply(
            cell, x_proj, weight_hh, bias_hh, *state
        ),
        (x_proj, cell.weight_hh_l0, cell.bias_hh_l0, *state),
    )


@pytest.mark.parametrize("manual", [m for m, _ in TWINS])
def test_inference_path_equals_training_path(manual) -> None:
    """Without gradients the cells skip the saving loop; the outputs must not change."""
    torch.manual_seed(0)
    core = manual(1, 4, 2)
    x = torch.randint(0, 2, (3, 6, 1)).float()
    with_grad, _ = core(x)
    with torch.no_grad():
        without_grad, _ = core(x)
    torch.testing.assert_close(with_grad.detach(), without_grad, atol=0, rtol=0)
