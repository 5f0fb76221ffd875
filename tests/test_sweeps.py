"""Sweeps: summaries (Hydra callback, parity_lab.report), stored sweeps, launchers, TensorBoard."""

from __future__ import annotations

import csv
import importlib.util
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from parity_lab.config import validate
from parity_lab.report import expand_sweep, write_report
from tests.conftest import CONF, ROOT

# Each job trains 20 steps (validating at 10 and 20, so val/acc has a curve) on tiny eval sets.
TINY = [
    "trainer.max_steps=20",
    "trainer.val_check_interval=10",
    "eval.num_val=32",
    "eval.num_test=32",
    "eval.lengths=[30]",
]


def run_sweep(sweep_dir: Path, *overrides: str) -> subprocess.CompletedProcess[str]:
    """``python -m parity_lab -m ...`` from the repo root, outputs in ``sweep_dir``."""
    command = [sys.executable, "-m", "parity_lab", "-m", f"hydra.sweep.dir={sweep_dir}"]
    result = subprocess.run(
        [*command, *overrides, *TINY], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def summary_rows(sweep_dir: Path) -> list[dict[str, str]]:
    with (sweep_dir / "summary.csv").open() as f:
        return list(csv.DictReader(f))


def job_dirs(sweep_dir: Path) -> list[Path]:
    return sorted(p for p in sweep_dir.iterdir() if (p / ".hydra").is_dir())


@pytest.fixture(scope="module")
def small_sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A 4-job sweep (hidden 4, 8 x seed 0, 1) run in 2 parallel processes (one after another
    where the joblib plugin is not installed); its dir and stdout."""
    sweep_dir = tmp_path_factory.mktemp("small") / "sweep"
    joblib = importlib.util.find_spec("hydra_plugins.hydra_joblib_launcher") is not None
    launcher = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"] if joblib else []
    result = run_sweep(sweep_dir, *launcher, "model.hidden_size=4,8", "seed=0,1")
    return sweep_dir, result.stdout


def test_joblib_sweep_leaves_every_jobs_metrics_and_a_summary(small_sweep: tuple[Path, str]):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    sweep_dir, stdout = small_sweep
    assert "JoblibLauncher" in (sweep_dir / "multirun.yaml").read_text()
    dirs = job_dirs(sweep_dir)
    assert len(dirs) == 4
    assert all((d / "metrics.json").is_file() for d in dirs)

    rows = summary_rows(sweep_dir)
    assert sorted(row["dir"] for row in rows) == [d.name for d in dirs]
    assert {row["status"] for row in rows} == {"ok"}
    for row in rows:
        metrics = json.loads((sweep_dir / row["dir"] / "metrics.json").read_text())
        assert float(row["val/acc"]) == metrics["val/acc"]
        assert float(row["test/acc_len_30"]) == metrics["test/acc_len_30"]
    assert [(r["model.hidden_size"], r["seed"]) for r in rows] == [
        ("4", "0"), ("4", "1"), ("8", "0"), ("8", "1"),
    ]  # fmt: skip

    markdown = (sweep_dir / "summary.md").read_text()
    assert "4 jobs: 4 ok." in markdown  # statuses no job has are left out
    for hidden in (4, 8):  # one row per configuration, seeds aggregated: 2 of 2 runs ok
        assert f"| model.hidden_size={hidden} | 2/2 |" in markdown
        assert f"| model.hidden_size={hidden} | 2/2 |" in stdout  # printed when the sweep ends
    assert (sweep_dir / "summary.png").stat().st_size > 0


def test_report_lists_missing_failed_and_unfinished_jobs(
    small_sweep: tuple[Path, str], tmp_path: Path
):
    sweep_dir = tmp_path / "sweep"
    shutil.copytree(small_sweep[0], sweep_dir)
    for name in ("summary.csv", "summary.md", "summary.png"):
        (sweep_dir / name).unlink()
    dirs = job_dirs(sweep_dir)
    shutil.rmtree(dirs[1])  # hidden 4, seed 1: deleted -> missing
    (dirs[2] / "metrics.json").unlink()  # hidden 8, seed 0: crashed with a record -> failed
    (dirs[2] / "error.txt").write_text("Traceback ...\nRuntimeError: loss is nan at step 7\n")
    (dirs[3] / "metrics.json").unlink()  # hidden 8, seed 1: killed -> unfinished

    result = subprocess.run(
        [sys.executable, "-m", "parity_lab.report", str(sweep_dir)],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr

    rows = {row["job"]: row for row in summary_rows(sweep_dir)}
    assert [rows[n]["status"] for n in "0123"] == ["ok", "missing", "failed", "unfinished"]
    assert (rows["1"]["model.hidden_size"], rows["1"]["seed"]) == ("4", "1")  # from multirun.yaml
    assert "loss is nan at step 7" in rows["2"]["note"]
    markdown = (sweep_dir / "summary.md").read_text()
    assert "4 jobs: 1 ok, 1 failed, 1 unfinished, 1 missing" in markdown
    assert "| model.hidden_size=4 | 1/2 |" in markdown
    assert "| 1 | missing | model.hidden_size=4 seed=1" in markdown
    assert "| model.hidden_size=4 | 1/2 |" in result.stdout
    assert (sweep_dir / "summary.png").is_file()


def test_submitit_local_sweep_runs_every_job(tmp_path: Path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    sweep_dir = tmp_path / "sweep"
    run_sweep(sweep_dir, "hydra/launcher=slurm_local", "seed=0,1")
    rows = summary_rows(sweep_dir)
    assert [(row["seed"], row["status"]) for row in rows] == [("0", "ok"), ("1", "ok")]
    assert (sweep_dir / ".submitit").is_dir()  # the jobs really went through submitit


MODELS = ["lstm", "gru", "rnn", "lstm_manual", "gru_manual", "rnn_manual"]
# Grazzi et al.'s Table 3 rows, in its order
FRONTIER_MODELS = ["transformer", "xlstm_mlstm", "xlstm_slstm", "mamba", "mamba_signed",
                   "deltanet_published", "deltanet_published_signed"]  # fmt: skip
STORED_SWEEPS = {
    "hidden_lr": {
        "model.hidden_size": "1,2,4,8,16",
        "optimizer.lr": "0.001,0.003,0.01,0.03",
        "seed": "range(3)",
    },
    "lengths": {"data": "variable,fixed", "data.max_len": "5,10,20,30,40,50", "seed": "range(3)"},
    "rfr": {
        "experiment": "openai_fixed50,openai_variable50",
        "model": ",".join(MODELS),
        "seed": "range(5)",
    },
    "frontier": {
        "seed": "range(5)",
        "experiment": "state_tracking",
        "model": ",".join(FRONTIER_MODELS),
    },
    "certified": {
        "experiment": "certified",
        "model": "rnn,gru,lstm",
        "data.density": "uniform,fair",
        "saturation.weight": "0.1,0.0",
        "seed": "range(5)",
    },
    "mamba_ablation": {
        "seed": "range(5)",
        "experiment": ",".join(f"mamba_ablation_{step}" for step in range(1, 6)),
    },
    "certified_linear": {
        "experiment": "certified_linear",
        "model.hidden_size": "1,4",
        "model.input_bias": "false,true",
        "saturation.weight": "0.1,0.0",
        "seed": "range(5)",
    },
}


def test_every_stored_sweep_is_tested():
    assert sorted(p.stem for p in (CONF / "sweep").glob("*.yaml")) == sorted(STORED_SWEEPS)


@pytest.mark.parametrize("name", sorted(STORED_SWEEPS))
def test_stored_sweep_composes_every_job(name: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"sweep={name}"], return_hydra_config=True)
        assert cfg.hydra.mode.name == "MULTIRUN"  # `python -m parity_lab sweep=NAME` sweeps
        params = OmegaConf.to_container(cfg.hydra.sweeper.params)
        assert {k: str(v) for k, v in params.items()} == STORED_SWEEPS[name]
        jobs = expand_sweep(params, [f"sweep={name}"])
        for overrides in {tuple(o for o in job if not o.startswith("seed=")) for job in jobs}:
            validate(compose("config", overrides=list(overrides)))
    sizes = {
        "hidden_lr": 60,
        "lengths": 36,
        "rfr": 60,
        "frontier": 35,
        "certified": 60,
        "mamba_ablation": 25,
        "certified_linear": 40,
    }
    assert len(jobs) == sizes[name]


def test_rfr_sweep_trains_each_model_on_each_openai_setting():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for experiment, min_len in [("openai_fixed50", 50), ("openai_variable50", 1)]:
            for model in MODELS:
                cfg = compose("config", overrides=["sweep=rfr", f"experiment={experiment}",
                                                   f"model={model}"])  # fmt: skip
                reference = compose("config", overrides=[f"model={model}"])
                assert cfg.model.rnn._target_ == reference.model.rnn._target_  # not the lstm
                assert (cfg.data.min_len, cfg.data.max_len) == (min_len, 50)
                assert (cfg.data.num_train, cfg.data.supervision) == (100000, "final")


def test_slurm_launcher_takes_partition_time_and_cpus_as_overrides():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    overrides = [
        "hydra/launcher=slurm",
        "hydra.launcher.partition=gpu",
        "hydra.launcher.timeout_min=30",
        "hydra.launcher.cpus_per_task=2",
    ]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        launcher = compose("config", overrides=overrides, return_hydra_config=True).hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.partition, launcher.timeout_min, launcher.cpus_per_task) == ("gpu", 30, 2)


def test_stored_sweep_runs_without_dash_m_and_command_line_narrows_it(tmp_path: Path):
    sweep_dir = tmp_path / "sweep"
    command = [sys.executable, "-m", "parity_lab", "sweep=lengths", f"hydra.sweep.dir={sweep_dir}",
               "data=fixed", "data.max_len=5,10", "seed=0", *TINY]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = summary_rows(sweep_dir)
    assert [(row["data"], row["data.max_len"], row["status"]) for row in rows] == [
        ("fixed", "5", "ok"), ("fixed", "10", "ok"),
    ]  # fmt: skip
    # Only the key that differs names the jobs: sweep, data and seed are the same in every job.
    assert [row["dir"] for row in rows] == ["0_max_len=5", "1_max_len=10"]


def test_report_does_not_import_torch_or_lightning():
    code = "import sys, parity_lab.report; print(sorted({'torch', 'lightning'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.stdout.strip() == "[]", result.stderr


def test_report_on_a_killed_sweep_lists_the_unfinished_and_missing_jobs(tmp_path: Path):
    sweep_dir = tmp_path / "sweep"
    command = [sys.executable, "-m", "parity_lab", "-m", f"hydra.sweep.dir={sweep_dir}",
               "seed=0,1,2", *TINY]  # fmt: skip
    sweep = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 120
        while not list(sweep_dir.glob("1_*/.hydra/overrides.yaml")):  # job 0 done, job 1 started
            assert time.monotonic() < deadline and sweep.poll() is None
            time.sleep(0.05)
    finally:
        sweep.kill()
        sweep.wait()
    if list(sweep_dir.glob("1_*/metrics.json")):
        pytest.skip("job 1 finished before the kill landed")

    write_report(sweep_dir)
    rows = summary_rows(sweep_dir)
    assert [(row["seed"], row["status"]) for row in rows] == [
        ("0", "ok"), ("1", "unfinished"), ("2", "missing"),
    ]  # fmt: skip


def test_report_adds_length_curve_columns_when_measured(tmp_path: Path) -> None:
    for num, (model, exact) in enumerate([("lstm", 1000000), ("gru", 251)]):
        job = tmp_path / f"{num}_model={model}"
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(f"- model={model}\n")
        metrics = {
            "val/acc": 1.0,
            "test/acc_len_50": 1.0,
            "solved": True,
            "solved_step": 200,
            "global_step": 200,
            "test/acc_unseen": 0.5 + num / 4,
            "test/exact_until": exact,
        }
        (job / "metrics.json").write_text(json.dumps(metrics))
    table = write_report(tmp_path)
    assert "exact up to (bits, per job)" in table and "acc beyond training" in table
    assert "| 0.500 | 1000000 |" in table.replace("model=lstm", "") and "| 0.750 | 251 |" in table


def test_frontier_sweep_runs_every_published_row_on_the_published_protocol():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for model in FRONTIER_MODELS:
            overrides = ["sweep=frontier", "experiment=state_tracking", f"model={model}"]
            cfg = compose("config", overrides=overrides)
            reference = compose("config", overrides=[f"model={model}", "data.encoding=pair"])
            # the model's own settings (not the lstm's), with the published head
            assert cfg.model == {**reference.model, "head": "tokens"}
            assert (cfg.data.min_len, cfg.data.max_len) == (2, 39)
            assert cfg.trainer.max_steps == 20000 and "max_time" not in cfg.trainer
            assert cfg.eval.curve.max_len == 1_000_000 and cfg.eval.curve.only_solved
