"""Parity networks by construction: weights derived by hand, exact on strings of any length.

All are ordinary ``ParityRNN`` instances around the project's cores (bit encoding, input 1),
so they run, save and load like trained models. Each keeps its state in a finite set of values
that float32 reproduces exactly (saturated gates are exactly 0 or 1), so no error accumulates:
the state after a million bits is bit-for-bit one of the states after one bit.

``handset_lstm`` (1 unit). Gates by the input bit only, with gain ``K``: on a 0 the forget gate
is 1 and the input gate 0 (the cell keeps its value); on a 1 the forget gate is 0 and the input
gate 1 (the cell is replaced by the candidate). The candidate ``g = tanh(W (t - h))`` is a
threshold on the previous output ``h`` at ``t = tanh(1) / 2``: it is ``+1`` when ``h`` is
``0`` (start) or ``-tanh(1)``, and ``-1`` when ``h = +tanh(1)``. So a 1 flips the cell between
``-1`` and ``+1`` (from the start ``0`` it goes to ``+1``), and ``c = +1`` exactly when the
parity is odd. The output gate is 1 and the head thresholds ``h`` at ``t``. One unit is the fewest.

``handset_gru`` (1 unit), the same idea in GRU form: the update gate keeps ``h`` on a 0 and takes
the candidate on a 1; the candidate ``n = tanh(W (1/2 - h))`` is ``+1`` from ``h`` in ``{-1, 0}``
and ``-1`` from ``h = +1``.

``handset_rnn`` (2 units). One tanh unit cannot do it: its update ``h -> tanh(w h + u x + b)``
is monotone in ``h`` with the same sign of ``w`` for both inputs, so it cannot keep the two
parity states in order on a 0 and swap them on a 1. Two units compute ``p XOR x`` as ``OR - AND``:
with ``s_i = (h_i + 1) / 2`` in ``{0, 1}`` and ``p = s_1 - s_2`` the previous parity,
``s_1 = [p + x > 1/2]`` (OR) and ``s_2 = [p + x > 3/2]`` (AND), so the new ``s_1 - s_2`` is the
new parity, a linear function of the state, which the next step and the head read. The zero start
state gives ``p = 0``.

``handset_linear_rnn`` (1 unit), a ``LinearRNN`` with signed eigenvalues (Grazzi et al., 2025):
the transition is ``a = 1`` on a 0 and ``a = -1`` on a 1, with ``b = x``, so ``h -> h`` on a 0
and ``h -> 1 - h`` on a 1: ``h`` is the parity itself, 0 or 1. Mamba's parametrisation
``a = 2 exp(-softplus(dt)) - 1`` reaches both ends exactly in float32 with ``dt = +-K``:
``softplus(-K) = log1p(exp(-K))`` and ``exp(-K)`` both round to 0. Every composed map of the scan
is ``h -> h`` or ``h -> 1 - h``, so the scan is exact too. The gate is a constant
``silu(K) = K``; the head thresholds ``K h`` at ``K / 2``.

No ``linear_rnn`` with ``eigenvalues: positive`` (one layer, any width ``H``) is exact. On the
strings ``1^n`` every step has the same transition, ``a_i`` in [0, 1] and ``b_i`` per unit, so
unit ``i`` holds ``b_i (1 - a_i^n) / (1 - a_i)`` (``b_i n`` if ``a_i = 1``). The logit is affine
in the state with coefficients fixed by the last bit (here 1), so as a function of ``n`` it is
``c + sum_i d_i a_i^n`` (a term ``e n`` for a unit with ``a_i = 1``): at most ``H + 1`` terms.
Such a sum has at most ``H`` real zeros (the rule of signs for exponential sums, Polya & Szego,
"Problems and Theorems in Analysis II", part V), so its sign changes at most ``H`` times along
``n = 1, 2, ...``, while the parity of ``1^n`` changes at every ``n``: it is wrong on some
``1^n`` with ``n <= H + 2``. For one unit the logit is monotone in ``n``, so it cannot be right
on all of ``1``, ``11`` and ``111``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from parity_lab.models.classifier import ParityRNN
from parity_lab.models.linear_rnn import LinearRNN

GAIN = 120.0  # float32 sigmoid(-120) is exactly 0 and sigmoid(120) exactly 1: gates are exact


def _load(model: ParityRNN, weights: dict[str, list]) -> ParityRNN:
    """Load ``{state_dict key: nested list}`` into ``model`` (every key must be given)."""
    model.load_state_dict({key: torch.tensor(value) for key, value in weights.items()})
    return model


def handset_lstm() -> ParityRNN:
    """A 1-unit ``torch.nn.LSTM`` computing parity exactly (construction in the module doc)."""
    k, w, threshold = GAIN, 2 * GAIN, math.tanh(1.0) / 2
    model = ParityRNN(nn.LSTM, input_size=1, hidden_size=1)
    # torch gate order: input, forget, cell candidate, output.
    return _load(
        model,
        {
            "rnn.weight_ih_l0": [[2 * k], [-2 * k], [0.0], [0.0]],
            "rnn.weight_hh_l0": [[0.0], [0.0], [-w], [0.0]],
            "rnn.bias_ih_l0": [-k, k, w * threshold, k],
            "rnn.bias_hh_l0": [0.0, 0.0, 0.0, 0.0],
            "head.weight": [[k]],
            "head.bias": [-k * threshold],
        },
    )


def handset_gru() -> ParityRNN:
    """A 1-unit ``torch.nn.GRU`` computing parity exactly (construction in the module doc)."""
    k, w = GAIN, 2 * GAIN
    model = ParityRNN(nn.GRU, input_size=1, hidden_size=1)
    # torch gate order: reset, update, new; h' = (1 - z) n + z h, n = tanh(W_in x + b_in + r (W_hn
    # h + b_hn)). Reset gate 1; update gate 1 (keep) on a 0, 0 (replace) on a 1.
    return _load(
        model,
        {
            "rnn.weight_ih_l0": [[0.0], [-2 * k], [0.0]],
            "rnn.weight_hh_l0": [[0.0], [0.0], [-w]],
            "rnn.bias_ih_l0": [k, k, w / 2],
            "rnn.bias_hh_l0": [0.0, 0.0, 0.0],
            "head.weight": [[k]],
            "head.bias": [-k / 2],
        },
    )


def handset_rnn() -> ParityRNN:
    """A 2-unit tanh ``torch.nn.RNN`` computing parity exactly (construction in the module doc)."""
    k = GAIN
    model = ParityRNN(nn.RNN, input_size=1, hidden_size=2)
    # Pre-activation of unit i: k (p + x - theta_i) with p = (h_1 - h_2) / 2, theta = 1/2, 3/2.
    return _load(
        model,
        {
            "rnn.weight_ih_l0": [[k], [k]],
            "rnn.weight_hh_l0": [[k / 2, -k / 2], [k / 2, -k / 2]],
            "rnn.bias_ih_l0": [-k / 2, -3 * k / 2],
            "rnn.bias_hh_l0": [0.0, 0.0],
            # logit = k (p - 1/2)
            "head.weight": [[k / 2, -k / 2]],
            "head.bias": [-k / 2],
        },
    )


def handset_linear_rnn() -> ParityRNN:
    """A 1-unit signed ``LinearRNN`` computing parity exactly (construction in the module doc)."""
    k = GAIN
    model = ParityRNN(LinearRNN, input_size=1, hidden_size=1, eigenvalues="signed")
    # in_proj rows: dt = 2k x - k (a = 1 on a 0, -1 on a 1), b = x, gate = k (silu(k) = k).
    return _load(
        model,
        {
            "rnn.layers.0.in_proj.weight": [[2 * k], [1.0], [0.0]],
            "rnn.layers.0.in_proj.bias": [-k, 0.0, k],
            "rnn.layers.0.A_log": [0.0],
            "rnn.layers.0.out_proj.weight": [[1.0]],
            "rnn.layers.0.out_proj.bias": [0.0],
            "head.weight": [[1.0]],
            "head.bias": [-k / 2],
        },
    )
