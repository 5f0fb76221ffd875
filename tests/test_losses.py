"""The hand-written loss equals torch's in value and gradient, and stays finite at extremes."""

from __future__ import annotations

import pytest
import torch

from parity_lab.losses import StableBCEWithLogitsLoss

CASES = {
    "moderate": torch.tensor([-3.0, -0.5, 0.0, 0.2, 4.0]),
    "extreme": torch.tensor([-1e4, -50.0, 50.0, 1e4, 1e4]),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("targets", [[0.0, 1.0, 1.0, 0.0, 1.0], [1.0, 0.0, 0.0, 1.0, 0.0]])
def test_manual_equals_builtin_in_value_and_gradient(case: str, targets: list[float]) -> None:
    y = torch.tensor(targets, dtype=torch.float64)
    values, grads = [], []
    for loss in (torch.nn.BCEWithLogitsLoss(), StableBCEWithLogitsLoss()):
        z = CASES[case].double().requires_grad_()
        value = loss(z, y)
        value.backward()
        assert torch.isfinite(value) and torch.isfinite(z.grad).all()
        values.append(value)
        grads.append(z.grad)
    torch.testing.assert_close(values[1], values[0])
    torch.testing.assert_close(grads[1], grads[0])


def test_extreme_logits_give_exact_loss() -> None:
    loss = StableBCEWithLogitsLoss()
    z = torch.tensor([1e4, -1e4])
    assert loss(z, torch.tensor([1.0, 0.0])).item() == 0.0  # confidently right
    assert loss(z, torch.tensor([0.0, 1.0])).item() == pytest.approx(1e4)  # confidently wrong


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\(\)`")
def test_every_step_loss_ignores_padded_positions() -> None:
    """The module selects valid positions before the loss, so padding never changes it."""
    from parity_lab.data import make_batch, sample_bits
    from parity_lab.models import ParityRNN
    from parity_lab.module import ParityModule

    torch.manual_seed(0)
    module = ParityModule(
        ParityRNN(torch.nn.GRU, 1, 4),
        StableBCEWithLogitsLoss(),
        torch.optim.Adam,
        supervision="every_step",
        eval_names=["val"],
    )
    bits, lengths = sample_bits(torch.Generator().manual_seed(0), 8, 1, 10)
    batch = make_batch(bits, lengths, "bit")
    loss = module.training_step(batch, 0)
    padding = torch.arange(10) >= lengths[:, None]
    corrupted = batch._replace(targets=batch.targets.masked_fill(padding, 1.0))
    assert torch.equal(module.training_step(corrupted, 0), loss)
