"""Analysis of the state-tracking families: transitions by input bit, automata of any state."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from parity_lab import analyze
from parity_lab.data import key_generator
from parity_lab.models import SLSTM, LinearRNN, ParityRNN
from parity_lab.models.handset import handset_linear_rnn, handset_lstm
from tests.conftest import CONF, compose_config, event_tags, save_as_run


def random_bits(num: int = 32, length: int = 20) -> torch.Tensor:
    return torch.randint(0, 2, (num, length), generator=key_generator(0, "test_analyze"))


def test_handset_signed_linear_rnn_keeps_on_a_zero_and_flips_on_a_one() -> None:
    (layer,) = analyze.transition_values(handset_linear_rnn(), random_bits(), "bit")
    assert layer.per_unit == {0: [1.0], 1: [-1.0]}  # exactly: float32 saturates the gates
    assert layer.quantiles[0] == [1.0] * 5 and layer.quantiles[1] == [-1.0] * 5
    assert layer.flip_unit() == 0 and math.isinf(layer.half_life(0))


def test_positive_linear_rnn_transitions_stay_in_zero_one_and_leak() -> None:
    torch.manual_seed(0)
    model = ParityRNN(LinearRNN, input_size=1, hidden_size=4, num_layers=2)
    bits = random_bits()
    found = analyze.transition_values(model, bits, "bit")
    assert [layer.layer for layer in found] == [0, 1]
    for layer in found:
        for bit in (0, 1):
            assert layer.values[bit].numel() == int((bits == bit).sum()) * 4
            assert layer.quantiles[bit][0] > 0 and layer.quantiles[bit][-1] <= 1
        assert layer.half_life(layer.flip_unit()) < math.inf


def test_half_life_of_a_leaking_unit() -> None:
    layer = analyze.Transitions(0, {0: [0.5], 1: [-0.5]}, {}, {})
    assert layer.half_life(0) == pytest.approx(1.0)  # |a| = 1/2 per bit: half after one bit


def test_cores_without_transitions_have_none() -> None:
    assert analyze.transition_values(handset_lstm(), random_bits(), "bit") == []


@pytest.mark.parametrize(
    "state",
    [
        torch.zeros(2, 5, 3),  # (layers, batch, hidden)
        (torch.zeros(1, 5, 3), torch.zeros(1, 5, 3)),  # LSTM (h, c)
        torch.zeros(1, 5, 2, 4, 4),  # matrix memory (layers, batch, heads, d, d)
        ((torch.zeros(1, 5, 3), torch.zeros(1, 5, 2, 2)), [torch.zeros(1, 5, 1)]),  # nested
    ],
)
def test_state_vector_flattens_any_state_to_batch_by_features(state: object) -> None:
    def size(part: object) -> int:
        if isinstance(part, tuple | list):
            return sum(size(p) for p in part)
        return part[:, 0].numel()

    assert analyze.state_vector(state).shape == (5, size(state))


def test_state_vector_keeps_each_strings_state_in_its_row() -> None:
    h = torch.arange(2 * 3 * 4, dtype=torch.float).view(2, 3, 4)  # (layers, batch, hidden)
    matrix = torch.arange(3 * 4, dtype=torch.float).view(1, 3, 2, 2)
    rows = analyze.state_vector((h, matrix))
    assert torch.equal(rows[1], torch.cat([h[0, 1], h[1, 1], matrix[0, 1].flatten()]))


def test_analyze_finds_the_parity_automaton_of_the_signed_linear_rnn() -> None:
    result, _, _ = analyze.analyze(handset_linear_rnn(), num_strings=64, length=30)
    assert result.automaton.num_states == 2 and result.automaton.is_parity()
    assert result.agreement == 1.0


def test_analyze_command_shows_transitions_of_a_linear_rnn_run(
    make_config, tmp_path: Path, capsys
) -> None:
    cfg = make_config("model=linear_rnn_signed", "model.hidden_size=1")
    save_as_run(tmp_path, cfg, handset_linear_rnn())

    analyze.main([str(tmp_path), "--strings", "32"])
    printed = capsys.readouterr().out
    assert "layer 0, on a 0: +1.0000 +1.0000 +1.0000 +1.0000 +1.0000" in printed
    assert "layer 0, on a 1: -1.0000 -1.0000 -1.0000 -1.0000 -1.0000" in printed
    assert "unit 0, a(0) = +1.000000, a(1) = -1.000000" in printed
    saved = json.loads((tmp_path / "analysis" / "transitions.json").read_text())
    assert saved[0]["per_unit"] == {"0": [1.0], "1": [-1.0]} and saved[0]["half_life"] is None
    assert (tmp_path / "analysis" / "transitions.png").stat().st_size > 0
    assert "analysis/transitions" in event_tags(tmp_path, "images")


RECURRENT = sorted(
    path.stem for path in (CONF / "model").glob("*.yaml") if path.stem != "transformer"
)


@pytest.mark.parametrize("name", RECURRENT)
def test_automaton_extraction_runs_on_every_recurrent_family(name: str) -> None:
    """Whatever the state (vector, (h, c), matrix memory), it clusters into an automaton whose
    predictions are compared with the network's."""
    torch.manual_seed(0)
    model = instantiate(compose_config(f"model={name}", "model.hidden_size=4").model)
    result, states, bits = analyze.analyze(model, num_strings=16, length=8, max_clusters=3)
    assert states.shape[:2] == bits.shape == (16, 8)
    assert 1 <= result.clusters <= 3 and 0.0 <= result.agreement <= 1.0


def handset_slstm_with_counters() -> ParityRNN:
    """An sLSTM that computes parity exactly in unit 0, beside units 1-3 that the head ignores
    and that only count: their forget gates are 1 and input gates constant, so their ``n`` and
    ``c`` grow by 1 and ``tanh(1/2)`` every bit, as the normalisers of trained sLSTMs grow with
    the string.

    Unit 0 holds ``h = c / n = +1`` on odd parity, ``-1`` on even. On a 1 its forget gate is 0
    and its input gate 1 (``c`` becomes the candidate, ``n`` 1); on a 0 its forget gate is 1 and
    its input gate ``exp(-K)``, 0 in float32 (keep), except on a leading run of 0s, where the
    stabiliser opens every input gate and ``c / n`` is the mean of the candidates. The candidate
    ``tanh(G (1.5 x - 0.75 h - 1))`` is ``+1`` on a 1 from ``h`` in ``{-1, 0}``, ``-1`` on a 1
    from ``h = +1``, and ``-1`` on a 0 from ``h`` in ``{-1, 0}``: so that mean is ``-1`` too."""
    k, g, hidden = 120.0, 100.0, 4  # saturated: gates and candidate are exactly 0, +-1
    model = ParityRNN(SLSTM, input_size=1, hidden_size=hidden)
    i, f, z, o = (slice(gate * hidden, (gate + 1) * hidden) for gate in range(4))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        w_ih, w_hh, b_ih = model.rnn.weight_ih_l0, model.rnn.weight_hh_l0, model.rnn.bias_ih_l0
        w_ih[i.start, 0], b_ih[i.start] = k, -k  # unit 0: i~ = K (x - 1); counters: i~ = 0
        w_ih[f.start, 0], b_ih[f] = -2 * k, k  # unit 0: f~ = K (1 - 2x); counters: f~ = K
        w_ih[z.start, 0], w_hh[z.start, 0], b_ih[z.start] = 1.5 * g, -0.75 * g, -g
        b_ih[z.start + 1 : z.stop] = 0.5  # the counters' candidate: tanh(1/2) at every bit
        b_ih[o] = k  # output gates 1
        model.head.weight[0, 0] = 1.0  # logit = h of unit 0
    return model


def test_analyze_clusters_the_slstms_normalised_memory_not_its_growing_normaliser() -> None:
    """The counters' ``n`` and ``c`` grow with the string: clustered whole (16 states, 61%
    agreement before ``SLSTM.analysis_state``), the states fall into bands of length. ``h`` and
    ``c / n``, all that the output sees, take two values: the 2-state parity automaton."""
    model = handset_slstm_with_counters()
    bits = random_bits(64, 40)
    _, logits = analyze.collect_states(model, bits, "bit")
    assert torch.equal((logits > 0).long(), bits.cumsum(dim=1).remainder(2))  # solved
    result, states, _ = analyze.analyze(model, num_strings=64, length=40)
    assert result.automaton.num_states == 2 and result.automaton.is_parity()
    assert result.agreement == 1.0
    assert states.shape[2] == 8  # h and c / n of 4 units
