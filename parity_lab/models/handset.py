"""Parity networks by construction: weights derived by hand, exact on strings of any length.

All three are ordinary ``ParityRNN`` instances around torch's own cores (bit encoding, input 1),
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
"""

from __future__ import annotations

import math

import torch
from torch import nn

from parity_lab.models.classifier import ParityRNN

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
