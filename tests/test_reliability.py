"""Reliability: clean config errors, stopping on a non-finite loss, exact resume after SIGKILL,
reproducible runs, and runs and sweep jobs that never cost each other their results."""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from torch import nn

from parity_lab.__main__ import hydra_quoted, resume_in_place
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
    # evaluation sizes of 0: no string scored, every accuracy NaN
    ("eval.num_val=0", "eval.num_val=0"),
    ("eval.num_test=0", "eval.num_test=0"),
    ("eval.curve.num_strings=0", "eval.curve.num_strings=0"),
    ("eval.curve.max_len=0", "eval.curve.max_len=0"),
    ("eval.curve.dense_until=0", "eval.curve.dense_until=0"),
    ("eval.curve.per_decade=0", "eval.curve.per_decade=0"),
    ("eval.curve.chunk_len=0", "eval.curve.chunk_len=0"),
    ("trainer.gradient_clip_val=-1", "trainer.gradient_clip_val=-1"),
    ("resume=/no/such/run", "resume='/no/such/run'"),
    # values that used to pass these checks and fail (or hang) only once training ran
    ("seed=4294967296", "seed=4294967296"),
    ("trainer.log_every_n_steps=0", "trainer.log_every_n_steps=0"),
    ("optimizer=sgd optimizer.momentum=-0.1", "optimizer.momentum=-0.1"),
    ("trainer.max_steps=0", "trainer.max_steps=0"),
    ("trainer.max_steps=-2", "trainer.max_steps=-2"),
    (
        "trainer.max_steps=-1 eval.stop_when_solved=false",
        "trainer.max_steps=-1 is invalid here: with eval.stop_when_solved=false and fresh strings",
    ),
    (
        "trainer.max_steps=-1 eval.stop_when_solved=false data.num_train=64 trainer.max_epochs=-1",
        "trainer.max_steps=-1 is invalid here: with eval.stop_when_solved=false and "
        "trainer.max_epochs=-1",
    ),
    (
        "data.curriculum.schedule=linear data.curriculum.start_len=21",
        "data.curriculum.start_len=21 > data.max_len=20",
    ),
]


@pytest.mark.parametrize(("override", "named"), BAD_VALUES, ids=[o for o, _ in BAD_VALUES])
def test_bad_value_is_rejected_naming_key_value_and_rule(
    override: str, named: str, make_config
) -> None:
    with pytest.raises(ConfigError) as caught:
        validate(make_config(*override.split()))
    message = str(caught.value)
    assert message.startswith(named), message
    assert "expected" in message or "allowed" in message or "must be" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "model.hidden_size=100000",
            "model.hidden_size=100000 is invalid: training (weights, gradients, Adam state and "
            "one batch's activations) needs about 600 GiB, more than the 8 GiB of memory here",
        ),
        (
            "eval.lengths=[50,100000000]",
            "eval.lengths=[50, 100000000] is invalid: evaluating 64 strings of each length "
            "(eval.curve.max_len measures long strings in chunks) needs about 530 GiB, more than "
            "the 8 GiB of memory here",
        ),
    ],
)
def test_sizes_that_cannot_fit_in_memory_are_refused_naming_the_memory(
    override: str, message: str, make_config, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("parity_lab.config.physical_memory", lambda: 8 * 2**30)
    validate(make_config())  # the default sizes fit
    with pytest.raises(ConfigError) as caught:
        validate(make_config(override))
    assert str(caught.value) == message


def test_finished_run_cannot_be_resumed(tmp_path: Path) -> None:
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text("seed: 0\n")
    (tmp_path / "metrics.json").write_text('{"val/acc": 1.0, "solved": true}\n')
    with pytest.raises(ConfigError, match="already finished"):
        resume_config(str(tmp_path))


CLI_BAD_VALUES = [
    (["model.hidden_size=2.5"], "config error: model.hidden_size=2.5"),
    (["model=mambo"], "config error: model='mambo' is invalid: allowed values are ["),
    (["-m", "model=lstm,mambo"], "config error: model='mambo' is invalid"),
    (["experiment=nope"], "config error: experiment='nope' is invalid"),
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
    quoted = f"'{tmp_path}'"
    assert resume_in_place(argv) == [
        "parity_lab",
        f"resume={quoted}",
        f"hydra.run.dir={quoted}",
        "hydra.output_subdir=null",
    ]
    for resume in (f"resume={tmp_path}", f"+resume={tmp_path}", f"++resume={tmp_path}"):
        with pytest.raises(ConfigError, match=r"drop the overrides \['trainer.max_steps=9'\]"):
            resume_in_place(["parity_lab", resume, "trainer.max_steps=9"])


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
    # stopped when the validation sets were all right (solved_step is null if a worst-case
    # string is wrong: solved asks for those too)
    assert expected["global_step"] < 600
    assert expected["solved_step"] in (None, expected["global_step"])
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


def start_and_signal(command: list[str], ready: Callable[[], bool]) -> subprocess.Popen:
    """Start ``command`` and send it SIGTERM once ``ready()``; return it, ended."""
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not ready():
        assert time.monotonic() < deadline and process.poll() is None, process.communicate()
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=120)
    return process


def test_sigterm_keeps_the_checkpoint_exits_143_and_prints_the_resume_command(
    make_config, tmp_path: Path
) -> None:
    overrides = [*FAST, *RESUMABLE, "optimizer.lr=0.003", "trainer.max_steps=300"]
    whole, stopped = tmp_path / "whole", tmp_path / "stopped [1] $x"
    expected = train(make_config(*overrides), run_dir=whole)

    ckpt = stopped / "checkpoints" / "last.ckpt"
    run_dir = f"hydra.run.dir={hydra_quoted(str(stopped))}"
    command = [sys.executable, "-m", "parity_lab", *overrides, run_dir]
    process = start_and_signal(command, lambda: ckpt.is_file() and checkpoint(stopped) is not None)
    stderr = process.stderr.read().decode()
    assert process.returncode == 143, stderr[-3000:]
    step = checkpoint(stopped)["global_step"]
    assert 20 <= step < 300 and step % 20 != 0  # written at SIGTERM, not at a validation
    resume = f"python -m parity_lab resume={shlex.quote(str(stopped))}"
    assert stderr.endswith(
        f"stopped by SIGTERM at step {step}; the checkpoint of that step is kept; "
        f"to continue it:\n  {resume}\n"
    ), stderr[-3000:]
    assert not (stopped / "metrics.json").exists() and not (stopped / "error.txt").exists()

    result = subprocess.run(
        [sys.executable, *shlex.split(resume)[1:]], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert without_timings(read_metrics(stopped)) == without_timings(expected)
    assert_same_weights(checkpoint(stopped)["state_dict"], checkpoint(whole)["state_dict"])


def test_sigterm_in_a_sweep_exits_143_with_a_summary(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    command = [
        sys.executable, "-m", "parity_lab", "-m", f"hydra.sweep.dir={sweep}", "seed=0,1",
        *FAST, *RESUMABLE, "trainer.max_steps=100000",
    ]  # fmt: skip
    process = start_and_signal(command, lambda: bool(list(sweep.glob("0_*/checkpoints/*.ckpt"))))
    stderr = process.stderr.read().decode()
    assert process.returncode == 143, stderr[-3000:]
    assert "job 0 stopped by SIGTERM at step " in stderr
    with (sweep / "summary.csv").open() as f:
        assert [row["status"] for row in csv.DictReader(f)] == ["unfinished", "missing"]


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


# 7. The report summarises what it can read and lists the rest --------------------------------


def test_report_lists_corrupt_results_and_summarises_the_rest(tmp_path: Path) -> None:
    """Empty, cut-short, non-numeric metrics and an unreadable Hydra record each make their job
    `corrupt` with a note; a glob() sweep, which needs the config to expand, does not crash it."""
    from parity_lab.report import write_report

    good = '{"val/acc": 1.0, "test/acc_len_30": 1.0, "solved": true, "solved_step": 40}'
    jobs = {
        "0_seed=0": (good, "metrics.json"),
        "1_seed=1": ("", "is empty"),
        "2_seed=2": ('{"val/acc": 0.9', "is not JSON"),
        "3_seed=3": ('{"val/acc": "high"}', "val/acc='high': not a number"),
        "4_seed=4": ('["val/acc"]', "not a metrics object"),
        "5_seed=5": (good, "overrides.yaml"),
    }
    for name, (metrics, _) in jobs.items():
        (tmp_path / name / ".hydra").mkdir(parents=True)
        (tmp_path / name / ".hydra" / "overrides.yaml").write_text(f"- seed={name[0]}\n")
        (tmp_path / name / "metrics.json").write_text(metrics)
    (tmp_path / "5_seed=5" / ".hydra" / "overrides.yaml").write_text("- [unclosed\n")
    (tmp_path / "multirun.yaml").write_text(
        "hydra:\n  sweeper:\n    _target_: hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
        "\n    params: null\n  overrides:\n    task: ['model=glob(*)', 'seed=range(6)']\n"
    )
    table = write_report(tmp_path)
    with (tmp_path / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [row["status"] for row in rows] == ["ok"] + ["corrupt"] * 5
    for row, (_, note) in zip(rows[1:], list(jobs.values())[1:], strict=True):
        assert note in row["note"], row
    assert "| all jobs | 1/6 | 1 | 1.00 | [0.21, 1.00] | 1.000 | 1.000 | 40 | 5 corrupt |" in table
    assert "6 jobs: 1 ok, 5 corrupt." in (tmp_path / "summary.md").read_text()


def test_a_killed_joblib_job_costs_only_itself(tmp_path: Path) -> None:
    """Job 1 is SIGKILLed (as by the out-of-memory killer): jobs 0 and 2 finish, the sweep
    ends normally, and its summary lists job 1 as unfinished."""
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    sweep = tmp_path / "sweep"
    losses = (
        "torch.nn.BCEWithLogitsLoss,tests.self_killing.SelfKillingLoss,torch.nn.BCEWithLogitsLoss"
    )
    result = python_m(
        "parity_lab", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
        f"loss._target_={losses}", "trainer.max_steps=5", *FAST, f"hydra.sweep.dir={sweep}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "job 1 was killed by SIGKILL (out of memory?): it stays unfinished" in result.stderr
    with (sweep / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(row["job"], row["status"]) for row in rows] == [
        ("0", "ok"), ("1", "unfinished"), ("2", "ok"),
    ]  # fmt: skip


def test_a_slurm_requeued_job_continues_from_its_checkpoint(make_config, tmp_path: Path) -> None:
    """SLURM sets SLURM_RESTART_COUNT in a requeued job, which starts again with the same
    overrides in the same directory: it continues from the checkpoint there."""
    overrides = [*FAST, *RESUMABLE, "trainer.max_steps=40"]
    run_dir = tmp_path / "job"
    cfg = make_config(*overrides)
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    expected = train(cfg, run_dir=run_dir)
    (run_dir / "metrics.json").unlink()  # stopped after its last checkpoint
    command = [sys.executable, "-m", "parity_lab", *overrides, f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "SLURM_RESTART_COUNT": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming {run_dir} from {run_dir / 'checkpoints' / 'last.ckpt'}" in result.stdout
    assert without_timings(read_metrics(run_dir)) == without_timings(expected)


def long_joblib_sweep(sweep: Path, n_jobs: int) -> list[str]:
    """A joblib sweep of two resumable jobs (seeds 0, 1) too long to end before a signal."""
    return [
        sys.executable, "-m", "parity_lab", "-m", "hydra/launcher=joblib",
        f"hydra.launcher.n_jobs={n_jobs}", f"hydra.sweep.dir={sweep}", "seed=0,1",
        *FAST, *RESUMABLE, "trainer.max_steps=100000",
    ]  # fmt: skip


def test_sigterm_to_a_joblib_sweep_leaves_a_summary_and_stops_its_jobs(tmp_path: Path) -> None:
    """The sweep's own process gets SIGTERM while its jobs run in joblib's workers: it writes the
    summary (jobs cut short are unfinished) and exits 143, and no job trains on, orphaned
    (joblib ends its workers and their children)."""
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    sweep = tmp_path / "sweep"
    command = long_joblib_sweep(sweep, n_jobs=2)
    process = start_and_signal(command, lambda: bool(list(sweep.glob("*/checkpoints/*.ckpt"))))
    stderr = process.stderr.read().decode()
    assert process.returncode == 143, stderr[-3000:]
    with (sweep / "summary.csv").open() as f:
        assert {row["status"] for row in csv.DictReader(f)} <= {"unfinished", "missing"}
    deadline = time.monotonic() + 60  # the jobs, told by SIGTERM, checkpoint and end
    while file_times(sweep) != (time.sleep(3) or file_times(sweep)):
        assert time.monotonic() < deadline, "a job of the stopped sweep still writes its files"


@pytest.mark.parametrize("whom", ["the sweep", "its process group"])
def test_sigterm_to_a_one_worker_joblib_sweep_stops_it_and_its_job_checkpoints(
    whom: str, tmp_path: Path
) -> None:
    """With ``n_jobs=1`` joblib runs the jobs in the sweep's own process (each in a forked child):
    SIGTERM to that process, or to its whole group (``kill -- -PGID``, a closed terminal), ends
    the sweep with its summary and exit 143, the running job keeps a checkpoint of the step it
    stopped at, and no later job starts."""
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    sweep = tmp_path / "sweep"
    command = long_joblib_sweep(sweep, n_jobs=1)
    process = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    deadline = time.monotonic() + 120
    while not list(sweep.glob("0_*/checkpoints/*.ckpt")):
        assert time.monotonic() < deadline and process.poll() is None, process.communicate()
        time.sleep(0.01)
    if whom == "the sweep":
        process.send_signal(signal.SIGTERM)
    else:
        os.killpg(process.pid, signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    stderr = stderr.decode()
    assert process.returncode == 143, stderr[-3000:]
    assert "job 0 stopped by SIGTERM at step " in stderr, stderr[-3000:]
    assert not list(sweep.glob("1_*")), "the job after the stopped one started"
    with (sweep / "summary.csv").open() as f:
        assert [row["status"] for row in csv.DictReader(f)] == ["unfinished", "missing"]
    stopped_at = int(re.search(r"job 0 stopped by SIGTERM at step (\d+)", stderr).group(1))
    assert checkpoint(next(sweep.glob("0_*")))["global_step"] == stopped_at


def file_times(directory: Path) -> dict[Path, int]:
    return {path: path.stat().st_mtime_ns for path in directory.rglob("*") if path.is_file()}
