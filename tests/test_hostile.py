"""Hostile run directories, two writers, and a C kernel that must run the equations it claims to:
nothing outside the run directory changes, nothing hangs, and every refusal is one line."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from parity_lab import analyze
from parity_lab.config import ConfigError, resume_config, validate
from parity_lab.models import ManualLSTM, manual, native
from parity_lab.predict import PredictError, load_run
from parity_lab.report import found_job, write_report
from parity_lab.run_files import RunFileError, RunInUseError, write_atomic
from parity_lab.train import train
from tests.conftest import ROOT, compose_config, save_as_run
from tests.test_run_files import TINY, copy_with_config, make_run


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    return make_run(tmp_path_factory.mktemp("hostile") / "run")


def unfinished_copy(run: Path, to: Path, edit: dict | None = None) -> Path:
    copy = copy_with_config(run, to, edit or {})
    (copy / "metrics.json").unlink()
    return copy


def one_line(text: str) -> bool:
    return len(text.strip().splitlines()) == 1 and "Traceback" not in text


def cli(*args: str, cwd: Path = ROOT, **kwargs) -> subprocess.CompletedProcess:
    command = [sys.executable, *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300, **kwargs)


# 1. The config that is checked is the config that is built ----------------------------------


def test_resume_builds_the_values_it_checked_not_a_reinterpolation(
    finished_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An interpolation that reads ``resume`` names an allowed class while the config is
    checked (resume is null in the file) and ``builtins.open`` once resume is set: the built
    config holds the checked value, and the user's file outside the run is untouched."""
    home = tmp_path / "home"
    home.mkdir()
    victim = home / ".bashrc"
    victim.write_text("keep\n")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    edit = {
        "xevil": "builtins.open",
        "model.rnn": {
            "_target_": "${oc.select:x${resume},parity_lab.models.MLSTM}",
            "_partial_": False,
            "_args_": [str(victim), "w"],
        },
    }
    unfinished_copy(finished_run, tmp_path / "evil", edit)
    cfg = resume_config("evil")  # relative: resume is "evil", so x${resume} is "xevil"
    assert cfg.model.rnn._target_ == "parity_lab.models.MLSTM"
    with pytest.raises(Exception):  # noqa: B017  (MLSTM takes no file name: it fails)
        instantiate(cfg.model)
    assert victim.read_text() == "keep\n"


# 2. Small files never expand into large ones ------------------------------------------------

LAUGHS = "a: &a [x, x]\nb: &b [*a, *a]\nc: [*b, *b]\n"


def test_yaml_aliases_in_run_files_are_refused_before_parsing(
    finished_run: Path, tmp_path: Path
) -> None:
    run = unfinished_copy(finished_run, tmp_path / "run")
    config = run / ".hydra" / "config.yaml"
    config.write_text(config.read_text() + LAUGHS)
    with pytest.raises(ConfigError) as resumed:
        resume_config(str(run))
    with pytest.raises(PredictError) as predicted:
        load_run(run)
    for error in (resumed.value, predicted.value):
        assert f"{config}: refusing a YAML anchor or alias (line " in str(error)
        assert one_line(str(error))
    (run / ".hydra" / "overrides.yaml").write_text("- seed=0\n" + "- &x model=gru\n- *x\n")
    job = found_job(run)
    assert job.status == "corrupt" and "anchor or alias" in job.note


# 3. The report shows what is written ---------------------------------------------------------


def test_report_shows_overrides_as_written_and_resolves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SECRET_TOKEN", "hunter2")
    sweep = tmp_path / "sweep"
    for num in (0, 1):
        job = sweep / f"{num}_job"
        (job / ".hydra").mkdir(parents=True)
        overrides = [f"seed={num}", "secret=${oc.env:SECRET_TOKEN}"]
        (job / ".hydra" / "overrides.yaml").write_text(OmegaConf.to_yaml(overrides))
        (job / "metrics.json").write_text(json.dumps({"val/acc": 1.0, "solved": True}))
    sweeper = {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"}
    task = ["seed=0,1", "secret=${oc.env:SECRET_TOKEN}"]
    hydra = {"hydra": {"sweeper": sweeper, "overrides": {"task": task}}}
    (sweep / "multirun.yaml").write_text(OmegaConf.to_yaml(hydra))
    write_report(sweep)
    for name in ("summary.md", "summary.csv"):
        text = (sweep / name).read_text()
        assert "${oc.env:SECRET_TOKEN}" in text and "hunter2" not in text


# 4. Nothing writes through a link -----------------------------------------------------------


def test_analyze_refuses_an_analysis_link_and_writes_nothing_there(
    finished_run: Path, tmp_path: Path
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    (run / "analysis").symlink_to(elsewhere)
    result = cli("-m", "parity_lab.analyze", str(run))
    assert result.returncode == 1 and one_line(result.stderr)
    assert result.stderr.startswith(f"analyze: {run / 'analysis'}: is a symbolic link inside")
    assert list(elsewhere.iterdir()) == []


def test_resume_refuses_a_linked_result_file_and_leaves_its_target(
    finished_run: Path, tmp_path: Path
) -> None:
    victim = tmp_path / "victim.json"
    victim.write_text("mine\n")
    run = unfinished_copy(finished_run, tmp_path / "run")
    (run / "metrics.json").symlink_to(victim)
    with pytest.raises(RunFileError, match="metrics.json: is a symbolic link inside") as caught:
        train(resume_config(str(run)))
    assert one_line(str(caught.value)) and victim.read_text() == "mine\n"
    with pytest.raises(RunFileError, match="is a symbolic link: refusing"):
        write_atomic(run / "metrics.json", "{}")
    assert victim.read_text() == "mine\n"


# 5. Checkpoint sizes are checked before loading ----------------------------------------------


def rewrite_archive(path: Path, compression: int, extra: bytes = b"") -> None:
    with zipfile.ZipFile(path) as archive:
        entries = [(info.filename, archive.read(info)) for info in archive.infolist()]
    with zipfile.ZipFile(path, "w", compression) as archive:
        for name, data in entries:
            archive.writestr(name, data)
        if extra:
            archive.writestr(f"{entries[0][0].split('/')[0]}/data/999", extra)


@pytest.mark.parametrize("spoil", ["compressed", "oversized"])
def test_checkpoint_sizes_are_checked_before_any_tensor_is_read(
    spoil: str, finished_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = unfinished_copy(finished_run, tmp_path / "run")
    checkpoint = run / "checkpoints" / "last.ckpt"
    if spoil == "compressed":  # a small file that inflates: 64 MiB of zeros in a few kB
        rewrite_archive(checkpoint, zipfile.ZIP_DEFLATED, bytes(64 << 20))
        says = "refusing the compressed entry"
    else:
        rewrite_archive(checkpoint, zipfile.ZIP_STORED, bytes(8 << 20))
        says = "bytes, more than the"
    assert checkpoint.stat().st_size < 16 << 20

    def no_load(*args, **kwargs):
        raise AssertionError("torch.load ran before the sizes were checked")

    monkeypatch.setattr(torch, "load", no_load)
    with pytest.raises(PredictError, match=says) as predicted:
        load_run(run)
    with pytest.raises(RunFileError, match=says) as resumed:
        train(resume_config(str(run)))
    for error in (predicted.value, resumed.value):
        assert str(checkpoint) in str(error) and one_line(str(error))


# 6. A finished run is never overwritten -----------------------------------------------------


def test_a_directory_holding_a_run_is_refused_unless_resumed(
    finished_run: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    result = cli("-m", "parity_lab", f"hydra.run.dir={run}", "model=gru")
    assert result.returncode == 1 and one_line(result.stderr)
    assert result.stderr.startswith(f"config error: hydra.run.dir='{run}' is invalid: it already")
    assert f"resume={run}" in result.stderr
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


# 7. One writer per run directory ------------------------------------------------------------


def test_a_second_writer_is_refused_naming_the_first(finished_run: Path, tmp_path: Path) -> None:
    run = unfinished_copy(finished_run, tmp_path / "run")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from parity_lab.run_files import hold_run_lock;"
         " hold_run_lock(sys.argv[1]); print('held', flush=True); time.sleep(120)", str(run)],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(RunInUseError, match=f"in use by process {holder.pid} ") as caught:
            train(resume_config(str(run)))
        assert one_line(str(caught.value))
        result = cli("-m", "parity_lab", f"resume={run}")
        assert result.returncode == 1 and one_line(result.stderr)
        assert f"in use by process {holder.pid} " in result.stderr
        assert not (run / "metrics.json").exists()
    finally:
        holder.kill()
        holder.wait()


# 8. The C kernel computes what the cell's step says ------------------------------------------


def edited_step(self, x_proj, state, weight_hh, bias_hh, saved=None):
    """``ManualLSTM.step`` with one equation changed: ``c = f c_prev - i g``."""
    h, c_prev = state
    gates = x_proj + torch.addmm(bias_hh, h, weight_hh.t())
    sig = torch.sigmoid(gates)
    i, f, _, o = sig.chunk(4, dim=1)
    g = torch.tanh(gates[:, 2 * self.hidden_size : 3 * self.hidden_size])
    c = f * c_prev - i * g
    tanh_c = torch.tanh(c)
    h = o * tanh_c
    if saved is not None:
        saved.append((sig, g, torch.cat([g, -c_prev, i, tanh_c], dim=1), f, o, tanh_c))
    return h, (h, c)


def python_outputs(core: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The core's outputs through its Python ``step`` alone (one layer, zero state)."""
    x_proj = torch.nn.functional.linear(x.transpose(0, 1), core.weight_ih_l0, core.bias_ih_l0)
    zeros = torch.zeros(x.shape[0], core.hidden_size)
    outputs, _ = core.unroll(x_proj, (zeros, zeros), core.weight_hh_l0, core.bias_hh_l0)
    return outputs.transpose(0, 1)


def lstm_manual(hidden: int) -> torch.nn.Module:
    return instantiate(compose_config("model=lstm_manual", f"model.hidden_size={hidden}").model)


def test_an_edited_step_is_what_lstm_manual_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    if native.load("lstm", 6) is None:
        pytest.skip("no C compiler")
    monkeypatch.setattr(ManualLSTM, "step", edited_step)
    torch.manual_seed(0)
    model = lstm_manual(6)
    x = torch.randint(0, 2, (3, 7, 1)).float()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outputs, _ = model.rnn(x)
        model.rnn(x)
    said = [w for w in caught if "does not compute what its step" in str(w.message)]
    assert len(said) == 1  # once
    with torch.no_grad():
        torch.testing.assert_close(outputs.detach(), python_outputs(model.rnn, x))


class ChangedStepLSTM(ManualLSTM):
    """A subclass that changes only ``step``: the inherited ``step_backward`` is not its own."""

    step = edited_step


def test_a_subclass_changing_only_step_runs_it_and_gets_its_gradients() -> None:
    torch.manual_seed(0)
    core, reference = ChangedStepLSTM(1, 5), ChangedStepLSTM(1, 5)
    reference.load_state_dict(core.state_dict())
    reference.native_layer = lambda *args: None
    x = torch.randn(3, 6, 1)
    outputs, (h, c) = core(x)
    torch.testing.assert_close(outputs.detach(), python_outputs(core, x).detach())
    loss = (outputs**2).sum() + c.sum()
    grads = torch.autograd.grad(loss, list(core.parameters()))
    # autograd through the edited step itself, one op at a time
    x_proj = torch.nn.functional.linear(x.transpose(0, 1), reference.weight_ih_l0,
                                        reference.bias_ih_l0)  # fmt: skip
    zeros = torch.zeros(3, 5)
    expected_out, (_, expected_c) = reference.unroll(
        x_proj, (zeros, zeros), reference.weight_hh_l0, reference.bias_hh_l0
    )
    expected_loss = (expected_out**2).sum() + expected_c.sum()
    expected = torch.autograd.grad(expected_loss, list(reference.parameters()))
    for actual, wanted in zip(grads, expected, strict=True):
        torch.testing.assert_close(actual, wanted, atol=1e-5, rtol=1e-4)
    assert manual._derived.get(core)  # the backward was derived from the edited step


# 9. A broken model does not answer ---------------------------------------------------------


def test_non_finite_weights_are_refused(finished_run: Path, tmp_path: Path) -> None:
    run = unfinished_copy(finished_run, tmp_path / "run")
    checkpoint = run / "checkpoints" / "last.ckpt"
    saved = torch.load(checkpoint, weights_only=False)
    name = next(k for k in saved["state_dict"] if k.startswith("model.rnn.weight_hh"))
    saved["state_dict"][name].fill_(float("nan"))
    torch.save(saved, checkpoint)
    with pytest.raises(PredictError, match=f"weight {name.removeprefix('model.')} is not finite"):
        load_run(run)
    with pytest.raises(RunFileError, match=f"weight {name} is not finite") as caught:
        train(resume_config(str(run)))
    assert one_line(str(caught.value))


# 10. The kernel cache -----------------------------------------------------------------------


@pytest.fixture
def kernel_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler")
    monkeypatch.setenv("PARITY_LAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("CC", raising=False)
    return tmp_path / "cache"


@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
def test_a_damaged_cached_kernel_is_rebuilt(damage: str, kernel_cache: Path) -> None:
    library = native.build("lstm", 3)
    whole = library.read_bytes()
    if damage == "truncated":
        library.write_bytes(whole[: len(whole) // 3])
    else:
        library.write_bytes(bytes(len(whole)))
    assert native.build("lstm", 3) == library
    assert library.read_bytes() == whole
    # and a fresh process loads it without a signal
    code = "from parity_lab.models import native; assert native.load('lstm', 3) is not None"
    env = {**os.environ, "PARITY_LAB_CACHE": str(kernel_cache)}
    assert cli("-c", code, env=env).returncode == 0


def test_a_compiler_with_arguments_and_a_changed_source(
    kernel_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    compiler = shutil.which("cc") or shutil.which("gcc")
    monkeypatch.setenv("CC", f"env {compiler}")  # a command with arguments, as ccache gcc
    first = native.build("lstm", 2)
    kernels = tmp_path / "kernels"
    kernels.mkdir()
    source = (native.KERNELS / "lstm.c").read_text()
    (kernels / "lstm.c").write_text(source + "\n/* edited */\n")
    monkeypatch.setattr(native, "KERNELS", kernels)
    second = native.build("lstm", 2)
    assert second != first and second.is_file() and first.is_file()


# 11. analyze on a Transformer run -----------------------------------------------------------


def test_analyze_says_why_a_transformer_run_has_no_automaton(tmp_path: Path, capsys) -> None:
    cfg = compose_config(*TINY, "model=transformer", "model.max_len=20")
    run = tmp_path / "run"
    save_as_run(run, cfg, instantiate(cfg.model))
    with pytest.raises(SystemExit) as caught:
        analyze.main([str(run)])
    message = str(caught.value.code)
    assert message.startswith(f"analyze: {run} is a ") and "no automaton to extract" in message
    assert one_line(message) and not (run / "analysis").exists()


# 12. Matrix memories count in the memory check ----------------------------------------------


@pytest.mark.parametrize("model", ["mlstm", "deltanet"])
def test_matrix_memory_state_counts_in_the_memory_check(
    model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("parity_lab.config.physical_memory", lambda: 16 << 30)
    validate(compose_config(f"model={model}"))  # the default size fits
    with pytest.raises(ConfigError, match=r"model.hidden_size=1024 is invalid: .* GiB, more than"):
        validate(compose_config(f"model={model}", "model.hidden_size=1024"))


# 13. A run's whole config is validated on read ----------------------------------------------


@pytest.mark.parametrize(
    ("edit", "key"),
    [({"num_threads": 0}, "config error: num_threads=0"), ({"data.encoding": "morse"}, "morse")],
)
def test_predict_validates_the_whole_config(
    edit: dict, key: str, finished_run: Path, tmp_path: Path
) -> None:
    run = copy_with_config(finished_run, tmp_path / "run", edit)
    result = cli("-m", "parity_lab.predict", str(run), "0110")
    assert result.returncode == 1 and one_line(result.stderr)
    assert result.stderr.startswith(f"predict: {run / '.hydra' / 'config.yaml'}: ")
    assert key in result.stderr


# 14. analyze's arguments --------------------------------------------------------------------


@pytest.mark.parametrize("args", [["--strings", "0"], ["--max-clusters", "0"],
                                  ["--drift", "-5"], ["--length", "0"]])  # fmt: skip
def test_analyze_arguments_get_one_usage_line(
    args: list[str], finished_run: Path, tmp_path: Path, capsys
) -> None:
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    with pytest.raises(SystemExit) as caught:
        analyze.main([str(run), *args])
    err = capsys.readouterr().err
    assert caught.value.code == 2 and one_line(err)
    assert f"argument {args[0]}: {args[1]!r} is not an integer >= 1" in err
    assert not (run / "analysis").exists()


# 15-16. A full disk, and SIGTERM after training, on the command line -------------------------

TINY_CLI = [*TINY, "trainer.max_steps=5"]


def wrapped_run(run: Path, patch: str, *overrides: str) -> subprocess.CompletedProcess:
    """``python -m parity_lab`` with ``patch`` (Python) applied to parity_lab.train first."""
    code = (
        "import runpy, sys, parity_lab.train as t\n" + patch + "\n"
        "sys.argv = ['parity_lab', *sys.argv[1:]]\n"
        "runpy.run_module('parity_lab', run_name='__main__', alter_sys=True)\n"
    )
    return cli("-c", code, *TINY_CLI, *overrides, f"hydra.run.dir={run}")


def test_a_full_disk_gets_one_line_naming_the_file(tmp_path: Path) -> None:
    patch = (
        "import json, resource\n"
        "class J:\n"
        "    @staticmethod\n"
        "    def dumps(obj, **kw):\n"
        "        text = json.dumps(obj, **kw)\n"
        "        resource.setrlimit(resource.RLIMIT_FSIZE, (16, resource.RLIM_INFINITY))\n"
        "        return text\n"
        "t.json = J\n"
    )
    run = tmp_path / "run"
    result = wrapped_run(run, patch)
    assert result.returncode == 1 and one_line(result.stderr), result.stderr[-2000:]
    assert result.stderr.startswith(f"run stopped: {run / 'metrics.json'}: cannot be written (")
    assert not (run / "metrics.json").exists()


def test_sigterm_during_the_length_curve_says_what_was_kept(tmp_path: Path) -> None:
    patch = (
        "import os, signal, time\n"
        "def curve(*args):\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(5)\n"
        "t.length_curve = curve\n"
    )
    run = tmp_path / "run"
    result = wrapped_run(run, patch, "eval.curve.max_len=100")
    assert result.returncode == 128 + signal.SIGTERM, result.stderr[-2000:]
    assert "stopped by SIGTERM after training ended at step 5" in result.stderr
    assert f"python -m parity_lab resume={run}" in result.stderr
    assert (run / "checkpoints" / "last.ckpt").is_file() and not (run / "metrics.json").exists()
    resumed = cli("-m", "parity_lab", f"resume={run}")  # runs only the evaluation again
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads((run / "metrics.json").read_text())["global_step"] == 5


# 17. Result files follow the umask ----------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_result_files_follow_the_umask(umask: int, tmp_path: Path) -> None:
    previous = os.umask(umask)
    try:
        write_atomic(tmp_path / "metrics.json", "{}\n")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "metrics.json").stat().st_mode) == 0o666 & ~umask


# 18. Small ones -----------------------------------------------------------------------------


def test_a_non_ascii_name_gets_the_projects_line() -> None:
    result = cli("-m", "parity_lab", "name=é")
    assert result.returncode == 1 and one_line(result.stderr)
    assert result.stderr.startswith("config error: name='é' is invalid: expected 1 to 48 ")


def test_empty_eval_lengths_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"eval.lengths=\[\] is invalid: expected a non-empty"):
        validate(compose_config("eval.lengths=[]"))


def test_kernel_self_check_leaves_the_global_random_state_alone() -> None:
    """Seeded runs stay identical: the check draws from its own generator."""
    if native.load("lstm", 9) is None:
        pytest.skip("no C compiler")
    cell = ManualLSTM(1, 9)
    before = torch.get_rng_state()
    manual.kernel_difference(cell)
    assert torch.equal(torch.get_rng_state(), before)
