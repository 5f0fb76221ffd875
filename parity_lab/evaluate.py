"""Accuracy on long strings, evaluated in chunks with the recurrent state carried across.

Memory depends on the chunk length, never on the string length, so strings of a million bits
evaluate on a laptop; time grows linearly with length.
"""

from __future__ import annotations

import torch

from parity_lab.data import encode, key_generator
from parity_lab.models import ParityRNN


@torch.no_grad()
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
    exist whole in memory.
    """
    device = next(model.parameters()).device
    generator = key_generator(seed, "long", length)
    parity = torch.zeros(num_strings, dtype=torch.int64)
    full = torch.full((num_strings,), chunk_len)
    state, final_logits = None, None
    for start in range(0, length, chunk_len):
        bits = torch.randint(
            0, 2, (num_strings, min(chunk_len, length - start)), generator=generator
        )
        parity ^= bits.sum(dim=1).remainder_(2)
        logits, state = model.run(encode(bits, full, encoding).to(device), state)
        final_logits = logits[:, -1]
    predictions = (final_logits > 0).long().cpu()
    return (predictions == parity).float().mean().item()
