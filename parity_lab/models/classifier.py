"""One classifier around any recurrent core: a linear head reads a logit at every position."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from parity_lab import READOUTS


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
        **core_options: Any,
    ) -> None:
        super().__init__()
        if readout not in READOUTS:
            raise ValueError(f"model.readout={readout!r}: allowed values are {list(READOUTS)}")
        self.readout = readout
        self.rnn = rnn(input_size, hidden_size, num_layers, batch_first=True, **core_options)
        self.head = nn.Linear(hidden_size, 1)
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
