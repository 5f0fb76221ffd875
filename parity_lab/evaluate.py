"""Accuracy on long strings, evaluated in chunks with the recurrent state carried across.

Memory depends on the chunk length, never on the string length, so strings of a million bits
evaluate on a laptop; time grows linearly with length.
"""

from __future__ import annotations

import torch

from parity_lab.data import encode, key_generator
from parity_lab.models import ParityRNN


@torch.inference_mode()
def accuracy_at_length(
    model: ParityRNN,
    length: int,
    num_strings: int,
    seed: int,
    encoding: str = "bit",
    chunk_len: int = 4096,
) -> float:
    """Share of ``num_strings`` random strings of exactly ``length`` bits whose parity is right.

    The strings are fixed by ``(seed, length)``; they are generated chunk by chunk, so they never
    exist whole in memory. Only the last position's logit is computed: the head on every position
    cost a third of the time.
    """
    device = next(model.parameters()).device
    generator = key_generator(seed, "long", length)
    parity = torch.zeros(num_strings, dtype=torch.int64)
    full = torch.full((num_strings,), chunk_len)
    state, outputs = None, None
    for start in range(0, length, chunk_len):
        size = (num_strings, min(chunk_len, length - start))
        bits = torch.randint(0, 2, size, generator=generator)
        parity ^= bits.sum(dim=1).remainder_(2)
        outputs, state = model.rnn(encode(bits, full, encoding).to(device), state)
    predictions = (model.head(outputs[:, -1]).squeeze(-1) > 0).long().cpu()
    return (predictions == parity).float().mean().item()
