"""What a new user reads: ``python -m parity_lab --help`` (from conf/hydra/help) and the README's
way to shorten any experiment."""

from __future__ import annotations

import argparse
import importlib
import re
import subprocess
import sys

import pytest

from parity_lab.config import validate
from tests.conftest import CONF, ROOT, compose_config

GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name != "hydra")


@pytest.fixture(scope="module")
def help_text() -> str:
    result = subprocess.run(
        [sys.executable, "-m", "parity_lab", "--help"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return result.stdout


def section(text: str, title: str) -> str:
    """The lines of one ``== title ...`` section."""
    return text.split(f"== {title}", 1)[1].split("\n== ", 1)[0]


def test_help_is_parity_labs_own(help_text: str) -> None:
    assert "powered by Hydra" not in help_text
    assert help_text.startswith("parity_lab:")


@pytest.mark.parametrize("group", GROUPS)
def test_every_group_has_a_meaning_and_every_option(help_text: str, group: str) -> None:
    groups = section(help_text, "Groups")
    assert any(
        line.split()[:1] == [group] and len(line.split()) > 2 for line in groups.splitlines()
    )
    listed = next(line for line in groups.splitlines() if line.startswith(f"{group}: "))
    options = sorted(p.stem for p in (CONF / group).glob("*.yaml"))
    assert listed.removeprefix(f"{group}: ").split(", ") == options


def test_main_keys_and_launchers_are_listed(help_text: str) -> None:
    keys = section(help_text, "Main keys")
    for key in ("seed", "model.hidden_size", "data.num_train", "trainer.max_steps", "resume"):
        assert f"  {key}" in keys
    launchers = section(help_text, "Launchers")
    for name in [
        "basic",
        "joblib",
        *(p.stem for p in (CONF / "hydra" / "launcher").glob("*.yaml")),
    ]:
        assert f"  {name} " in launchers


def shortening_overrides() -> list[str]:
    """The overrides in the first column of the README's "Shortening any experiment" table."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Shortening any experiment", 1)[1].split("\n## ", 1)[0]
    return [o for row in re.findall(r"^\| `([^`]+)` \|", section, re.M) for o in row.split()]


def test_readme_shortening_overrides_are_real_keys_with_valid_values() -> None:
    overrides = shortening_overrides()
    assert {"trainer.max_steps=200", "trainer.max_epochs=1", "data.num_train=10000"} <= set(
        overrides
    )
    for experiment in ([], ["experiment=openai_variable50"]):
        cfg = compose_config(*experiment, *overrides)
        validate(cfg)
        assert cfg.trainer.max_epochs == 1 and cfg.eval.num_test == 64


TOOLS = [
    "parity_lab.predict",
    "parity_lab.analyze",
    "parity_lab.bench",
    "parity_lab.report",
    "parity_lab.certify",
]


@pytest.mark.parametrize("module", TOOLS)
def test_help_answers_before_torch_loads(module: str) -> None:
    """``--help`` parses the arguments before the seconds of ``import torch``."""
    script = (
        "import runpy, sys\n"
        f"sys.argv = [{module!r}, '--help']\n"
        "try:\n"
        f"    runpy.run_module({module!r}, run_name='__main__')\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('torch loaded' if 'torch' in sys.modules else 'no torch')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip().endswith("no torch"), result.stdout[-500:]
    assert "usage:" in result.stdout


@pytest.mark.parametrize(
    "module", ["parity_lab.predict", "parity_lab.analyze", "parity_lab.bench", "parity_lab.certify"]
)
def test_help_describes_every_argument_and_shows_its_default(module: str) -> None:
    parser = importlib.import_module(module).make_parser()
    text = " ".join(parser.format_help().split())  # argparse wraps lines anywhere
    for action in parser._actions:
        assert action.help, f"{action.dest} has no description"
        if action.default not in (None, [], False, argparse.SUPPRESS):
            assert f"(default: {action.default})" in text, action.dest


def test_bench_help_says_how_long_a_default_run_takes() -> None:
    from parity_lab import bench

    text = " ".join(bench.make_parser().format_help().split())
    assert "With every default it takes about 3 minutes" in text
