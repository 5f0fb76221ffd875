"""Every ``python -m parity_lab`` command of README.md and docs/*.md, as written, checked without
training: the main command's overrides compose and validate (every swept value of a sweep, a
stored sweep's own included), and a tool's arguments parse. A command the code no longer accepts
(a misspelt or removed key, an option gone, a flag renamed) fails here, naming file and line.

Placeholders (``RUN_DIR``, ``<job>``, ``seed=S``) stand for values of the reader's own; here they
get real ones. The commands run in a directory of the reader's own holding docs/cells.md's cell
(``my_cells.py``, ``my_conf/model/mgu.yaml``), and the docs' ``resume=`` commands find an
unfinished run where they point.
"""

from __future__ import annotations

import copy
import re
import shlex
from functools import cache
from pathlib import Path

import pytest
from hydra._internal.utils import get_args_parser
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from parity_lab import analyze, bench, certify, predict, report, run_files
from parity_lab.__main__ import RESUME, prepared, searchpath
from parity_lab.config import ConfigError, resume_config, validate
from parity_lab.naming import is_group, job_dir_name, run_dir_suffix
from parity_lab.tensorboard_log import metric_tags
from parity_lab.train import result_scalars
from tests.conftest import CONF, ROOT, compose_config
from tests.test_cells import EXAMPLE_CELL, EXAMPLE_YAML

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCED = re.compile(r"^```.*?^```", re.S | re.M)
INLINE = re.compile(r"(?<!`)`([^`]+)`(?!`)")
SHELL_OPERATORS = {"&&", "||", ";", "|", "<", ">", "done"}
RUN_DIR = "outputs/runs/2026-11-23/09-44-01.123456"
# What the docs write for a value of the reader's own, and what stands in for it here.
PLACEHOLDERS = {
    "<date_time>": "2026-11-23/10-00-00.000000",
    "<job>": "0_model=lstm,seed=0",
    "seed=S": "seed=0",
    "seed=$s": "seed=0",
    "seed={0,1}": "seed=0",
    "[--drift 1000000]": "--drift 1000000",
    " [RUN_DIR ...]": "",
}
WORDS = {
    "RUN_DIR": RUN_DIR,
    "SWEEP_DIR": "outputs/sweeps/a",
    "BASELINE_SWEEP": "outputs/sweeps/a",
    "MY_SWEEP": "outputs/sweeps/b",
    "BITS": "0110",
    "DIR": ".",
}
# Commands the docs show being refused (docs/performance.md times a refused start-up).
REFUSED = {"model.hidden_size=2.5"}
TOOLS = {
    "parity_lab.predict": predict.parse_args,
    "parity_lab.analyze": analyze.parse_args,
    "parity_lab.report": report.parse_args,
    "parity_lab.bench": bench.parse_args,
    "parity_lab.certify": lambda argv: certify.make_parser().parse_args(argv),
}


def doc_lines(text: str) -> list[tuple[int, str]]:
    """``(line number, text)`` of every command a reader may copy: each line of a fenced block
    (backslash continuations joined, numbered by their first line) and each inline code span."""
    lines: list[tuple[int, str]] = []
    for block in FENCED.finditer(text):
        first = text.count("\n", 0, block.start()) + 2
        pending: list[str] = []
        for number, line in enumerate(block[0].splitlines()[1:-1], first):
            pending.append(line.removesuffix("\\"))
            if not line.endswith("\\"):
                lines.append((number - len(pending) + 1, " ".join(pending)))
                pending = []
    outside = FENCED.sub(lambda block: "\n" * block[0].count("\n"), text)
    for span in INLINE.finditer(outside):
        if span[1].split()[3:]:  # not the bare name of a tool (`python -m parity_lab.analyze`)
            lines.append((outside.count("\n", 0, span.start()) + 1, " ".join(span[1].split())))
    return lines


def doc_commands() -> list[tuple[str, str, list[str]]]:
    """``(where, module, arguments)`` of every ``python -m parity_lab...`` in the docs, its
    placeholders filled; templates (``...``) left out."""
    commands = []
    for path in DOCS:
        for number, line in doc_lines(path.read_text()):
            if "python -m parity_lab" not in line:
                continue
            for placeholder, value in PLACEHOLDERS.items():
                line = line.replace(placeholder, value)
            for word, value in WORDS.items():
                line = re.sub(rf"\b{word}\b", value, line)
            lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|<>")
            lexer.whitespace_split, lexer.commenters = True, "#"
            tokens = list(lexer)
            for i in range(len(tokens) - 2):
                if tokens[i : i + 2] != ["python", "-m"] or not tokens[i + 2].startswith(
                    "parity_lab"
                ):
                    continue
                args = []
                for token in tokens[i + 3 :]:
                    if token in SHELL_OPERATORS:
                        break
                    args.append(token)
                if "..." not in args:
                    commands.append((f"{path.relative_to(ROOT)}:{number}", tokens[i + 2], args))
    return commands


COMMANDS = doc_commands()


def test_the_docs_commands_are_found() -> None:
    """The extraction itself: each kind of command the docs show is among those checked."""
    found = {(where.split(":")[0], module, shlex.join(args)) for where, module, args in COMMANDS}
    assert len(COMMANDS) > 80
    for expected in [
        ("README.md", "parity_lab", "-m model=rnn,lstm,gru model.hidden_size=4,8 seed=0,1"),
        ("README.md", "parity_lab", "sweep=rfr --cfg hydra -p hydra.sweeper"),
        ("docs/cells.md", "parity_lab", "'hydra.searchpath=[file://my_conf]' -m model=mgu,gru "
         "seed=0,1,2"),
        ("docs/cells.md", "parity_lab", f"'hydra.searchpath=[file://my_conf]' resume={RUN_DIR}"),
        ("docs/cells.md", "parity_lab.predict", f"{RUN_DIR} 0110 --trust my_cells"),
        ("README.md", "parity_lab.bench", "--models lstm lstm_manual lstm_manual_pytorch "
         "lstm_manual_autograd rnn rnn_manual gru gru_manual --max-len 20 50 200 --solve-seeds 0 "
         "--notebook-seeds 0 --no-breakdown --repeats 9 --steps 10"),  # continuations joined
        ("README.md", "parity_lab.predict", RUN_DIR),  # before '< bits.txt'
    ]:  # fmt: skip
        assert expected in found


@pytest.fixture
def user_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory of the reader's own, outside the repository: docs/cells.md's cell and yaml,
    nothing trusted yet."""
    (tmp_path / "my_cells.py").write_text(EXAMPLE_CELL)
    (tmp_path / "my_conf" / "model").mkdir(parents=True)
    (tmp_path / "my_conf" / "model" / "mgu.yaml").write_text(EXAMPLE_YAML)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(run_files, "_trusted_modules", set())
    monkeypatch.setattr(run_files, "_trusted_targets", {})
    monkeypatch.delenv(run_files.TRUST_ENV, raising=False)
    return tmp_path


@cache
def composed(overrides: tuple[str, ...]) -> DictConfig:
    """The config of one job (a relative ``hydra.searchpath`` read from the current directory,
    which holds the same files in every test)."""
    return compose_config(*overrides, hydra=True)


def swept_values(params: dict[str, str], overrides: list[str]) -> dict[str, list[str]]:
    """Each key's overrides in a sweep, one per value, as Hydra's basic sweeper merges them: the
    stored sweep's ``params`` first, a later override of a key replacing an earlier one."""
    lines = [*(f"{key}={value}" for key, value in params.items()), *overrides]
    values: dict[str, list[str]] = {}
    for override in OverridesParser.create().parse_overrides(lines):
        key = override.get_key_element()
        values[key] = (
            [f"{key}={value}" for value in override.sweep_string_iterator()]
            if override.is_sweep_override()
            else [override.input_line]
        )
    return values


def validate_sweep(values: dict[str, list[str]], searchpath: list[str]) -> None:
    """Every swept value checked, without composing a config per job: the job of each key's
    first value composed and validated; another choice of a group is a file of that group (in
    conf/ or a ``searchpath`` directory); any other value, set in the first job's config, is
    validated there (a seed, a size: nothing else changes)."""
    first = [choices[0] for choices in values.values()]
    cfg = composed(tuple(first))
    validate(cfg)
    folders = [CONF, *(Path(entry.removeprefix("file://")) for entry in searchpath)]
    for key, choices in values.items():
        for choice in choices[1:]:
            value = OverridesParser.create().parse_override(choice).value()
            if is_group(key):
                options = {path.stem for folder in folders for path in folder.glob(f"{key}/*.yaml")}
                assert value in options, f"{choice}: no {key}/{value}.yaml in {folders}"
                continue
            job = copy.deepcopy(cfg)
            OmegaConf.update(job, key, value, merge=False)
            validate(job)


def unfinished_run(run_dir: Path, overrides: list[str]) -> None:
    """An interrupted run of ``overrides`` in ``run_dir``: its config, no metrics.json."""
    (run_dir / ".hydra").mkdir(parents=True)
    OmegaConf.save(compose_config(*overrides), run_dir / ".hydra" / "config.yaml")


def check_names_show_choices(values: dict[str, list[str]], cfg: DictConfig, sweep: bool) -> None:
    """A run's directory name shows every group choice on its command line, a sweep job's every
    swept group choice (``model=gru``, or ``gru`` alone in a long name), whatever else they hold:
    checked on the first job and on each other value of one key at a time."""
    excluded = list(cfg.hydra.job.config.override_dirname.exclude_keys)
    task = {k: v for k, v in values.items() if not k.startswith(("hydra.", "hydra/"))}
    first = [choices[0] for choices in task.values()]
    jobs = [first]
    for i, choices in enumerate(task.values()):
        jobs += [[*first[:i], choice, *first[i + 1 :]] for choice in choices[1:]]
    groups = [
        key
        for key, choices in task.items()
        if is_group(key) and key not in excluded and (len(choices) > 1 or not sweep)
    ]
    if not groups or (cfg.name is not None and not sweep):
        return
    for num, job in enumerate(jobs):
        name = job_dir_name(num, job, excluded) if sweep else run_dir_suffix(None, job, excluded)
        parts = set(re.sub(r"^\d*_|-[0-9a-f]{6}$", "", name).split(","))  # no number, hash
        for line in job:
            key, value = line.split("=", 1)
            assert key not in groups or {value, line} & parts, f"{name!r} does not show {line}"


def check_main_command(args: list[str], cwd: Path) -> None:
    """What ``python -m parity_lab ARGS`` checks before its first step, every job's config
    validated as training validates it, and the names of its directories."""
    resumed = [RESUME.fullmatch(arg)[1] for arg in args if RESUME.fullmatch(arg)]
    if resumed:  # the run it continues: of the user's own cell where the searchpath adds one
        own = ["model=mgu"] if any("searchpath" in arg for arg in args) else []
        kept = [arg for arg in args if arg.startswith("hydra.")]
        unfinished_run(cwd / resumed[-1], [*kept, *own])
    argv = prepared(["parity_lab", *args])
    parsed = get_args_parser().parse_args(argv[1:])  # Hydra's own: SystemExit if it refuses
    if parsed.help or parsed.hydra_help:
        return
    if resumed:
        validate(resume_config(resumed[-1]))
        return
    values = swept_values({}, parsed.overrides)
    cfg = composed(tuple(choices[0] for choices in values.values()))
    sweep = parsed.multirun or cfg.hydra.mode == RunMode.MULTIRUN  # -m, or a stored sweep
    if sweep:
        params = cfg.hydra.sweeper.get("params")
        params = OmegaConf.to_container(params, resolve=False) if params else {}
        values = swept_values(params, parsed.overrides)
    validate_sweep(values, searchpath(argv))
    check_names_show_choices(values, cfg, sweep)


@pytest.mark.parametrize(
    ("where", "module", "args"), COMMANDS, ids=[f"{w}:{m}" for w, m, _ in COMMANDS]
)
def test_a_docs_command_is_accepted(
    where: str, module: str, args: list[str], user_dir: Path
) -> None:
    command = f"{where}: " + shlex.join(["python", "-m", module, *args])
    if REFUSED & set(args):
        with pytest.raises(ConfigError):
            check_main_command(args, user_dir)
        return
    try:
        if module == "parity_lab":
            check_main_command(args, user_dir)
        else:
            TOOLS[module](args)
    except SystemExit as exit:
        if exit.code:
            pytest.fail(f"{command} fails: exit {exit.code} (its message is above)")
    except Exception as error:
        pytest.fail(f"{command} fails: {type(error).__name__}: {error}")


def readme_tags(after: str) -> list[str]:
    """The code spans of the README's TensorBoard section from ``after`` to the sentence's end."""
    readme = (ROOT / "README.md").read_text()
    section = " ".join(readme.split("### TensorBoard", 1)[1].split("\n### ", 1)[0].split())
    return re.findall(r"`([^`]+)`", section.split(after, 1)[1].split(". ", 1)[0])


def test_the_readme_names_the_tensorboard_tags_the_runs_write() -> None:
    cfg = compose_config("eval.lengths=[50]")
    declared = [tag.replace("acc_len_50", "acc_len_<L>") for tag in metric_tags(cfg)]
    assert readme_tags("Every run declares the same metrics, the main results first:") == declared
    metrics = {"solved": True, "train_seconds": 1.0, "val/acc": 1.0, "solved_step": 50}
    metrics |= {"test/exact_until": 100, "test/acc_unseen": 1.0}  # with the length curve
    once = {tag.removeprefix("whole_run/") for tag in result_scalars(metrics, True)}
    assert set(readme_tags("then `whole_run/`, the values that exist once per run")) == once
