"""The state-tracking protocol: AdamW + warm-up/decay schedule, scaled accuracy, the experiment."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from parity_lab.config import ConfigError, validate
from parity_lab.module import warmup_decay
from parity_lab.report import write_report
from parity_lab.train import scaled_accuracies, summary, train
from tests.conftest import compose_config


def lr_at(scheduler: torch.optim.lr_scheduler.LRScheduler, step: int) -> float:
    while scheduler.last_epoch < step:
        scheduler.optimizer.step()
        scheduler.step()
    return scheduler.get_last_lr()[0]


@pytest.mark.parametrize("shape", ["cosine", "linear"])
def test_warmup_decay_rises_linearly_then_falls_to_the_final_factor(shape: str) -> None:
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    scheduler = warmup_decay(optimizer, 10, decay_steps=30, final_factor=0.1, shape=shape)
    assert lr_at(scheduler, 0) == 0.0
    assert lr_at(scheduler, 5) == pytest.approx(0.005)
    assert lr_at(scheduler, 10) == pytest.approx(0.01)
    # Half-way through the decay both shapes are at the mean of the peak and the final value.
    assert lr_at(scheduler, 20) == pytest.approx(0.0055)
    quarter = 0.001 + 0.009 * (0.5 * (1 + math.cos(math.pi * 0.75)) if shape == "cosine" else 0.25)
    assert lr_at(scheduler, 25) == pytest.approx(quarter)
    assert lr_at(scheduler, 30) == pytest.approx(0.001)
    assert lr_at(scheduler, 45) == pytest.approx(0.001)  # constant after decay_steps


def test_schedule_steps_once_per_training_step_and_is_off_by_default(
    make_config, tmp_path: Path
) -> None:
    overrides = ["trainer.max_steps=20", "eval.stop_when_solved=false", "optimizer=adamw"]
    schedule = ["scheduler=warmup_decay", "scheduler.warmup_steps=5", "scheduler.final_factor=0.25"]
    scheduled = make_config(*overrides, *schedule)
    train(scheduled, run_dir=tmp_path / "scheduled")
    ckpt = torch.load(tmp_path / "scheduled" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["lr_schedulers"][0]["last_epoch"] == 20  # decay_steps follows trainer.max_steps
    assert ckpt["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(0.25e-3)

    constant = make_config(*overrides)
    assert "scheduler" not in constant  # conf/config.yaml: scheduler: null
    train(constant, run_dir=tmp_path / "constant")
    ckpt = torch.load(tmp_path / "constant" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["lr_schedulers"] == []
    assert ckpt["optimizer_states"][0]["param_groups"][0]["lr"] == 1e-3


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("scheduler.shape=step", "scheduler.shape='step'"),
        ("scheduler.warmup_steps=-1", "scheduler.warmup_steps=-1"),
        ("scheduler.final_factor=2", "scheduler.final_factor=2"),
        ("scheduler.decay_steps=10", "scheduler.decay_steps=10 < scheduler.warmup_steps=2000"),
    ],
)
def test_bad_schedule_is_rejected_naming_key_and_rule(override: str, named: str) -> None:
    with pytest.raises(ConfigError) as caught:
        validate(compose_config("scheduler=warmup_decay", override))
    message = str(caught.value)
    assert message.startswith(named) and ("expected" in message or "must be" in message
                                          or "allowed" in message), message  # fmt: skip


def test_state_tracking_is_the_published_protocol() -> None:
    cfg = compose_config("experiment=state_tracking")
    validate(cfg)
    # their 3..40 and 40..256 count the answer position: 2..39 and 39..255 bits
    assert (cfg.data.min_len, cfg.data.max_len, cfg.data.supervision) == (2, 39, "final")
    assert min(cfg.eval.lengths) == 39 and max(cfg.eval.lengths) == 255
    assert cfg.scheduler.warmup_steps * 10 == cfg.trainer.max_steps  # published: 10% warm-up
    short = compose_config("experiment=state_tracking_1to40")
    assert (short.data.min_len, short.data.max_len) == (1, 40)
    assert short.eval.lengths == cfg.eval.lengths


def test_scaled_accuracy_maps_chance_to_zero_and_perfect_to_one() -> None:
    metrics = {"val/acc": 0.9, "test/acc_len_40": 1.0, "test/acc_len_256": 0.5, "solved": False}
    scaled = scaled_accuracies(metrics)
    assert scaled == {
        "test/scaled_acc_len_40": 1.0,
        "test/scaled_acc_len_256": 0.0,
        "test/scaled_acc_mean": 0.5,
    }
    assert scaled_accuracies({"val/acc": 1.0}) == {}


def test_run_reports_scaled_accuracy_in_metrics_and_summary(make_config, tmp_path: Path) -> None:
    cfg = make_config("+trainer.fast_dev_run=true", "eval.lengths=[40,64]")
    metrics = train(cfg, run_dir=tmp_path)
    for length in (40, 64):
        acc = metrics[f"test/acc_len_{length}"]
        assert metrics[f"test/scaled_acc_len_{length}"] == pytest.approx(2 * acc - 1)
    mean = (metrics["test/scaled_acc_len_40"] + metrics["test/scaled_acc_len_64"]) / 2
    assert metrics["test/scaled_acc_mean"] == pytest.approx(mean)
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    printed = summary(cfg, metrics, tmp_path, num_parameters=1)
    assert f"mean: {mean:.3f}" in printed and "scaled" in printed


def test_report_adds_mean_and_best_scaled_accuracy(tmp_path: Path) -> None:
    for num, scaled in enumerate([0.2, 1.0, 0.0]):
        job = tmp_path / f"{num}_seed={num}"
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(f"- seed={num}\n")
        metrics = {
            "val/acc": 1.0,
            "test/acc_len_256": 0.5 + scaled / 2,
            "solved": scaled == 1.0,
            "solved_step": None,
            "global_step": 10,
            "test/scaled_acc_mean": scaled,
            "test/scaled_acc_pool": scaled / 2,
        }
        (job / "metrics.json").write_text(json.dumps(metrics))
    table = write_report(tmp_path)
    assert "scaled acc (mean over lengths)" in table and "best scaled acc" in table
    assert "| 0.400 ± 0.529 | 1.000 |" in table
    # Table 3's figure, the pool's, per job in job order and as mean ± sample std
    assert "| scaled acc on the pool, per job | pool: mean ± std |" in table
    assert "| 0.100, 0.500, 0.000 | 0.200 ± 0.265 |" in table


@pytest.mark.parametrize("only_solved", [False, True])
def test_curve_can_be_kept_for_solved_runs(only_solved: bool, make_config, tmp_path: Path) -> None:
    cfg = make_config(
        "+trainer.fast_dev_run=true",  # one step: not solved
        "eval.curve.max_len=200",
        "eval.curve.num_strings=8",
        f"eval.curve.only_solved={only_solved}",
    )
    metrics = train(cfg, run_dir=tmp_path)
    assert not metrics["solved"]
    assert ("test/exact_until" in metrics) is not only_solved
    assert (tmp_path / "length_curve.png").is_file() is not only_solved


def test_curve_only_solved_must_be_a_bool() -> None:
    with pytest.raises(ConfigError, match=r"^eval.curve.only_solved='often' is invalid: expected"):
        validate(compose_config("eval.curve.only_solved=often"))
