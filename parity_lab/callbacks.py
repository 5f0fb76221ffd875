"""Training callbacks: stop once solved, checkpoint for resuming, and a quiet progress bar."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Checkpoint, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from lightning.pytorch.utilities.exceptions import SIGTERMException


class SolvedTracker(L.Callback):
    """Records the first step at which every ``val/acc*`` metric is 1.0; stops there if asked."""

    def __init__(self, stop_when_solved: bool) -> None:
        self.stop_when_solved = stop_when_solved
        self.solved_step: int | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A run resumed from a checkpoint taken once it was solved ends there, as it did before.
        if self.stop_when_solved and self.solved_step is not None:
            trainer.should_stop = True

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        accuracies = [v for k, v in trainer.callback_metrics.items() if k.startswith("val/acc")]
        if accuracies and all(float(acc) == 1.0 for acc in accuracies):
            if self.solved_step is None:
                self.solved_step = trainer.global_step
            if self.stop_when_solved:
                trainer.should_stop = True

    def state_dict(self) -> dict[str, Any]:
        return {"solved_step": self.solved_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.solved_step = state_dict["solved_step"]


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
        trainer.save_checkpoint(partial, weights_only=False)
        os.replace(partial, self.path)


class TrainingProgressBar(TQDMProgressBar):
    """Lightning's bar for training only: evaluation passes take milliseconds, and their bars
    would scroll the training bar away."""

    def init_validation_tqdm(self) -> Tqdm:
        return Tqdm(disable=True)

    def init_test_tqdm(self) -> Tqdm:
        return Tqdm(disable=True)
