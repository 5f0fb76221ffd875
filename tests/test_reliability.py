"""Reliability: clean config errors, stopping on a non-finite loss, exact resume after SIGKILL,
reproducible runs, and runs and sweep jobs that never cost each other their results."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import instantiate
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from torch import nn

from parity_lab.__main__ import hydra_value, resume_in_place
from parity_lab.config import ConfigError, resume_config, validate
from parity_lab.module import NonFiniteLossError
from parity_lab.train import train
from tests.conftest import FAST, ROOT

# A run that keeps training to max_steps and checkpoints often: what the resume tests kill.
RESUMABLE = ["eval.stop_when_solved=false", "trainer.val_check_interval=20"]


def python_m(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)


def without_timings(metrics: dict[str, Any]) -> dict[str, Any]:
    return {name: value for name, value in metrics.items() if name != "train_seconds"}


def read_metrics(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "metrics.json").read_text())


def checkpoint(run_dir: Path) -> dict[str, Any]:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


# 1. Config validation -------------------------------------------------------------------------

BAD_VALUES = [
    ("data.min_len=0", "data.min_len=0"),
    ("data.min_len=30", "data.min_len=30 > data.max_len=20"),
    ("model.hidden_size=0", "model.hidden_size=0"),
    ("model.hidden_size=2.5", "model.hidden_size=2.5"),
    ("trainer.max_steps=abc", "trainer.max_steps='abc'"),
    ("trainer.val_check_interval=0", "trainer.val_check_interval=0"),
    ("model.hidden_size=abc", "model.hidden_size='abc'"),
    ("optimizer.lr=0", "optimizer.lr=0"),
    ("optimizer.lr=-0.01", "optimizer.lr=-0.01"),
    ("optimizer.lr=nan", "optimizer.lr=nan"),
    ("data.batch_size=0", "data.batch_size=0"),
    ("data.num_train=0", "data.num_train=0"),
    ("data.supervision=sometimes", "data.supervision='sometimes'"),
    ("data.encoding=onehot", "data.encoding='onehot'"),
    ("eval.lengths=[50,0]", "eval.lengths=[50, 0]"),
    ("eval.lengths=[-5]", "eval.lengths=[-5]"),
    ("eval.lengths=50", "eval.lengths=50"),
    ("eval.stop_when_solved=maybe", "eval.stop_when_solved='maybe'"),
    ("trainer.gradient_clip_val=-1", "trainer.gradient_clip_val=-1"),
    ("resume=/no/such/run", "resume='/no/such/run'"),
]


@pytest.mark.parametrize(("override", "named"), BAD_VALUES, ids=[o for o, _ in BAD_VALUES])
def test_bad_value_is_rejected_naming_key_value_and_rule(
    override: str, named: str, make_config
) -> None:
    with pytest.raises(ConfigError) as caught:
        validate(make_config(override))
    message = str(caught.value)
    assert message.startswith(named), message
    assert "expected" in message or "allowed" in message or "must be" in message
    assert "\n" not in message


def test_finished_run_cannot_be_resumed(tmp_path: Path) -> None:
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text("seed: 0\n")
    (tmp_path / "metrics.json").write_text("{}\n")
    with pytest.raises(ConfigError, match="already finished"):
        resume_config(str(tmp_path))


CLI_BAD_VALUES = [
    (["model.hidden_size=2.5"], "config error: model.hidden_size=2.5"),
    (["model=mamba"], "Could not find 'model/mamba'"),  # Hydra's own message
]


@pytest.mark.parametrize(("overrides", "message"), CLI_BAD_VALUES, ids=lambda v: str(v))
def test_bad_override_exits_cleanly_before_any_work(
    overrides: list[str], message: str, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    result = python_m("parity_lab", *overrides, f"hydra.run.dir={run_dir}")
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    if run_dir.exists():  # Hydra's record and log, and nothing of the run
        assert {path.name for path in run_dir.iterdir()} <= {".hydra", "__main__.log"}


def test_resume_of_missing_run_exits_cleanly_and_creates_nothing(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_run"
    result = python_m("parity_lab", f"resume={missing}")
    assert result.returncode != 0
    assert result.stderr.startswith(f"config error: resume='{missing}' is invalid")
    assert "Traceback" not in result.stderr
    assert not missing.exists()


def test_resume_refuses_other_overrides(tmp_path: Path) -> None:
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text("seed: 0\n")
    argv = ["parity_lab", f"resume={tmp_path}"]
    assert resume_in_place(argv) == [*argv, f"hydra.run.dir={tmp_path}", "hydra.output_subdir=null"]
    with pytest.raises(ConfigError, match=r"drop the overrides \['trainer.max_steps=9'\]"):
        resume_in_place([*argv, "trainer.max_steps=9"])


@pytest.mark.parametrize(
    "name", ["0_model=gru,seed=1", "12-00-00.5_lr=[0.01]", "it's", "x y", "ends\\"]
)
@pytest.mark.parametrize("typed", ["plain", "quoted"])
def test_resume_takes_a_sweep_job_directory(name: str, typed: str, tmp_path: Path) -> None:
    """Job and run directory names hold ``=`` and ``,``, which Hydra's grammar reads otherwise."""
    run_dir = tmp_path / name
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text("seed: 0\n")
    value = str(run_dir) if typed == "plain" else hydra_value(str(run_dir))
    argv = resume_in_place(["parity_lab", f"resume={value}"])
    parsed = {o.key_or_group: o.value() for o in OverridesParser.create().parse_overrides(argv[1:])}
    assert parsed["resume"] == parsed["hydra.run.dir"] == str(run_dir)


def test_killed_sweep_job_resumes_in_its_directory(make_config, tmp_path: Path) -> None:
    job = tmp_path / "0_model=gru,seed=1"
    (job / ".hydra").mkdir(parents=True)
    cfg = make_config("model=gru", "seed=1", "trainer.max_steps=20")
    (job / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    result = python_m("parity_lab", f"resume={job}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert read_metrics(job)["global_step"] == 20
    assert [path.name for path in tmp_path.iterdir()] == [job.name]


# 2. Non-finite loss and gradient clipping -------------------------------------------------------


class LossTurningNaN(nn.BCEWithLogitsLoss):
    """BCE with logits until its ``nan_from``-th call, NaN from then on: a run that diverges."""

    def __init__(self, nan_from: int) -> None:
        super().__init__()
        self.nan_from, self.calls = nan_from, 0

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = super().forward(logits, targets)
        self.calls += 1
        return loss * torch.nan if self.calls > self.nan_from else loss


def test_non_finite_loss_stops_the_run_and_keeps_checkpoint_and_logs(
    make_config, tmp_path: Path
) -> None:
    cfg = make_config(
        *RESUMABLE,
        f"loss._target_={__name__}.LossTurningNaN",
        "+loss.nan_from=25",
        "trainer.max_steps=100",
    )
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss \(nan\) at step 25:"):
        train(cfg, run_dir=tmp_path)
    assert checkpoint(tmp_path)["global_step"] == 20  # the last validation's, not overwritten
    assert list(tmp_path.glob("events.out.tfevents.*"))
    assert not (tmp_path / "metrics.json").exists()


def test_diverging_run_exits_with_a_message_naming_the_step(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = python_m(
        "parity_lab", *FAST, "optimizer=sgd", "optimizer.lr=1e38", f"hydra.run.dir={run_dir}"
    )
    assert result.returncode != 0
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("training stopped: non-finite loss"), result.stderr
    assert " at step " in last_line
    assert "Traceback" not in result.stderr
    assert "NonFiniteLossError" in (run_dir / "error.txt").read_text()
    assert not (run_dir / "metrics.json").exists()


def test_gradient_clip_val_bounds_each_update(make_config, tmp_path: Path) -> None:
    """With SGD at lr 1 and no momentum, an update is minus the gradient: its norm is the clip."""

    def update_norm(*overrides: str) -> float:
        cfg = make_config(
            "optimizer=sgd",
            "optimizer.lr=1.0",
            "optimizer.momentum=0",
            "trainer.max_steps=1",
            *overrides,
        )
        run_dir = tmp_path / str(len(list(tmp_path.iterdir())))
        train(cfg, run_dir=run_dir)
        L.seed_everything(cfg.seed, verbose=False)
        initial = instantiate(cfg.model).state_dict()
        trained = checkpoint(run_dir)["state_dict"]
        steps = [trained[f"model.{name}"] - weight for name, weight in initial.items()]
        return torch.linalg.vector_norm(torch.cat([step.flatten() for step in steps])).item()

    assert update_norm() > 0.01  # unclipped: the gradient is far larger than the clip below
    assert update_norm("trainer.gradient_clip_val=0.001") == pytest.approx(0.001, rel=1e-4)


# 3. Exact resume -------------------------------------------------------------------------------


def kill_after_checkpoint(overrides: list[str], run_dir: Path, step: int) -> int:
    """Start a run and SIGKILL it once its checkpoint reaches ``step``; return the saved step."""
    command = [sys.executable, "-m", "parity_lab", *overrides, f"hydra.run.dir={run_dir}"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    path = run_dir / "checkpoints" / "last.ckpt"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            if path.is_file() and (saved := checkpoint(run_dir)["global_step"]) >= step:
                process.send_signal(signal.SIGKILL)
                process.wait()
                return saved
            time.sleep(0.005)
        raise AssertionError(f"no checkpoint at step {step}: {process.communicate()[1][-2000:]}")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.parametrize(
    "data",
    [
        pytest.param([], id="fresh-batches"),
        # 7 batches an epoch, so every checkpoint (each 20 steps) is mid-epoch
        pytest.param(["data.num_train=448", "data.batch_size=64"], id="fixed-set-mid-epoch"),
    ],
)
def test_resume_after_sigkill_ends_exactly_like_an_uninterrupted_run(
    data: list[str], make_config, tmp_path: Path
) -> None:
    # lr 0.003 leaves the run unsolved at step 300, so its accuracies are not all a flat 1.0
    overrides = [*FAST, *RESUMABLE, *data, "optimizer.lr=0.003", "trainer.max_steps=300"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    expected = train(make_config(*overrides), run_dir=whole)

    killed_at = kill_after_checkpoint(overrides, killed, step=60)
    assert 60 <= killed_at < 300 and not (killed / "metrics.json").exists()

    events_before_resume = set(killed.glob("events.out.tfevents.*"))
    result = python_m("parity_lab", f"resume={killed}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming {killed} from {killed / 'checkpoints' / 'last.ckpt'}" in result.stdout
    resumed_steps = [
        event.step
        for path in set(killed.glob("events.out.tfevents.*")) - events_before_resume
        for event in EventFileLoader(str(path)).Load()
        if any(value.tag == "train/loss" for value in event.summary.value)
    ]
    assert min(resumed_steps) >= killed_at  # it went on from the checkpoint, not from step 0
    assert without_timings(read_metrics(killed)) == without_timings(expected)
    assert_same_weights(checkpoint(killed)["state_dict"], checkpoint(whole)["state_dict"])
    assert sorted(path.name for path in tmp_path.iterdir()) == ["killed", "whole"]


def test_run_stopped_when_solved_resumes_to_the_same_end(make_config, tmp_path: Path) -> None:
    """Killed after its last checkpoint but before metrics.json, a solved run stays stopped."""
    cfg = make_config("data.max_len=8", "model.hidden_size=8", "seed=1", "trainer.max_steps=600")
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    expected = train(cfg, run_dir=tmp_path)
    assert expected["solved_step"] == expected["global_step"] < 600
    (tmp_path / "metrics.json").unlink()
    resumed = train(resume_config(str(tmp_path)))
    assert without_timings(resumed) == without_timings(expected)


def test_resume_before_the_first_checkpoint_starts_over(make_config, tmp_path: Path) -> None:
    cfg = make_config(*RESUMABLE, "trainer.max_steps=30")
    whole, fresh = tmp_path / "whole", tmp_path / "fresh"
    expected = train(cfg, run_dir=whole)
    (fresh / ".hydra").mkdir(parents=True)
    (fresh / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    resumed = train(resume_config(str(fresh)))
    assert without_timings(resumed) == without_timings(expected)
    assert (fresh / "metrics.json").is_file()


# 4. Reproducibility ----------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["lstm", "lstm_manual"])
def test_same_config_and_seed_give_identical_runs(model: str, make_config, tmp_path: Path) -> None:
    cfg = make_config(f"model={model}", *RESUMABLE, "trainer.max_steps=60", "seed=3")
    first = train(cfg, run_dir=tmp_path / "first")
    second = train(cfg, run_dir=tmp_path / "second")
    assert without_timings(first) == without_timings(second)
    assert read_metrics(tmp_path / "first") == first
    assert_same_weights(
        checkpoint(tmp_path / "first")["state_dict"], checkpoint(tmp_path / "second")["state_dict"]
    )

    cfg.seed = 4  # the seed matters: another seed gives other weights
    train(cfg, run_dir=tmp_path / "other_seed")
    head = "model.head.weight"
    assert not torch.equal(
        checkpoint(tmp_path / "other_seed")["state_dict"][head],
        checkpoint(tmp_path / "first")["state_dict"][head],
    )


# 6. Runs and sweep jobs never cost each other their results -------------------------------------


def test_runs_started_together_get_their_own_directories(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "parity_lab", *FAST, "trainer.max_steps=5"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    runs = [
        subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL)
        for _ in range(2)
    ]
    assert [run.wait(timeout=300) for run in runs] == [0, 0]
    run_dirs = sorted((tmp_path / "outputs" / "runs").glob("*/*"))
    assert len(run_dirs) == 2
    for run_dir in run_dirs:
        assert read_metrics(run_dir)["global_step"] == 5


def test_failed_sweep_job_leaves_the_other_jobs_results(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    result = python_m(
        "parity_lab",
        "-m",
        "optimizer=sgd",
        "optimizer.lr=1e38,0.1",  # job 0 diverges, job 1 trains
        "trainer.max_steps=20",
        "resume=null",
        *FAST,
        f"hydra.sweep.dir={sweep}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    failed, trained = sorted(path for path in sweep.iterdir() if path.is_dir())
    assert "resume" not in failed.name + trained.name  # job directories are named without it
    assert "NonFiniteLossError: non-finite loss" in (failed / "error.txt").read_text()
    assert not (failed / "metrics.json").exists()
    assert "job 0 failed: non-finite loss" in result.stderr
    assert read_metrics(trained)["global_step"] == 20
    assert not (trained / "error.txt").exists()
