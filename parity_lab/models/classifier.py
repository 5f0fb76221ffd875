"""One classifier around any recurrent core: a linear head reads a logit at every position."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from parity_lab import HEADS, READOUTS


def in_chunks(
    forward: Callable[[torch.Tensor, Any], tuple[torch.Tensor, Any]],
    x: torch.Tensor,
    state: Any,
    size: int,
) -> tuple[torch.Tensor, Any]:
    """A core's ``forward(x, state) -> (outputs, state)`` over ``x`` (batch, time, ...) in chunks
    of ``size`` positions, the state carried from each to the next: the whole string's outputs
    and its final state, with each chunk's activations no larger than ``size`` positions."""
    outputs = []
    for chunk in x.split(size, dim=1):
        out, state = forward(chunk, state)
        outputs.append(out)
    return torch.cat(outputs, dim=1), state


class TokenHead(nn.Module):
    """The published 3-way head, ``scores = classes(h)`` over (pad, bit 0, bit 1), bias-free.

    Called like a ``logit`` head it gives the parity logit ``score(1) - score(0)`` (batch, time,
    1), with ``weight`` and ``bias`` of that linear map, so certify and analyze read it as they
    read ``nn.Linear(hidden, 1)``. It differs from the published accuracy only where the pad
    class scores highest, which they count as an error and this reads as the larger bit class.
    """

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.classes = nn.Linear(hidden_size, 3, bias=False)

    def scores(self, h: torch.Tensor) -> torch.Tensor:
        return self.classes(h)

    @property
    def weight(self) -> torch.Tensor:
        w = self.classes.weight
        return (w[2] - w[1]).unsqueeze(0)

    @property
    def bias(self) -> torch.Tensor:
        return self.classes.weight.new_zeros(1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h @ self.weight.t()


class ParityRNN(nn.Module):
    """Recurrent core + linear head: ``forward(x, lengths) -> logits (batch, time)``.

    ``rnn`` builds the core with torch's RNN signature ``(input_size, hidden_size, num_layers,
    batch_first=True)``: ``torch.nn.LSTM`` or a hand-written twin such as ``ManualLSTM``. Both name
    their parameters alike, so a ``state_dict`` moves between them unchanged.

    ``readout`` picks where a string's prediction is read: ``last`` (its true last bit, position
    ``lengths - 1``) or ``padded_end`` (the last padded position: the classic padding bug).

    ``compile`` (a ``torch.compile`` mode, or None for eager) compiles the training forward, whose
    shapes are static (every batch is padded to ``data.max_len``): ``reduce-overhead`` replays it
    as CUDA graphs on a GPU. Evaluation, with its many lengths, stays eager.

    ``head`` picks the output layer: ``logit`` (one logit per position, ``nn.Linear(hidden, 1)``)
    or ``tokens``, the published state-tracking head (Grazzi et al., 2025; xLSTM, 2024): a
    bias-free ``nn.Linear(hidden, 3)`` scoring their vocabulary (pad, bit 0, bit 1), trained with
    cross-entropy on the answer (``loss=token_ce``). Its parity logit is the score of bit 1 minus
    the score of bit 0, so every tool that reads a logit reads this head too.

    ``weight_decay`` is the family's published weight decay, taken where ``optimizer.weight_decay``
    is null (``experiment=state_tracking``); None there means 0.

    Any further keyword (a model yaml's own keys, such as ``eigenvalues`` of ``linear_rnn``) is
    passed on to the core.
    """

    def __init__(
        self,
        rnn: Callable[..., nn.Module],
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        readout: str = "last",
        compile: str | None = None,
        head: str = "logit",
        weight_decay: float | None = None,
        **core_options: Any,
    ) -> None:
        super().__init__()
        if readout not in READOUTS:
            raise ValueError(f"model.readout={readout!r}: allowed values are {list(READOUTS)}")
        self.readout = readout
        self.rnn = rnn(input_size, hidden_size, num_layers, batch_first=True, **core_options)
        if head not in HEADS:
            raise ValueError(f"model.head={head!r}: allowed values are {list(HEADS)}")
        self.head_kind = head
        self.head = nn.Linear(hidden_size, 1) if head == "logit" else TokenHead(hidden_size)
        self.weight_decay = weight_decay
        self.compile_mode = compile
        self._compiled_run = (
            torch.compile(self.run, mode=compile, dynamic=False) if compile else None
        )

    @property
    def max_len(self) -> int | None:
        """The longest string the core reads (a Transformer's ``max_len``); None: any length."""
        return getattr(self.rnn, "max_len", None)

    @property
    def eval_chunk_len(self) -> int | None:
        """Bits per chunk the core evaluates long strings fastest in (its ``eval_chunk_len``);
        None: no preference (``parity_lab.evaluate.CHUNK_LEN``)."""
        return getattr(self.rnn, "eval_chunk_len", None)

    def run(self, x: torch.Tensor, state: Any = None) -> tuple[torch.Tensor, Any]:
        """Logits for a chunk of time steps, starting from (and returning) the recurrent state."""
        outputs, state = self.rnn(x, state)
        return self.head(outputs).squeeze(-1), state

    def token_scores(self, x: torch.Tensor) -> torch.Tensor:
        """The ``tokens`` head's three scores per position (batch, time, 3), for its loss."""
        return self.head.scores(self.rnn(x)[0])

    def answer_scores(self, x: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
        """The ``tokens`` head's three scores at one position per string (batch, 3), for a loss
        read there. A core with ``reads_answers`` (its ``forward`` takes ``answers``) skips its
        position-wise work at every other position; the values are the same."""
        if getattr(self.rnn, "reads_answers", False):
            return self.head.scores(self.rnn(x, answers=answers)[0][:, 0])
        rows = torch.arange(len(answers), device=answers.device)
        return self.token_scores(x)[rows, answers]

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        # Causal: position t sees only inputs up to t, so padding never reaches a valid position.
        if self.training and self._compiled_run is not None:
            return self._compiled_run(x)[0]
        return self.run(x)[0]

    def final_logits(self, logits: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The logit that predicts each string's parity, according to ``readout``."""
        if self.readout == "padded_end":
            return logits[:, -1]
        return logits.gather(1, (lengths - 1).unsqueeze(1)).squeeze(1)
