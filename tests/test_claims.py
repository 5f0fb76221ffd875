"""Tests for the computations behind published claims, each built so that a plausible silent bug
fails it: automaton minimisation, exactness of the hand-set models at any length, when a run counts
as solved, the sweep's success rate, the length curve's seed and ``exact_until``, and chunked
evaluation reading every bit. Inputs are constructed (hand-built automata, hand-set or stub
models, scripted metrics), so no failure depends on what a network happened to learn."""

from __future__ import annotations

import functools
import itertools
import json
from collections.abc import Callable
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from parity_lab.analyze import START, Automaton, analyze, drift, minimise, run_automaton
from parity_lab.callbacks import SolvedTracker
from parity_lab.curve import exact_until, length_curve
from parity_lab.data import encode, eval_set
from parity_lab.datamodule import ParityDataModule
from parity_lab.evaluate import accuracy_at_length, accuracy_by_length, curve_lengths
from parity_lab.models import ParityRNN
from parity_lab.models.handset import handset_gru, handset_lstm, handset_rnn
from parity_lab.report import write_report
from parity_lab.train import train
from tests.conftest import compose_config

# --- automaton minimisation ------------------------------------------------------------------


def every_string(max_len: int) -> torch.Tensor:
    """All bit strings of exactly ``max_len`` bits (their prefixes are every shorter string)."""
    return torch.tensor(list(itertools.product((0, 1), repeat=max_len)))


def counter_mod_3() -> Automaton:
    """Counts 1s mod 3 and outputs 1 on a count of 1: states 0 and 2 share an output and differ
    only in where a 1 takes them, so a minimisation blind to 1s merges them."""
    transitions = {START: (0, 1), 0: (0, 1), 1: (1, 2), 2: (2, 0)}
    return Automaton(START, transitions, {START: 0, 0: 0, 1: 1, 2: 0})


def zeros_mod_3() -> Automaton:
    """``counter_mod_3`` counting 0s instead: blind to 0s, a minimisation merges its states."""
    counter = counter_mod_3()
    transitions = {s: (on_1, on_0) for s, (on_0, on_1) in counter.transitions.items()}
    return Automaton(START, transitions, counter.outputs)


def redundant_parity() -> Automaton:
    """Parity with each of its two states split in two (even: 0, 2; odd: 1, 3)."""
    transitions = {START: (0, 1), 0: (2, 1), 1: (3, 2), 2: (0, 3), 3: (1, 0)}
    return Automaton(START, transitions, {START: 0, 0: 0, 1: 1, 2: 0, 3: 1})


@pytest.mark.parametrize(
    ("build", "states", "parity"),
    [(counter_mod_3, 3, False), (zeros_mod_3, 3, False), (redundant_parity, 2, True)],
)
def test_minimisation_gives_the_known_minimal_automaton(
    build: Callable[[], Automaton], states: int, parity: bool
) -> None:
    automaton = build()
    minimal = minimise(automaton)
    assert minimal.num_states == states
    assert minimal.is_parity() == parity
    bits = every_string(8)  # same output after every prefix: the same language
    assert torch.equal(run_automaton(minimal, bits), run_automaton(automaton, bits))


def one_in_last_two_bits() -> ParityRNN:
    """A hand-set 2-unit RNN answering whether either of the last two bits is 1: unit 1 holds the
    bit just read, unit 2 the one before (both +-1); its minimal automaton has 3 states
    (last two bits 00; 01 or 11; 10), and it is not parity."""
    k = 120.0
    model = ParityRNN(nn.RNN, input_size=1, hidden_size=2)
    with torch.no_grad():
        model.rnn.weight_ih_l0.copy_(torch.tensor([[2 * k], [0.0]]))
        model.rnn.weight_hh_l0.copy_(torch.tensor([[0.0, 0.0], [k, 0.0]]))
        model.rnn.bias_ih_l0.copy_(torch.tensor([-k, 0.0]))
        model.rnn.bias_hh_l0.zero_()
        model.head.weight.copy_(torch.tensor([[1.0, 1.0]]))  # h1 + h2 + 1 > 0: a 1 among them
        model.head.bias.fill_(1.0)
    return model


def test_analyze_extracts_a_known_three_state_automaton() -> None:
    model = one_in_last_two_bits()
    result, _, bits = analyze(model, num_strings=64, length=20)
    truth = ((bits + torch.nn.functional.pad(bits, (1, -1))) > 0).long()
    with torch.no_grad():
        lengths = torch.full((64,), 20)
        assert torch.equal(model(encode(bits, lengths, "bit"), lengths) > 0, truth > 0)
    assert result.automaton.num_states == 3 and not result.automaton.is_parity()
    assert result.agreement == 1.0
    assert torch.equal(run_automaton(result.automaton, bits), truth)


# --- hand-set models: exact at any length, proved --------------------------------------------


def lstm_gates(rnn: nn.LSTM, x: torch.Tensor, state: tuple[torch.Tensor, ...]) -> dict:
    i, f, g, o = (x @ rnn.weight_ih_l0.T + rnn.bias_ih_l0 + state[0] @ rnn.weight_hh_l0.T
                  + rnn.bias_hh_l0).chunk(4, dim=-1)  # fmt: skip
    return {"input": i.sigmoid(), "forget": f.sigmoid(), "output": o.sigmoid(), "cell": g.tanh()}


def gru_gates(rnn: nn.GRU, x: torch.Tensor, state: tuple[torch.Tensor, ...]) -> dict:
    xr, xz, xn = (x @ rnn.weight_ih_l0.T + rnn.bias_ih_l0).chunk(3, dim=-1)
    hr, hz, hn = (state[0] @ rnn.weight_hh_l0.T + rnn.bias_hh_l0).chunk(3, dim=-1)
    reset = (xr + hr).sigmoid()
    return {"reset": reset, "update": (xz + hz).sigmoid(), "new": (xn + reset * hn).tanh()}


def rnn_gates(rnn: nn.RNN, x: torch.Tensor, state: tuple[torch.Tensor, ...]) -> dict:
    pre = x @ rnn.weight_ih_l0.T + rnn.bias_ih_l0 + state[0] @ rnn.weight_hh_l0.T + rnn.bias_hh_l0
    return {"units": pre.tanh()}


# Each saturating nonlinearity and the exact values it must take: sigmoid gates 0 or 1, tanh
# candidates and units -1 or +1.
SATURATED = {"input": {0, 1}, "forget": {0, 1}, "output": {0, 1}, "reset": {0, 1},
             "update": {0, 1}, "cell": {-1, 1}, "new": {-1, 1}, "units": {-1, 1}}  # fmt: skip


@pytest.mark.parametrize(
    ("build", "gates"),
    [(handset_lstm, lstm_gates), (handset_gru, gru_gates), (handset_rnn, rnn_gates)],
)
@torch.no_grad()
def test_handset_model_is_exact_at_every_length(build: Callable[[], ParityRNN], gates) -> None:
    """A proof, not a sample: search every (state, true parity) pair reachable from the start
    under inputs 0 and 1 until no new pair appears. The set closes, small, with every gate exactly
    saturated and the right answer in every pair, so by induction every string of every length is
    answered right (each step is one of these finitely many float computations)."""
    model = build()
    size = model.rnn.hidden_size
    start = (torch.zeros(1, 1, size),) * (2 if isinstance(model.rnn, nn.LSTM) else 1)
    key = lambda state: tuple(v for part in state for v in part.flatten().tolist())  # noqa: E731
    seen, frontier = {(key(start), 0)}, [(start, 0)]
    while frontier:
        state, parity = frontier.pop()
        for bit in (0, 1):
            x = encode(torch.tensor([[bit]]), torch.tensor([1]), "bit")
            logit, after = model.run(x, state[0] if len(state) == 1 else state)
            after = after if isinstance(after, tuple) else (after,)
            for name, value in gates(model.rnn, x[0], state[0][0]).items():
                assert set(value.flatten().tolist()) <= SATURATED[name], (name, state, bit)
            assert int(logit.item() > 0) == parity ^ bit, (state, bit)
            pair = (key(after), parity ^ bit)
            if pair not in seen:
                seen.add(pair)
                frontier.append((after, parity ^ bit))
            assert len(seen) <= 8, "reachable states do not close: not a finite automaton"
    assert {parity for _, parity in seen} == {0, 1}


@pytest.mark.parametrize("build", [handset_lstm, handset_gru, handset_rnn])
def test_drift_of_an_exact_model_is_zero_at_every_length(build: Callable[[], ParityRNN]) -> None:
    """Streams of 10,000 bits end, exactly, in one of the states short strings reach: no drift,
    every answer right with the full margin, across chunk boundaries."""
    model = build()
    _, states, _ = analyze(model, num_strings=32, length=10)
    centres = states.flatten(0, 1).unique(dim=0)
    rows = drift(model, centres, [10, 1000, 10_000], num_strings=32, chunk_len=999)
    assert [row["length"] for row in rows] == [10, 1000, 10_000]
    assert all(row["accuracy"] == 1.0 and row["max_distance"] == 0.0 for row in rows)
    assert min(row["min_margin"] for row in rows) > 1.0
    offset = torch.full((centres.shape[1],), 0.01)  # centres moved: every state 0.01 * sqrt(n) off
    moved = drift(model, centres + offset, [10, 10_000], num_strings=32, chunk_len=999)
    assert [row["max_distance"] for row in moved] == pytest.approx(
        [offset.norm().item()] * 2, rel=1e-3
    )


# --- when a run is solved --------------------------------------------------------------------

# Scripted (val/acc, val/acc_len_100) by global step. Step 0 is the sanity check, which must be
# ignored; at step 10 only one accuracy is perfect; 20 is the first with all; 30 falls back.
SCRIPT = {0: (1.0, 1.0), 10: (1.0, 0.5), 20: (1.0, 1.0), 30: (0.9, 1.0), 40: (1.0, 1.0)}


class ScriptedAccuracies(L.LightningModule):
    """Trains a scalar; each validation logs the accuracies ``SCRIPT`` gives for its step."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return (self.weight - batch[0]).square().mean()

    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        plain, long = SCRIPT[self.trainer.global_step]
        self.log("val/acc", plain)
        self.log("val/acc_len_100", long)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit_scripted(stop_when_solved: bool) -> tuple[SolvedTracker, int]:
    tracker = SolvedTracker(stop_when_solved)
    trainer = L.Trainer(
        max_steps=40,
        val_check_interval=10,
        callbacks=[tracker],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    data = DataLoader(TensorDataset(torch.zeros(40, 1)), batch_size=1)
    trainer.fit(ScriptedAccuracies(), data, DataLoader(TensorDataset(torch.zeros(1, 1))))
    return tracker, trainer.global_step


def test_solved_step_is_the_first_validation_with_every_accuracy_perfect() -> None:
    tracker, steps = fit_scripted(stop_when_solved=False)
    assert (tracker.solved_step, steps) == (20, 40)


def test_stop_when_solved_waits_for_every_accuracy() -> None:
    tracker, steps = fit_scripted(stop_when_solved=True)
    assert (tracker.solved_step, steps) == (20, 20)


def test_run_perfect_on_training_lengths_only_is_not_solved(make_config, tmp_path: Path) -> None:
    """Trained on length 1 alone, the network is perfect there (val/acc) and at chance on length
    30: the run neither stops nor counts as solved, and it has no solved_step."""
    cfg = make_config(
        "data.min_len=1", "data.max_len=1", "eval.lengths=[30]", "trainer.max_steps=150"
    )
    metrics = train(cfg, run_dir=tmp_path)
    assert metrics["val/acc"] == 1.0 and metrics["test/acc_len_30"] < 0.75
    assert not metrics["solved"] and metrics["solved_step"] is None
    assert metrics["global_step"] == 150


# --- the sweep's success rate ----------------------------------------------------------------


def test_success_rate_and_median_steps_count_the_right_runs(tmp_path: Path) -> None:
    """Four seeds of one configuration: two solved (at steps 300 and 500), one finished unsolved
    though it was perfect at a validation mid-run (solved_step 100), one failed. Success rate is
    2 of the 3 finished runs, not of all 4; the median steps to solve is over the solved runs; the
    accuracies are averaged over the finished runs."""
    runs = [
        {"val/acc": 1.0, "test/acc_len_100": 0.6, "solved": True, "solved_step": 300},
        {"val/acc": 1.0, "test/acc_len_100": 0.8, "solved": True, "solved_step": 500},
        {"val/acc": 0.7, "test/acc_len_100": 0.7, "solved": False, "solved_step": 100},
        None,
    ]
    for seed, metrics in enumerate(runs):
        job = tmp_path / f"{seed}_seed={seed}"
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(f"- model=lstm\n- seed={seed}\n")
        if metrics is None:
            (job / "error.txt").write_text("RuntimeError: loss is nan at step 7\n")
        else:
            (job / "metrics.json").write_text(json.dumps({**metrics, "test/acc_len_50": 0.5}))
    header, _, row = [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in write_report(tmp_path).splitlines()
    ]
    columns = dict(zip(header, row, strict=True))
    assert columns["runs ok"] == "3/4" and columns["solved"] == "2"
    assert columns["success rate"] == "0.67"
    assert columns["median steps to solve"] == "400"
    # Means ± std over the finished runs; the longest tested length, not the first.
    assert columns["val/acc"] == "0.900 ± 0.173"
    assert columns["acc @ len 100"] == "0.700 ± 0.100"
    assert columns["not ok"] == "1 failed"


def test_evaluation_sets_are_fixed_by_the_seed() -> None:
    """Each seed has its own held-out strings (the README's 'fixed by the seed'), the same every
    time they are built."""
    sets = {}
    for seed in (1, 2):
        data = ParityDataModule(1, 20, 16, seed=seed, eval_lengths=[50], num_val=40, num_test=30)
        sets[seed] = data.eval_sets()
        again = eval_set(seed, "len_50", 30, 50, 50, "bit")
        assert torch.equal(sets[seed]["len_50"].x, again.x)
    for name in ("val", "len_50"):
        assert not torch.equal(sets[1][name].x, sets[2][name].x)


# --- the length curve ------------------------------------------------------------------------


def always_odd() -> ParityRNN:
    """Answers 'odd' to everything: its accuracy is the share of odd strings, so it tells which
    strings were drawn."""
    model = ParityRNN(nn.RNN, input_size=1, hidden_size=1)
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.fill_(1.0)
    return model


def test_length_curve_is_measured_on_the_seeds_strings(tmp_path: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    curves = []
    for seed in (1, 2):
        cfg = compose_config(
            f"seed={seed}",
            "eval.curve.max_len=300",
            "eval.curve.dense_until=20",
            "eval.curve.num_strings=63",
        )
        with SummaryWriter(tmp_path / str(seed)) as writer:
            metrics = length_curve(always_odd(), cfg, tmp_path, writer, step=0)
        options = cfg.eval.curve
        lengths = curve_lengths(options.max_len, options.dense_until, options.per_decade)
        expected = accuracy_by_length(
            always_odd(), lengths, 63, seed, cfg.data.encoding, options.chunk_len
        )
        assert metrics["length_curve"] == {str(n): acc for n, acc in expected.items()}
        beyond = [acc for n, acc in expected.items() if n > cfg.data.max_len]
        assert metrics["test/acc_unseen"] == pytest.approx(sum(beyond) / len(beyond))
        curves.append(metrics["length_curve"])
    assert curves[0] != curves[1]


def test_length_curve_of_an_exact_model_is_exact_to_its_end(tmp_path: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    cfg = compose_config(
        "eval.curve.max_len=5000", "eval.curve.num_strings=32", "eval.curve.chunk_len=999"
    )
    with SummaryWriter(tmp_path) as writer:
        metrics = length_curve(handset_lstm(), cfg, tmp_path, writer, step=0)
    assert metrics["test/exact_until"] == 5000 and metrics["test/acc_unseen"] == 1.0


def test_exact_until_is_the_end_of_the_first_perfect_stretch() -> None:
    dense = dict.fromkeys(range(1, 101), 1.0)
    sparse = {126: 1.0, 1000: 1.0, 2000: 1.0, 2512: 0.99, 3162: 1.0, 10_000: 0.5}
    assert exact_until({**sparse, **dense}) == 2000  # keys out of order on purpose
    assert exact_until({**dense, 126: 1.0, 1000: 1.0}) == 1000  # exact everywhere: the longest
    assert exact_until({**dense, 1: 0.98}) == 0  # wrong already at length 1
    assert exact_until({**dense, 50: 1 - 1 / 512}) == 49  # one string wrong in 512: not exact


# --- chunked evaluation reads every bit ------------------------------------------------------


def bit_counter(threshold: float) -> ParityRNN:
    """Counts the bits it has read (a ReLU unit adding 1 per step, exact in float32) and answers
    'odd' once more than ``threshold`` have been read: its answers reveal how many were."""
    model = ParityRNN(functools.partial(nn.RNN, nonlinearity="relu"), input_size=1, hidden_size=1)
    with torch.no_grad():
        for name, value in [("weight_ih_l0", 0.0), ("weight_hh_l0", 1.0), ("bias_ih_l0", 1.0)]:
            getattr(model.rnn, name).fill_(value)
        model.rnn.bias_hh_l0.zero_()
        model.head.weight.fill_(1.0)
        model.head.bias.fill_(-threshold)
    return model


@pytest.mark.parametrize(("length", "chunk_len"), [(50, 7), (49, 7), (50, 50), (50, 64)])
def test_chunked_evaluation_reads_exactly_length_bits(length: int, chunk_len: int) -> None:
    """After all ``length`` bits the counter answers like ``always_odd``; had it read one bit
    fewer it would answer 'even' to all, one more and it would still say 'odd' for ``length +
    1/2``. 63 strings: the share of odd ones is never 1/2, so 'even' always scores differently."""
    args = (length, 63, 5, "bit", chunk_len)
    odd = accuracy_at_length(always_odd(), *args)
    assert odd != 0.5
    assert accuracy_at_length(bit_counter(length - 0.5), *args) == odd
    assert accuracy_at_length(bit_counter(length + 0.5), *args) == pytest.approx(1 - odd)
