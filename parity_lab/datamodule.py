"""The LightningDataModule of a run: the training stream plus the fixed evaluation sets."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
from torch.utils.data import DataLoader

from parity_lab import ENCODING_SIZES
from parity_lab.data import Curriculum, ParityBatch, ParityStream, by_length, eval_set, split


class ParityDataModule(L.LightningDataModule):
    """Training stream plus evaluation sets: ``val`` (drawn like training) and one per length."""

    def __init__(
        self,
        min_len: int,
        max_len: int,
        batch_size: int,
        num_train: int | None = None,
        supervision: str = "final",
        encoding: str = "bit",
        seed: int = 0,
        eval_lengths: list[int] | tuple[int, ...] = (),
        num_val: int = 512,
        num_test: int = 256,
        eval_batch_size: int = 1024,
        curriculum: Mapping[str, Any] | None = None,
        pool: Mapping[str, int] | None = None,
        density: str = "fair",
    ) -> None:
        super().__init__()
        self.min_len, self.max_len, self.batch_size = min_len, max_len, batch_size
        self.num_train, self.supervision, self.encoding = num_train, supervision, encoding
        self.seed, self.eval_lengths = seed, [int(n) for n in eval_lengths]
        self.num_val, self.num_test, self.eval_batch_size = num_val, num_test, eval_batch_size
        self.curriculum = Curriculum(**(curriculum or {}))
        self.pool = dict(pool) if pool else None
        self.density = density  # training strings only (data.sample_bits)
        self._eval_sets: dict[str, ParityBatch] | None = None

    @property
    def input_size(self) -> int:
        return ENCODING_SIZES[self.encoding]

    @property
    def batches_per_epoch(self) -> int | None:
        """Training batches per epoch of a fixed training set; None for fresh strings."""
        return None if self.num_train is None else -(-self.num_train // self.batch_size)

    @property
    def eval_names(self) -> list[str]:
        """Names of the evaluation sets, in dataloader order: ``val``, ``len_<L>``, then ``pool``
        (``eval.pool``: ``num`` strings of lengths uniform in ``min_len..max_len``)."""
        return ["val"] + [f"len_{n}" for n in self.eval_lengths] + ["pool"] * bool(self.pool)

    def eval_sets(self) -> dict[str, ParityBatch]:
        if self._eval_sets is None:
            sets = {
                "val": eval_set(
                    self.seed, "val", self.num_val, self.min_len, self.max_len, self.encoding
                )
            }
            for n in self.eval_lengths:
                sets[f"len_{n}"] = eval_set(
                    self.seed, f"len_{n}", self.num_test, n, n, self.encoding
                )
            if self.pool:
                sets["pool"] = eval_set(
                    self.seed, "pool", self.pool["num"], self.pool["min_len"],
                    self.pool["max_len"], self.encoding,
                )  # fmt: skip
            self._eval_sets = sets
        return self._eval_sets

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        stream = ParityStream(
            self.seed,
            self.min_len,
            self.max_len,
            self.batch_size,
            self.num_train,
            self.encoding,
            first_step=(lambda: trainer.global_step) if trainer is not None else (lambda: 0),
            curriculum=self.curriculum,
            density=self.density,
        )
        return DataLoader(stream, batch_size=None)

    def _eval_dataloaders(self) -> list[DataLoader]:
        # Shortest strings first: each batch then spans few lengths, and evaluation reads each
        # batch only to its longest string (``ParityModule._evaluate``).
        return [
            DataLoader(split(by_length(batch), self.eval_batch_size), batch_size=None)
            for batch in self.eval_sets().values()
        ]

    def val_dataloader(self) -> list[DataLoader]:
        return self._eval_dataloaders()

    def test_dataloader(self) -> list[DataLoader]:
        return self._eval_dataloaders()
