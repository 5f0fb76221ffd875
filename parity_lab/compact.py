"""Bit strings written as their runs: ``1 0^24`` for a 1 and 24 zeros, ``(1 0^3)^5`` for a group
repeated. Worst-case strings and counterexamples are recorded this way (metrics.json, summaries),
since they can be a million bits long."""

from __future__ import annotations


def run_length(bits: str) -> str:
    """``'1000000'`` -> ``'1 0^6'``: a string written as its runs."""
    if not bits:
        return "(empty)"
    runs, current, count = [], bits[0], 0
    for b in bits + "|":
        if b == current:
            count += 1
            continue
        runs.append(current if count == 1 else f"{current}^{count}")
        current, count = b, 1
    return " ".join(runs)


def expand(name: str) -> str:
    """The bits of a compact name (``'1 0^3'`` -> ``'1000'``; groups ``(..)^k`` too)."""
    return "".join(_tokens(name))


def _tokens(name: str) -> list[str]:
    parts, i = [], 0
    while i < len(name):
        if name[i] == " ":
            i += 1
        elif name[i] == "(":
            close = name.index(")", i)
            inner = expand(name[i + 1 : close])
            i = close + 1
            times = 1
            if name[i : i + 1] == "^":
                j = i + 1
                while j < len(name) and name[j].isdigit():
                    j += 1
                times, i = int(name[i + 1 : j]), j
            parts.append(inner * times)
        else:
            bit, i = name[i], i + 1
            times = 1
            if name[i : i + 1] == "^":
                j = i + 1
                while j < len(name) and name[j].isdigit():
                    j += 1
                times, i = int(name[i + 1 : j]), j
            parts.append(bit * times)
    return parts
