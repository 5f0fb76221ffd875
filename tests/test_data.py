"""Parity batches: right labels, lengths in range, pure functions of (seed, step)."""

from __future__ import annotations

import pytest
import torch

from parity_lab.data import ParityStream, eval_set, split
from parity_lab.datamodule import ParityDataModule


def stream(**overrides) -> ParityStream:
    settings = (
        dict(seed=3, min_len=2, max_len=9, batch_size=32, num_train=None, encoding="bit")
        | overrides
    )
    return ParityStream(**settings)


def bits_of(batch) -> torch.Tensor:
    return batch.x[..., 0].long()


@pytest.mark.parametrize("num_train", [None, 100])
def test_labels_are_the_parity_of_the_bits(num_train: int | None) -> None:
    for step in range(3):
        batch = stream(num_train=num_train).batch(step)
        for bits, length, targets in zip(bits_of(batch), batch.lengths, batch.targets, strict=True):
            n = int(length)
            assert targets[n - 1].item() == bits[:n].sum().item() % 2
            assert (bits[n:] == 0).all() and (targets[n:] == 0).all()


def test_every_step_targets_are_the_running_parity() -> None:
    batch = stream().batch(0)
    for bits, length, targets in zip(bits_of(batch), batch.lengths, batch.targets, strict=True):
        for t in range(int(length)):
            assert targets[t].item() == bits[: t + 1].sum().item() % 2


def test_lengths_lie_in_range_and_cover_it() -> None:
    lengths = torch.cat([stream().batch(step).lengths for step in range(20)])
    assert lengths.min() == 2 and lengths.max() == 9
    assert stream(min_len=5, max_len=5).batch(0).lengths.eq(5).all()


def test_same_seed_and_step_give_the_same_batch() -> None:
    for num_train in (None, 100):
        a, b = stream(num_train=num_train), stream(num_train=num_train)
        for step in (0, 7, 3):  # order of requests must not matter
            assert all(torch.equal(u, v) for u, v in zip(a.batch(step), b.batch(step), strict=True))
    assert not torch.equal(stream().batch(0).x, stream().batch(1).x)
    assert not torch.equal(stream().batch(0).x, stream(seed=4).batch(0).x)


def test_fixed_training_set_is_iterated_in_epochs() -> None:
    data = stream(num_train=100, batch_size=32, min_len=9)  # 4 batches per epoch (32+32+32+4)
    epoch = [data.batch(step) for step in range(4)]
    assert [len(b.lengths) for b in epoch] == [32, 32, 32, 4]
    strings = {tuple(row.tolist()) for b in epoch for row in bits_of(b)}
    next_epoch = {tuple(row.tolist()) for step in range(4, 8) for row in bits_of(data.batch(step))}
    assert strings == next_epoch  # same strings ...
    assert not torch.equal(epoch[0].x, data.batch(4).x)  # ... reshuffled


def test_iteration_starts_at_the_trainer_step() -> None:
    data = stream(first_step=lambda: 5)
    assert torch.equal(next(iter(data)).x, data.batch(5).x)
    finite = stream(num_train=100, batch_size=32, first_step=lambda: 6)  # mid-epoch 1
    assert len(list(finite)) == 2  # the rest of that epoch


def test_pair_encoding_is_bit_and_complement_zero_padded() -> None:
    batch = stream(encoding="pair").batch(0)
    valid = torch.arange(batch.x.shape[1]) < batch.lengths[:, None]
    assert torch.equal(batch.x.sum(-1), valid.float())
    assert (batch.x[valid][:, 0] == 1 - batch.x[valid][:, 1]).all()


def test_evaluation_sets_are_fixed_by_seed() -> None:
    dm = ParityDataModule(1, 20, 16, seed=1, eval_lengths=[50, 100], num_val=40, num_test=30)
    sets = dm.eval_sets()
    assert list(sets) == ["val", "len_50", "len_100"]
    assert sets["len_100"].lengths.eq(100).all() and len(sets["len_100"].lengths) == 30
    again = eval_set(1, "len_50", 30, 50, 50, "bit")
    assert torch.equal(again.x, sets["len_50"].x)
    assert sum(len(b.lengths) for b in split(sets["val"], 16)) == 40


def test_each_evaluation_set_has_a_key_of_its_own() -> None:
    """Training batch 0, val, the held-out length and the pool, all 64 strings of exactly 20 bits:
    any two drawn from the same key would be equal, so each must come from its own."""
    dm = ParityDataModule(
        20, 20, 64, seed=1, eval_lengths=[20], num_val=64, num_test=64,
        pool={"num": 64, "min_len": 20, "max_len": 20},
    )  # fmt: skip
    sets = {name: batch.x for name, batch in dm.eval_sets().items()}
    sets["train"] = stream(seed=1, min_len=20, max_len=20, batch_size=64).batch(0).x
    sets["train_set"] = (
        stream(seed=1, min_len=20, max_len=20, batch_size=64, num_train=64).batch(0).x
    )
    assert len(sets) == 5
    names = sorted(sets)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            same = (sets[a] == sets[b]).all(dim=(1, 2)).float().mean().item()
            assert same < 0.05, f"{a} and {b} share {same:.0%} of their strings"
    other_seed = ParityDataModule(20, 20, 64, seed=2, eval_lengths=[20], num_val=64, num_test=64)
    assert not torch.equal(other_seed.eval_sets()["val"].x, sets["val"])
