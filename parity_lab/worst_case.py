"""Worst-case strings: the structured strings on which a leaky network fails first.

In ``n`` random bits the longest run of zeros is only about ``log2 n`` bits long, so a network
whose odd state drifts to even after 25 zeros looks exact on a million random bits. Every
evaluation therefore also reads

- every string of up to ``EXHAUSTIVE_BITS`` bits (one pass of ``2^16`` streams scores every
  prefix, so every shorter string too);
- long runs after an even and after an odd prefix: ``0^k``, ``1 0^k``, ``11 0^k``, ``1^k``,
  ``0 1^k``, and periodic strings ``(1 0^m)^*`` for ``m`` in ``PERIODS``; each is one stream
  scored at every length up to the longest evaluated one.

``worst_case(model, max_len, encoding)`` returns the first (shortest) string the network gets
wrong, or None.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from parity_lab.compact import run_length
from parity_lab.data import encode
from parity_lab.evaluate import chunk_length
from parity_lab.models import ParityRNN

EXHAUSTIVE_BITS = 16
PERIODS = (1, 2, 3, 4, 7, 15, 31, 63)


@dataclass(frozen=True)
class Stream:
    """An infinite structured string: ``prefix`` then ``period`` repeated."""

    prefix: str
    period: str

    def bits(self, start: int, size: int) -> torch.Tensor:
        """Bits ``start .. start + size - 1`` of the stream."""
        index = torch.arange(start, start + size)
        prefix = torch.tensor([int(b) for b in self.prefix] or [0])
        period = torch.tensor([int(b) for b in self.period])
        tail = period[(index - len(self.prefix)).clamp(min=0) % len(self.period)]
        return torch.where(index < len(self.prefix), prefix[index.clamp(max=len(prefix) - 1)], tail)

    def name(self, length: int) -> str:
        """The first ``length`` bits, written compactly (``1 0^24``, ``(1 0^3)^5 1``)."""
        body = length - len(self.prefix)
        if body <= 0:
            return run_length(self.prefix[:length])
        whole, rest = divmod(body, len(self.period))
        parts = [run_length(self.prefix)] if self.prefix else []
        if len(self.period) == 1:
            parts.append(f"{self.period}^{body}" if body > 1 else self.period)
        else:
            unit = run_length(self.period)
            if whole:
                parts.append(f"({unit})^{whole}" if whole > 1 else unit)
            if rest:
                parts.append(run_length(self.period[:rest]))
        return " ".join(parts)


STREAMS = (
    Stream("", "0"),
    Stream("1", "0"),
    Stream("11", "0"),
    Stream("", "1"),
    Stream("0", "1"),
    *(Stream("", "1" + "0" * m) for m in PERIODS),
    *(Stream("1", "1" + "0" * m) for m in PERIODS[:4]),
)


@torch.no_grad()
def first_wrong_exhaustive(
    model: ParityRNN, encoding: str, bits: int = EXHAUSTIVE_BITS
) -> str | None:
    """The shortest string of at most ``bits`` bits the model gets wrong (all tried), or None."""
    device = next(model.parameters()).device
    codes = torch.arange(2**bits)
    strings = (codes[:, None] >> torch.arange(bits - 1, -1, -1)) & 1  # every string, MSB first
    logits, _ = model.run(encode(strings, torch.full((2**bits,), bits), encoding).to(device))
    wrong = (logits.cpu() > 0).long() != torch.cumsum(strings, dim=1).remainder(2)
    if not wrong.any():
        return None
    length = int(wrong.any(dim=0).long().argmax())  # shortest wrong prefix length - 1
    row = int(wrong[:, length].long().argmax())
    return "".join(str(int(b)) for b in strings[row, : length + 1])


@torch.no_grad()
def first_wrong_structured(
    model: ParityRNN, max_len: int, encoding: str, chunk_len: int | None = None
) -> tuple[int, str] | None:
    """``(length, name)`` of the shortest structured string of at most ``max_len`` bits that the
    model gets wrong, or None. Every stream is read once, in chunks, with the state carried."""
    device = next(model.parameters()).device
    chunk_len = chunk_length(model, chunk_len)
    count = len(STREAMS)
    parity = torch.zeros(count, 1, dtype=torch.int64)
    state, first = None, None
    for start in range(0, max_len, chunk_len):
        size = min(chunk_len, max_len - start)
        bits = torch.stack([s.bits(start, size) for s in STREAMS])
        running = (torch.cumsum(bits, dim=1) + parity).remainder_(2)
        parity = running[:, -1:]
        logits, state = model.run(
            encode(bits, torch.full((count,), size), encoding).to(device), state
        )
        wrong = (logits.cpu() > 0).long() != running
        if wrong.any():
            position = int(wrong.any(dim=0).long().argmax())
            stream = STREAMS[int(wrong[:, position].long().argmax())]
            first = (start + position + 1, stream.name(start + position + 1))
            break
    return first


def worst_case(model: ParityRNN, max_len: int, encoding: str) -> tuple[int, str] | None:
    """``(length, compact string)`` of the first worst-case string the model gets wrong: every
    string up to ``EXHAUSTIVE_BITS`` bits first, then the structured streams to ``max_len``."""
    short = first_wrong_exhaustive(model, encoding, min(EXHAUSTIVE_BITS, max_len))
    if short is not None:
        return len(short), run_length(short)
    return first_wrong_structured(model, max_len, encoding)
