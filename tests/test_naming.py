"""Run and sweep-job directory names: short keys, only what differs, bounded, confined."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from parity_lab.naming import (
    MAX_NAME,
    bounded,
    constant_overrides,
    job_dir_name,
    override_label,
    run_dir_suffix,
    safe,
)
from tests.conftest import CONF, ROOT

TINY = [
    "trainer.max_steps=2",
    "trainer.val_check_interval=2",
    "eval.num_val=16",
    "eval.num_test=16",
    "eval.lengths=[20]",
    "trainer.enable_progress_bar=false",
]
LONG = "a" * 300


def parity_lab(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """``python -m parity_lab ARGS`` with this checkout's package, run in ``cwd``."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "parity_lab", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_label_uses_short_keys_group_choices_first_and_seed_last():
    overrides = ["seed=1", "model.hidden_size=16", "optimizer.lr=0.01", "model=gru"]
    assert override_label(overrides) == "model=gru,hidden_size=16,lr=0.01,seed=1"


def test_keys_that_would_read_the_same_keep_what_tells_them_apart():
    label = override_label(["data.max_len=20", "eval.curve.max_len=1000", "model.hidden_size=4"])
    assert label == "data.max_len=20,curve.max_len=1000,hidden_size=4"


def test_excluded_keys_are_left_out():
    overrides = ["model=lstm", "trainer.max_steps=20", "seed=2", "+sweep=rfr"]
    assert override_label(overrides, ["trainer.max_steps", "sweep"]) == "model=lstm,seed=2"
    assert job_dir_name(7, overrides, ["model", "trainer.max_steps", "seed", "sweep"]) == "7"


def test_a_long_name_is_cut_to_the_bound_with_a_hash_and_stays_distinct():
    short = "3_model=lstm_manual,hidden_size=16,seed=2"
    assert bounded(short) == short  # three swept keys fit in 48 characters
    first = job_dir_name(3, [f"+note={LONG}x", "seed=1"], [])
    second = job_dir_name(3, [f"+note={LONG}y", "seed=1"], [])
    assert len(first) == len(second) == MAX_NAME
    assert first.startswith("3_note=aaaa") and first != second
    assert first == job_dir_name(3, [f"+note={LONG}x", "seed=1"], [])  # the same every time


def test_a_cut_name_keeps_whole_overrides_and_never_a_cut_value():
    overrides = ["trainer.max_steps=50", "eval.num_val=64", "eval.num_test=64", "+x.tag=abcdefghij"]
    name = run_dir_suffix(None, overrides, [])
    assert name.startswith("_max_steps=50,num_val=64,num_test=64-") and len(name) <= MAX_NAME + 1


@pytest.mark.parametrize(
    "value", ["../../escape", "a/b", "..", "/etc/passwd", "x\\y", "'q'", "a b", "[1,2]", "$HOME"]
)
def test_a_name_never_holds_a_separator_dots_quotes_or_spaces(value: str):
    name = job_dir_name(0, [f"+tag={value}"], [])
    assert safe(name) == name
    assert not {"/", "\\", "'", '"', " ", "$", "["} & set(name) and ".." not in name
    assert Path(name).name == name and name not in (".", "..")


def test_a_named_run_and_a_default_single_run():
    assert run_dir_suffix("my_try", ["name=my_try", "model=gru"], ["name"]) == "_my_try"
    assert run_dir_suffix(None, ["model=gru", "seed=3"], ["name"]) == "_model=gru,seed=3"
    assert run_dir_suffix(None, [], ["name"]) == ""


def test_single_run_dirs_from_the_composed_config():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        named = compose("config", overrides=["name=my_try", "seed=3"], return_hydra_config=True)
        default = compose("config", overrides=["model=gru", "seed=3"], return_hydra_config=True)
        plain = compose("config", return_hydra_config=True)
    assert OmegaConf.select(named, "hydra.run.dir").endswith("_my_try")
    assert OmegaConf.select(default, "hydra.run.dir").endswith("_model=gru,seed=3")
    run_dir = Path(OmegaConf.select(plain, "hydra.run.dir"))
    assert run_dir.parent.parent == Path("outputs/runs") and "_" not in run_dir.name  # time only


@pytest.mark.parametrize("name", ["a/b", "..", "my try", "x" * (MAX_NAME + 1)])
def test_a_bad_name_is_refused_in_one_line_before_any_work(name: str, tmp_path: Path):
    result = parity_lab(f"name={name}", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"config error: name={name!r} is invalid: expected 1 to {MAX_NAME} of the characters "
        "A-Z a-z 0-9 . _ + = , - (no '..'): it becomes part of the run's directory name"
    ]
    assert not (tmp_path / "outputs").exists()


def test_constant_overrides_of_a_stored_sweep_and_the_command_line():
    argv = ["parity_lab", "sweep=lengths", "data=fixed", "data.max_len=5,10", "seed=0"]
    extended = constant_overrides(argv)
    assert extended[:-1] == argv
    key, keys = extended[-1].split("=", 1)
    assert key == "hydra.job.config.override_dirname.exclude_keys"
    assert keys == "['resume','sweep','name','data','seed']"  # data.max_len alone is swept
    assert constant_overrides(["parity_lab", "model=gru"]) == ["parity_lab", "model=gru"]


def test_a_named_single_run_writes_to_time_underscore_name(tmp_path: Path):
    result = parity_lab("name=my_try", *TINY, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = (tmp_path / "outputs" / "runs").glob("*/*")
    assert run_dir.name.endswith("_my_try") and (run_dir / "metrics.json").is_file()


def test_sweep_job_names_show_only_what_differs_bounded_and_inside_the_sweep(tmp_path: Path):
    sweep_dir = tmp_path / "sweep"
    escape = f"{LONG}/../../../escaped"
    result = parity_lab(
        "-m", f"hydra.sweep.dir={sweep_dir}", f"+note={escape},../../up", "seed=3",
        "model.hidden_size=2", *TINY,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep"]  # nothing escaped the sweep
    dirs = sorted(p for p in sweep_dir.iterdir() if p.is_dir())
    names = [d.name for d in dirs]
    assert names[1] == "1_note=____up"  # each "/" and ".." becomes "_"
    assert names[0].startswith("0_note=aaaa") and len(names[0]) == MAX_NAME
    assert all((d / "metrics.json").is_file() for d in dirs)
    overrides = OmegaConf.load(dirs[1] / ".hydra" / "overrides.yaml")
    assert {"seed=3", "model.hidden_size=2"} <= set(overrides)  # constants stay in .hydra/
    summary = (sweep_dir / "summary.md").read_text()
    assert "`model.hidden_size=2`" in summary.split("Same in every job:")[1].splitlines()[0]


def test_a_stored_sweep_prints_its_plan_with_options_after_the_overrides() -> None:
    """The README's `sweep=rfr --cfg hydra -p hydra.sweeper`: the exclude_keys override joins
    the other overrides, not the options after them (argparse would refuse it there)."""
    result = subprocess.run(
        [sys.executable, "-m", "parity_lab", "sweep=rfr", "--cfg", "hydra", "-p", "hydra.sweeper"],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "params:" in result.stdout and "model:" in result.stdout


def test_group_choices_stay_in_view_as_their_values_when_the_name_is_long():
    overrides = ["experiment=state_tracking_1to40", "model=linear_rnn_signed", "seed=0"]
    assert run_dir_suffix(None, overrides, []) == "_state_tracking_1to40,linear_rnn_signed,seed=0"
    assert job_dir_name(3, ["model=gru", "seed=1"], []) == "3_model=gru,seed=1"  # fits: keys kept


@pytest.mark.parametrize(
    "argv",
    [
        ["hydra.searchpath=[file://my_conf]", "-m", "model=mgu,gru", "seed=0,1,2"],
        ["-m", "hydra.searchpath=[file://my_conf]", "model=mgu,gru", "seed=0,1,2"],
        ["hydra.searchpath=[file://my_conf]", "model=mgu,gru", "seed=0,1,2", "-m"],
    ],
)
def test_overrides_on_both_sides_of_an_option_reach_hydra_together(argv: list[str]):
    from hydra._internal.utils import get_args_parser

    from parity_lab.__main__ import overrides_first

    normal = overrides_first(["parity_lab", *argv])
    parsed = get_args_parser().parse_args(normal[1:])
    assert parsed.multirun and parsed.overrides == [a for a in argv if a != "-m"]
    assert overrides_first(["p", "sweep=rfr", "--cfg", "hydra", "-p", "hydra.sweeper", "x=1"]) == [
        "p", "sweep=rfr", "x=1", "--cfg", "hydra", "-p", "hydra.sweeper"
    ]  # fmt: skip
    assert overrides_first(["p", "--info", "x=1"]) == ["p", "x=1", "--info"]
