"""Training callbacks: stop once solved, checkpoint for resuming, and a quiet progress bar."""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Checkpoint, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from lightning.pytorch.utilities.exceptions import SIGTERMException

from parity_lab.run_files import ResultWriteError, first_line


class SolvedTracker(L.Callback):
    """Records the first step at which every ``val/acc*`` metric is 1.0 and, with
    ``right_on_worst_case`` (called only then), the worst-case strings are right too; stops there
    if asked. Random strings alone stop runs that a structured string breaks (a long run of zeros),
    so the stop asks both, as ``solved`` does. Also records the last step validated."""

    def __init__(
        self, stop_when_solved: bool, right_on_worst_case: Callable[[], bool] | None = None
    ) -> None:
        self.stop_when_solved = stop_when_solved
        self.right_on_worst_case = right_on_worst_case
        self.solved_step: int | None = None
        self.validated_step: int | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A run resumed from a checkpoint taken once it was solved ends there, as it did before.
        if self.stop_when_solved and self.solved_step is not None:
            trainer.should_stop = True

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.validated_step = trainer.global_step
        accuracies = [v for k, v in trainer.callback_metrics.items() if k.startswith("val/acc")]
        if accuracies and all(float(acc) == 1.0 for acc in accuracies):
            if self.right_on_worst_case is not None and not self.right_on_worst_case():
                return
            if self.solved_step is None:
                self.solved_step = trainer.global_step
            if self.stop_when_solved:
                trainer.should_stop = True

    def state_dict(self) -> dict[str, Any]:
        return {"solved_step": self.solved_step, "validated_step": self.validated_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.solved_step = state_dict["solved_step"]
        self.validated_step = state_dict.get("validated_step")  # absent in older checkpoints


class LastCheckpoint(Checkpoint):
    """Writes ``last.ckpt`` after every validation, when training ends and on SIGTERM, replacing
    it atomically.

    Lightning's ``ModelCheckpoint(save_top_k=0, save_last=True)`` writes only when training ends,
    so a killed run kept nothing. Saving after validation (Lightning runs checkpoint callbacks
    last) records ``SolvedTracker``'s state for that step, and a kill mid-write leaves the previous
    file whole.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self.save(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.save(trainer)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        # Lightning turns SIGTERM (preemption) into SIGTERMException at the end of a training
        # step, when the state is whole: keep that step, as Lightning's OnExceptionCheckpoint does.
        if isinstance(exception, SIGTERMException) and trainer.state.fn == "fit":
            self.save(trainer)

    def save(self, trainer: L.Trainer) -> None:
        partial = self.path.with_name(self.path.name + ".partial")
        try:
            trainer.save_checkpoint(partial, weights_only=False)
            os.replace(partial, self.path)
        except Exception as error:  # a full disk: torch's writer raises RuntimeError, not OSError
            reason = OSError(getattr(error, "errno", None), first_line(error))
            raise ResultWriteError(self.path, reason) from error


class TrainingProgressBar(TQDMProgressBar):
    """Lightning's bar for training only (evaluation passes take milliseconds, and their bars
    would scroll the training bar away), with a total that means something.

    On a fixed training set (``batches_per_epoch``) the total is the epoch's batches, which
    Lightning cannot know from an iterable dataset. When a run stops once solved on fresh strings
    (``open_ended``), its length is unknown: the bar counts steps, with no total and no ETA.
    """

    OPEN_ENDED_FORMAT = "{desc}: {n} steps [{elapsed}, {rate_fmt}{postfix}]"

    def __init__(
        self, refresh_rate: int, batches_per_epoch: int | None = None, open_ended: bool = False
    ) -> None:
        super().__init__(refresh_rate=refresh_rate)
        self.batches_per_epoch = batches_per_epoch
        self.open_ended = open_ended and batches_per_epoch is None

    @property
    def total_train_batches(self) -> int | float:
        if self.batches_per_epoch is None:
            return super().total_train_batches
        max_steps = self.trainer.max_steps
        remaining = max_steps - self.trainer.global_step if max_steps > 0 else math.inf
        return min(self.batches_per_epoch, remaining)

    def init_train_tqdm(self) -> Tqdm:
        # Lightning's own bar, but with its format and total from the start: its first draw
        # would otherwise show "0/?".
        return Tqdm(
            desc="Training" if self.open_ended else self.train_description,
            total=self.batches_per_epoch,
            position=2 * self.process_position,
            disable=self.is_disabled,
            leave=True,
            dynamic_ncols=True,
            file=sys.stdout,
            smoothing=0,
            bar_format=self.OPEN_ENDED_FORMAT if self.open_ended else self.BAR_FORMAT,
        )

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if not self.open_ended:  # an open-ended run is one endless epoch, its bar already set
            super().on_train_epoch_start(trainer, *args)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning redraws every refresh_rate steps or at the total; an open-ended run has none,
        # so its last steps would never show.
        if self.open_ended and self.train_progress_bar.n != trainer.global_step:
            self.train_progress_bar.n = trainer.global_step
            self.train_progress_bar.refresh()
        super().on_train_end(trainer, pl_module)

    def init_validation_tqdm(self) -> Tqdm:
        return Tqdm(disable=True)

    def init_test_tqdm(self) -> Tqdm:
        return Tqdm(disable=True)
