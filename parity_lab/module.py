"""The one LightningModule: any parity model, any loss, final or every-step supervision."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import lightning as L
import torch
from torch import nn
from torchmetrics.classification import BinaryAccuracy

from parity_lab.data import ParityBatch
from parity_lab.models import ParityRNN


def metric_name(stage: str, eval_name: str) -> str:
    """Logged name of an evaluation set's accuracy: ``val/acc`` for the set drawn like training,
    ``<stage>/acc_len_<L>`` for the fixed-length sets."""
    return "val/acc" if eval_name == "val" else f"{stage}/acc_{eval_name}"


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss; the run stops before the weights take that step."""


class ParityModule(L.LightningModule):
    def __init__(
        self,
        model: ParityRNN,
        loss: nn.Module,
        optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer],
        supervision: str,
        eval_names: list[str],
    ) -> None:
        super().__init__()
        self.model, self.loss, self.optimizer = model, loss, optimizer
        self.supervision, self.eval_names = supervision, eval_names
        self.eval_acc = nn.ModuleDict(
            {
                stage: nn.ModuleList(BinaryAccuracy() for _ in eval_names)
                for stage in ("val", "test")
            }
        )

    def predict_final(self, batch: ParityBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """All logits, each string's prediction logit, and each string's parity."""
        logits = self.model(batch.x, batch.lengths)
        final = self.model.final_logits(logits, batch.lengths)
        parity = batch.targets.gather(1, (batch.lengths - 1).unsqueeze(1)).squeeze(1)
        return logits, final, parity

    def training_step(self, batch: ParityBatch, batch_idx: int) -> torch.Tensor:
        logits, final, parity = self.predict_final(batch)
        if self.supervision == "every_step":
            valid = torch.arange(logits.shape[1], device=self.device) < batch.lengths.unsqueeze(1)
            loss = self.loss(logits[valid], batch.targets[valid])
        else:
            loss = self.loss(final, parity)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"non-finite loss ({loss.item()}) at step {self.global_step}: lower optimizer.lr "
                "or set trainer.gradient_clip_val; the checkpoint and logs written so far are kept"
            )
        trainer = self._trainer  # None when called outside a Trainer
        if trainer is None or (self.global_step + 1) % trainer.log_every_n_steps == 0:
            # Only on the steps the logger writes: each self.log costs ~0.5 ms, a third of a step.
            self.log("train/loss", loss, prog_bar=True)
            self.log("train/acc", ((final > 0).float() == parity).float().mean(), prog_bar=True)
        return loss

    def _evaluate(self, stage: str, batch: ParityBatch, dataloader_idx: int) -> None:
        _, final, parity = self.predict_final(batch)
        metric = self.eval_acc[stage][dataloader_idx]
        metric.update(torch.sigmoid(final), parity)  # forward() would also compute per batch
        name = metric_name(stage, self.eval_names[dataloader_idx])
        # The test pass re-evaluates the validation sets on the final weights for metrics.json;
        # train() logs it to TensorBoard only where it is new (training ended between validations).
        self.log(
            name,
            metric,
            add_dataloader_idx=False,
            prog_bar=name == "val/acc",
            logger=stage == "val",
        )

    def validation_step(self, batch: ParityBatch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate("val", batch, dataloader_idx)

    def on_validation_epoch_end(self) -> None:
        # x-axis of validation points: the steps taken, as solved_step counts them (Lightning
        # would use the batches seen, one fewer); a logged "step" is Lightning's way to set it.
        self.log("step", float(self.global_step))

    def test_step(self, batch: ParityBatch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate("test", batch, dataloader_idx)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer(self.parameters())
