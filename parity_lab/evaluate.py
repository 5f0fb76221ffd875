"""Accuracy on long strings, evaluated in chunks with the recurrent state carried across.

Memory depends on the chunk length, never on the string length, so strings of a million bits
evaluate on a laptop; time grows linearly with length.
"""

from __future__ import annotations

import math

import torch

from parity_lab.data import encode, key_generator
from parity_lab.models import ParityRNN

# Bits per chunk, unless the model names its own (``ParityRNN.eval_chunk_len``). Short chunks keep a
# chunk's activations (strings x bits x gates) in cache: at 64, 512 strings of 1,000,000 bits take
# nn.LSTM 37 s of CPU instead of 66 s at 4096 (python -m parity_lab.bench --eval-bits,
# docs/performance.md). A scan (the linear RNNs) pays per chunk instead and prefers long ones.
CHUNK_LEN = 64
# Random bits are drawn as uint8: the same values as int64 from the same generator, in 40% of the
# time (drawing was a tenth of a linear RNN's evaluation).
BITS = torch.uint8


def chunk_length(model: ParityRNN, chunk_len: int | None) -> int:
    """``chunk_len``; if None, the model's ``eval_chunk_len``, else ``CHUNK_LEN``."""
    if chunk_len is not None:
        return chunk_len
    return model.eval_chunk_len or CHUNK_LEN


@torch.inference_mode()
def accuracy_at_length(
    model: ParityRNN,
    length: int,
    num_strings: int,
    seed: int,
    encoding: str = "bit",
    chunk_len: int | None = None,
) -> float:
    """Share of ``num_strings`` random strings of exactly ``length`` bits whose parity is right.

    The strings are fixed by ``(seed, length)``; they are generated chunk by chunk, so they never
    exist whole in memory. Only the last position's logit is computed: the head on every position
    cost a third of the time.
    """
    device = next(model.parameters()).device
    chunk_len = chunk_length(model, chunk_len)
    generator = key_generator(seed, "long", length)
    parity = torch.zeros(num_strings, dtype=torch.int64)
    full = torch.full((num_strings,), chunk_len)
    state, outputs = None, None
    for start in range(0, length, chunk_len):
        size = (num_strings, min(chunk_len, length - start))
        bits = torch.randint(0, 2, size, generator=generator, dtype=BITS)
        parity ^= bits.sum(dim=1).remainder_(2)
        outputs, state = model.rnn(encode(bits, full, encoding).to(device), state)
    predictions = (model.head(outputs[:, -1]).squeeze(-1) > 0).long().cpu()
    return (predictions == parity).float().mean().item()


def readable_lengths(model: ParityRNN, lengths: list[int]) -> tuple[list[int], list[int]]:
    """``(lengths the model reads, lengths beyond its max_len)``, each in the given order.

    Only a Transformer has a ``max_len``; evaluation skips the longer lengths instead of failing.
    """
    limit = model.max_len
    if limit is None:
        return list(lengths), []
    return [n for n in lengths if n <= limit], [n for n in lengths if n > limit]


def skip_note(model: ParityRNN, skipped: list[int], where: str) -> str:
    """The printed note for lengths ``readable_lengths`` left out of ``where``."""
    return (
        f"note: {where} skips lengths {skipped}: longer than model.max_len={model.max_len}, "
        "the longest string this model reads"
    )


def curve_lengths(max_len: int, dense_until: int, per_decade: int) -> list[int]:
    """Every length ``1..dense_until``, then about ``per_decade`` log-spaced lengths per factor
    of ten, up to and including ``max_len``."""
    dense = list(range(1, min(dense_until, max_len) + 1))
    if max_len <= dense_until:
        return dense
    decades = math.log10(max_len / dense_until)
    points = torch.logspace(
        math.log10(dense_until), math.log10(max_len), max(2, round(decades * per_decade) + 1)
    )
    sparse = sorted({int(round(p)) for p in points.tolist()} - set(dense))
    return dense + [n for n in sparse if n <= max_len]


@torch.no_grad()
def accuracy_by_length(
    model: ParityRNN,
    lengths: list[int],
    num_strings: int,
    seed: int,
    encoding: str = "bit",
    chunk_len: int | None = None,
) -> dict[int, float]:
    """Accuracy at every length in ``lengths``, from one pass over ``num_strings`` streams.

    The prediction after ``n`` bits of a random stream is the prediction for a random string of
    ``n`` bits, so one stream of ``max(lengths)`` bits, read in chunks with the state carried
    across, scores every length at once (the strings of different lengths share prefixes). The
    streams are fixed by ``(seed, "curve")``.
    """
    device = next(model.parameters()).device
    chunk_len = chunk_length(model, chunk_len)
    generator = key_generator(seed, "curve")
    wanted = torch.tensor(sorted(set(lengths)), dtype=torch.int64)
    total = int(wanted[-1])
    parity = torch.zeros(num_strings, 1, dtype=torch.int64)
    full = torch.full((num_strings,), chunk_len)
    correct: dict[int, float] = {}
    state = None
    for start in range(0, total, chunk_len):
        bits = torch.randint(
            0, 2, (num_strings, min(chunk_len, total - start)), generator=generator, dtype=BITS
        )
        running = (torch.cumsum(bits, dim=1) + parity).remainder_(2)
        parity = running[:, -1:]
        logits, state = model.run(encode(bits, full, encoding).to(device), state)
        here = wanted[(wanted > start) & (wanted <= start + bits.shape[1])]
        predictions = (logits[:, here - 1 - start] > 0).long().cpu()
        accuracy = (predictions == running[:, here - 1 - start]).float().mean(dim=0)
        correct.update(zip(here.tolist(), accuracy.tolist(), strict=True))
    return {n: correct[n] for n in lengths}
