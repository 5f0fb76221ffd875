"""The recipe whose trained networks certify (experiment=certified): a uniform density of 1s in
the training strings, and a penalty that saturates the units."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from parity_lab.config import ConfigError, validate
from parity_lab.data import ParityStream, eval_set, make_batch, sample_bits
from parity_lab.datamodule import ParityDataModule
from parity_lab.models import ParityRNN
from parity_lab.module import ParityModule
from parity_lab.train import train


def longest_zero_run(bits: torch.Tensor, length: int) -> int:
    best = run = 0
    for bit in bits[:length].tolist():
        run = run + 1 if bit == 0 else 0
        best = max(best, run)
    return best


def test_a_uniform_density_gives_long_runs_and_fair_bits_are_unchanged() -> None:
    generator = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    fair, lengths = sample_bits(generator(), 400, 50, 50)
    # "fair" is the old draw, bit for bit: earlier results reproduce.
    reference = generator()
    torch.randint(50, 51, (400,), generator=reference)
    assert torch.equal(fair, torch.randint(0, 2, (400, 50), generator=reference))
    dense, _ = sample_bits(generator(), 400, 50, 50, "uniform")
    long_fair = sum(longest_zero_run(row, 50) >= 25 for row in fair)
    long_dense = sum(longest_zero_run(row, 50) >= 25 for row in dense)
    assert long_fair == 0 and long_dense >= 20  # fair: ~1e-6 per string; uniform: ~7%
    assert dense.float().mean().sub(0.5).abs() < 0.05  # still balanced over strings
    with pytest.raises(ValueError, match="data.density='dense'"):
        sample_bits(generator(), 4, 1, 5, "dense")


def test_the_density_shapes_training_strings_only() -> None:
    settings = dict(seed=1, min_len=1, max_len=20, batch_size=64, num_train=None, encoding="bit")
    fair = ParityStream(**settings).batch(3)
    dense = ParityStream(**settings, density="uniform").batch(3)
    assert not torch.equal(fair.x, dense.x)
    fixed = ParityStream(**(settings | {"num_train": 100}), density="uniform").batch(0)
    per_string = fixed.x[..., 0].sum(1) / fixed.lengths
    assert per_string.std() > 0.2  # densities vary from string to string
    sets = [
        ParityDataModule(1, 20, 64, seed=1, eval_lengths=[30], density=d).eval_sets()
        for d in ("fair", "uniform")
    ]
    for name in sets[0]:
        assert torch.equal(sets[0][name].x, sets[1][name].x)
    assert torch.equal(sets[0]["val"].x, eval_set(1, "val", 512, 1, 20, "bit").x)


def module(weight: float, start_step: int) -> ParityModule:
    torch.manual_seed(0)
    model = ParityRNN(nn.RNN, input_size=1, hidden_size=4)
    return ParityModule(
        model,
        nn.BCEWithLogitsLoss(),
        torch.optim.Adam,
        supervision="every_step",
        eval_names=["val"],
        saturation={"weight": weight, "start_step": start_step},
    )


def test_the_penalty_is_weight_times_mean_one_minus_h_squared_from_its_start_step() -> None:
    bits, lengths = sample_bits(torch.Generator().manual_seed(2), 16, 3, 12)
    batch = make_batch(bits, lengths, "bit")
    plain = module(0.0, 0).training_step(batch, 0)
    later = module(0.5, 1).training_step(batch, 0)  # global_step 0 < start_step 1: off
    assert torch.equal(plain, later)
    penalised = module(0.5, 0).training_step(batch, 0)
    h = module(0.0, 0).model.rnn(batch.x)[0]
    valid = torch.arange(12) < lengths[:, None]
    expected = (1 - h[valid] ** 2).mean()  # every position of every string, no padding
    assert torch.allclose(penalised - plain, 0.5 * expected)
    penalised.backward()  # and it trains: gradients flow through the penalty


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["saturation.weight=-1"],
            r"^saturation.weight=-1 is invalid: expected a finite number >= 0",
        ),
        (["saturation.start_step=-1"], r"^saturation.start_step=-1 is invalid"),
        (["data.density=dense"], r"^data.density='dense' is invalid: allowed values are"),
        (
            ["saturation.weight=0.1", "model=deltanet_signed"],
            r"^saturation.weight=0.1 with model.rnn._target_=.*DeltaNet' is invalid",
        ),
        (
            ["saturation.weight=0.1", "+model.rnn.nonlinearity=relu"],
            r"^saturation.weight=0.1 with model.rnn._target_='torch.nn.RNN' is invalid",
        ),
    ],
)
def test_bad_recipe_settings_fail_in_one_line(make_config, overrides, message) -> None:
    with pytest.raises(ConfigError, match=message):
        validate(make_config("experiment=certified", *overrides))


def test_the_recipe_certifies_a_trained_rnn(make_config, tmp_path) -> None:
    """experiment=certified, seed 0, as stored (its length curve shortened to 2,000 bits)."""
    cfg = make_config("experiment=certified", "eval.curve.max_len=2000", "seed=0")
    metrics = train(cfg, run_dir=tmp_path)
    assert metrics["certified"] is True, metrics["certify_note"]
    assert metrics["worst_case_wrong"] is None and metrics["global_step"] == 3000
