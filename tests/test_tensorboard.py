"""TensorBoard as a researcher opens it: a real server over a real sweep, read through HTTP."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import metadata

from parity_lab.naming import MAX_NAME
from parity_lab.tensorboard_log import MAX_SETTINGS, RunOrigin, run_settings
from parity_lab.train import result_scalars
from tests.conftest import ROOT, compose_config

# The same in every job, so in no job's name: 20 steps, validated at 10 and 20, tiny eval sets.
CONSTANT = [
    "seed=1",
    "model.hidden_size=4",
    "trainer.max_steps=20",
    "trainer.val_check_interval=10",
    "eval.num_val=32",
    "eval.num_test=32",
    "eval.lengths=[30]",
    "eval.curve.num_strings=16",
    "trainer.enable_progress_bar=false",
]
# Swept: two models, and the length curve measured by half the jobs (mixed runs).
SWEPT = ["model=lstm,gru", "eval.curve.max_len=null,64"]
METRICS = [  # the main results first: they show beside the swept settings at 1400 px
    "whole_run/solved",
    "val/acc",
    "whole_run/solved_step",
    "val/acc_len_30",
    "whole_run/exact_until",
    "whole_run/acc_unseen",
    "train/loss",
    "whole_run/train_seconds",
]


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real 4-job sweep with constant overrides."""
    sweep_dir = tmp_path_factory.mktemp("tensorboard") / "sweep"
    command = [sys.executable, "-m", "parity_lab", "-m", f"hydra.sweep.dir={sweep_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [*command, *SWEPT, *CONSTANT],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return sweep_dir


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, body: dict | None = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def board(sweep_dir: Path) -> Iterator[str]:
    """A TensorBoard server on 127.0.0.1 over the sweep; its ``/data`` URL once every run shows."""
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(sweep_dir),
         "--host", "127.0.0.1", "--port", str(port), "--load_fast", "false"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/data"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if len(_get(f"{url}/plugin/text/tags")) == 4:  # written last by every job
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "TensorBoard did not load the 4 runs"
            time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def job_dirs(sweep_dir: Path) -> list[Path]:
    return sorted(p for p in sweep_dir.iterdir() if (p / ".hydra").is_dir())


def test_run_names_are_short_distinct_and_show_only_what_differs(board: str):
    runs = _get(f"{board}/runs")
    assert sorted(runs) == [
        "0_model=lstm,max_len=null",
        "1_model=lstm,max_len=64",
        "2_model=gru,max_len=null",
        "3_model=gru,max_len=64",
    ]
    assert all(len(run) <= MAX_NAME for run in runs)
    constant_keys = [override.split("=")[0].rsplit(".", 1)[-1] for override in CONSTANT]
    assert not any(f"{key}=" in run for run in runs for key in constant_keys)


def test_hparams_hold_only_the_swept_settings_then_the_main_results(board: str):
    """TensorBoard shows 5 settings, then every metric, 10em a column: constant settings would
    push the results off a 1400 px screen."""
    experiment = _get(f"{board}/plugin/hparams/experiment", {"experimentName": ""})
    infos = experiment["hparamInfos"]
    assert [info["name"] for info in infos] == ["eval.curve.max_len", "model"]  # both swept
    assert all(info.get("differs") for info in infos)
    assert [m["name"]["tag"] for m in experiment["metricInfos"]] == METRICS


def _session_groups(board: str) -> list[dict]:
    return _get(
        f"{board}/plugin/hparams/session_groups",
        {"experimentName": "", "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS"],
         "startIndex": 0, "sliceSize": 100},
    )["sessionGroups"]  # fmt: skip


def test_every_run_declares_the_same_metrics_and_curve_runs_show_theirs(
    board: str, sweep_dir: Path
):
    for job in job_dirs(sweep_dir):  # TensorBoard takes the definition from any one run
        (events,) = job.glob("events.out.tfevents.*")
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        content = accumulator.SummaryMetadata(metadata.EXPERIMENT_TAG).plugin_data.content
        declared = metadata.parse_experiment_plugin_data(content).metric_infos
        assert [info.name.tag for info in declared] == METRICS
    groups = _session_groups(board)
    assert len(groups) == 4
    for group in groups:
        (session,) = group["sessions"]
        values = {m["name"]["tag"]: m["value"] for m in session["metricValues"]}
        metrics = json.loads((sweep_dir / session["name"] / "metrics.json").read_text())
        assert values["val/acc"] == pytest.approx(metrics["val/acc"])
        assert values["val/acc_len_30"] == pytest.approx(metrics["test/acc_len_30"])
        assert values["whole_run/train_seconds"] == pytest.approx(metrics["train_seconds"])
        assert values["whole_run/solved"] == float(metrics["solved"])
        curve = "test/exact_until" in metrics
        assert curve == session["name"].endswith("max_len=64")
        assert ("whole_run/exact_until" in values) == curve  # measured: shown; else blank
        if curve:
            assert values["whole_run/exact_until"] == metrics["test/exact_until"]
        hparams = group["hparams"]
        assert "model.hidden_size" not in hparams  # the same in every job: in the Text tab
        swept = (hparams["model"], hparams["eval.curve.max_len"])  # swept: as on the command line
        assert f"model={swept[0]},max_len={swept[1]}" in session["name"]
        assert "None" not in json.dumps(group["hparams"])


def scalar_steps(board: str, run: str, tag: str) -> list[int]:
    query = urllib.parse.urlencode({"run": run, "tag": tag})
    return [step for _, step, _ in _get(f"{board}/plugin/scalars/scalars?{query}")]


def test_train_and_val_hold_series_and_one_off_values_have_their_own_group_after_them(
    board: str, sweep_dir: Path
):
    tags = _get(f"{board}/plugin/scalars/tags")
    assert len(tags) == 4
    for run, run_tags in tags.items():
        groups = {tag.split("/")[0] for tag in run_tags}
        assert groups == {"train", "val", "whole_run"}, run_tags
        assert sorted(groups)[-1] == "whole_run"  # Time Series sorts groups: it comes last
        for tag in run_tags:  # one value per run in whole_run/, series in train/ and val/
            steps = scalar_steps(board, run, tag)
            assert (len(steps) == 1) == tag.startswith("whole_run/"), (tag, steps)
        assert scalar_steps(board, run, "val/acc") == [10, 20]  # steps taken; the test adds none


def test_every_run_has_its_summary_command_and_config_as_text(board: str, sweep_dir: Path):
    tags = _get(f"{board}/plugin/text/tags")
    assert set(tags) == {d.name for d in job_dirs(sweep_dir)}
    for run_tags in tags.values():
        # the Text tab sorts by tag: the summary first
        assert sorted(run_tags) == ["result/summary", "run/command", "run/config"]
    run = "3_model=gru,max_len=64"
    texts = {
        tag: _get(f"{board}/plugin/text/text?{urllib.parse.urlencode({'run': run, 'tag': tag})}")
        for tag in ("result/summary", "run/command", "run/config")
    }
    assert "GRU hidden=4" in texts["result/summary"][0]["text"]
    assert "python -m parity_lab model=gru eval.curve.max_len=64" in texts["run/command"][0]["text"]
    assert "hidden_size: 4" in texts["run/config"][0]["text"]


def test_each_job_dir_is_tidy(sweep_dir: Path):
    for job in job_dirs(sweep_dir):
        assert len(list(job.glob("events.out.tfevents.*"))) == 1
        assert not (job / "hparams.yaml").exists()
        assert not list(job.glob("*.log"))  # nothing was logged, so no empty log file


def test_a_sweep_records_its_swept_keys_then_the_model_and_nothing_constant():
    cfg = compose_config("model=gru", "model.hidden_size=16", "seed=2")
    overrides = ["model=gru", "model.hidden_size=16", "seed=2"]
    origin = RunOrigin({"model": "gru", "data": "variable", "loss": "builtin"}, overrides, ["seed"])
    assert run_settings(cfg, origin) == {"seed": "2", "model": "gru"}  # swept: its text


def test_a_single_run_records_the_model_and_its_overrides_capped_and_no_nulls():
    cfg = compose_config("model=gru", "model.hidden_size=16", "seed=2", "eval.lengths=[30,60]")
    overridden = ["eval.num_val", "eval.num_test", "eval.stop_when_solved", "num_threads"]
    overridden += [f"trainer.{k}" for k in ("max_steps", "val_check_interval", "devices")]
    overridden += ["trainer.log_every_n_steps", "trainer.accelerator"]
    overrides = ["seed=2", "name=x", "+extra=1", "eval.curve.max_len=null", "eval.lengths=[30,60]"]
    overrides += ["model.hidden_size=16", *(f"{key}=1" for key in overridden)]  # values: cfg's
    origin = RunOrigin({"model": "gru", "data": "variable"}, overrides, [])
    settings = run_settings(cfg, origin)
    assert len(settings) == MAX_SETTINGS  # model + 11 overrides; the 12th override is cut
    assert list(settings)[:4] == ["model", "seed", "eval.lengths", "model.hidden_size"]
    assert settings["model"] == "gru" and settings["model.hidden_size"] == 16
    assert settings["seed"] == 2  # not swept: its type kept
    assert settings["eval.lengths"] == "[30, 60]" and settings["eval.stop_when_solved"] is True
    assert "name" not in settings and "extra" not in settings  # not a setting / not in the config
    assert "eval.curve.max_len" not in settings and "data" not in settings  # null / not typed
    assert "trainer.accelerator" not in settings  # past the cap


def test_the_final_evaluation_joins_the_val_series_only_between_validations():
    metrics = {"val/acc": 0.9, "test/acc_len_30": 0.8, "solved": False, "solved_step": None,
               "train_seconds": 1.5}  # fmt: skip
    between = result_scalars(metrics, validated_last_step=False)
    assert between == {"whole_run/solved": 0.0, "whole_run/train_seconds": 1.5, "val/acc": 0.9,
                       "val/acc_len_30": 0.8}  # fmt: skip
    assert "val/acc" not in result_scalars(metrics, validated_last_step=True)
