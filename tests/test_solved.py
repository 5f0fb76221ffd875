"""``solved``, part by part, and the accuracies it is made of, on runs of a model whose every
answer is known in advance (``tests/oracle.py``): right everywhere but where a case says."""

from __future__ import annotations

from pathlib import Path

import pytest

from parity_lab.data import eval_set
from parity_lab.run_files import read_metrics
from parity_lab.train import train
from tests.oracle import ORACLE

# Validation strings are all 20 bits (drawn like training); held-out lengths 30, 35 and 40. Each
# mistake below is placed where the worst-case strings (parity_lab/worst_case.py) never go: after
# 20, 35 bits holding 9, 16 ones, counts no structured string of that length has.
RUN = ["data.min_len=20", "data.max_len=20", "eval.lengths=[30,35,40]"]

CASES = {
    # case: (overrides, accuracies below 1, worst-case string wrong)
    "right everywhere": ([], set(), None),
    "wrong on validation strings only": (["+model.wrong_at=20", "+model.wrong_ones=9"],
                                         {"val/acc"}, None),
    "wrong at one held-out length only": (["+model.wrong_at=35", "+model.wrong_ones=16"],
                                          {"test/acc_len_35"}, None),
    "wrong on a worst-case string only": (["+model.wrong_at=26", "+model.wrong_ones=1"],
                                          set(), "1 0^25"),
}  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_solved_needs_validation_every_length_and_the_worst_case_strings(
    case: str, make_config, tmp_path: Path
) -> None:
    """Solved exactly when val/acc, every test/acc_len_<L> and the worst-case strings are all
    right; then solved_step is the first validation and the run stops there."""
    overrides, below_one, worst = CASES[case]
    metrics = train(make_config(*ORACLE, *RUN, *overrides), run_dir=tmp_path)
    accuracies = {
        k: v for k, v in metrics.items() if k == "val/acc" or k.startswith("test/acc_len_")
    }
    assert set(accuracies) == {"val/acc", "test/acc_len_30", "test/acc_len_35", "test/acc_len_40"}
    assert {k for k, v in accuracies.items() if v < 1.0} == below_one, accuracies
    assert all(v == 1.0 for k, v in accuracies.items() if k not in below_one)
    assert metrics["worst_case_wrong"] == worst
    solved = case == "right everywhere"
    assert metrics["solved"] is solved
    assert metrics["solved_step"] == (1 if solved else None)
    # by default the stop follows the validation sets alone: a worst-case miss is found after
    stopped = not below_one
    assert metrics["global_step"] == (1 if stopped else 2)


@pytest.mark.parametrize("case", CASES)
def test_the_stop_can_ask_what_solved_asks(case: str, make_config, tmp_path: Path) -> None:
    """With eval.stop_needs_worst_case, a worst-case miss keeps the run going like a random one."""
    overrides, _, _ = CASES[case]
    cfg = make_config(*ORACLE, *RUN, *overrides, "eval.stop_needs_worst_case=true")
    metrics = train(cfg, run_dir=tmp_path)
    solved = case == "right everywhere"
    assert metrics["solved"] is solved
    assert metrics["global_step"] == (1 if solved else 2)


def test_a_length_beyond_max_len_is_skipped_and_never_solved(make_config, tmp_path: Path) -> None:
    metrics = train(make_config(*ORACLE, *RUN, "+model.max_len=39"), run_dir=tmp_path)
    assert metrics["test/skipped_lengths"] == [40] and "test/acc_len_40" not in metrics
    assert metrics["val/acc"] == metrics["test/acc_len_30"] == metrics["test/acc_len_35"] == 1.0
    assert metrics["solved"] is False and metrics["solved_step"] is None
    assert metrics["global_step"] == 2  # never stopped as solved
    assert read_metrics(tmp_path / "metrics.json") == metrics  # the report reads it back


def test_a_length_equal_to_max_len_is_evaluated(make_config, tmp_path: Path) -> None:
    """``model.max_len`` is the longest string the model reads: that length is evaluated, in
    the held-out sets, the worst-case strings and the length curve, and the run can be solved."""
    cfg = make_config(
        *ORACLE, *RUN, "+model.max_len=40",
        "eval.curve.max_len=45", "eval.curve.dense_until=45", "eval.curve.num_strings=16",
    )  # fmt: skip
    metrics = train(cfg, run_dir=tmp_path)
    assert "test/skipped_lengths" not in metrics and metrics["test/acc_len_40"] == 1.0
    assert metrics["solved"] is True
    assert max(int(n) for n in metrics["length_curve"]) == 40
    assert metrics["length_curve_skipped"] == [41, 42, 43, 44, 45]
    assert metrics["test/exact_until"] == metrics["test/exact_until_random"] == 40
    assert read_metrics(tmp_path / "metrics.json") == metrics


def test_accuracy_reads_the_sign_of_the_logit_not_its_size(make_config, tmp_path: Path) -> None:
    """Logits 0.25 after an even prefix and 0.75 after an odd one: both positive, so the model
    always answers odd and is right on the odd strings only. Fed to torchmetrics as they are
    (values in [0, 1] are taken for probabilities, cut at 0.5), they would score 100%."""
    overrides = ["+model.logit_scale=0.25", "+model.logit_shift=0.5"]
    cfg = make_config(*ORACLE, *RUN, *overrides)
    metrics = train(cfg, run_dir=tmp_path)
    for name, (low, high, num) in {
        "val": (20, 20, cfg.eval.num_val),
        "len_30": (30, 30, cfg.eval.num_test),
        "len_40": (40, 40, cfg.eval.num_test),
    }.items():
        batch = eval_set(cfg.seed, name, num, low, high, "bit")
        odd = batch.targets[:, -1].mean().item()
        key = "val/acc" if name == "val" else f"test/acc_{name}"
        assert 0.3 < odd < 0.7 and metrics[key] == pytest.approx(odd, abs=1e-6), (key, odd)
    assert metrics["solved"] is False
