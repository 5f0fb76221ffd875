"""The one LightningModule: any parity model, any loss, final or every-step supervision."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import lightning as L
import torch
from torch import nn
from torchmetrics.classification import BinaryAccuracy

from parity_lab import LR_SHAPES
from parity_lab.data import ParityBatch
from parity_lab.models import ParityRNN


def metric_name(stage: str, eval_name: str) -> str:
    """Logged name of an evaluation set's accuracy: ``val/acc`` for the set drawn like training,
    ``<stage>/acc_len_<L>`` for the fixed-length sets."""
    return "val/acc" if eval_name == "val" else f"{stage}/acc_{eval_name}"


def warmup_decay(
    optimizer: torch.optim.Optimizer,
    warmup_steps: int,
    decay_steps: int,
    final_factor: float,
    shape: str = "cosine",
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from 0 to the optimizer's lr over ``warmup_steps``, then a cosine or linear
    fall to ``final_factor`` x lr at ``decay_steps``, constant after (stepped once per step)."""
    if shape not in LR_SHAPES:
        raise ValueError(f"scheduler.shape={shape!r}: allowed values are {list(LR_SHAPES)}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, decay_steps - warmup_steps))
        fall = 0.5 * (1.0 + math.cos(math.pi * progress)) if shape == "cosine" else 1.0 - progress
        return final_factor + (1.0 - final_factor) * fall

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


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
        scheduler: Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]
        | None = None,
        saturation: Mapping[str, Any] | None = None,
    ) -> None:
        """``saturation`` (``{weight, start_step}``): from training step ``start_step`` on, the
        loss adds ``weight * mean(1 - h^2)`` over the core's outputs ``h`` at every position of
        every string (for a linear RNN, ``weight * mean(LinearRNN.saturation)`` over its
        transitions). It pushes units in [-1, 1] to saturate, which is what lets the certificate
        close on a trained network (docs/certify.md); 0 is off."""
        super().__init__()
        self.model, self.loss, self.optimizer = model, loss, optimizer
        saturation = saturation or {}
        self.saturation_weight = float(saturation.get("weight", 0.0))
        self.saturation_start = int(saturation.get("start_step", 0))
        self.scheduler = scheduler
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
        penalise = self.saturation_weight > 0 and self.global_step >= self.saturation_start
        outputs = self.model.rnn(batch.x)[0] if penalise else None
        rows, last = torch.arange(len(batch.lengths), device=self.device), batch.lengths - 1
        if (
            self.model.head_kind == "tokens"
            and outputs is None
            and self.supervision == "final"
            and self.model.readout == "last"
        ):  # the published loss reads the answer only: so does the model
            scores = self.model.answer_scores(batch.x, last)
            final = scores[:, 2] - scores[:, 1]
            loss = self.loss(scores, batch.targets[rows, last].long() + 1)
            return self.finish_step(loss, final, batch.targets[rows, last], outputs, batch)
        if self.model.head_kind == "tokens":
            # The published head: cross-entropy over (pad, bit 0, bit 1), the answer's class
            # being 1 + parity; its parity logit is score(bit 1) - score(bit 0).
            scores = (
                self.model.token_scores(batch.x)
                if outputs is None
                else self.model.head.scores(outputs)
            )
            logits = scores[..., 2] - scores[..., 1]
            targets = batch.targets.long() + 1
        elif outputs is not None:
            scores = logits = self.model.head(outputs).squeeze(-1)
            targets = batch.targets
        else:
            scores = logits = self.model(batch.x, batch.lengths)
            targets = batch.targets
        final = self.model.final_logits(logits, batch.lengths)
        parity = batch.targets[rows, last]
        if self.supervision == "every_step":
            valid = torch.arange(logits.shape[1], device=self.device) < batch.lengths.unsqueeze(1)
            loss = self.loss(scores[valid], targets[valid])
        else:
            read = last if self.model.readout == "last" else torch.full_like(last, -1)
            loss = self.loss(scores[rows, read], targets[rows, last])
        return self.finish_step(loss, final, parity, outputs, batch)

    def finish_step(
        self,
        loss: torch.Tensor,
        final: torch.Tensor,
        parity: torch.Tensor,
        outputs: torch.Tensor | None,
        batch: ParityBatch,
    ) -> torch.Tensor:
        """The checks, logs and saturation penalty shared by every training loss."""
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"non-finite loss ({loss.item()}) at step {self.global_step}: lower optimizer.lr "
                "or set trainer.gradient_clip_val; the checkpoint and logs written so far are kept"
            )
        trainer = self._trainer  # None when called outside a Trainer
        logging = trainer is None or (self.global_step + 1) % trainer.log_every_n_steps == 0
        if logging:
            # Only on the steps the logger writes: each self.log costs ~0.5 ms, a third of a step.
            self.log("train/loss", loss, prog_bar=True)
            self.log("train/acc", ((final > 0).float() == parity).float().mean(), prog_bar=True)
        if outputs is None:
            return loss
        positions = torch.arange(outputs.shape[1], device=self.device) < batch.lengths.unsqueeze(1)
        core = self.model.rnn
        # the linear RNN saturates its transitions (LinearRNN.saturation), the rest their outputs
        unsaturated = core.saturation(batch.x) if hasattr(core, "saturation") else 1 - outputs**2
        saturation = unsaturated[positions].mean()
        if logging:
            self.log("train/saturation", saturation)
        return loss + self.saturation_weight * saturation

    def _evaluate(self, stage: str, batch: ParityBatch, dataloader_idx: int) -> None:
        if self.model.readout == "last":  # causal: the padding after the longest string is unread
            width = int(batch.lengths.max())
            batch = ParityBatch(batch.x[:, :width], batch.lengths, batch.targets[:, :width])
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

    def published_decay(self) -> bool:
        """Whether ``optimizer.weight_decay`` is null: the model's published decay applies."""
        keywords = getattr(self.optimizer, "keywords", {})
        return "weight_decay" in keywords and keywords["weight_decay"] is None

    def parameter_groups(self) -> list[dict[str, Any]]:
        """The optimizer's parameter groups. With ``optimizer.weight_decay: null`` the model's
        published decay applies as xLSTM's code applies it: to parameters of two or more
        dimensions outside the embedding (biases, norms, ``A_log``, ``D`` and the embedding are
        exempt); otherwise one group with the optimizer's own decay."""
        if not self.published_decay():
            return [{"params": list(self.parameters())}]
        decay = self.model.weight_decay or 0.0
        matrices, exempt = [], []
        for name, parameter in self.model.named_parameters():
            embedding = name.split(".")[-2:-1] in (["embedding"], ["embed"])
            (matrices if parameter.ndim >= 2 and not embedding else exempt).append(parameter)
        return [
            {"params": matrices, "weight_decay": decay},
            {"params": exempt, "weight_decay": 0.0},
        ]

    def configure_optimizers(self) -> torch.optim.Optimizer | dict[str, Any]:
        groups = self.parameter_groups()
        if self.published_decay():  # each group has its own; the default must still be a number
            optimizer = self.optimizer(groups, weight_decay=0.0)
        else:
            optimizer = self.optimizer(groups)
        if self.scheduler is None:
            return optimizer
        schedule = {"scheduler": self.scheduler(optimizer), "interval": "step"}
        return {"optimizer": optimizer, "lr_scheduler": schedule}
