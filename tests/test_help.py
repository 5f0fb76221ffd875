"""``python -m parity_lab --help`` comes from conf/hydra/help and lists what a user can choose."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import CONF, ROOT

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
