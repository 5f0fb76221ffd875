"""A run directory is data: predict, analyze and resume build only the project's own classes from
it, and result files are written whole or not at all."""

from __future__ import annotations

import json
import re
import resource
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf

from parity_lab.config import ConfigError, resume_config
from parity_lab.predict import PredictError, load_run
from parity_lab.run_files import (
    TRUST_HINT,
    CorruptResultError,
    RunFileError,
    read_metrics,
    write_atomic,
)
from parity_lab.train import train
from tests.conftest import ROOT, compose_config

TINY = [
    "eval.num_val=16",
    "eval.num_test=16",
    "eval.lengths=[8]",
    "trainer.enable_progress_bar=false",
    "eval.stop_when_solved=false",
    "trainer.val_check_interval=5",
    "model.hidden_size=4",
]


def make_run(run_dir: Path, *overrides: str, finished: bool = True) -> Path:
    """A real run directory: ``.hydra/config.yaml``, checkpoint, and metrics.json if finished."""
    cfg = compose_config(*TINY, "trainer.max_steps=5", *overrides)
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    train(cfg, run_dir=run_dir)
    if not finished:
        (run_dir / "metrics.json").unlink()
    return run_dir


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    return make_run(tmp_path_factory.mktemp("run_files") / "run")


def copy_with_config(run: Path, to: Path, edit: dict[str, Any]) -> Path:
    """A copy of ``run`` whose ``.hydra/config.yaml`` has the dotted keys in ``edit`` set."""
    shutil.copytree(run, to)
    cfg = OmegaConf.load(to / ".hydra" / "config.yaml")
    for key, value in edit.items():
        OmegaConf.update(cfg, key, value, force_add=True)
    (to / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    return to


# Each would create MARKER if it were called: open(MARKER, "w") or os.makedirs(MARKER).
def malicious(marker: Path) -> dict[str, dict[str, Any]]:
    opener = {"_target_": "builtins.open", "_args_": [str(marker), "w"]}
    return {
        "nested": {"model.rnn": {"_target_": "os.makedirs", "name": str(marker)}},
        "top": {"model._target_": "builtins.open", "model.file": str(marker), "model.mode": "w"},
        "partial": {"model.rnn": {**opener, "_partial_": True}},
        "inside-args": {"model.rnn._args_": [opener]},
        "list-in-list": {"model.extra": [[{"x": opener}]]},
        "interpolated": {"evil": "os.makedirs", "model.rnn._target_": "${evil}"},
        "torch-load": {
            "model.rnn": {"_target_": "torch.load", "f": str(marker), "weights_only": False}
        },
        "through-models": {"model.rnn._target_": "parity_lab.models.classifier.torch.load"},
    }


CASES = list(malicious(Path("m")))


@pytest.mark.parametrize("case", CASES)
def test_predict_refuses_any_foreign_target_and_calls_nothing(
    case: str, finished_run: Path, tmp_path: Path
) -> None:
    marker = tmp_path / "marker"
    if case == "torch-load":  # a pickle that would create the marker when unpickled
        torch.save({"x": 1}, marker)
    run = copy_with_config(finished_run, tmp_path / "run", malicious(marker)[case])
    existed = marker.exists()
    with pytest.raises(PredictError) as caught:
        load_run(run)
    message = str(caught.value)
    assert "\n" not in message
    assert str(run / ".hydra" / "config.yaml") in message and "refusing model." in message
    assert marker.exists() == existed and (not existed or marker.is_file())


def test_predict_cli_names_the_target_and_the_file_and_creates_nothing(
    finished_run: Path, tmp_path: Path
) -> None:
    marker = tmp_path / "marker"
    run = copy_with_config(finished_run, tmp_path / "run", malicious(marker)["nested"])
    for module in ("parity_lab.predict", "parity_lab.analyze"):
        command = [sys.executable, "-m", module, str(run), *(["01"] if "predict" in module else [])]
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert result.returncode == 1, result.stderr
        name = module.rsplit(".", 1)[1]
        assert result.stderr == (
            f"{name}: {run / '.hydra' / 'config.yaml'}: refusing model.rnn._target_='os.makedirs':"
            " a run directory may only name the project's own classes (those in conf/model/); "
            f"{TRUST_HINT}\n"
        )
        assert not marker.exists()


def test_model_classes_of_the_package_load_without_a_yaml(
    finished_run: Path, tmp_path: Path
) -> None:
    """Any nn.Module class defined under parity_lab.models is accepted (a new model needs no
    allow-list edit), whatever the path it is named by."""
    edit = {"model._target_": "parity_lab.models.classifier.ParityRNN"}
    model, _ = load_run(copy_with_config(finished_run, tmp_path / "run", edit))
    assert type(model).__name__ == "ParityRNN"


@pytest.mark.parametrize(
    "edit",
    [
        {"loss._target_": "os.makedirs"},
        {"optimizer._target_": "builtins.open"},
        {"data.curriculum": {"_target_": "os.system", "_args_": ["true"]}},
        {"trainer.callbacks": [{"_target_": "os.makedirs", "name": "x"}]},
        {"model.rnn._target_": "torch.optim.Adam"},  # the project's, but not a model's
    ],
    ids=lambda edit: next(iter(edit)),
)
def test_resume_refuses_foreign_targets_in_every_group(
    edit: dict[str, Any], finished_run: Path, tmp_path: Path
) -> None:
    run = copy_with_config(finished_run, tmp_path / "run", edit)
    (run / "metrics.json").unlink()
    key = next(iter(edit))
    with pytest.raises(ConfigError, match=rf"refusing {key.split('.')[0]}\..*_target_="):
        resume_config(str(run))


def test_resume_cli_refuses_before_anything_runs(finished_run: Path, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    edit = {"loss": {"_target_": "os.makedirs", "name": str(marker)}}
    run = copy_with_config(finished_run, tmp_path / "run", edit)
    (run / "metrics.json").unlink()
    command = [sys.executable, "-m", "parity_lab", f"resume={run}"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.startswith("config error: ") and "refusing loss._target_='os.makedirs'"
    assert "Traceback" not in result.stderr and not marker.exists()


# Atomic results -------------------------------------------------------------------------------


@pytest.fixture
def disk_full_after(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """``fill(n)``: from then on, no file in this process grows past ``n`` bytes (EFBIG), as when
    a disk fills; ``fill(None)`` lifts that. Tests lift it as soon as the write has failed: pytest's
    own output may be a file too."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    yield lambda n: resource.setrlimit(resource.RLIMIT_FSIZE, (soft if n is None else n, hard))
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def test_a_write_cut_short_leaves_the_old_file_whole(tmp_path: Path, disk_full_after) -> None:
    path = tmp_path / "metrics.json"
    write_atomic(path, "old\n")
    disk_full_after(8)
    try:
        with pytest.raises(OSError):
            write_atomic(path, "x" * 100)
    finally:
        disk_full_after(None)
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no temporary left


def test_full_disk_at_the_final_write_leaves_no_metrics_and_resume_completes(
    tmp_path: Path, disk_full_after, monkeypatch: pytest.MonkeyPatch
) -> None:
    class JsonThenDiskFull:
        """``json`` for train.py, whose ``dumps`` fills the disk once metrics.json is encoded."""

        @staticmethod
        def dumps(obj: Any, **kwargs: Any) -> str:
            text = json.dumps(obj, **kwargs)
            disk_full_after(16)
            return text

    monkeypatch.setattr("parity_lab.train.json", JsonThenDiskFull)
    try:
        with pytest.raises(OSError):
            make_run(tmp_path / "run")
    finally:
        disk_full_after(None)
    assert not (tmp_path / "run" / "metrics.json").exists()  # not an empty or half file
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.startswith(".metrics")]

    monkeypatch.undo()
    metrics = train(resume_config(str(tmp_path / "run")))
    assert json.loads((tmp_path / "run" / "metrics.json").read_text()) == metrics
    assert metrics["global_step"] == 5


@pytest.mark.parametrize("content", ["", '{"val/acc": 0.9', "[]", '{"val/acc": "high"}'])
def test_unreadable_metrics_counts_as_unfinished_and_resume_completes(
    content: str, tmp_path: Path
) -> None:
    run = make_run(tmp_path / "run")
    (run / "metrics.json").write_text(content)
    metrics = train(resume_config(str(run)))
    assert json.loads((run / "metrics.json").read_text()) == metrics


# Resuming any directory name ------------------------------------------------------------------

NASTY_NAMES = [
    "3_model=gru,hidden_size=16,seed=1",
    "3_model=gru,hidden_size=16,seed=1_5f3a9c",
    "with space",
    "x[1]{2}(3)",
    'it\'s "quoted"',
    "$HOME ${oops} ${",
    "back\\slash\\",
    "a,b=c:d~e*f?g#h",
]


@pytest.mark.parametrize("name", NASTY_NAMES)
def test_resume_argv_reads_back_as_the_directory_whatever_its_name(
    name: str, tmp_path: Path
) -> None:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from parity_lab.__main__ import resume_in_place

    run = tmp_path / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("seed: 0\nresume: null\n")
    argv = resume_in_place(["parity_lab", f"resume={run}"])
    overrides = OverridesParser.create().parse_overrides(argv[1:])
    values = {o.key_or_group: OmegaConf.create({"v": o.value()}).v for o in overrides}
    assert values["resume"] == values["hydra.run.dir"] == str(run)
    assert resume_config(str(run)).resume == str(run)


def test_resume_of_a_sweep_job_with_every_awkward_character_completes(tmp_path: Path) -> None:
    run = make_run(tmp_path / "3_model=lstm,seed=0_ab12 [x] 'q' \"d\" ${y} $z {}\\", finished=False)
    command = [sys.executable, "-m", "parity_lab", f"resume={run}"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((run / "metrics.json").read_text())["global_step"] == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == [run.name]  # no other directory made


# predict's input and output -------------------------------------------------------------------


def predict(run: Path, stdin: bytes) -> subprocess.CompletedProcess[bytes]:
    command = [sys.executable, "-m", "parity_lab.predict", str(run)]
    return subprocess.run(command, cwd=ROOT, input=stdin, capture_output=True, timeout=120)


def test_predict_skips_blank_lines(finished_run: Path) -> None:
    result = predict(finished_run, b"\n0110\n\n  \n1\r\n\n")
    assert result.returncode == 0, result.stderr
    assert [line.split("\t")[0] for line in result.stdout.decode().splitlines()] == ["0110", "1"]


def test_predict_refuses_input_that_is_not_utf8(finished_run: Path) -> None:
    result = predict(finished_run, b"0110\n\xff\xfe01\n")
    assert result.returncode == 1 and result.stdout == b""
    assert result.stderr.decode() == (
        "predict: stdin is not UTF-8 text (byte 0xff at offset 5): "
        "expected bit strings, one a line\n"
    )


def test_predict_piped_into_head_closes_quietly(finished_run: Path) -> None:
    """``predict RUN < many | head -1``: the reader leaves after one line; no traceback."""
    command = [sys.executable, "-m", "parity_lab.predict", str(finished_run)]
    strings = "".join(f"{n:b}\n" for n in range(1, 20000)).encode()  # ~300 kB out: > a pipe
    process = subprocess.Popen(
        command, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    process.stdin.write(strings)
    process.stdin.close()
    first = process.stdout.readline()
    process.stdout.close()
    stderr = process.stderr.read()
    assert process.wait(timeout=120) == 0
    assert first.startswith(b"1\t") and stderr == b""


# Bad files get one line naming them -----------------------------------------------------------


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def other_models_checkpoint(path: Path, tmp_path: Path) -> None:
    other = make_run(tmp_path / "other", "model.hidden_size=3")
    shutil.copy(other / "checkpoints" / "last.ckpt", path)


BAD_FILES = {
    "truncated-checkpoint": (
        "checkpoints/last.ckpt",
        lambda path, _: truncate(path),
        "not a readable checkpoint",
        "cannot load",
    ),
    "other-models-checkpoint": (
        "checkpoints/last.ckpt",
        other_models_checkpoint,
        "its weights do not fit the model",
        "does not fit the model of",
    ),
    "broken-config": (
        ".hydra/config.yaml",
        lambda path, _: path.write_text("model: [unclosed\n"),
        "not a run config",
        "not a run config",
    ),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_bad_run_file_is_named_on_one_line_by_resume_and_predict(
    case: str, finished_run: Path, tmp_path: Path
) -> None:
    name, spoil, resume_says, predict_says = BAD_FILES[case]
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    (run / "metrics.json").unlink()
    spoil(run / name, tmp_path)
    with pytest.raises((ConfigError, RunFileError)) as resumed:
        train(resume_config(str(run)))
    with pytest.raises(PredictError) as predicted:
        load_run(run)
    for error, says in ((resumed.value, resume_says), (predicted.value, predict_says)):
        assert str(run / name) in str(error) and says in str(error)
        assert "\n" not in str(error)


def test_resume_cli_names_a_truncated_checkpoint_without_a_traceback(
    finished_run: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    (run / "metrics.json").unlink()
    truncate(run / "checkpoints" / "last.ckpt")
    command = [sys.executable, "-m", "parity_lab", f"resume={run}"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.startswith(f"{run / 'checkpoints' / 'last.ckpt'}: not a readable ")
    assert "Traceback" not in result.stderr and len(result.stderr.splitlines()) == 1


def unwritable_dir(tmp_path: Path) -> Path:
    """A directory this process cannot write in: a read-only one, or (for root, who writes in
    those anyway) sysfs."""
    read_only = tmp_path / "read_only"
    read_only.mkdir(mode=0o555)
    for directory in (read_only, Path("/sys")):
        try:
            tempfile.TemporaryFile(dir=directory).close()
        except OSError:
            return directory
    pytest.skip("no directory this process cannot write in")


def test_read_only_output_dir_is_named_before_hydra_starts(tmp_path: Path) -> None:
    target = unwritable_dir(tmp_path) / "runs" / "one"
    command = [sys.executable, "-m", "parity_lab", f"hydra.run.dir={target}"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.startswith(f"config error: hydra.run.dir='{target}' is invalid: ")
    assert f"{target.parent.parent} cannot be written" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.splitlines()) == 1


def test_analyze_names_an_unwritable_run_directory_before_the_work(
    finished_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A directory it cannot write (read-only, a full quota): simulated, since root writes in
    read-only directories and a link to one is refused as a link."""
    from parity_lab import analyze

    def refused(*args: Any, **kwargs: Any) -> None:
        raise PermissionError(13, "Permission denied")

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    monkeypatch.setattr(analyze.tempfile, "TemporaryFile", refused)
    with pytest.raises(SystemExit) as caught:
        analyze.main([str(run)])
    assert caught.value.code == f"analyze: {run / 'analysis'} cannot be written (Permission denied)"


@pytest.mark.parametrize(
    ("entry", "named"),
    [
        ({"test/acc_len_50": float("nan")}, "test/acc_len_50=nan: not a number"),
        ({"val/acc": float("inf")}, "val/acc=inf: not a number"),
        ({"test/exact_until": "1000"}, "test/exact_until='1000': not a number"),
        ({"test/acc_unseen": None}, "test/acc_unseen=None: not a number"),
        ({"length_curve": {"1": 1.0, "2": float("nan")}}, "length_curve="),
        ({"test/skipped_lengths": [600, "700"]}, "not a list of lengths"),
        ({"length_curve_skipped": 600}, "not a list of lengths"),
    ],
)
def test_metrics_are_read_back_only_as_finite_numbers(
    entry: dict, named: str, tmp_path: Path
) -> None:
    """JSON's NaN and Infinity are no accuracies: an empty evaluation (NaN) must not read as a
    score. Lists of skipped lengths and worst-case strings (text) read back as written."""
    path = tmp_path / "metrics.json"
    good = {
        "val/acc": 1.0,
        "test/acc_len_50": 0.5,
        "test/exact_until": 12,
        "test/skipped_lengths": [600, 700],
        "length_curve_skipped": [800],
        "length_curve": {"1": 1.0, "2": 0.75},
        "worst_case_wrong": "1 0^24",
        "solved": False,
        "solved_step": None,
    }
    path.write_text(json.dumps(good))
    assert read_metrics(path) == good
    path.write_text(json.dumps({**good, **entry}))
    with pytest.raises(CorruptResultError, match=re.escape(named)):
        read_metrics(path)
