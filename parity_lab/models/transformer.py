"""A causal Transformer encoder from ``torch.nn``, behind the recurrent-core interface.

Each position attends to itself and the positions before it (a causal mask), so outputs at valid
positions never see padding. The input bits are embedded by a linear map to ``hidden_size``,
to which a position code is added, chosen by ``positional``:

- ``sinusoidal``: the fixed sines and cosines of Vaswani et al. (2017);
- ``learned``: one trained vector per position (GPT-style), so positions never trained on keep
  their random initial vector;
- ``none``: no position code; causal attention alone still tells positions apart (it can count
  how many tokens it averages over), as studied by Haviv et al. (2022).

Attention costs ``time^2`` per string, and the position codes exist for ``max_len`` positions
only, so strings longer than ``max_len`` are not read at all: ``forward`` raises a one-line
``ValueError``, and the evaluation code asks ``ParityRNN.max_len`` first and skips those lengths
with a printed note (``test/skipped_lengths`` in ``metrics.json``).

The "state" carried between chunks is the input seen so far, at most ``max_len`` positions:
the next chunk recomputes attention over the whole prefix, so a chunked run equals the whole run.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from parity_lab import POSITIONAL


def sinusoidal_codes(max_len: int, size: int) -> torch.Tensor:
    """``(max_len, size)``: sin and cos of position times geometric frequencies, interleaved."""
    position = torch.arange(max_len, dtype=torch.float).unsqueeze(1)
    frequency = torch.exp(torch.arange(0, size, 2, dtype=torch.float) * (-math.log(1e4) / size))
    codes = torch.zeros(max_len, size)
    codes[:, 0::2] = torch.sin(position * frequency)
    codes[:, 1::2] = torch.cos(position * frequency)[:, : size // 2]
    return codes


@contextmanager
def attention_through_sdpa() -> Iterator[None]:
    """Run ``nn.TransformerEncoderLayer`` in eval mode on the path training takes.

    Without grad, torch's encoder layers take a fused "fast path" that computes causal attention
    through a masked softmax over the whole ``time x time`` score matrix; training goes through
    ``scaled_dot_product_attention`` with ``is_causal``, whose CPU flash kernel never builds that
    matrix. On 1,024 strings of 255 bits (the published protocol's longest test batch, one thread)
    the fast path took 3.7 s, this one 2.7 s; outputs agree to 2e-6. The switch is torch's own and
    global, so it is restored on exit.
    """
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


class CausalTransformer(nn.Module):
    """Pre-norm ``nn.TransformerEncoder`` with a causal mask and torch's RNN signature.

    ``forward(x, state) -> (outputs, state)``: ``state`` is the input so far, ``(batch, seen,
    input_size)``, or None at the start.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        batch_first: bool = True,
        num_heads: int = 2,
        positional: str = "sinusoidal",
        max_len: int = 512,
    ) -> None:
        super().__init__()
        if not batch_first:
            raise ValueError("CausalTransformer is batch_first only")
        if positional not in POSITIONAL:
            raise ValueError(
                f"model.positional={positional!r} is invalid: allowed values are {POSITIONAL}"
            )
        if num_heads < 1 or hidden_size % num_heads:
            raise ValueError(
                f"model.num_heads={num_heads} is invalid: expected a divisor of "
                f"model.hidden_size={hidden_size}"
            )
        if max_len < 1:
            raise ValueError(f"model.max_len={max_len} is invalid: expected an integer >= 1")
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.positional, self.max_len = positional, max_len
        self.embed = nn.Linear(input_size, hidden_size)
        if positional == "learned":
            self.position = nn.Parameter(torch.randn(max_len, hidden_size) * 0.02)
        elif positional == "sinusoidal":
            self.register_buffer(
                "position", sinusoidal_codes(max_len, hidden_size), persistent=False
            )
        layer = nn.TransformerEncoderLayer(
            hidden_size,
            num_heads,
            dim_feedforward=4 * hidden_size,
            dropout=0.0,
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(
            layer, num_layers, norm=nn.LayerNorm(hidden_size), enable_nested_tensor=False
        )

    def forward(
        self, x: torch.Tensor, state: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        seen = x if state is None else torch.cat([state, x], dim=1)
        steps = seen.shape[1]
        if steps > self.max_len:
            raise ValueError(
                f"a string of {steps} positions is longer than model.max_len={self.max_len}: "
                "the Transformer attends over at most max_len positions"
            )
        hidden = self.embed(seen)
        if self.positional != "none":
            hidden = hidden + self.position[:steps]
        mask = nn.Transformer.generate_square_subsequent_mask(steps, device=x.device)
        with attention_through_sdpa():
            outputs = self.encoder(hidden, mask=mask, is_causal=True)
        return outputs[:, steps - x.shape[1] :], seen
