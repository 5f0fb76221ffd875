"""Start-up: only training loads Lightning, and a bad value is refused before torch loads."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT


def loaded_after(code: str) -> set[str]:
    """Top-level packages in ``sys.modules`` after running ``code`` in a fresh interpreter."""
    probe = f"{code}\nimport sys\nprint(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return set(result.stdout.split())


@pytest.mark.parametrize("module", ["predict", "analyze", "report", "config", "data"])
def test_tools_do_not_import_lightning(module: str) -> None:
    loaded = loaded_after(f"import parity_lab.{module}")
    assert not {"lightning", "pytorch_lightning", "torchmetrics"} & loaded


@pytest.mark.parametrize("module", ["parity_lab", "parity_lab.config", "parity_lab.report"])
def test_config_checks_do_not_import_torch(module: str) -> None:
    assert "torch" not in loaded_after(f"import {module}")


def test_bad_value_fails_before_torch_and_leaves_no_run_dir(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    code = (
        "import runpy, sys\n"
        f"sys.argv = ['parity_lab', 'model.hidden_size=2.5', 'hydra.run.dir={run_dir}']\n"
        "try:\n"
        "    runpy.run_module('parity_lab', run_name='__main__', alter_sys=True)\n"
        "except SystemExit as exit:\n"
        "    print(exit.code, file=sys.stderr)\n"
        "    assert exit.code != 0\n"
        "assert 'torch' not in sys.modules, 'torch loaded before the config was checked'"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "config error: model.hidden_size=2.5 is invalid" in result.stderr
    assert not run_dir.exists()
