"""Parity strings: vectorised generation, training streams and fixed evaluation sets.

Plain torch, no Lightning: ``predict`` and ``analyze`` encode bits with it and start fast; the
LightningDataModule that serves these to a Trainer is in ``parity_lab.datamodule``.

Every batch is a pure function of its key, e.g. ``(seed, "train", i)`` for training batch ``i``,
so a run can be resumed at any step and two runs with the same seed see the same strings.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import IterableDataset

from parity_lab import DENSITIES, ENCODING_SIZES


class ParityBatch(NamedTuple):
    x: torch.Tensor  # (batch, time, input_size) float, zero after each string's end
    lengths: torch.Tensor  # (batch,) int64
    targets: torch.Tensor  # (batch, time) float: running parity, zero after each string's end


def key_generator(*key: int | str) -> torch.Generator:
    """A torch generator seeded from a tuple key through numpy's SeedSequence (no collisions)."""
    words = [zlib.crc32(k.encode()) if isinstance(k, str) else int(k) for k in key]
    seed = int(np.random.SeedSequence(words).generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.Generator().manual_seed(seed)


def encode(bits: torch.Tensor, lengths: torch.Tensor, encoding: str) -> torch.Tensor:
    """Bits (batch, time) -> network inputs (batch, time, input_size), zero past each length."""
    x = bits.float()
    if encoding == "bit":
        return x.unsqueeze(-1)
    if encoding == "pair":
        pairs = x.new_empty(*x.shape, 2)  # written in place: 3x faster than torch.stack
        pairs[..., 0] = x
        torch.sub(1.0, x, out=pairs[..., 1])
        if bool((lengths < bits.shape[1]).any()):  # long evaluation chunks are never padded
            pairs *= (torch.arange(bits.shape[1]) < lengths[:, None]).unsqueeze(-1)
        return pairs
    raise ValueError(f"data.encoding={encoding!r}: allowed values are {list(ENCODING_SIZES)}")


def make_batch(bits: torch.Tensor, lengths: torch.Tensor, encoding: str) -> ParityBatch:
    """Pack raw bits (zero-padded past each length) into a batch with running-parity targets."""
    valid = torch.arange(bits.shape[1]) < lengths[:, None]
    running = torch.cumsum(bits, dim=1).remainder_(2) * valid
    return ParityBatch(encode(bits, lengths, encoding), lengths, running.float())


def sample_bits(
    generator: torch.Generator, num: int, min_len: int, max_len: int, density: str = "fair"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``num`` strings, lengths uniform in ``min_len..max_len``, zero-padded to ``max_len``.

    ``density``: ``fair``, every bit a fair coin; ``uniform``, each string first draws its chance
    ``p`` of a 1 uniformly from [0, 1], then its bits with that chance, so runs of 0s (small
    ``p``) and of 1s (large ``p``) as long as the string appear often.
    """
    lengths = torch.randint(min_len, max_len + 1, (num,), generator=generator)
    if density == "uniform":
        chance = torch.rand(num, 1, generator=generator)
        bits = (torch.rand(num, max_len, generator=generator) < chance).long()
    elif density == "fair":
        bits = torch.randint(0, 2, (num, max_len), generator=generator, dtype=torch.int64)
    else:
        raise ValueError(f"data.density={density!r}: allowed values are {list(DENSITIES)}")
    bits *= torch.arange(max_len) < lengths[:, None]
    return bits, lengths


class Curriculum(NamedTuple):
    """Which lengths training batch ``step`` draws (``data.curriculum``).

    ``none``: ``min_len..max_len`` throughout. ``linear``: the longest length rises linearly from
    ``start_len`` at step 0 to ``max_len`` at step ``steps``, lengths uniform in
    ``min(min_len, top)..top`` (with ``data=fixed`` every string has the current top length).
    ``warmup``: lengths uniform in ``1..start_len`` for the first ``steps`` steps, then
    ``min_len..max_len``.
    """

    schedule: str = "none"
    start_len: int = 1
    steps: int = 1000

    def bounds(self, step: int, min_len: int, max_len: int) -> tuple[int, int]:
        if self.schedule == "linear":
            progress = min(1.0, step / self.steps)
            top = round(self.start_len + (max_len - self.start_len) * progress)
            return min(min_len, top), top
        if self.schedule == "warmup" and step < self.steps:
            return 1, self.start_len
        return min_len, max_len


class ParityStream(IterableDataset):
    """Training batches indexed by global step, starting wherever the trainer is.

    ``density`` (``sample_bits``) shapes the training strings only; evaluation sets stay fair.
    With ``num_train=None`` batch ``i`` is ``batch_size`` fresh strings drawn from key
    ``(seed, "train", i)``, forever. With an int, a fixed set of ``num_train`` strings is drawn once
    and iterated in epochs, reshuffled per epoch from ``(seed, "shuffle", epoch)``; one iteration
    of this dataset yields the rest of the current epoch, so Lightning's epochs line up with ours.
    """

    def __init__(
        self,
        seed: int,
        min_len: int,
        max_len: int,
        batch_size: int,
        num_train: int | None,
        encoding: str,
        first_step: Callable[[], int] = lambda: 0,
        curriculum: Curriculum | None = None,
        density: str = "fair",
    ) -> None:
        super().__init__()
        self.density = density
        self.curriculum = curriculum or Curriculum()
        self.seed, self.min_len, self.max_len = seed, min_len, max_len
        self.batch_size, self.num_train, self.encoding = batch_size, num_train, encoding
        self.first_step = first_step
        self._train_set: tuple[torch.Tensor, torch.Tensor] | None = None
        self._order: tuple[int, torch.Tensor] | None = None

    @property
    def batches_per_epoch(self) -> int | None:
        if self.num_train is None:
            return None
        return -(-self.num_train // self.batch_size)

    def batch(self, step: int) -> ParityBatch:
        """Training batch number ``step`` (a pure function of ``seed`` and ``step``)."""
        if self.num_train is None:
            g = key_generator(self.seed, "train", step)
            shortest, longest = self.curriculum.bounds(step, self.min_len, self.max_len)
            bits, lengths = sample_bits(g, self.batch_size, shortest, longest, self.density)
            return make_batch(bits, lengths, self.encoding)
        if self._train_set is None:
            g = key_generator(self.seed, "train_set")
            self._train_set = sample_bits(
                g, self.num_train, self.min_len, self.max_len, self.density
            )
        epoch, position = divmod(step, self.batches_per_epoch)
        if self._order is None or self._order[0] != epoch:
            g = key_generator(self.seed, "shuffle", epoch)
            self._order = (epoch, torch.randperm(self.num_train, generator=g))
        index = self._order[1][position * self.batch_size : (position + 1) * self.batch_size]
        bits, lengths = self._train_set
        return make_batch(bits[index], lengths[index], self.encoding)

    def __iter__(self) -> Iterator[ParityBatch]:
        step = self.first_step()
        if self.num_train is None:
            while True:
                yield self.batch(step)
                step += 1
        end = (step // self.batches_per_epoch + 1) * self.batches_per_epoch
        for i in range(step, end):
            yield self.batch(i)


def eval_set(
    seed: int, name: str, num: int, min_len: int, max_len: int, encoding: str
) -> ParityBatch:
    """A held-out set fixed by ``(seed, name)``; disjoint in key from every training batch."""
    bits, lengths = sample_bits(key_generator(seed, "eval", name), num, min_len, max_len)
    return make_batch(bits, lengths, encoding)


def by_length(batch: ParityBatch) -> ParityBatch:
    """The batch's strings in order of length (ties in their order)."""
    order = torch.argsort(batch.lengths, stable=True)
    return ParityBatch(*(t[order] for t in batch))


def split(batch: ParityBatch, size: int) -> list[ParityBatch]:
    """Split a batch along the string axis into batches of at most ``size`` strings."""
    return [ParityBatch(*parts) for parts in zip(*(t.split(size) for t in batch), strict=True)]
