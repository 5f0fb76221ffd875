"""``python -m parity_lab [overrides]``: train one run, or a sweep with ``-m``."""

import contextlib
import logging
import math
import multiprocessing
import os
import re
import shlex
import signal
import sys
import tempfile
import threading
import traceback
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from parity_lab.config import ConfigError, literal, resume_config
from parity_lab.naming import CONFIG_DIR, directory_overrides
from parity_lab.run_files import (
    RunFileError,
    RunInUseError,
    hold_run_lock,
    read_metrics,
    release_run_lock,
    run_lock,
    trust,
    write_atomic,
)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float:
    """One run, or one job of a sweep (see ``run``)."""
    hydra_cfg = HydraConfig.get()
    pooled = hydra_cfg.mode == RunMode.MULTIRUN and "Joblib" in hydra_cfg.launcher._target_
    return run_in_child(cfg) if pooled and hasattr(os, "fork") else run(cfg)


def run_in_child(cfg: DictConfig) -> float:
    """A joblib job in a child of its worker: a job killed (say by the out-of-memory killer, whose
    victim is the process holding the memory: the child) costs only itself. A killed worker
    would break joblib's whole pool and stop the sweep before its summary."""
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    # fork: the child inherits Hydra's state; the worker has not imported torch (run does).
    child = multiprocessing.get_context("fork").Process(target=run_job, args=(cfg,))
    child.start()
    with sigterm_forwarded_to(child):
        child.join()
    if child.exitcode is not None and child.exitcode < 0:
        killer = signal.Signals(-child.exitcode).name
        print(
            f"job {hydra_cfg.job.num} was killed by {killer} (out of memory?): it stays "
            f"unfinished ({run_dir})",
            file=sys.stderr,
        )
    try:
        return float(read_metrics(run_dir / "metrics.json")["val/acc"])
    except (RunFileError, FileNotFoundError):
        return math.nan


def run_job(cfg: DictConfig) -> float:
    """``run`` in a job's forked child, with SIGTERM's default handler: the child inherits the
    sweep's (``SweepSummary``), which would make it summarise the sweep, and Lightning installs
    its own, the one that checkpoints the step a run stops at, only over the default."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    return run(cfg)


@contextlib.contextmanager
def sigterm_forwarded_to(child: multiprocessing.process.BaseProcess) -> Iterator[None]:
    """While the job's child runs: SIGTERM to this process (the sweep's own with ``n_jobs=1``,
    else joblib's worker) is passed on to the child, which checkpoints and ends, and only then
    handled here as before (the sweep's summary and exit 143, or the default). Else the
    process would end and leave its job training, or wait for it, to the last step."""
    if threading.current_thread() is not threading.main_thread():
        yield  # handlers belong to the main thread
        return
    previous = signal.getsignal(signal.SIGTERM)

    def forward(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, previous)
        if child.is_alive():
            child.terminate()  # SIGTERM
            child.join()
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:
            os.kill(os.getpid(), signal.SIGTERM)  # the default: end as SIGTERM would have

    signal.signal(signal.SIGTERM, forward)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def requeued(run_dir: Path) -> bool:
    """Whether this is SLURM's requeue of a job that stopped in ``run_dir`` (preempted, or at its
    time limit: hydra/launcher=slurm requeues through submitit) and left a checkpoint there."""
    restarts = os.environ.get("SLURM_RESTART_COUNT", "0")
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    return restarts.isdigit() and int(restarts) > 0 and checkpoint.is_file()


def run(cfg: DictConfig) -> float:
    """One run; in a sweep a failed job records ``error.txt`` in its directory and the sweep goes
    on, so one bad job never costs the others their results. On SIGTERM (preemption) the run keeps
    its checkpoint, prints the command that continues it and exits with 143, never 0."""
    from parity_lab.module import NonFiniteLossError  # heavy imports after Hydra parsed argv
    from parity_lab.train import Interrupted, train

    # Lightning 2.6 on torch >= 2.10 warns about its own use of a deprecated torch API.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    # Lightning's INFO banners (hardware, tips) print twice under Hydra's logging and say nothing
    # the run's own summary does not; warnings still show.
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)

    hydra_cfg = HydraConfig.get()
    # On resume, the run's own directory: Hydra re-reads its runtime.output_dir as a config string.
    run_dir = Path(cfg.resume if cfg.resume is not None else hydra_cfg.runtime.output_dir)
    in_sweep = hydra_cfg.mode == RunMode.MULTIRUN
    trust(searchpath=hydra_cfg.searchpath)  # this command's own (a requeued job's, too)
    if cfg.resume is None and requeued(run_dir):
        cfg.resume = literal(str(run_dir))  # its config: the one Hydra just composed again
    try:
        hold_run_lock(run_dir)  # one writer per run directory
    except RunInUseError as error:  # another process's run: write nothing into it
        if not in_sweep:
            sys.exit(str(error))
        print(f"job {hydra_cfg.job.num} not run: {error}", file=sys.stderr)
        return math.nan
    try:
        if cfg.resume is not None:
            cfg = resume_config(cfg.resume)
        return float(train(cfg, run_dir)["val/acc"])
    except Interrupted as error:
        job = f"job {hydra_cfg.job.num} " if in_sweep else ""
        command = f"python -m parity_lab resume={shlex.quote(str(error.run_dir))}"
        print(f"{job}{error}; to continue it:\n  {command}", file=sys.stderr)
        if in_sweep and not hydra_cfg.launcher._target_.endswith("BasicLauncher"):
            return math.nan  # in a launcher's worker: the sweep's own process reports
        if in_sweep:  # this process is the sweep: summarise before leaving
            from parity_lab.report import write_report

            write_report(hydra_cfg.sweep.dir)
        sys.exit(128 + signal.SIGTERM)  # 143, as if SIGTERM had ended the process
    except Exception as error:
        if isinstance(error, ConfigError) and not in_sweep:
            sys.exit(f"config error: {error}")
        if isinstance(error, RunFileError) and not in_sweep:
            sys.exit(str(error))
        note = ""
        try:
            write_atomic(run_dir / "error.txt", traceback.format_exc())
        except (OSError, RunFileError) as unwritten:  # the full disk may refuse this one too
            note = f"; error.txt not written either ({unwritten})"
        if isinstance(error, OSError) and not in_sweep:  # a full disk: the file and the error
            sys.exit(f"run stopped: {error}{note}")
        if note:
            print(note.removeprefix("; "), file=sys.stderr)
        if in_sweep:
            print(f"job {hydra_cfg.job.num} failed: {error} ({run_dir})", file=sys.stderr)
            return math.nan
        if isinstance(error, NonFiniteLossError):
            sys.exit(f"training stopped: {error}")
        raise
    finally:  # a sweep's next job in this process (basic launcher) needs no lock of this one
        release_run_lock(run_dir)


RESUME = re.compile(r"\+{0,2}resume=(.*)", re.DOTALL)


def hydra_quoted(text: str) -> str:
    """``text`` as a quoted value of Hydra's override grammar that reads back as exactly ``text``,
    whatever it holds (``=``, ``,``, spaces, brackets, quotes, ``${``, backslashes)."""
    text = literal(text)  # ${ would be read as an interpolation even inside quotes
    text = re.sub(r"(\\*)'", lambda m: m[1] * 2 + "\\'", text)  # a quote and its backslashes
    text = re.sub(r"(\\+)$", lambda m: m[1] * 2, text)  # backslashes before the closing quote
    return f"'{text}'"


def resume_in_place(argv: list[str]) -> list[str]:
    """For ``resume=RUN_DIR``, point Hydra at RUN_DIR itself and keep the run's own ``.hydra/``.

    RUN_DIR is taken as typed (a sweep job's directory name holds ``=`` and ``,``), quoted for
    Hydra's grammar. Checked before Hydra starts, since Hydra would create a missing directory.
    """
    resumes = [(i, m[1]) for i, arg in enumerate(argv) if i and (m := RESUME.fullmatch(arg))]
    if not resumes or resumes[-1][1] == "null" or {"-m", "--multirun"} & set(argv):
        return argv
    run_dir = resumes[-1][1]
    resume_config(run_dir)  # an unfinished run whose config builds only the project's classes
    with run_lock(run_dir):  # no other process writes it (else Hydra would log into it)
        pass
    others = [
        arg
        for i, arg in enumerate(argv[1:], 1)
        if i not in dict(resumes) and not arg.startswith(("-", "hydra.", "hydra/"))
    ]
    if others:
        raise ConfigError(
            f"resume={run_dir!r} continues the run with its own config "
            f"({run_dir}/.hydra/config.yaml): drop the overrides {others}"
        )
    flags = [arg for i, arg in enumerate(argv[1:], 1) if i not in dict(resumes)]
    value = hydra_quoted(run_dir)
    argv = [
        argv[0],
        *flags,
        f"resume={value}",
        f"hydra.run.dir={value}",
        "hydra.output_subdir=null",
    ]
    if "${" in run_dir:  # Hydra stores the log's directory unescaped, then reads it as a config
        log = hydra_quoted(str(Path(run_dir) / "__main__.log"))
        argv.append(f"hydra.job_logging.handlers.file.filename={log}")
    return argv


def overrides_first(argv: list[str]) -> list[str]:
    """``argv`` with every override before Hydra's options, in their own orders. Hydra's argparse
    reads the overrides as one run of positional arguments, so ``A -m B`` would refuse ``B``;
    options and their values (``--cfg hydra``, ``-p KEY``, ``--info [WHAT]``) keep together."""
    from hydra._internal.utils import get_args_parser

    takes_value: dict[str, Any] = {}  # option -> its choices (None: any value), "?" optional
    for action in get_args_parser()._actions:
        if action.option_strings and action.nargs != 0:
            for option in action.option_strings:
                takes_value[option] = (action.nargs, action.choices)
    overrides, options = [], []
    args = iter(argv[1:])
    for arg in args:
        if not arg.startswith("-"):
            overrides.append(arg)
            continue
        options.append(arg)
        if arg in takes_value:
            nargs, choices = takes_value[arg]
            following = next(args, None)
            if following is None:
                continue
            if nargs == "?" and following not in (choices or ()):
                overrides.append(following)  # --info without a value, then an override
            else:
                options.append(following)
    return [argv[0], *overrides, *options]


def searchpath(argv: list[str]) -> list[str]:
    """The entries of the ``hydra.searchpath=[...]`` overrides in ``argv`` (as Hydra parses them);
    an override Hydra cannot parse is left for Hydra to report."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    entries: list[str] = []
    for arg in argv[1:]:
        if arg.lstrip("+").startswith("hydra.searchpath="):
            try:
                value = OverridesParser.create().parse_override(arg.lstrip("+")).value()
            except Exception:
                continue
            entries += [str(v) for v in value] if isinstance(value, list) else [str(value)]
    return entries


OUTPUT_DIR = re.compile(r"\+{0,2}(hydra\.(?:run|sweep)\.dir)=(.*)", re.DOTALL)


GROUP_CHOICE = re.compile(r"(\w+)=([\w.,-]*)")  # model=gru, model=rnn,lstm (a sweep)


def check_group_choices(argv: list[str]) -> None:
    """``ConfigError`` in one line for an option that is not in its ``conf/<group>/`` folder
    (Hydra's own message lists every search path). Skipped when ``hydra.searchpath`` adds the
    user's own config folders, whose options only Hydra knows."""
    if any(arg.lstrip("+").startswith("hydra.searchpath") for arg in argv[1:]):
        return
    for arg in argv[1:]:
        if not (match := GROUP_CHOICE.fullmatch(arg)) or not (CONFIG_DIR / match[1]).is_dir():
            continue
        options = sorted(path.stem for path in (CONFIG_DIR / match[1]).glob("*.yaml"))
        for choice in match[2].split(","):
            if choice not in options and choice != "null":
                raise ConfigError(f"{match[1]}={choice!r} is invalid: allowed values are {options}")


RUN_FILES = (".hydra", "metrics.json", "checkpoints", "error.txt")  # what a run leaves


def check_not_a_run(directory: Path, key: str) -> None:
    """``ConfigError`` when ``directory`` already holds a run: a new run would replace its
    results, and the old TensorBoard events and analysis would disagree with its config."""
    found = [name for name in RUN_FILES if (directory / name).exists()]
    if found and not requeued(directory):  # SLURM's requeue continues its own run
        raise ConfigError(
            f"{key}={str(directory)!r} is invalid: it already holds a run ({', '.join(found)}); "
            f"choose a new directory, or continue an unfinished run with "
            f"python -m parity_lab resume={shlex.quote(str(directory))}"
        )


def check_output_dirs(argv: list[str]) -> None:
    """``ConfigError`` when the directory a run or sweep would be written in cannot be written:
    checked on its nearest existing ancestor before Hydra starts, since Hydra creates it first."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    key = "hydra.sweep.dir" if {"-m", "--multirun"} & set(argv) else "hydra.run.dir"
    directory = "outputs"  # conf/config.yaml: outputs/runs/..., outputs/sweeps/...
    for arg in argv[1:]:
        if (match := OUTPUT_DIR.fullmatch(arg)) and match[1] == key:
            try:
                value = OverridesParser.create().parse_override(arg.lstrip("+")).value()
            except Exception:
                return  # Hydra reports a value it cannot parse
            directory = str(value).split("${", 1)[0]  # the part fixed before any ${now:...}
            resuming = any(RESUME.fullmatch(other) for other in argv[1:])
            if key == "hydra.run.dir" and "${" not in str(value) and not resuming:
                check_not_a_run(Path(directory), key)
    existing = Path(directory).absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise ConfigError(
            f"{key}={directory!r} is invalid: {existing} cannot be written ({error.strerror})"
        ) from None


def prepared(argv: list[str]) -> list[str]:
    """``argv`` checked and completed as Hydra gets it: overrides first, the user's searchpath
    trusted, group choices, ``resume=`` and output directories checked, sweep job names' excluded
    keys added. ``ConfigError`` (or ``RunFileError``) for what cannot work."""
    argv = overrides_first(argv)
    trust(searchpath=searchpath(argv))
    check_group_choices(argv)
    argv = directory_overrides(resume_in_place(argv))
    check_output_dirs(argv)
    return argv


if __name__ == "__main__":
    try:
        sys.argv = prepared(sys.argv)
    except ConfigError as error:
        sys.exit(f"config error: {error}")
    except RunFileError as error:  # a run directory another process is writing
        sys.exit(str(error))
    main()
