"""A user's own cell, trusted from the command line or the environment, never from the run."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from parity_lab import certify, predict, run_files
from parity_lab.run_files import UnsafeConfigError, checked_config, trust
from tests.conftest import ROOT, compose_config, save_as_run

USER_CELL = """
import torch
from parity_lab.models.manual import ManualRecurrent


class IndRNN(ManualRecurrent):
    num_gates = 1

    def weight_hh_shape(self):
        return (self.hidden_size,)

    def step(self, x_proj, state, weight_hh, bias_hh, saved=None):
        h = torch.relu(x_proj + weight_hh * state[0] + bias_hh)
        return h, (h,)
"""
USER_YAML = "defaults:\n  - lstm\n  - _self_\n\nrnn:\n  _target_: user_cells.IndRNN\n"


@pytest.fixture
def user_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory of the user's own, its module importable; nothing trusted yet."""
    (tmp_path / "user_cells.py").write_text(USER_CELL)
    (tmp_path / "my_conf" / "model").mkdir(parents=True)
    (tmp_path / "my_conf" / "model" / "indrnn.yaml").write_text(USER_YAML)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(run_files, "_trusted_modules", set())
    monkeypatch.setattr(run_files, "_trusted_targets", {})
    monkeypatch.delenv(run_files.TRUST_ENV, raising=False)
    yield tmp_path
    sys.modules.pop("user_cells", None)


def user_config(target: str = "user_cells.IndRNN"):
    cfg = compose_config("model.hidden_size=4")
    cfg.model.rnn._target_ = target
    return cfg


def test_a_user_class_is_refused_until_the_user_trusts_it(user_dir: Path, monkeypatch) -> None:
    cfg = user_config()
    with pytest.raises(UnsafeConfigError, match="refusing model.rnn._target_='user_cells.IndRNN'"):
        checked_config(cfg.model, Path("run"), "model")
    trust(searchpath=[f"file://{user_dir / 'my_conf'}"])  # the classes its yaml names
    assert checked_config(cfg.model, Path("run"), "model")["rnn"]["_target_"].endswith("IndRNN")
    other = user_config("user_cells.Other")  # not named by the yaml: still refused
    with pytest.raises(UnsafeConfigError):
        checked_config(other.model, Path("run"), "model")
    monkeypatch.setenv(run_files.TRUST_ENV, "user_cells")  # a whole module, from the environment
    checked_config(other.model, Path("run"), "model")
    with pytest.raises(UnsafeConfigError):  # trusting one module trusts no other
        checked_config(user_config("os.system").model, Path("run"), "model")


def test_predict_and_certify_run_a_user_cell_with_trust_and_refuse_it_without(
    user_dir: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = user_config()
    model = instantiate(cfg.model)
    run_dir = user_dir / "run"
    save_as_run(run_dir, cfg, model)
    with pytest.raises(SystemExit, match="refusing"):
        predict.main([str(run_dir), "0110"])
    with pytest.raises(SystemExit, match="refusing"):
        certify.main([str(run_dir), "--max-boxes", "1", "--probe-len", "8"])
    predict.main([str(run_dir), "0110", "--trust", "user_cells"])
    bits, parity, probability = capsys.readouterr().out.strip().split("\t")
    assert bits == "0110" and parity in "01" and 0 <= float(probability) <= 1
    monkeypatch.setattr(run_files, "_trusted_modules", set())  # trusted by predict's --trust
    certify.main([str(run_dir), "--max-boxes", "1", "--probe-len", "8", "--trust", "user_cells"])
    assert capsys.readouterr().out.startswith(f"{run_dir}\t")  # a verdict on the user's cell
    assert OmegaConf.load(run_dir / ".hydra" / "config.yaml").model.rnn._target_.startswith("user")


def test_the_rerun_command_keeps_the_users_searchpath(tmp_path: Path) -> None:
    from parity_lab.tensorboard_log import RunOrigin

    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "hydra.yaml").write_text(
        "hydra:\n  mode: RUN\n  overrides:\n    hydra: ['hydra.searchpath=[file://my_conf]', "
        "'hydra.run.dir=x']\n    task: [model=indrnn]\n  job:\n    config:\n      "
        "override_dirname:\n        exclude_keys: []\n  runtime:\n    cwd: /home/me/cells\n"
        "    choices: {model: indrnn}\n"
    )
    assert RunOrigin.of(tmp_path).command == (
        "cd /home/me/cells && python -m parity_lab 'hydra.searchpath=[file://my_conf]' model=indrnn"
    )


def test_docs_sweep_of_a_user_cell_resumes_predicts_analyzes_benches_and_reports_outside_the_repo(
    tmp_path: Path,
) -> None:
    """docs/cells.md's sweep command as written (tiny steps appended), run outside the repo;
    then resume (trusted through the searchpath), predict, analyze (--trust, PARITY_LAB_TRUST),
    bench (--searchpath: training steps, a default run, the breakdown, evaluation) and report."""
    from tests.test_cells import CELLS_DOC, EXAMPLE_CELL, EXAMPLE_YAML

    (tmp_path / "my_cells.py").write_text(EXAMPLE_CELL)
    (tmp_path / "my_conf" / "model").mkdir(parents=True)
    (tmp_path / "my_conf" / "model" / "mgu.yaml").write_text(EXAMPLE_YAML)
    (command,) = re.findall(r"^python -m parity_lab (.* -m .*)$", CELLS_DOC, re.M)
    tiny = "trainer.max_steps=4 trainer.val_check_interval=2 eval.num_val=16 eval.num_test=16 "
    tiny += "eval.lengths=[20] trainer.enable_progress_bar=false hydra.sweep.dir=sw"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop(run_files.TRUST_ENV, None)

    def run(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", *args], cwd=tmp_path, env={**env, **extra},
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip

    sweep = run("parity_lab", *shlex.split(command), *tiny.split())
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    assert f"summary: {tmp_path / 'sw' / 'summary.md'}" in sweep.stdout  # absolute
    job = "sw/0_model=mgu,seed=0"
    assert (tmp_path / job / "metrics.json").is_file()
    (tmp_path / job / "metrics.json").unlink()  # as if it had been stopped
    assert "refusing" in run("parity_lab", f"resume={job}").stderr
    resumed = run("parity_lab", "hydra.searchpath=[file://my_conf]", f"resume={job}")
    assert resumed.returncode == 0 and (tmp_path / job / "metrics.json").is_file(), resumed.stderr
    assert run("parity_lab.predict", job, "0110").returncode != 0
    predicted = run("parity_lab.predict", job, "0110", "--trust", "my_cells")
    assert predicted.returncode == 0 and predicted.stdout.startswith("0110\t"), predicted.stderr
    analyzed = run("parity_lab.analyze", job, "--strings", "8", PARITY_LAB_TRUST="my_cells")
    assert analyzed.returncode == 0 and (tmp_path / job / "analysis" / "automaton.json").is_file()
    shrink = ["--batch", "4", "--max-len", "6", "--hidden", "2", "--warmup", "1", "--repeats", "1"]
    shrink += ["--steps", "1", "--notebook-seeds", "0", "--eval-bits", "8", "--eval-strings", "4"]
    solve = ["--solve-seeds", "1", "--solve-overrides", "model=mgu", *tiny.split()[:5]]
    bench = ["parity_lab.bench", "--models", "mgu", "gru", "--eval-model", "mgu", *shrink, *solve]
    assert "--models 'mgu': not a model" in run(*bench, "--output", "b.json").stderr
    benched = run(*bench, "--searchpath", "file://my_conf", "--output", "b.json")
    assert benched.returncode == 0, benched.stderr[-3000:]
    results = json.loads((tmp_path / "b.json").read_text())
    assert [row["model"] for row in results["throughput"]] == ["mgu", "gru"]
    assert results["time_to_solve"]["default"]["runs"][0]["seed"] == 0  # trained a user cell
    assert "model=mgu" in results["time_to_solve"]["default"]["command"]
    assert results["breakdown"]["global_step"] == 4 and results["evaluation"][0]["model"] == "mgu"
    report = run("parity_lab.report", "sw")
    assert report.returncode == 0 and "model=mgu" in report.stdout
