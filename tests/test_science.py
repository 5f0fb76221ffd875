"""The science tools: hand-set exact models, accuracy against length, curricula, the padding
readout, and automaton extraction."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from parity_lab import analyze
from parity_lab.config import ConfigError, validate
from parity_lab.curve import exact_until
from parity_lab.data import Curriculum, ParityStream, key_generator, make_batch, sample_bits
from parity_lab.evaluate import accuracy_at_length, accuracy_by_length, curve_lengths
from parity_lab.models import ParityRNN
from parity_lab.models.handset import handset_gru, handset_lstm, handset_rnn
from parity_lab.train import train
from tests.conftest import event_tags, save_as_run, scalar_series

HANDSET = [handset_lstm, handset_gru, handset_rnn]


def every_string(max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All 2 + 4 + ... + 2**max_len bit strings of lengths 1..max_len, zero-padded."""
    rows, lengths = [], []
    for length in range(1, max_len + 1):
        codes = torch.arange(2**length)
        bits = (codes[:, None] >> torch.arange(length)) & 1
        rows.append(torch.nn.functional.pad(bits, (0, max_len - length)))
        lengths.append(torch.full((2**length,), length))
    return torch.cat(rows), torch.cat(lengths)


@pytest.mark.parametrize("build", HANDSET)
def test_handset_model_is_exact_on_every_string_up_to_14(build: Callable[[], ParityRNN]) -> None:
    bits, lengths = every_string(14)
    batch = make_batch(bits, lengths, "bit")
    model = build()
    with torch.no_grad():
        logits = model.final_logits(model(batch.x, batch.lengths), batch.lengths)
    assert len(bits) == 2**15 - 2
    assert torch.equal((logits > 0).long(), bits.sum(dim=1) % 2)


@pytest.mark.parametrize("build", HANDSET)
def test_handset_model_is_exact_on_long_strings(build: Callable[[], ParityRNN]) -> None:
    assert accuracy_at_length(build(), 10_000, num_strings=64, seed=0, chunk_len=2500) == 1.0


def test_handset_sizes_are_minimal_as_documented() -> None:
    assert [m().rnn.hidden_size for m in HANDSET] == [1, 1, 2]


def test_curve_lengths_are_dense_then_log_spaced() -> None:
    lengths = curve_lengths(max_len=1_000_000, dense_until=100, per_decade=10)
    assert lengths[:100] == list(range(1, 101))
    assert lengths[-1] == 1_000_000 and 10_000 in lengths
    assert lengths == sorted(set(lengths))
    assert curve_lengths(max_len=30, dense_until=100, per_decade=10) == list(range(1, 31))


def test_accuracy_by_length_matches_true_parity_per_length() -> None:
    """A model that always answers 'odd' is right on exactly the odd-parity strings: the curve
    must reproduce that share at every length, including across chunk boundaries."""
    model = ParityRNN(torch.nn.RNN, input_size=1, hidden_size=1)
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.fill_(1.0)
    lengths = [1, 2, 7, 8, 9, 30]
    curve = accuracy_by_length(model, lengths, num_strings=200, seed=3, chunk_len=8)
    generator = key_generator(3, "curve")
    chunks = [torch.randint(0, 2, (200, n), generator=generator) for n in (8, 8, 8, 6)]
    bits = torch.cat(chunks, dim=1)
    for n in lengths:
        assert curve[n] == pytest.approx((bits[:, :n].sum(1) % 2).float().mean().item())
    assert accuracy_by_length(handset_rnn(), lengths, 50, seed=0, chunk_len=8) == dict.fromkeys(
        lengths, 1.0
    )


def test_an_accuracy_that_is_not_a_number_is_never_exact() -> None:
    """No string scored gives NaN accuracies (the mean of nothing): no length is exact then, and
    a NaN after exact lengths ends the exact range as a mistake would."""
    assert exact_until({1: 1.0, 2: 1.0, 3: float("nan"), 4: 1.0}) == 2
    assert exact_until({1: 1.0, 2: 0.5, 3: 1.0}) == 1 and exact_until({5: 1.0, 9: 1.0}) == 9
    curve = accuracy_by_length(handset_rnn(), [1, 2, 100], num_strings=0, seed=0)
    assert all(math.isnan(acc) for acc in curve.values()) and exact_until(curve) == 0


def test_length_curve_reports_lengths_beyond_training(make_config, tmp_path: Path) -> None:
    cfg = make_config(
        "data.max_len=8",
        "model.hidden_size=8",
        "eval.lengths=[16]",
        "trainer.max_steps=600",
        "seed=1",
        "eval.curve.max_len=2000",
        "eval.curve.dense_until=20",
        "eval.curve.num_strings=64",
    )
    metrics = train(cfg, run_dir=tmp_path)
    curve = {int(n): acc for n, acc in metrics["length_curve"].items()}
    beyond = [n for n in curve if n > 8]
    assert set(range(1, 21)) <= set(curve) and max(curve) == 2000 and len(beyond) > 12
    assert metrics["test/acc_unseen"] == pytest.approx(sum(curve[n] for n in beyond) / len(beyond))
    assert metrics["val/acc"] == 1.0 and all(curve[n] == 1.0 for n in range(1, 9))
    assert metrics["test/exact_until"] <= metrics["test/exact_until_random"]  # worst case too
    exact = metrics["test/exact_until"]
    assert exact >= 8 and all(curve[n] == 1.0 for n in curve if n <= exact)
    assert exact == max(curve) or min(acc for n, acc in curve.items() if n > exact) < 1.0
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    assert (tmp_path / "length_curve.png").stat().st_size > 0
    assert "val/length_curve" in event_tags(tmp_path, "images")
    # The curve is also a scalar series with step = length, so runs overlay in Time Series.
    assert dict(scalar_series(tmp_path, "val/acc_by_length")) == pytest.approx(curve)
    assert scalar_series(tmp_path, "whole_run/exact_until") == [(metrics["global_step"], exact)]


def test_curricula_pick_lengths_by_step_and_stay_reproducible() -> None:
    linear = ParityStream(0, 50, 50, 8, None, "bit", curriculum=Curriculum("linear", 2, 100))
    assert linear.batch(0).lengths.tolist() == [2] * 8
    assert linear.batch(50).lengths.tolist() == [26] * 8
    assert linear.batch(100).lengths.tolist() == [50] * 8
    warmup = ParityStream(0, 50, 50, 64, None, "bit", curriculum=Curriculum("warmup", 10, 100))
    assert int(warmup.batch(99).lengths.max()) <= 10 and warmup.batch(99).x.shape[1] <= 10
    assert warmup.batch(100).lengths.tolist() == [50] * 64
    again = ParityStream(0, 50, 50, 64, None, "bit", curriculum=Curriculum("warmup", 10, 100))
    assert all(torch.equal(a, b) for a, b in zip(warmup.batch(7), again.batch(7), strict=True))
    plain = ParityStream(0, 1, 20, 16, None, "bit")
    explicit = ParityStream(0, 1, 20, 16, None, "bit", curriculum=Curriculum("none"))
    assert all(torch.equal(a, b) for a, b in zip(plain.batch(3), explicit.batch(3), strict=True))


def test_curriculum_needs_fresh_strings(make_config) -> None:
    cfg = make_config("data.curriculum.schedule=linear", "data.num_train=1000")
    with pytest.raises(ConfigError, match="data.num_train=null"):
        validate(cfg)
    with pytest.raises(ConfigError, match="data.curriculum.schedule"):
        validate(make_config("data.curriculum.schedule=cosine"))


def test_padded_end_readout_differs_from_last_bit_on_variable_lengths() -> None:
    torch.manual_seed(0)
    last = ParityRNN(torch.nn.LSTM, input_size=2, hidden_size=8)
    padded = ParityRNN(torch.nn.LSTM, input_size=2, hidden_size=8, readout="padded_end")
    padded.load_state_dict(last.state_dict())
    bits, lengths = sample_bits(key_generator(0, "readout"), 64, 1, 20)
    batch = make_batch(bits, lengths, "pair")
    with torch.no_grad():
        logits = last(batch.x, batch.lengths)
        at_last = last.final_logits(logits, batch.lengths)
        at_end = padded.final_logits(padded(batch.x, batch.lengths), batch.lengths)
    full = batch.lengths == 20
    assert torch.equal(at_last[full], at_end[full])  # no padding: the same position
    assert not torch.allclose(at_last[~full], at_end[~full])
    assert torch.equal(at_end, logits[:, -1])


@pytest.mark.parametrize("build", HANDSET)
def test_analyze_finds_the_two_state_automaton(build: Callable[[], ParityRNN]) -> None:
    result, _, _ = analyze.analyze(build(), num_strings=64, length=30)
    assert result.automaton.num_states == 2 and result.automaton.is_parity()
    assert result.agreement == 1.0


def test_analyze_rejects_a_network_that_is_not_parity() -> None:
    model = ParityRNN(torch.nn.LSTM, input_size=1, hidden_size=4)  # untrained
    result, _, _ = analyze.analyze(model, num_strings=64, length=20, max_clusters=6)
    assert not (result.automaton.num_states == 2 and result.automaton.is_parity())


def test_analyze_command_on_a_run_dir(make_config, tmp_path: Path, capsys) -> None:
    """The command rebuilds a run from its config and Lightning checkpoint (here the hand-set
    LSTM saved as a run) and writes the automaton, a png and a TensorBoard image."""
    cfg = make_config("model=lstm", "model.hidden_size=1")
    save_as_run(tmp_path, cfg, handset_lstm())

    result = analyze.main([str(tmp_path), "--strings", "32"])
    assert result.automaton.num_states == 2 and result.automaton.is_parity()
    lines = capsys.readouterr().out.splitlines()
    assert "certified: right on every string of every length" in lines[0]
    assert any(
        "it is the 2-state parity automaton, at every length (certified)" in line for line in lines
    )
    saved = json.loads((tmp_path / "analysis" / "automaton.json").read_text())
    assert len(saved["automaton"]["transitions"]) == 2
    assert (tmp_path / "analysis" / "trajectories.png").stat().st_size > 0
    assert "analysis/trajectories" in event_tags(tmp_path, "images")


def test_analyze_says_first_that_an_unsolved_run_is_unsolved(
    make_config, tmp_path: Path, capsys
) -> None:
    """An untrained network is not parity: the first line says so, and no probe claims that it
    holds the parity of any prefix."""
    cfg = make_config("model=lstm", "model.hidden_size=4")
    torch.manual_seed(0)
    untrained = ParityRNN(torch.nn.LSTM, input_size=1, hidden_size=4)
    save_as_run(tmp_path, cfg, untrained)
    (tmp_path / "metrics.json").write_text(json.dumps({"val/acc": 0.5, "solved": False}))

    analyze.main([str(tmp_path), "--strings", "32", "--max-clusters", "4"])
    lines = capsys.readouterr().out.splitlines()
    assert "not exact: wrong on" in lines[0]  # the certificate's verdict comes first
    assert "NOT solved" in lines[1] and "val/acc 0.500" in lines[1]
    assert "it is NOT the 2-state parity automaton" in "\n".join(lines)
    assert not any("holds" in line for line in lines)


@pytest.mark.parametrize("build", HANDSET)
def test_handset_models_hold_parity_through_long_runs_of_zeros(build) -> None:
    prefixes = torch.tensor([[1], [0], [1], [1]]), torch.tensor([[1, 1, 0, 1], [0, 1, 1, 0]])
    for batch in prefixes:
        limits = analyze.zero_run_limits(build(), batch, "bit", 10_000, chunk_len=3000)
        assert limits.tolist() == [10_001] * len(batch)


def test_parity_is_lost_only_when_the_leak_crosses_over() -> None:
    """The hand-set models never lose it; the leaking unit below has forgotten its 1 after a run of
    zeros and reads the next 1 as odd again."""
    prefixes = torch.tensor([[1, 0, 1, 1], [0, 1, 1, 0]])
    for build in HANDSET:
        assert set(analyze.lost_after_zeros(build(), prefixes, "bit", [8, 64]).values()) == {0.0}
    assert analyze.lost_after_zeros(leaking_rnn(), torch.tensor([[1]]), "bit", [8]) == {8: 1.0}


def leaking_rnn() -> ParityRNN:
    """A 1-unit RNN whose state decays by about half per zero: after a 1 it reads 'odd' until the
    state falls below the head's threshold (it is not a parity network: a second 1 adds up)."""
    model = ParityRNN(torch.nn.RNN, input_size=1, hidden_size=1)
    with torch.no_grad():
        for name, value in [("weight_ih_l0", 10.0), ("weight_hh_l0", 0.5), ("bias_ih_l0", 0.0)]:
            getattr(model.rnn, name).fill_(value)
        model.rnn.bias_hh_l0.zero_()
        model.head.weight.fill_(1.0)
        model.head.bias.fill_(-0.1)  # odd while h > 0.1: h = 1, 0.46, 0.23, 0.11, 0.06
    return model


def test_zero_run_limit_finds_a_leaking_odd_state() -> None:
    limits = analyze.zero_run_limits(leaking_rnn(), torch.tensor([[1], [0]]), "bit", 100, 3)
    assert limits.tolist() == [4, 101]


def test_analyze_never_contradicts_the_certificate() -> None:
    """A network that looks like the parity automaton on short strings but is wrong on a
    worst-case string is never called the parity automaton without that caveat."""
    from parity_lab.certify import Certificate

    wrong = Certificate(False, counterexample="1 0^24")
    line = analyze.automaton_line(True, wrong)
    assert "is not one" in line and "1 0^24" in line
    assert "not proven" in analyze.automaton_line(True, Certificate(None))
    assert "at every length" in analyze.automaton_line(True, Certificate(True))
    assert analyze.certificate_line(wrong).startswith("not exact: wrong on 1 0^24")
