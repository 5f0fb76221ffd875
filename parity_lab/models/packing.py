"""Training strings packed for a loss read at the answer: each string cut after its answer and
the pieces laid end to end.

A loss read at one position per string needs nothing after it, and in a causal model nothing
after it reaches it. The published protocol's batches of 2..39 bits are padded to 39 steps, so
about 47% of their positions come after the answers; cut and packed, the position-wise work of
a block (projections, norms, SiLU, short convolutions) reads only the tokens that count. The
published Mamba, DeltaNet and mLSTM train this way (``forward(x, answers=...)`` from the zero
state); their outputs equal the padded forward's to float32 rounding.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.nn import functional as F


def check_answers(answers: torch.Tensor, batch: int, steps: int) -> None:
    """One answer position in ``0..steps - 1`` per string of a batch, or a one-line error (a
    position out of range would cut a string to nothing, or read another's)."""
    if answers.numel() == 0 and batch == 0:
        return
    values = f"[{int(answers.min())}, {int(answers.max())}]" if answers.numel() else "none"
    if answers.shape != (batch,) or not 0 <= int(answers.min()) <= int(answers.max()) < steps:
        raise ValueError(
            f"answers must be one position in 0..{steps - 1} per string, got "
            f"{tuple(answers.shape)} values in {values}"
        )


class Packed(NamedTuple):
    """A batch cut at its answers, packed: row ``r`` is the tokens ``offsets[r]`` to
    ``offsets[r + 1] - 1``; ``last_only``: a layer's output is wanted at each row's last token
    alone (the last layer's)."""

    mask: torch.Tensor  # (batch, time): the tokens kept
    offsets: torch.Tensor  # (batch + 1,) int64
    position: torch.Tensor  # (tokens,) each token's step within its string
    row: torch.Tensor  # (tokens,) each token's string
    last: torch.Tensor  # (batch,) each row's last token
    longest: int
    last_only: bool = False

    @classmethod
    def cut(cls, answers: torch.Tensor, batch: int, steps: int) -> Packed:
        """``answers``: each string's answer position in a batch of ``batch`` strings of
        ``steps`` steps."""
        check_answers(answers, batch, steps)
        lengths = answers.long() + 1
        mask = torch.arange(steps, device=answers.device) < lengths.unsqueeze(1)
        offsets = F.pad(lengths.cumsum(0), (1, 0))
        position = torch.arange(steps, device=answers.device).expand_as(mask)[mask]
        row = torch.arange(len(answers), device=answers.device).unsqueeze(1).expand_as(mask)[mask]
        return cls(mask, offsets, position, row, offsets[1:] - 1, int(lengths.max()))

    def convolve(
        self, u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The causal depthwise convolution of packed inputs ``u`` (tokens, channels) from zero
        padding, as ``nn.Conv1d`` with ``padding=K-1`` computes it: weight ``j`` of ``weight``
        (channels, K) reads the input ``K - 1 - j`` steps back, and a token ``s`` steps into its
        string reads nothing from ``s + 1`` or more steps back (so no string sees another's).
        Summed in the order of the padded forms (bias first, then weights 0..K-1)."""
        width = weight.shape[1]

        out = self.earlier(u, width - 1) * weight[:, 0]
        out = out if bias is None else bias + out
        for j in range(1, width):
            out = out + self.earlier(u, width - 1 - j) * weight[:, j]
        return out

    def earlier(self, u: torch.Tensor, back: int) -> torch.Tensor:
        """Each token's input ``back`` steps before it in its string (0 before its start)."""
        if back == 0:
            return u
        shifted = F.pad(u, (0, 0, back, 0))[: len(u)]
        return shifted * (self.position >= back).unsqueeze(1)

    def windows(self, u: torch.Tensor, size: int) -> torch.Tensor:
        """Each token's last ``size`` inputs, oldest first, zeros before its string's start:
        (tokens, channels, size), as ``unfold`` gives them over a zero-padded string."""
        return torch.stack([self.earlier(u, size - 1 - j) for j in range(size)], dim=-1)

    def tail(self, u: torch.Tensor, size: int) -> torch.Tensor:
        """Each string's last ``size`` inputs of ``u`` (tokens, channels), oldest first, zeros
        before its start: (batch, size, channels), what a convolution continues from."""
        back = torch.arange(size - 1, -1, -1, device=u.device)
        index = self.last.unsqueeze(1) - back
        kept = index >= self.offsets[:-1].unsqueeze(1)
        return u[index.clamp(min=0)] * kept.unsqueeze(-1)
