"""A proof that a trained one-layer diagonal linear RNN computes parity at every length.

``LinearRNN`` (``parity_lab.models.linear_rnn``) reads a bit ``x`` through ``h <- a(x) h + b(x)``
per unit, then ``y = out_proj(h * silu(gate(x)))`` and the head. With bit encoding ``a``, ``b``
and the gate take two values per unit, one for each bit, so each unit is a pair of affine maps of
the line. The proof sorts the units into two kinds and needs at least one of the first:

- **parity units**: ``a(0) = 1``, ``b(0) = 0`` and ``a(1) = -1`` exactly in float32. Every value
  the chunked scan computes for such a unit is exactly ``0`` (even parity) or ``c = b(1)`` (odd):
  the scan only applies ``h <- A h + B`` where ``(A, B)`` is a step or a block of steps
  composed from zero, and those compositions are ``(1, 0)`` or ``(-1, c)``, products of ``+-1``
  (exact) and sums ``0 + h`` or ``c - h`` with ``h`` in ``{0, c}`` (exact). No rounding ever
  happens, in any order of the scan, in one piece or in pieces with the state carried.
- **contracting units**: every step that is not the identity ``(a, b) = (1, 0)`` has
  ``|a| <= rho`` with ``rho (1 + u)^3 < 1``. Identity steps are exact (``1 h + 0 = h``) and a
  block of them composes to ``(1, 0)`` exactly. Each other operation of the scan is
  ``fl(B + A h)``, at most ``(1 + u)^2 (|B| + |A| |h|)`` in magnitude, fused or not. By induction,
  the states scanned inside a block from zero stay within ``W = k beta / (1 - k rho)``
  (``k = (1 + u)^2``, ``beta`` the largest ``|b|``), a block's running product of ``a`` is 1
  exactly or at most ``rho (1 + u)`` (rounding happens only at the non-identity factors, each
  at most ``rho``), and every state entering a block, and every state, stays within
  ``R = k W / (1 - k rho (1 + u))``, whatever the length.

So after any string of parity ``p`` ending in bit ``x``, the state lies in a box: each parity
unit exactly at ``0`` or ``c``, each contracting unit in ``[-R, R]``. The readout of these four
boxes (``p`` and ``x`` in {0, 1}) is bounded with the interval arithmetic of
``parity_lab.certify``: the product with ``silu(gate(x))`` is one rounded operation, and
``out_proj`` and the head are affine maps whose float32 error is bounded for any order of
summation. If the logit is ``> 0`` on both odd boxes and ``<= 0`` on both even ones, every string
of every length is answered right.

Assumed, as for the classic cells: a float32 elementwise function gives the same value for the
same input wherever it is computed (the values of ``a``, ``b`` and ``silu(gate)`` are read off
the network's own code, at many positions, and must agree). Not covered (``None`` with the
reason): more than one layer (a second layer's transitions depend on real-valued inputs), the
``pair`` encoding, the ``tokens`` head, and any unit that is neither kind (for instance one with
``|a| = 1`` on a bit that is not a parity unit, whose state can grow without bound).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from parity_lab.certify import TINY, Box, U, affine, rounded_sum
from parity_lab.models import LinearRNN, ParityRNN

MARGIN = 1 + 2.0**-40  # float64 bookkeeping of the bounds


@dataclass
class LinearProof:
    """Why a one-layer linear RNN is exact: which units hold parity, how far the rest can go,
    and the logit bounds of the four boxes (parity, last bit)."""

    parity_units: list[int]
    radius: np.ndarray  # per unit: 0 for parity units, R for contracting ones
    logits: dict[tuple[int, int], tuple[float, float]]

    @property
    def holds(self) -> bool:
        return all(
            (lo > 0) if parity == 1 else (hi <= 0) for (parity, _), (lo, hi) in self.logits.items()
        )

    def describe(self) -> str:
        units = ", ".join(str(i) for i in self.parity_units)
        rest = len(self.radius) - len(self.parity_units)
        bound = f"; {rest} contracting, |h| <= {self.radius.max():.3g}" if rest else ""
        margin = min(lo if parity == 1 else -hi for (parity, _), (lo, hi) in self.logits.items())
        return f"4 boxes: parity unit {units}{bound}; logit margin {margin:.3g}"


@torch.no_grad()
def bit_values(model: ParityRNN) -> dict[str, np.ndarray]:
    """``a``, ``b`` and ``silu(gate)`` for bits 0 and 1, shape (2, hidden), as the network's own
    code computes them at many positions of one string; raises ValueError if they differ."""
    layer = model.rnn.layers[0]
    bits = torch.arange(2).repeat(600)  # both bits at 1,200 positions: vector and tail paths
    x = bits.float().view(1, -1, 1).to(next(model.parameters()).device)
    a, b, gate = layer.transition(x)
    values = {"a": a[0], "b": b[0], "silu": F.silu(gate)[0]}
    out = {}
    for name, value in values.items():
        per_bit = [value[bits == bit] for bit in (0, 1)]
        if any(bool((v != v[0]).any()) for v in per_bit):
            raise ValueError(f"{name} differs between positions of the same bit")
        out[name] = torch.stack([v[0] for v in per_bit]).double().cpu().numpy()
    return out


def contraction_radius(a: np.ndarray, b: np.ndarray) -> float | None:
    """``R`` of the module doc for one unit (``a``, ``b``: its values on bits 0 and 1), or None
    if a non-identity step has ``|a|`` too close to 1 for the bound."""
    moving = ~((a == 1.0) & (b == 0.0))
    if not moving.any():
        return 0.0
    rho, beta = float(np.abs(a[moving]).max()), float(np.abs(b).max())
    k = (1 + U) ** 2
    if k * rho * (1 + U) * MARGIN >= 1:
        return None
    within = k * beta / (1 - k * rho * MARGIN) * MARGIN
    return k * within / (1 - k * rho * (1 + U) * MARGIN) * MARGIN + TINY


def linear_proof(model: ParityRNN, encoding: str) -> LinearProof | str:
    """The proof of the module doc, or a sentence saying why this model is not covered."""
    core = model.rnn
    if not isinstance(core, LinearRNN):
        return f"{type(core).__name__} is not a linear RNN"
    if core.num_layers != 1:
        return (
            "a linear RNN of more than one layer is not covered: its second layer's transitions "
            "depend on real-valued inputs, not on two bits"
        )
    if encoding != "bit" or model.head_kind != "logit":
        return "the linear RNN proof covers bit encoding and the logit head only"
    try:
        values = bit_values(model)
    except ValueError as error:
        return f"not covered: {error}"
    a, b, silu = values["a"], values["b"], values["silu"]
    parity_units, radius = [], np.zeros(core.hidden_size)
    for unit in range(core.hidden_size):
        if a[0, unit] == 1.0 and b[0, unit] == 0.0 and a[1, unit] == -1.0:
            parity_units.append(unit)
            continue
        bound = contraction_radius(a[:, unit], b[:, unit])
        if bound is None:
            return (
                f"unit {unit} is neither a parity unit (a(0) = 1, b(0) = 0, a(1) = -1 exactly) "
                f"nor contracting: a = {a[:, unit].tolist()}, b = {b[:, unit].tolist()}"
            )
        radius[unit] = bound
    if not parity_units:
        return "no unit has a(0) = 1, b(0) = 0 and a(1) = -1 exactly, so none holds parity"
    out = model.rnn.layers[0].out_proj
    weights = [
        (m.weight.detach().double().cpu().numpy(), m.bias.detach().double().cpu().numpy())
        for m in (out, model.head)
    ]
    logits = {}
    for parity in (0, 1):
        centre = np.zeros(core.hidden_size)
        centre[parity_units] = b[1, parity_units] * parity  # 0 or c, exactly
        for bit in (0, 1):
            h: Box = (centre - radius, centre + radius)
            products = np.stack([h[0] * silu[bit], h[1] * silu[bit]])  # exact in float64
            box: Box = (
                rounded_sum(products.min(axis=0), 0 * centre) - TINY,
                rounded_sum(products.max(axis=0), 0 * centre) + TINY,
            )
            for weight, bias in weights:
                box = affine(weight, bias, *box)
            logits[(parity, bit)] = (float(box[0][0]), float(box[1][0]))
    return LinearProof(parity_units, radius, logits)
